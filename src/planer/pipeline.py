"""``planer run``: the whole method into one run directory, resumable stage by stage.

Baseline training, the latency table, then for every target a search (phase 1) and a retraining of the found
arch (phase 2), the same for the iso-parameter space and for every further seed, the fixed designs (Sandwich
over a few K, PAR), evaluation of every model on valid and test, end-to-end latency against the baseline, and
the report. A stage whose output is complete is skipped, and an unfinished training or search continues from its
newest resume state, so an interrupted run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from planer.arch import Arch
from planer.checkpoint import atomic_write_text, read_json_object
from planer.config import Config, check_target, saved_config_matches
from planer.data import load_corpus
from planer.designs import iso_space, named_arch, sandwich_sweep
from planer.errors import PlanerError
from planer.evaluate import evaluate_run
from planer.latency import bench, load_or_profile
from planer.loop import RunOptions
from planer.report import search_dir_name, write_report
from planer.search import search
from planer.train import train

BENCH_BATCHES = (1, 8, 64)
DESIGNS = ("sandwich", "par", "iso")


def target_name(target: float) -> str:
    return f"t{target:.2f}"


def searched_name(design: str, target: float, seed: int) -> str:
    """``planer-t0.50``, ``iso-t0.50``, and ``-s2``, ``-s3``, ... for the repeats with other seeds."""
    return f"{design}-{target_name(target)}" + (f"-s{seed + 1}" if seed else "")


def parse_designs(text: str) -> list[str]:
    """``sandwich,par,iso`` and explicit ``sandwich:K``; an empty string means PLANER alone."""
    designs = [d.strip() for d in text.split(",") if d.strip()]
    for d in designs:
        if d not in DESIGNS and not d.startswith("sandwich:"):
            raise PlanerError(f"unknown design '{d}': expected {', '.join(DESIGNS)} or sandwich:K")
    return designs


def run_pipeline(
    cfg: Config,
    out: str | Path,
    targets: list[float],
    designs: list[str] = (),
    seeds: int = 1,
    force: bool = False,
    batches: tuple[int, ...] = BENCH_BATCHES,
) -> Path:
    """Every stage into ``out``; ``designs`` adds the comparisons, ``seeds`` repeats every search with other seeds."""
    for t in targets:
        check_target(t)
    if not isinstance(seeds, int) or seeds < 1:
        raise PlanerError(f"--seeds must be a positive integer, got {seeds}")
    if not batches or any(b <= 0 for b in batches):
        raise PlanerError(f"batch sizes must be positive integers, got {list(batches)}")
    out = Path(out)
    corpus = load_corpus(cfg.data)
    cfg.model.vocab_size = len(corpus.vocab)
    for d in designs:
        if d.startswith("sandwich:"):
            named_arch(d, cfg.model)  # a bad K stops the run before any work
    _claim_run_dir(out, cfg, force)

    def stage(done: Path, work) -> None:
        if force or not done.exists():
            work()

    def trained(name: str, arch_of, run_cfg: Config = cfg) -> Path:
        path = out / name
        stage(
            path / "summary.json", lambda: train(run_cfg, path, arch_of(), options=RunOptions(force=True, resume=not force, corpus=corpus))
        )
        return path

    baseline = trained("baseline", lambda: Arch.baseline(cfg.model.n_layer, cfg.model.n_head))
    lut = out / "lut.json"
    stage(lut, lambda: load_or_profile(cfg, lut, force=force))

    searched = [("planer", cfg)]
    if "iso" in designs:
        searched.append(("iso", _with_space(cfg, iso_space(cfg.search.space, cfg.model.n_experts))))
    models = [baseline]
    for seed in range(seeds):
        for design, design_cfg in searched:
            run_cfg = _with_seed(design_cfg, cfg.train.seed + seed)
            for t in targets:
                name = searched_name(design, t, seed)
                found = out / search_dir_name(name)
                stage(
                    found / "arch.json",
                    lambda: search(
                        run_cfg, found, t, lut, baseline, RunOptions(force=True, resume=not force, corpus=corpus)
                    ),
                )
                models.append(trained(name, lambda: Arch.load(found / "arch.json"), run_cfg))

    ks = sorted(
        {int(d.split(":")[1]) for d in designs if d.startswith("sandwich:")}
        | (set(sandwich_sweep(cfg.model.n_layer)) if "sandwich" in designs else set())
    )
    sandwiches = [trained(f"sandwich-k{k}", lambda: named_arch(f"sandwich:{k}", cfg.model)) for k in ks]
    if "par" in designs:
        models.append(trained("par", lambda: named_arch("par", cfg.model)))
    models += sandwiches

    for model in models:
        scored = read_json_object(model / "eval.json")
        for split in ("valid", "test"):
            if force or split not in scored:
                evaluate_run(model, split)
        if model != baseline:
            stage(model / "bench.json", lambda: bench(model, baseline, batches))
    if "sandwich" in designs:
        _choose_sandwich(out, sandwiches)
    write_report(out)
    return out


def _with_space(cfg: Config, space: list[str]) -> Config:
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, space=space))


def _with_seed(cfg: Config, seed: int) -> Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed))


def _choose_sandwich(out: Path, runs: list[Path]) -> None:
    """Record the sweep over K and the K with the lowest valid loss, the Sandwich design the report compares."""
    sweep = {run.name: read_json_object(run / "eval.json")["valid"]["loss"] for run in runs}
    chosen = min(sweep, key=sweep.get)
    atomic_write_text(out / "sandwich.json", json.dumps({"valid_loss": sweep, "chosen": chosen}, indent=1) + "\n")


def _claim_run_dir(out: Path, cfg: Config, force: bool) -> None:
    """A run directory belongs to one config: resuming with another would mix results, so it is refused."""
    resolved = out / "config.yaml"
    if (out / "model.safetensors").exists():
        raise PlanerError(f"{out} holds a trained model, not a planer run directory; use another --out")
    if resolved.exists() and not force:
        if not saved_config_matches(resolved, cfg):
            raise PlanerError(f"run directory {out} was made with a different config; use another --out or --force")
    else:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(resolved)
