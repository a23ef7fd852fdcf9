"""The report of a run: absolute latencies, wall times, text samples, how sure the search was, where the found model
is and how to use it; the figures' titles; ``planer evaluate`` on a run folder.

One tiny run (a baseline, a Gumbel search and its retrained model, and a knapsack search beside them) is built once
and shared by every test here.
"""

import dataclasses
import json
import math
import shlex
import shutil

import pytest
from conftest import ROOT, TINY_RUN, tiny_overrides

from planer.cli import main
from planer.config import load_config
from planer.errors import PlanerError
from planer.pipeline import Plan, run_pipeline
from planer.report import plots, samples
from planer.report.details import duration
from planer.report.markdown import write_report
from planer.report.rows import collect
from planer.search.methods import run_search
from planer.training.loop import RunOptions


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("report")
    text = tmp / "tiny.txt"
    text.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:60000])
    cfg = load_config(None, tiny_overrides(*TINY_RUN, text=text))
    cfg.search.space = ["skip", "attn:1", "attn:4", "ffl", "moe:top1"]
    out = run_pipeline(cfg, tmp / "run", Plan(targets=(0.5,), batches=(1, 2))).path
    run_search(
        "knapsack", cfg, out / "search-knapsack", 0.8, out / "lut.json", out / "baseline", RunOptions(quiet=True)
    )
    write_report(out)
    return out


def report_lines(run) -> list[str]:
    return (run / "report.md").read_text().splitlines()


def table_after(lines: list[str], header_start: str) -> dict[str, list[str]]:
    """The Markdown table whose header row starts with ``header_start``, as {first cell: other cells}."""
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0]] = cells[1:]
    return rows


def bench(run, name: str) -> dict:
    return json.loads((run / name / "bench.json").read_text())


@pytest.mark.slow
def test_report_gives_every_models_milliseconds_beside_the_ratios(tiny_run):
    lines = report_lines(tiny_run)
    table = table_after(lines, "| model | ms b1 | ms b2 | tok/s b1 | tok/s b2 |")
    result = bench(tiny_run, "planer-t0.50")
    found, tokens = result["batches"], result["tokens_per_call"]  # a segment's tokens at the default workload
    ms = [row["model"]["median"] for row in found]
    speed = [f"{1000 * row['batch'] * tokens / m:.0f}" for row, m in zip(found, ms)]
    assert table["planer-t0.50"] == [f"{m:.2f}" for m in ms] + speed
    assert table["baseline"][:2] == [f"{row['baseline']['median']:.2f}" for row in found]  # timed beside it, once
    assert any("the median of the forward of one segment with full memory" in line for line in lines)
    assert any("speed-up b1" in line for line in lines)


@pytest.mark.slow
def test_report_gives_the_wall_time_of_every_stage(tiny_run):
    table = table_after(report_lines(tiny_run), "| stage | wall time |")
    for name in ("baseline", "planer-t0.50"):
        seconds = json.loads((tiny_run / name / "summary.json").read_text())["seconds"]
        assert table[f"train {name}"][0] == duration(seconds) and "ms a step" in table[f"train {name}"][1]
    for search, method in (("search-t0.50", "gumbel"), ("search-knapsack", "knapsack")):
        seconds = json.loads((tiny_run / search / "arch.json").read_text())["seconds"]
        assert seconds > 0 and table[f"search {search}"] == [duration(seconds), method]
    lut = json.loads((tiny_run / "lut.json").read_text())
    assert table["profile blocks (lut.json)"][0] == duration(lut["settings"]["seconds"]) and "total" in table


@pytest.mark.slow
def test_every_model_has_one_seeded_sample_that_planer_generate_repeats(tiny_run, monkeypatch, capsys):
    written = {name: (tiny_run / name / "sample.json").read_text() for name in ("baseline", "planer-t0.50")}
    report = (tiny_run / "report.md").read_text()
    for name, text in written.items():
        sample = json.loads(text)
        assert sample["tokens"] == 80 and sample["text"].startswith(sample["prompt"])
        assert sample["text"] in report.replace(f"**{name}**:", "")
        capsys.readouterr()
        argv = ["generate", "--run", str(tiny_run / name), "--prompt", sample["prompt"], "--tokens", "80"]
        assert main([*argv, "--seed", str(sample["seed"])]) == 0
        assert capsys.readouterr().out == sample["text"] + "\n"
    prompt = json.loads(written["baseline"])["prompt"]
    assert prompt in (ROOT / "data" / "tinyshakespeare.txt").read_text()[54000:57000]  # from the valid split

    def no_sampling(*args, **kwargs):
        raise AssertionError("the report sampled again")

    monkeypatch.setattr(samples, "generate", no_sampling)
    write_report(tiny_run)
    assert {name: (tiny_run / name / "sample.json").read_text() for name in written} == written
    assert (tiny_run / "report.md").read_text() == report


@pytest.mark.slow
def test_a_model_trained_again_is_sampled_again(tiny_run, tmp_path):
    copy = shutil.copytree(tiny_run / "baseline", tmp_path / "baseline")
    sample = json.loads((copy / "sample.json").read_text())
    (copy / "sample.json").write_text(json.dumps({**sample, "weights_sha256": "other weights"}))
    again = samples.model_sample(copy, lambda: sample["prompt"])
    assert again == sample and json.loads((copy / "sample.json").read_text()) == sample


