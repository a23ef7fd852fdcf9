"""planer run: every stage into one run directory, resumable, with a report."""

import copy
import json
import subprocess
import sys

import pytest
from conftest import ROOT, TINY_RUN

from planer.io.checkpoint import load_checkpoint
from planer.models.arch import Arch
from planer.pipeline import Plan, run_pipeline
from planer.training.inherit import can_inherit


@pytest.mark.slow
def test_run_pipeline_end_to_end_and_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*TINY_RUN)
    cfg.search.space = ["skip", "attn:1", "attn:4", "ffl", "moe:top1"]
    out = run_pipeline(cfg, tmp_path / "run", Plan(targets=(0.5,), batches=(1, 2))).path
    for path in [
        "config.yaml",
        "lut.json",
        "baseline/model.safetensors",
        "baseline/eval.json",
        "search-t0.50/arch.json",
        "search-t0.50/search.jsonl",
        "planer-t0.50/model.safetensors",
        "planer-t0.50/bench.json",
        "report.md",
    ]:
        assert (out / path).exists(), path
    scored = json.loads((out / "planer-t0.50" / "eval.json").read_text())
    assert {"valid", "test"} <= scored.keys()
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| planer-t0.50 |" in report and "speed-up b2" in report

    for figure in ["archs.png", "speedup.png", "pareto.png", "latency_estimate.png", "search-t0.50.png"]:
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in report
    stamps = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix not in (".md", ".png")}
    run_pipeline(cfg, tmp_path / "run", Plan(targets=(0.5,), batches=(1, 2)))  # every stage done: only the report
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


@pytest.mark.slow
def test_run_with_every_design_and_seeds(tiny_cfg, tmp_path):
    """The sweep with Sandwich, PAR, the iso-parameter space and two seeds: every model, figure and table row."""
    cfg = tiny_cfg(
        *TINY_RUN,
        "train.steps=20",
        "train.eval_every=20",
        "search.epochs=2",
        "search.steps_per_epoch=4",
        "search.freeze_fraction=0.0",
    )
    cfg.search.space = ["skip", "attn:1", "attn:4", "ffl", "moe:top1", "moe:top2"]
    cfg.model.n_layer = 3
    plan = Plan(targets=(0.5, 0.8), designs=("sandwich", "par", "iso"), seeds=2, batches=(1,))
    out = run_pipeline(cfg, tmp_path / "run", plan).path
    models = [
        "baseline",
        "planer-t0.50",
        "planer-t0.80",
        "planer-t0.50-s2",
        "planer-t0.80-s2",
        "iso-t0.50",
        "iso-t0.80",
        "iso-t0.50-s2",
        "iso-t0.80-s2",
        "sandwich-k1",
        "sandwich-k2",
        "par",
    ]
    report = (out / "report.md").read_text()
    table = [line for line in report.splitlines() if line.startswith("| ") and "`" in line]
    assert sorted(line.split(" | ")[0][2:].removesuffix(" (chosen K)") for line in table) == sorted(models)
    for name in models[1:]:
        assert json.loads((out / name / "bench.json").read_text())["batches"][0]["batch"] == 1
    iso = json.loads((out / "search-iso-t0.50" / "arch.json").read_text())
    assert iso["space"] == ["skip", "attn:1", "attn:4", "ffl", "ffl:x8"]
    assert json.loads((out / "search-t0.50-s2" / "arch.json").read_text())["target"] == 0.5
    assert json.loads((out / "planer-t0.50-s2" / "config.json").read_text())["config"]["train"]["seed"] == 1112
    assert (out / "par" / "summary.json").exists() and "| planer | 0.50 | 2 |" in report
    sweep = json.loads((out / "sandwich.json").read_text())
    assert set(sweep["valid_loss"]) == {"sandwich-k1", "sandwich-k2"} and f"{sweep['chosen']} (chosen K)" in report
    for figure in [
        "archs.png",
        "speedup.png",
        "pareto.png",
        "latency_estimate.png",
        "blocks.png",
        "search-t0.50.png",
        "search-iso-t0.80-s2.png",
    ]:
        assert (out / figure).stat().st_size > 1000 and f"]({figure})" in report


