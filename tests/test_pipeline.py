"""planer run: every stage into one run directory, resumable, with a report."""

import json
import subprocess
import sys

from conftest import ROOT

from planer.pipeline import run_pipeline

TINY_RUN = [
    "search.epochs=3",
    "search.steps_per_epoch=8",
    "search.freeze_fraction=0.3",
    "train.steps=40",
    "train.eval_every=40",
    "latency.batch_size=2",
    "latency.repeats=3",
    "model.n_layer=2",
]


def test_run_pipeline_end_to_end_and_resume(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*TINY_RUN)
    cfg.search.space = ["skip", "attn:1", "attn:4", "ffl", "moe:top1"]
    out = run_pipeline(cfg, tmp_path / "run", [0.5], batches=(1, 2))
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
    run_pipeline(cfg, tmp_path / "run", [0.5], batches=(1, 2))  # every stage is done: only the report is redone
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items())


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
    out = run_pipeline(cfg, tmp_path / "run", [0.5, 0.8], designs=["sandwich", "par", "iso"], seeds=2, batches=(1,))
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


def test_run_refuses_another_config(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*TINY_RUN)
    (tmp_path / "run").mkdir()
    other = tiny_cfg(*TINY_RUN, "model.d_model=64")
    other.save(tmp_path / "run" / "config.yaml")
    result = subprocess.run(
        [sys.executable, "-m", "planer", "report", "--run", tmp_path / "run"], capture_output=True, text=True
    )
    assert result.returncode == 2 and "no finished baseline" in result.stderr
    try:
        run_pipeline(cfg, tmp_path / "run", [0.5])
    except Exception as e:
        assert "different config" in str(e)
    else:
        raise AssertionError("a run directory made with another config was reused")
