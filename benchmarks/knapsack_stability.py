"""Is the knapsack's calibration sample large enough? A second, disjoint sample of the same size, and how far its
option scores and pick lie from the search's.

The knapsack scores every option at every position by the loss increase it causes on ``search.sample_segments``
of training text (search/knapsack.py). This measures the same scores on a sample of the same shape drawn from the
training tokens the search's sample did not read, then compares: the Spearman rank correlation of the two sets of
option scores (every option that can start from the baseline block, the baseline's own block left out, since it
costs 0 in both), the same for the heads' scores, and the knapsack's pick at the search's target from each.

    .venv/bin/python benchmarks/knapsack_stability.py --config configs/smollm2-135m.yaml \\
        --search runs/smollm2-search/t0.6 [--out docs/results/smollm2-135m/stability]

``--search`` is the output folder of ``planer search`` with this config: its arch.json holds the first sample's
scores (the search's own sample) and its lut.json the latency table; its record names the baseline it started from.
Writes OUT/stability.md and OUT/stability.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from planer.config import load_config
from planer.errors import PlanerError
from planer.evaluation.importance import Sample, calibration_sample
from planer.io.checkpoint import load_checkpoint
from planer.io.data import load_corpus
from planer.io.records import SearchRecord
from planer.latency.table import LatencyTable
from planer.search.knapsack import KnapsackSettings, Measured, knapsack_pick, measure


def unread_tokens(sample: Sample) -> torch.Tensor:
    """The tokens of ``sample.ids`` that the sample's scoring never reads (as evaluate_ids cuts its streams)."""
    ids = sample.ids
    batch = max(1, min(sample.batch_size, len(ids) // (2 * sample.tgt_len)))
    n = len(ids) // batch
    warm = sample.mem_len if n - 1 > sample.mem_len else 0
    used = warm + sample.segments * sample.tgt_len + 1  # a segment's targets reach one token past it
    return torch.cat([ids[k * n + used : (k + 1) * n] for k in range(batch)] + [ids[batch * n :]])


def measured_of(record: SearchRecord) -> Measured:
    """The search's own measurement, as its arch.json keeps it."""
    details = record.knapsack
    return Measured(
        options=details.positions[0].options,
        baseline_loss=details.baseline_loss,
        increases=[p.increase for p in details.positions],
        heads=details.heads,
        distill=details.distill,
    )


def spearman(a: list[float], b: list[float]) -> float:
    ranks = [np.argsort(np.argsort(np.asarray(x))) for x in (a, b)]
    return float(np.corrcoef(*ranks)[0, 1])


def option_scores(m: Measured, baseline) -> list[float | None]:
    """Every option's score but the baseline block's own, in one order for both samples."""
    return [inc for row, own in zip(m.increases, baseline) for opt, inc in zip(m.options, row) if opt != str(own)]


def head_scores(m: Measured) -> list[float]:
    return [inc for p in sorted(m.heads, key=int) for _, inc in sorted(m.heads[p])]


def predicted(m: Measured, arch: list[str]) -> float:
    """The sum of ``m``'s single-swap increases over the choices of ``arch``: what the knapsack minimises."""
    return sum(row[m.options.index(spec)] for row, spec in zip(m.increases, arch))


def compare(a: Measured, b: Measured, baseline, table: LatencyTable, target: float) -> dict:
    """How the two samples' scores and picks agree; ``regret``: on each sample's scores, how much more its
    rival pick is predicted to lose than its own (the optimum there), in nats per token."""
    pairs = [(x, y) for x, y in zip(option_scores(a, baseline), option_scores(b, baseline)) if x is not None]
    picks = [knapsack_pick(m, baseline, table, target, KnapsackSettings()) for m in (a, b)]
    own = [predicted(m, p.arch) for m, p in zip((a, b), picks)]
    other = [predicted(a, picks[1].arch), predicted(b, picks[0].arch)]
    return {
        "differing_positions": sum(x != y for x, y in zip(picks[0].arch, picks[1].arch)),
        "predicted_increase": [round(x, 4) for x in own],
        "regret": [round(o - x, 4) for o, x in zip(other, own)],
        "options": len(pairs),
        "spearman_options": round(spearman(*zip(*pairs)), 4),
        "spearman_heads": round(spearman(head_scores(a), head_scores(b)), 4),
        "baseline_loss": [a.baseline_loss, b.baseline_loss],
        "picks": [p.arch for p in picks],
        "same_pick": picks[0].arch == picks[1].arch,
        "estimated_ratio": [p.estimate.estimated_ratio for p in picks],
    }


def markdown(result: dict, cfg, seconds: float) -> str:
    tokens = cfg.eval.batch_size * cfg.model.tgt_len * cfg.search.sample_segments
    a, b = result["picks"]
    return "\n".join([
        f"Two disjoint calibration samples of {tokens:,} training tokens each ({cfg.eval.batch_size} streams x "
        f"{cfg.search.sample_segments} segment(s) x {cfg.model.tgt_len} tokens); the second measured in {seconds:.0f} s.",
        "",
        "| | sample A (the search's) | sample B |",
        "|---|---|---|",
        f"| baseline loss (nats/token) | {result['baseline_loss'][0]:.4f} | {result['baseline_loss'][1]:.4f} |",
        f"| pick at the target | `{' '.join(a)}` | `{' '.join(b)}` |",
        f"| estimated ratio | {result['estimated_ratio'][0]:.3f} | {result['estimated_ratio'][1]:.3f} |",
        f"| its predicted increase on this sample (nats/token) | {result['predicted_increase'][0]:.3f} "
        f"| {result['predicted_increase'][1]:.3f} |",
        f"| the other sample's pick, scored on this one | +{result['regret'][0]:.3f} | +{result['regret'][1]:.3f} |",
        "",
        f"Spearman rank correlation of the {result['options']} option scores: {result['spearman_options']:.3f}; "
        f"of the head scores: {result['spearman_heads']:.3f}. "
        + ("Both samples give the same pick." if result["same_pick"]
           else f"The picks differ at {result['differing_positions']} of {len(a)} positions."),
    ]) + "\n"  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--search", required=True, help="a planer search folder of this config (arch.json, lut.json)")
    parser.add_argument("--out", default="benchmarks/out/stability")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        record = SearchRecord.read(Path(args.search))
        if record is None or record.method != "knapsack":
            raise PlanerError(f"{args.search} holds no knapsack search's arch.json")
        table = LatencyTable.load(Path(args.search) / "lut.json")
        baseline, _, vocab = load_checkpoint(record.init_from)
        corpus = load_corpus(cfg.data, vocab)
    except PlanerError as e:
        print(f"knapsack_stability: error: {e}", file=sys.stderr)
        return 2
    second = calibration_sample(cfg, unread_tokens(calibration_sample(cfg, corpus.train)))
    started = time.perf_counter()
    measured = measure(baseline, cfg.search.space, second, progress=True)
    seconds = time.perf_counter() - started
    result = compare(measured_of(record), measured, baseline.arch, table, record.estimate.target)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(result, cfg, seconds)
    (out / "stability.md").write_text(text)
    saved = {**result, "seconds": round(seconds, 1), "sample_b": measured.to_dict()}
    (out / "stability.json").write_text(json.dumps(saved, indent=1) + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
