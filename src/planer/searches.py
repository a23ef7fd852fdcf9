"""The two ways ``planer search`` finds an architecture, run into one output directory with one arch.json.

- ``gumbel``: the paper's phase 1, a supernet with Gumbel-softmax architecture weights (search.py).
- ``knapsack``: every option swapped alone into the trained baseline, then an exact pick under the latency budget
  (knapsack.py). It needs the trained baseline, and takes about a minute where the Gumbel search takes ten.
"""

from __future__ import annotations

from pathlib import Path

from planer.arch import Arch
from planer.checkpoint import load_checkpoint
from planer.config import Config, check_target
from planer.data import check_same_vocab
from planer.errors import PlanerError
from planer.importance import Sample
from planer.knapsack import LocalDistill, knapsack_search
from planer.loop import Loop, RunOptions
from planer.search import check_reachable, load_table, search

METHODS = ("gumbel", "knapsack")
SAMPLE_SEGMENTS = 8  # training segments of every stream the knapsack's losses are measured on
DISTILL_STEPS = 50  # local distillation steps per option with --distill-blocks


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
    m = cfg.model
    sample = Sample(loop.corpus.train, cfg.eval.batch_size, m.tgt_len, m.mem_len, SAMPLE_SEGMENTS)
    distill = None
    if cfg.search.distill_blocks:
        later = loop.corpus.train[len(loop.corpus.train) // 2 :]  # other segments than the losses are measured on
        distill = LocalDistill(Sample(later, cfg.eval.batch_size, m.tgt_len, m.mem_len, SAMPLE_SEGMENTS), DISTILL_STEPS)
    arch, record = knapsack_search(baseline.to(loop.device), cfg.search.space, table, target, sample, distill=distill)
    record.update(space=cfg.search.space, init_from=str(baseline_dir))
    loop.finish(lambda: arch.save(loop.out_dir / "arch.json", **record))
    return arch