@pytest.mark.slow
def test_run_rejects_unknown_design(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "planer",
            "run",
            "--config",
            "configs/shakespeare-char.yaml",
            "--out",
            tmp_path / "run",
            "--designs",
            "sandwich,transformer",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert result.returncode == 2 and "unknown design 'transformer'" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_run_refuses_another_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*TINY_RUN)
    (tmp_path / "run").mkdir()
    other = tiny_cfg(*TINY_RUN, "model.d_model=64")
    other.save(tmp_path / "run" / "config.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "planer", "report", "--run", tmp_path / "run"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "holds no trained planer model" in result.stderr
    try:
        run_pipeline(cfg, tmp_path / "run", Plan())
    except Exception as e:
        assert "different config" in str(e)
    else:
        raise AssertionError("a run directory made with another config was reused")


@pytest.mark.slow
def test_run_with_knapsack_rivals_and_the_phase2_recipe(tiny_cfg, tmp_path):
    """The knapsack search, the dense rivals of the found model sized to its latency, every phase-2 model distilled
    from the baseline and inherited from it where the arch allows, manifests, and a report that names the best."""
    cfg = tiny_cfg(*TINY_RUN, "search.method=knapsack", "phase2.init=baseline", "train.steps=30", "train.eval_every=30",
                   "search.limits={1: 0.6}")  # fmt: skip
    cfg.search.space = ["skip", "attn:1", "attn:2", "attn:4", "ffl"]
    run_pipeline(cfg, tmp_path / "run", Plan(targets=(0.6,), designs=("dense-depth",), batches=(2,)))
    assert json.loads((tmp_path / "run" / "lut-b1.json").read_text())["fingerprint"]["batch"] == 1
    depth = json.loads((tmp_path / "run" / "planer-t0.60" / "rivals.json").read_text())
    assert [r["name"] for r in depth] == ["dense-depth"]
    # resumed with every rival and a second seed: the first seed's found model gets the rivals it lacked
    out = run_pipeline(cfg, tmp_path / "run", Plan(targets=(0.6,), designs=("dense",), seeds=2, batches=(2,))).path
    rivals = {
        json.loads((out / n / "run.json").read_text())["rival"] for n in ("dense-depth-t0.60", "dense-heads-t0.60")
    }
    assert rivals == {"dense-depth", "dense-heads"} and (out / "dense-width-t0.60-s2" / "summary.json").exists()
    for name in ("planer-t0.60", "dense-depth-t0.60", "dense-heads-t0.60-s2"):
        manifest = json.loads((out / name / "run.json").read_text())
        assert manifest["recipe"] == {"teacher": str(out / "baseline"), "init_from": str(out / "baseline")}
    width = json.loads((out / "dense-width-t0.60" / "run.json").read_text())
    assert width["recipe"]["init_from"] is None and width["recipe"]["teacher"] == str(out / "baseline")
    sized = json.loads((out / "planer-t0.60" / "rivals.json").read_text())
    assert [r["name"] for r in sized] == ["dense-depth", "dense-heads", "dense-width"] and sized[0] == depth[0]
    found = json.loads((out / "search-t0.60" / "arch.json").read_text())
    assert found["method"] == "knapsack" and json.loads((out / "planer-t0.60" / "run.json").read_text())["search"]
    (limit,) = found["limits"]  # the limit at batch 1, from the table profiled there
    assert limit["batch"] == 1 and limit["meets_target"] and limit["estimated_ratio"] <= 0.6
    report = (out / "report.md").read_text()
    assert (
        "**Target 0.60**" in report
        and "within 0.6 of the baseline's at batch 1 (search.limits" in report
        and "Against the rivals (latency at batch 2)" in report
        and "| dense-width-t0.60 |" in report
    )


@pytest.mark.slow
def test_two_search_methods_against_the_same_rivals(tiny_cfg, tmp_path):
    """``--method knapsack,gumbel``: both searches from one baseline, each found model trained with the same recipe
    and seed, the rivals sized to the first method's model only, and a report that compares the methods."""
    cfg = tiny_cfg(*TINY_RUN, "search.method=knapsack", "train.steps=30", "train.eval_every=30")
    cfg.search.space = ["skip", "attn:1", "attn:2", "attn:4", "ffl"]
    plan = Plan(targets=(0.6,), designs=("dense-depth",), methods=("gumbel",), batches=(2,))
    out = run_pipeline(cfg, tmp_path / "run", plan).path
    knapsack = json.loads((out / "planer-t0.60" / "run.json").read_text())
    gumbel = json.loads((out / "planer-gumbel-t0.60" / "run.json").read_text())
    assert (knapsack["method"], gumbel["method"], gumbel["design"]) == ("knapsack", "gumbel", "planer-gumbel")
    assert gumbel["recipe"]["teacher"] == knapsack["recipe"]["teacher"] and gumbel["seed"] == knapsack["seed"]
    # the baseline's weights where the gumbel pick can take them, else the options its supernet trained
    baseline = load_checkpoint(out / "baseline")[0]
    inheritable = can_inherit(baseline, Arch.parse(" ".join(gumbel["arch"])))
    start = out / ("baseline" if inheritable else "search-gumbel-t0.60")
    assert gumbel["recipe"]["init_from"] == str(start) and knapsack["recipe"]["init_from"] == str(out / "baseline")
    assert json.loads((out / "search-gumbel-t0.60" / "arch.json").read_text())["method"] == "gumbel"
    assert (out / "planer-t0.60" / "rivals.json").exists() and not (
        out / "planer-gumbel-t0.60" / "rivals.json"
    ).exists()
    assert sorted(p.name for p in out.glob("dense-*")) == ["dense-depth-t0.60"]
    report = (out / "report.md").read_text()
    gumbel_verdict = report.split("**Target 0.60, gumbel search**")[1]
    assert "**Target 0.60, knapsack search**" in report and "dense-depth" in gumbel_verdict.split("\n")[0]
    assert "**Search methods at target 0.60**" in report and "| planer-gumbel-t0.60 |" in report


@pytest.mark.slow
def test_a_second_target_reuses_the_measured_option_losses_and_the_config_is_left_alone(
    tiny_cfg, tmp_path, monkeypatch
):
    """The knapsack's option losses depend on the baseline, the space and the sample alone: a run with two targets
    measures them once (kept in the run directory) and solves twice; the caller's config is not changed."""
    from planer.search import knapsack

    measured = []
    real = knapsack.option_increases
    monkeypatch.setattr(knapsack, "option_increases", lambda *a, **k: measured.append(1) or real(*a, **k))
    cfg = tiny_cfg(*TINY_RUN, "search.method=knapsack", "train.steps=20", "train.eval_every=20",
                   "search.space=[skip, attn:1, attn:4, ffl]")  # fmt: skip
    given = copy.deepcopy(cfg)
    result = run_pipeline(cfg, tmp_path / "run", Plan(targets=(0.6, 0.8), batches=(2,)))
    assert cfg == given and cfg.model.vocab_size == 0
    assert len(measured) == 1 and len(json.loads((result.path / "option-losses.json").read_text())) == 1
    found = [json.loads((result.path / f"search-t{t}" / "arch.json").read_text()) for t in ("0.60", "0.80")]
    assert found[0]["positions"][0]["increase"] == found[1]["positions"][0]["increase"]
    assert found[0]["target"] == 0.6 and found[1]["target"] == 0.8
    assert ("search planer-t0.80 (knapsack)", "ran") in result.stages
    again = run_pipeline(cfg, tmp_path / "run", Plan(targets=(0.6, 0.8), batches=(2,)))
    assert len(measured) == 1 and all(status == "done before, skipped" for _, status in again.stages)
