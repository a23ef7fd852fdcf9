"""The knapsack's measured option losses, kept in the run directory, so that a run which searches several targets
or seeds from one baseline measures them once and only solves the knapsack again.

The measurement (every option swapped into the baseline, and the head ranking its attention options keep heads
by) depends on the baseline checkpoint (its weights and config), the search space and the samples alone. The file
maps a digest of those (with the local distillation's settings and the device, which change the numbers too) to
what was measured: any change of them is another key, so an entry is never used for what it was not measured on.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from torch import nn

from planer.evaluation.importance import Sample
from planer.io.checkpoint import CONFIG, WEIGHTS, atomic_write_text, file_digest, read_json_object
from planer.models.arch import BlockSpec
from planer.search.knapsack import LocalDistill, Measured, measure

CACHE_FILE = "option-losses.json"  # in a run directory


def _sample_key(sample: Sample) -> dict:
    tokens = hashlib.sha256(memoryview(sample.ids.contiguous().numpy())).hexdigest()
    return {"tokens": tokens, "batch_size": sample.batch_size, "tgt_len": sample.tgt_len,
            "mem_len": sample.mem_len, "segments": sample.segments}  # fmt: skip


def measurement_key(
    checkpoint: Path, baseline: nn.Module, space: list[str], sample: Sample, distill: LocalDistill | None
) -> str:
    """The digest of everything the measurement of ``space`` in ``baseline`` (loaded from ``checkpoint``) on
    ``sample`` depends on."""
    distilled = None if distill is None else {**_sample_key(distill.sample), "steps": distill.steps, "lr": distill.lr}
    settings = {
        "weights": file_digest(checkpoint / WEIGHTS),
        "config": file_digest(checkpoint / CONFIG),
        "options": [str(BlockSpec.parse(s)) for s in space],
        "sample": _sample_key(sample),
        "distill": distilled,
        "device": str(next(baseline.parameters()).device),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def cached_measure(
    cache: Path | None,
    checkpoint: Path,
    baseline: nn.Module,
    space: list[str],
    sample: Sample,
    distill: LocalDistill | None,
    progress: bool = False,
) -> Measured:
    """``measure``'s result for ``baseline`` (loaded from ``checkpoint``), from ``cache`` when it holds one for the
    same inputs, else measured and added to it (no cache: ``None``; ``progress``: see ``measure``)."""
    if cache is None:
        return measure(baseline, space, sample, distill, progress)
    key = measurement_key(checkpoint, baseline, space, sample, distill)
    held = read_json_object(cache)
    if key in held:
        return Measured.from_dict(held[key], f"{cache} (entry {key[:12]})")
    measured = measure(baseline, space, sample, distill, progress)
    atomic_write_text(cache, json.dumps({**held, key: measured.to_dict()}, indent=1) + "\n")
    return measured
