"""Folders an earlier planer wrote still read: a ``planer run`` folder of planer 0.1.0, written before its modules
moved into folders (tests/data/run-v0.1, its README says how it was made), reported on, its models loaded and
scored, its latency table searched with and its found architecture trained, all by the current code.

The folder holds what a user's would, its configs included, so they name the corpus at the absolute path it was
made at; commands that read the corpus are given the same text with ``--set data.path``.
"""

import dataclasses
import json
import shutil

import pytest
from conftest import ROOT

from planer import load
from planer.cli import main
from planer.config import config_from_dict
from planer.io.checkpoint import load_meta
from planer.io.data import load_corpus
from planer.latency import table
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.models.backbone import backbone

OLD = ROOT / "tests" / "data" / "run-v0.1"
MODELS = ("baseline", "planer-t0.60", "dense-depth-t0.60")
FOUND = "search-t0.60"


@pytest.fixture
def old_run(tmp_path):
    """A copy of the old run folder (commands write into it), and the corpus it was made from."""
    shutil.copytree(OLD / "run", tmp_path / "run")
    text = tmp_path / "tiny.txt"
    text.write_text((ROOT / "data" / "tinyshakespeare.txt").read_text()[:30000])
    return tmp_path / "run", text


def test_the_old_run_is_reported_on(old_run):
    run, _ = old_run
    (run / "report.md").unlink()
    assert main(["report", "--run", str(run)]) == 0
    report = (run / "report.md").read_text()
    for name in MODELS:
        arch = Arch.parse(" ".join(json.loads((run / name / "config.json").read_text())["arch"]))
        assert f"| {name} | `{arch.short()}` |" in report, name
    assert "**Target 0.60**: the found model" in report and "Against the rivals" in report


@pytest.mark.parametrize("name", MODELS)
def test_old_models_load_and_score_what_they_scored(old_run, name):
    run, text = old_run
    model, vocab = load(run / name)
    meta = load_meta(run / name)
    assert model.arch == Arch.parse(" ".join(meta["arch"]))
    cfg = config_from_dict(meta["config"])
    corpus = load_corpus(dataclasses.replace(cfg.data, path=str(text)), vocab)
    saved = json.loads((run / name / "eval.json").read_text())
    for split in ("valid", "test"):
        scored = backbone(cfg.model).scorer(model, cfg, 0)(corpus.split(split))
        assert scored["tokens"] == saved[split]["tokens"]
        assert scored["loss"] == pytest.approx(saved[split]["loss"], rel=1e-5)


def test_the_old_latency_table_searches_again(old_run, tmp_path, monkeypatch):
    """``planer search --lut`` on the old table, from the old baseline: the table's own latencies are used."""
    run, text = old_run
    old = LatencyTable.load(run / "lut.json")
    before = json.loads((run / FOUND / "arch.json").read_text())
    assert old.estimate(Arch.load(run / FOUND / "arch.json")) == pytest.approx(before["estimated_ms"])
    # A table holds for the machine it was measured on (its fingerprint names the device and torch): be that one.
    measured_on = {key: old.fingerprint[key] for key in ("device", "torch", "dtype", "threads")}
    monkeypatch.setattr(table, "environment", lambda lc: measured_on)
    out = tmp_path / "search"
    argv = ["search", "--config", run / "config.yaml", "--set", f"data.path={text}", "--out", out, "--target", "0.6",
            "--method", "knapsack", "--lut", run / "lut.json", "--init-from", run / "baseline"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    again = json.loads((out / "arch.json").read_text())
    assert again["meets_target"] and again["baseline_ms"] == pytest.approx(before["baseline_ms"])
    assert again["estimated_ms"] == pytest.approx(old.estimate(Arch.parse(" ".join(again["arch"]))))
    assert [p["latency_ms"] for p in again["positions"]] == [p["latency_ms"] for p in before["positions"]]


def test_the_old_found_architecture_trains(old_run, tmp_path):
    run, text = old_run
    out = tmp_path / "train"
    argv = ["train", "--config", run / "config.yaml", "--set", f"data.path={text}", "--set", "train.steps=4",
            "--set", "train.eval_every=4", "--out", out, "--arch", run / FOUND / "arch.json"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    found = json.loads((run / "planer-t0.60" / "run.json").read_text())["arch"]
    assert load(out)[0].arch == Arch.load(run / FOUND / "arch.json") == Arch.parse(" ".join(found))
