"""``planer run``: the whole method into one run directory, resumable stage by stage.

Baseline training, the latency table, then for every target a search (phase 1) and a retraining of the found
arch (phase 2), evaluation of every model on valid and test, end-to-end latency against the baseline, and the
report. A stage whose output is complete is skipped, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from planer.arch import Arch
from planer.config import Config, check_target
from planer.data import load_corpus
from planer.errors import PlanerError
from planer.evaluate import evaluate_run
from planer.latency import bench, load_or_profile
from planer.report import write_report
from planer.search import search
from planer.train import train

BENCH_BATCHES = (1, 8, 64)


def target_name(target: float) -> str:
    return f"t{target:.2f}"


def run_pipeline(cfg: Config, out: str | Path, targets: list[float], force: bool = False,
                 batches: tuple[int, ...] = BENCH_BATCHES) -> Path:
    for t in targets:
        check_target(t)
    out = Path(out)
    corpus = load_corpus(cfg.data)
    cfg.model.vocab_size = len(corpus.vocab)
    _claim_run_dir(out, cfg, force)

    def stage(done: Path, work) -> None:
        if force or not done.exists():
            work()

    baseline = out / "baseline"
    stage(baseline / "summary.json",
          lambda: train(cfg, baseline, Arch.baseline(cfg.model.n_layer, cfg.model.n_head), force=True, corpus=corpus))
    lut = out / "lut.json"
    stage(lut, lambda: load_or_profile(cfg, lut, force=force))

    models = [baseline]
    for t in targets:
        found, retrained = out / f"search-{target_name(t)}", out / f"planer-{target_name(t)}"
        stage(found / "arch.json", lambda: search(cfg, found, t, lut_path=lut, force=True, corpus=corpus, init_from=baseline))
        stage(retrained / "summary.json",
              lambda: train(cfg, retrained, Arch.load(found / "arch.json"), force=True, corpus=corpus))
        models.append(retrained)

    for model in models:
        scored = json.loads((model / "eval.json").read_text()) if (model / "eval.json").exists() else {}
        for split in ("valid", "test"):
            if force or split not in scored:
                evaluate_run(model, split)
        if model != baseline:
            stage(model / "bench.json", lambda: bench(model, baseline, batches))
    write_report(out)
    return out


def _claim_run_dir(out: Path, cfg: Config, force: bool) -> None:
    """A run directory belongs to one config: resuming with another would mix results, so it is refused."""
    resolved = out / "config.yaml"
    if resolved.exists() and not force:
        previous = yaml.safe_load(resolved.read_text())
        if previous != cfg.to_dict():
            raise PlanerError(f"run directory {out} was made with a different config; use another --out or --force")
    else:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(resolved)
