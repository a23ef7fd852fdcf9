"""The ways ``planer search`` finds an architecture, each a ``Searcher`` registered by name, run into one output
directory with one arch.json.

- ``gumbel``: the paper's phase 1, a supernet with Gumbel-softmax architecture weights (gumbel.py).
- ``knapsack``: every option swapped alone into the trained baseline, then an exact pick under the latency budget
  (knapsack.py). It needs the trained baseline, and takes about a minute where the Gumbel search takes ten.

``check_search`` is where a search's method, targets and the method's own needs (a baseline, no limits) are
checked, before any work: ``planer search`` through ``run_search``, ``planer run`` once for all its searches.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from planer.config import Config, phase2_steps
from planer.errors import PlanerError
from planer.evaluation.importance import Sample, calibration_sample
from planer.io.checkpoint import load_checkpoint, with_checkpoint_model
from planer.io.data import check_same_vocab
from planer.io.records import Estimate, RerankScore, SearchRecord, arch_of
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.search.gumbel import check_reachable, load_table, search
from planer.search.knapsack import KnapsackSettings, LatencyLimit, LocalDistill, knapsack_pick
from planer.search.option_cache import cached_measure
from planer.training.loop import Loop, RunOptions
from planer.training.train import phase2_recipe, train

DISTILL_STEPS = 50  # local distillation steps per option with --distill-blocks


@dataclass(frozen=True)
class SearchJob:
    """One search: ``target`` into ``out_dir`` with ``cfg``, the latency table at ``lut_path`` (default
    ``out_dir/lut.json``), from the trained ``baseline``; ``cache``: a file of measurements a run's searches share
    (the knapsack's option losses, see option_cache.py), None for none."""

    cfg: Config
    out_dir: Path
    target: float
    lut_path: Path | None = None
    baseline: Path | None = None
    options: RunOptions = RunOptions()
    cache: Path | None = None


class Searcher(Protocol):
    """A search method."""

    def validate(self, cfg: Config, baseline: Path | None) -> None:
        """Refuse, with one PlanerError line and before any work, what this method cannot search with."""

    def run(self, job: SearchJob) -> Arch:
        """Search ``job.target`` into ``job.out_dir`` (arch.json, a ``SearchRecord``); returns the found arch."""


class GumbelSearcher:
    """The paper's supernet search; it keeps no limits at other batch sizes (its latency loss has one table)."""

    def validate(self, cfg: Config, baseline: Path | None) -> None:
        if cfg.search.limits:
            raise PlanerError(
                "search.limits: only the knapsack search keeps limits at other batch sizes; drop gumbel or the limits"
            )

    def run(self, job: SearchJob) -> Arch:
        return search(job.cfg, job.out_dir, job.target, job.lut_path, job.baseline, job.options)


class KnapsackSearcher:
    """Options swapped into the trained baseline, then an exact pick; it cannot start without that baseline."""

    def validate(self, cfg: Config, baseline: Path | None) -> None:
        if baseline is None:
            raise PlanerError(
                "the knapsack search (search.method, the default) starts from a trained baseline: give --init-from "
                "DIR, or --method gumbel"
            )

    def run(self, job: SearchJob) -> Arch:
        return knapsack_into(job)


SEARCHERS: dict[str, Searcher] = {"gumbel": GumbelSearcher(), "knapsack": KnapsackSearcher()}


def check_search(method: str, cfg: Config, targets: tuple[float, ...], baseline: Path | None) -> Searcher:
    """The searcher of ``method``, once the method, every target and what the method needs are checked."""
    if method not in SEARCHERS:
        raise PlanerError(f"unknown search method '{method}': expected {' or '.join(SEARCHERS)}")
    for target in targets:
        if not isinstance(target, (int, float)) or not 0.0 < target <= 1.0:
            raise PlanerError(f"a latency target is a fraction of the baseline's latency in (0, 1], got {target}")
    SEARCHERS[method].validate(cfg, baseline)
    return SEARCHERS[method]


def run_search(
    method: str,
    cfg: Config,
    out_dir: str | Path,
    target: float,
    lut_path: str | Path | None,
    baseline: str | Path | None,
    options: RunOptions = RunOptions(),
) -> Arch:
    """Search ``target`` with ``method`` into ``out_dir``; ``baseline`` is the trained model both start from, and
    its checkpoint decides the model searched (``with_checkpoint_model``)."""
    lut, base = (Path(p) if p is not None else None for p in (lut_path, baseline))
    if base is not None:
        cfg = with_checkpoint_model(cfg, base)
    searcher = check_search(method, cfg, (target,), base)
    return searcher.run(SearchJob(cfg, Path(out_dir), target, lut, base, options))


def limit_table_path(lut_path: str | Path, batch: int) -> Path:
    """Where a limit's latency table lives: beside the run's, ``lut-b1.json`` for batch 1 beside ``lut.json``."""
    path = Path(lut_path)
    return path.with_name(f"{path.stem}-b{batch}{path.suffix}")


def knapsack_into(job: SearchJob) -> Arch:
    """The knapsack pick for ``job.target``, written to ``out_dir/arch.json`` with its record (losses per option);
    with ``search.rerank``, the best of its candidates after a short training."""
    baseline, _, vocab = load_checkpoint(job.baseline)
    options = job.options
    loop = Loop(job.cfg, job.out_dir, RunOptions(force=options.force or options.resume, quiet=options.quiet,
                                                 corpus=options.corpus), done=SearchRecord.FILE)  # fmt: skip
    cfg = loop.cfg
    with loop.setting_up():
        check_same_vocab(vocab, loop.corpus.vocab, str(job.baseline))
        table, limits = knapsack_tables(loop, job)
    sample, distill = knapsack_samples(loop)
    started = time.perf_counter()
    baseline = baseline.to(loop.device)
    measured = cached_measure(job.cache, job.baseline, baseline, cfg.search.space, sample, distill, not options.quiet)
    settings = KnapsackSettings(candidates=cfg.search.rerank, per_shape=cfg.search.rerank_per_shape, limits=limits)
    record = knapsack_pick(measured, baseline.arch, table, job.target, settings)
    if len(record.knapsack.candidates) > 1:
        candidates = [arch_of(c["arch"]) for c in record.knapsack.candidates]
        reranked, scores = rerank(
            cfg, loop.out_dir / "rerank", candidates, job.baseline, dataclasses.replace(options, corpus=loop.corpus)
        )
        record = adopt(record, reranked, scores, table, limits, baseline.arch)
    record = dataclasses.replace(record, space=cfg.search.space, init_from=str(job.baseline),
                                 seconds=round(time.perf_counter() - started, 1))  # fmt: skip
    loop.finish(lambda: record.save(loop.out_dir))
    return record.found


def knapsack_tables(loop: Loop, job: SearchJob) -> tuple[LatencyTable, list[LatencyLimit]]:
    """The latency table the target holds at, and one limit per ``search.limits`` with its own table; a target or
    limit that no architecture of the space meets is refused."""
    cfg = loop.cfg
    table = load_table(loop, job.lut_path)
    check_reachable(table, cfg, job.target)
    lut = job.lut_path or loop.out_dir / "lut.json"
    limits = [
        LatencyLimit(b, f, load_table(loop, limit_table_path(lut, b), b)) for b, f in sorted(cfg.search.limits.items())
    ]
    for limit in limits:
        check_reachable(limit.table, cfg, limit.target, f"search.limits {limit.batch}:{limit.target:g}")
    return table, limits


def knapsack_samples(loop: Loop) -> tuple[Sample, LocalDistill | None]:
    """The training segments the option losses are measured on, and the local distillation's (other segments)."""
    cfg, train_ids = loop.cfg, loop.corpus.train
    sample = calibration_sample(cfg, train_ids)
    if not cfg.search.distill_blocks:
        return sample, None
    later = train_ids[len(train_ids) // 2 :]  # other segments than the losses are measured on
    return sample, LocalDistill(calibration_sample(cfg, later), DISTILL_STEPS)


def rerank(
    cfg: Config, out_dir: Path, candidates: list[Arch], baseline_dir: Path, options: RunOptions
) -> tuple[Arch, list[RerankScore]]:
    """The candidate with the lowest validation loss after ``search.rerank_steps`` steps of phase 2's recipe (the
    baseline's weights where the arch can take them, its logits as teacher, the schedule's warm-up in proportion),
    and every candidate's score. A short training judges what single swaps into the untrained baseline cannot:
    how much of a cut the training wins back (Minitron ranks its pruned candidates after a short retraining too).
    """
    steps, full = cfg.search.rerank_steps, phase2_steps(cfg)
    warmup = round(cfg.train.warmup * steps / full)
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, eval_every=steps,
                                                               warmup=warmup, ckpt_every=0))  # fmt: skip
    fresh = RunOptions(force=True, quiet=options.quiet, corpus=options.corpus)
    scored = []
    for i, arch in enumerate(candidates):
        recipe = phase2_recipe(cfg.phase2, baseline_dir, arch)
        summary = train(short, out_dir / f"{i}-{arch.short()}", arch, recipe, fresh)
        scored.append(RerankScore(arch=arch.specs(), valid_loss=summary.best_valid_loss, steps=steps,
                                  seconds=round(summary.seconds, 1)))  # fmt: skip
    best = min(range(len(candidates)), key=lambda i: scored[i].valid_loss)
    return candidates[best], scored


def adopt(
    record: SearchRecord,
    chosen: Arch,
    scores: list[RerankScore],
    table: LatencyTable,
    limits: list[LatencyLimit],
    baseline: Arch,
) -> SearchRecord:
    """The knapsack's ``record`` made to describe the reranked ``chosen`` arch (its estimate, its options'
    predicted increases, the ``scores`` that chose it), keeping the knapsack's own pick as ``knapsack_pick``."""
    found = record.knapsack
    positions = [dataclasses.replace(p, chosen=str(spec)) for p, spec in zip(found.positions, chosen)]
    estimate = Estimate.of(table, chosen, record.estimate.baseline_ms, record.estimate.target)
    details = dataclasses.replace(
        found,
        limits=[limit.estimate(chosen, baseline) for limit in limits],
        in_window=estimate.estimated_ms >= record.window[0] * estimate.baseline_ms,
        blocks_ms=estimate.estimated_ms - table.fixed_ms,
        predicted_increase=sum(p.chosen_increase for p in positions),
        positions=positions,
        rerank=scores,
        knapsack_pick={"arch": record.arch, "predicted_increase": found.predicted_increase},
    )
    return dataclasses.replace(record, arch=chosen.specs(), estimate=estimate, details=details)