@pytest.mark.slow
def test_a_model_without_weights_has_no_sample_and_the_report_says_why(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    for name in ("model.safetensors", "sample.json"):
        (run / "planer-t0.50" / name).unlink()
    report = write_report(run).read_text()
    baseline = json.loads((run / "baseline" / "sample.json").read_text())["text"]
    assert baseline in report and f"No text sample of planer-t0.50: {run / 'planer-t0.50'} has no" in report


@pytest.mark.slow
def test_report_gives_the_final_probability_of_each_chosen_option(tiny_run):
    lines = report_lines(tiny_run)
    records = (tiny_run / "search-t0.50" / "search.jsonl").read_text().splitlines()
    found = json.loads((tiny_run / "search-t0.50" / "arch.json").read_text())
    shown = []
    for alpha, spec in zip(json.loads(records[-1])["alpha"], found["arch"]):
        weights = [math.exp(a) for a in alpha]
        shown.append(f"{weights[found['space'].index(spec)] / sum(weights):.2f}")
    line = next(line for line in lines if line.startswith("- `search-t0.50` (Gumbel-softmax)"))
    listed = line.split("block by block: ")[1].split(";")[0].split(", ")
    assert [item.split(" ")[1] for item in listed] == shown
    knapsack = json.loads((tiny_run / "search-knapsack" / "arch.json").read_text())
    line = next(line for line in lines if line.startswith("- `search-knapsack` (knapsack)"))
    assert "an exact pick" in line and "probabilit" in line
    for p in knapsack["positions"]:
        assert f"{p['increase'][p['options'].index(p['chosen'])]:+.3f}" in line


@pytest.mark.slow
def test_report_opens_with_the_verdict_and_the_found_models_path_and_commands(tiny_run):
    lines = report_lines(tiny_run)
    verdict = next(i for i, line in enumerate(lines) if line.startswith("**Target 0.50**"))
    table = next(i for i, line in enumerate(lines) if line.startswith("| model | arch |"))
    details = next(i for i, line in enumerate(lines) if line.startswith("| model | ms b1"))
    assert verdict < table < details
    path = tiny_run / "planer-t0.50"
    usage = lines[verdict + 2]
    prompt = json.loads((path / "sample.json").read_text())["prompt"]
    assert f"`planer generate --run {path} --prompt {shlex.quote(prompt)}`" in usage
    assert f"`planer export --run {path} --onnx model.onnx`" in usage


@pytest.mark.slow
def test_pareto_title_names_sandwich_k_only_when_a_sandwich_model_ran(tiny_run, tmp_path, monkeypatch):
    titles = []
    close = plots.plt.close
    monkeypatch.setattr(plots.plt, "close", lambda fig: (titles.append(fig.axes[0].get_title()), close(fig)))
    rows = collect(tiny_run)
    plots.pareto(rows, 1, "BPC", tmp_path / "pareto.png")
    sandwich = dataclasses.replace(rows[-1], name="sandwich-k1", design="sandwich", target=None)
    plots.pareto([*rows, sandwich], 1, "BPC", tmp_path / "pareto.png")
    assert "Sandwich" not in titles[0] and "Sandwich K" in titles[1]


@pytest.mark.slow
def test_evaluate_on_a_run_folder_names_the_models_inside(tiny_run, capsys):
    capsys.readouterr()
    assert main(["evaluate", "--run", str(tiny_run)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1 and "is a run folder, not a checkpoint" in err
    assert "baseline, planer-t0.50" in err and f"--run {tiny_run / 'baseline'}" in err


@pytest.mark.slow
def test_llama_cpp_timings_show_beside_pytorchs_speed_up(tiny_run, tmp_path):
    run = shutil.copytree(tiny_run, tmp_path / "run")
    timing = {"file": "x.gguf", "bytes": 2e6, "prefill_ms": 1.0, "decode_ms": 2.0, "prefill_speedup": 1.5}
    record = {"runtime": "llama.cpp (llama-cpp-python 0.3.36)", "threads": 2, "prompt": 16, "decode": 8, "rounds": 3,
              "baseline": "baseline", "models": {"planer-t0.50": {**timing, "decode_speedup": 1.75},
                                                 "baseline": {**timing, "decode_speedup": 1.0}}}  # fmt: skip
    (run / "llamacpp.json").write_text(json.dumps(record))
    rows = table_after(write_report(run).read_text().splitlines(), "| model | file | MB |")
    torch_up = next(b["speedup"] for b in bench(run, "planer-t0.50")["batches"] if b["batch"] == 1)
    assert rows["planer-t0.50"][-2:] == ["1.75x", f"{torch_up:.2f}x"] and rows["baseline"][-1] == "–"
    (run / "llamacpp.json").write_text(json.dumps({**record, "models": {"planer-t0.50": {}}}))
    with pytest.raises(PlanerError, match="llamacpp.json is damaged"):
        write_report(run)
