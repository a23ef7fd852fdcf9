"""The verdict's words follow the numbers: latency relative to the found model, wins only beyond twice the spread."""

import dataclasses
from pathlib import Path

from planer.io.records import Estimate, GumbelDetails, SearchRecord
from planer.models.arch import Arch
from planer.report.rows import ModelRow
from planer.report.verdict import verdicts


def row(design: str, valid: float, test: float, speedup: float, target: float | None = 0.5) -> ModelRow:
    return ModelRow(name=design, path=Path(design), design=design, target=target, arch=Arch.parse("attn:2 ffl"),
                    estimated_ratio=0.48, found=None,
                    eval={"valid": {"bpc": valid, "loss": valid}, "test": {"bpc": test, "loss": test}},
                    bench={"batches": [{"batch": 8, "speedup": speedup}]})  # fmt: skip


def found(method: str, seconds: float) -> SearchRecord:
    """A search's record that met its target in ``seconds``."""
    estimate = Estimate(target=0.5, baseline_ms=1.0, estimated_ms=0.48, estimated_ratio=0.48, meets_target=True)
    return SearchRecord(
        arch=["attn:2", "ffl"], method=method, estimate=estimate, details=GumbelDetails(), seconds=seconds
    )


BASE = row("baseline", 2.30, 2.45, 1.0, None)


def seeds(design: str, valid: float, test: float, speedup: float, step: float) -> list[ModelRow]:
    """Three seeds of one design, their scores ``step`` apart: a standard deviation of ``step``."""
    return [row(design, valid + d, test + d, speedup) for d in (0.0, step, 2 * step)]


def test_a_matched_rival_beaten_beyond_twice_the_spread():
    rows = [BASE] + seeds("planer", 2.30, 2.44, 2.0, 0.002)
    rows += seeds("dense-depth", 2.33, 2.49, 1.96, 0.002)
    text = verdicts(rows, level_char=True, batch=8)[0]
    assert "dense-depth, at its latency (+2.0%)" in text and "better on valid by 0.030" in text
    assert "It beats every rival within 5% of its latency (dense-depth)" in text
    assert "2.442 ± 0.002 (-0.3% on the baseline's 2.450)" in text


def test_a_tie_within_the_spread_and_a_slower_rival():
    rows = [BASE] + seeds("planer", 2.30, 2.44, 2.0, 0.02)
    rows += seeds("dense-heads", 2.31, 2.43, 1.80, 0.02)
    rows += seeds("dense-depth", 2.32, 2.45, 2.02, 0.02)
    text = verdicts(rows, level_char=True, batch=8)[0]
    assert "dense-heads, 11.1% slower" in text
    assert "tied on test (worse by 0.010, within twice the seed spread, 0.040)" in text
    assert "It does not beat every rival within 5% of its latency on both splits" in text
    assert "seed spread: it beats none of them, not dense-depth." in text


def test_one_seed_claims_no_win_however_large_the_difference():
    rows = [BASE, row("planer", 2.30, 2.44, 2.0), row("uniform-width", 2.60, 2.70, 1.98)]
    text = verdicts(rows, level_char=True, batch=8)[0]
    assert "(one seed each, so no seed spread to weigh the differences against)" in text
    assert "better on valid by 0.300 and better on test by 0.260" in text
    assert "With one seed no win over a rival within 5% of its latency (uniform-width) is claimed" in text
    assert "beats none of them" not in text


def test_two_search_methods_share_the_rivals_and_are_compared():
    """A second method's found model gets its own paragraph against the same rivals, then the methods compared."""
    rows = [BASE] + seeds("planer", 2.30, 2.44, 2.0, 0.002)
    rows += seeds("planer-gumbel", 2.35, 2.50, 2.1, 0.002)
    rows += seeds("dense-depth", 2.33, 2.49, 1.96, 0.002)
    gumbel, knapsack = found("gumbel", 600.0), found("knapsack", 20.0)
    rows = [dataclasses.replace(r, found=gumbel if r.design == "planer-gumbel" else knapsack) for r in rows]
    text = verdicts(rows, level_char=True, batch=8)
    knapsack, gumbel, methods = text[0], text[2], text[4]
    assert knapsack.startswith("**Target 0.50, knapsack search**") and "dense-depth, at its latency" in knapsack
    assert gumbel.startswith("**Target 0.50, gumbel search**") and "planer" not in gumbel.split("Against")[1]
    assert "dense-depth, 7.1% slower: the found model is worse on valid by 0.020" in gumbel
    assert methods.startswith("**Search methods at target 0.50**")
    assert "the knapsack search's is better on valid by 0.050 (seed spread 0.002)" in methods
    assert "knapsack 20 s, gumbel 600 s" in methods


def test_the_verdict_names_which_matched_rivals_are_beaten_and_which_not():
    rows = [BASE] + seeds("planer", 2.30, 2.44, 2.0, 0.02)
    rows += seeds("dense-width", 2.60, 2.70, 2.02, 0.02)
    rows += seeds("dense-heads", 2.35, 2.46, 1.98, 0.02)
    text = verdicts(rows, level_char=True, batch=8)[0]
    assert "dense-heads, at its latency (+1.0%): the found model is better on valid by 0.050" in text
    assert "tied on test (better by 0.020, within twice the seed spread, 0.040)" in text
    assert "seed spread: it beats dense-width, not dense-heads." in text
