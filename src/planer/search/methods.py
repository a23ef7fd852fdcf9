"""The two ways ``planer search`` finds an architecture, run into one output directory with one arch.json.

- ``gumbel``: the paper's phase 1, a supernet with Gumbel-softmax architecture weights (gumbel.py).
- ``knapsack``: every option swapped alone into the trained baseline, then an exact pick under the latency budget
  (knapsack.py). It needs the trained baseline, and takes about a minute where the Gumbel search takes ten.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from planer.config import Config, check_target
from planer.errors import PlanerError
from planer.evaluation.importance import Sample
from planer.io.checkpoint import load_checkpoint
from planer.io.data import check_same_vocab
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.search.gumbel import check_reachable, load_table, search
from planer.search.knapsack import LatencyLimit, LocalDistill, knapsack_search
from planer.training.loop import Loop, RunOptions
from planer.training.train import phase2_recipe, train

METHODS = ("gumbel", "knapsack")
SAMPLE_SEGMENTS = 8  # training segments of every stream the knapsack's losses are measured on
DISTILL_STEPS = 50  # local distillation steps per option with --distill-blocks


def limit_table_path(lut_path: str | Path, batch: int) -> Path:
    """Where a limit's latency table lives: beside the run's, ``lut-b1.json`` for batch 1 beside ``lut.json``."""
    path = Path(lut_path)
    return path.with_name(f"{path.stem}-b{batch}{path.suffix}")


def run_search(
    method: str,
    cfg: Config,
    out_dir: str | Path,
    target: float,
    lut_path: str | Path | None,
    baseline: str | Path | None,
    options: RunOptions = RunOptions(),
) -> Arch:
    """Search ``target`` with ``method`` into ``out_dir``; ``baseline`` is the trained model both start from."""
    if method not in METHODS:
        raise PlanerError(f"unknown search method '{method}': expected {' or '.join(METHODS)}")
    check_target(target)
    if method == "gumbel":
        if cfg.search.limits:
            raise PlanerError("search.limits: only the knapsack search keeps limits at other batch sizes")
        return search(cfg, out_dir, target, lut_path, baseline, options)
    if baseline is None:
        raise PlanerError(
            "the knapsack search (search.method, the default) starts from a trained baseline: give --init-from DIR, "
            "or --method gumbel"
        )
    return knapsack_into(cfg, out_dir, target, lut_path, Path(baseline), options)


def knapsack_into(
    cfg: Config,
    out_dir: str | Path,
    target: float,
    lut_path: str | Path | None,
    baseline_dir: Path,
    options: RunOptions,
) -> Arch:
    """The knapsack pick for ``target``, written to ``out_dir/arch.json`` with its record (losses per option)."""
    check_target(target)
    baseline, _, vocab = load_checkpoint(baseline_dir)
    loop = Loop(cfg, out_dir, RunOptions(force=options.force or options.resume, quiet=options.quiet,
                                         corpus=options.corpus), done="arch.json")  # fmt: skip
    with loop.setting_up():
        check_same_vocab(vocab, loop.corpus.vocab, str(baseline_dir))
        if len(baseline.blocks) != 2 * cfg.model.n_layer or baseline.cfg.d_model != cfg.model.d_model:
            raise PlanerError(f"{baseline_dir} does not have this config's length and width")
        table = load_table(loop, lut_path)
        check_reachable(table, cfg, target)
        limits = [LatencyLimit(b, f, load_table(loop, limit_table_path(lut_path or loop.out_dir / "lut.json", b), b))
                  for b, f in sorted(cfg.search.limits.items())]  # fmt: skip
        for limit in limits:
            check_reachable(limit.table, cfg, limit.target, f"search.limits {limit.batch}:{limit.target:g}")
    m = cfg.model
    sample = Sample(loop.corpus.train, cfg.eval.batch_size, m.tgt_len, m.mem_len, SAMPLE_SEGMENTS)
    distill = None
    if cfg.search.distill_blocks:
        later = loop.corpus.train[len(loop.corpus.train) // 2 :]  # other segments than the losses are measured on
        distill = LocalDistill(Sample(later, cfg.eval.batch_size, m.tgt_len, m.mem_len, SAMPLE_SEGMENTS), DISTILL_STEPS)
    started = time.perf_counter()
    arch, record = knapsack_search(
        baseline.to(loop.device),
        cfg.search.space,
        table,
        target,
        sample,
        distill=distill,
        candidates=cfg.search.rerank,
        limits=limits,
        per_shape=cfg.search.rerank_per_shape,
    )
    if len(record["candidates"]) > 1:
        candidates = [Arch.parse(" ".join(c["arch"])) for c in record["candidates"]]
        reranked, record["rerank"] = rerank(
            cfg, loop.out_dir / "rerank", candidates, baseline_dir, dataclasses.replace(options, corpus=loop.corpus)
        )
        adopt(record, arch, reranked, table, target)
        record["limits"] = [limit.record(reranked, baseline.arch) for limit in limits]
        arch = reranked
    record.update(space=cfg.search.space, init_from=str(baseline_dir), seconds=round(time.perf_counter() - started, 1))
    loop.finish(lambda: arch.save(loop.out_dir / "arch.json", **record))
    return arch


def rerank(
    cfg: Config, out_dir: Path, candidates: list[Arch], baseline_dir: Path, options: RunOptions
) -> tuple[Arch, list[dict]]:
    """The candidate with the lowest validation loss after ``search.rerank_steps`` steps of phase 2's recipe (the
    baseline's weights where the arch can take them, its logits as teacher, the schedule's warm-up in proportion),
    and every candidate's score. A short training judges what single swaps into the untrained baseline cannot:
    how much of a cut the training wins back (Minitron ranks its pruned candidates after a short retraining too).
    """
    steps, full = cfg.search.rerank_steps, cfg.phase2.steps or cfg.train.steps
    warmup = round(cfg.train.warmup * steps / full)
    short = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=steps, eval_every=steps,
                                                               warmup=warmup, ckpt_every=0))  # fmt: skip
    fresh = RunOptions(force=True, quiet=options.quiet, corpus=options.corpus)
    scored = []
    for i, arch in enumerate(candidates):
        recipe = phase2_recipe(cfg.phase2, baseline_dir, arch)
        summary = train(short, out_dir / f"{i}-{arch.short()}", arch, recipe, fresh)
        scored.append({"arch": arch.specs(), "valid_loss": summary["best_valid_loss"], "steps": steps,
                       "seconds": round(summary["seconds"], 1)})  # fmt: skip
    best = min(range(len(candidates)), key=lambda i: scored[i]["valid_loss"])
    return candidates[best], scored


def adopt(record: dict, pick: Arch, chosen: Arch, table: LatencyTable, target: float) -> None:
    """Make the knapsack's ``record`` describe the reranked ``chosen`` arch (its estimate, its options' predicted
    increases), keeping the knapsack's own ``pick`` and its predicted increase as ``knapsack_pick``."""
    record["knapsack_pick"] = {"arch": pick.specs(), "predicted_increase": record["predicted_increase"]}
    increases = []
    for position, spec in zip(record["positions"], chosen):
        position["chosen"] = str(spec)
        increases.append(position["increase"][position["options"].index(str(spec))])
    estimate, baseline_ms = table.estimate(chosen), record["baseline_ms"]
    record.update(estimated_ms=estimate, estimated_ratio=estimate / baseline_ms, blocks_ms=estimate - table.fixed_ms,
                  meets_target=estimate <= target * baseline_ms, in_window=estimate >= record["window"][0] * baseline_ms,
                  predicted_increase=sum(increases))  # fmt: skip
