"""The report's verdict in words: for every target, how much faster the found model is than the baseline, what
that costs in accuracy, whether the target was met, and which model is best at that latency.

A difference between two models is only called a win when it exceeds twice the larger of their seed spreads
(standard deviations over repeats); with a single seed there is no spread, and the verdict says so.
"""

from __future__ import annotations

import math
import shlex
import statistics

COMPETITORS = ("planer", "iso", "dense-depth", "dense-heads", "dense-width")


def metric_name(level_char: bool) -> str:
    return "bpc" if level_char else "ppl"


def group_stats(members: list[dict], split: str, metric: str) -> tuple[float, float, int] | None:
    """Mean, standard deviation (0 for one seed) and count of a design's score over its repeats."""
    values = [m["eval"][split][metric] for m in members if m["eval"].get(split)]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def mean_speedups(members: list[dict]) -> dict[int, float]:
    per_batch: dict[int, list[float]] = {}
    for m in members:
        for row in m["bench"].get("batches", []):
            per_batch.setdefault(row["batch"], []).append(row["speedup"])
    return {b: statistics.mean(v) for b, v in sorted(per_batch.items())}


def _fmt(stats: tuple[float, float, int], digits: int) -> str:
    mean, sd, n = stats
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


def ranking_sentence(groups: dict[str, list[dict]], metric: str, digits: int) -> str:
    """Which design scores best on test at this latency, and whether its lead beats twice the seed spread."""
    scored = {d: s for d, m in groups.items() if (s := group_stats(m, "test", metric)) is not None}
    if len(scored) < 2:
        return ""
    order = sorted(scored, key=lambda d: scored[d][0])
    best, second = order[0], order[1]
    gap = scored[second][0] - scored[best][0]
    spread = max(scored[best][1], scored[second][1])
    listing = ", ".join(f"{d} {_fmt(scored[d], digits)}" for d in order)
    if spread == 0:
        sure = "one seed each, so the margin has no spread to compare with"
    elif gap > 2 * spread:
        sure = f"a lead of {gap:.{digits}f}, more than twice the seed spread ({spread:.{digits}f})"
    else:
        sure = f"a lead of {gap:.{digits}f}, within twice the seed spread ({spread:.{digits}f}): not a clear win"
    return f"Best at this latency on test: **{best}** ({listing}); {sure}."


def target_verdict(rows: list[dict], target: float, level_char: bool) -> str:
    """One paragraph for ``target``: speed-ups, accuracy against the baseline, target met, best model."""
    metric, digits = metric_name(level_char), 3 if level_char else 2
    base = next((r for r in rows if r["design"] == "baseline"), None)
    groups = {d: [r for r in rows if r["design"] == d and r["target"] == target] for d in COMPETITORS}
    groups = {d: m for d, m in groups.items() if m}
    found = groups.get("planer")
    if not found:
        return ""
    speed = mean_speedups(found)
    test = group_stats(found, "test", metric)
    parts = [f"**Target {target:.2f}**: the found model (`{found[0]['arch'].short()}`"
             + (f", {len(found)} seeds" if len(found) > 1 else "") + ")"]  # fmt: skip
    if speed:
        parts.append(
            " is " + " / ".join(f"{v:.2f}x" for v in speed.values()) + " faster than the baseline at batch "
            + " / ".join(str(b) for b in speed)
        )  # fmt: skip
    base_test = base["eval"].get("test", {}).get(metric) if base else None
    if test and base_test:
        change = 100 * (test[0] - base_test) / base_test
        parts.append(
            f", with test {metric.upper()} {_fmt(test, digits)} ({change:+.1f}% on the baseline's {base_test:.{digits}f})"
        )
    met = all(r["found"].get("meets_target", True) for r in found)
    ratios = [r["estimated_ratio"] for r in found if r["estimated_ratio"]]
    if ratios:
        parts.append(f"; target {'met' if met else 'NOT met'} (estimate {statistics.mean(ratios):.2f})")
    text = "".join(parts) + "."
    ranking = ranking_sentence(groups, metric, digits)
    return text + (" " + ranking if ranking else "")


def usage(found: list[dict]) -> str:
    """Where the found model is (the best on valid of its seeds) and the commands that use it, with the prompt of
    its text sample when it has one."""
    best = min(found, key=lambda r: r["eval"].get("valid", {}).get("loss", math.inf))
    path = shlex.quote(str(best["path"]))
    prompt = shlex.quote(best["sample"].get("prompt") or "TEXT")
    seeds = f" (the best on valid of its {len(found)} seeds)" if len(found) > 1 else ""
    return (
        f"The found model{seeds} is `{best['path']}`: `planer generate --run {path} --prompt {prompt}` writes text "
        f"with it, and `planer export --run {path} --onnx model.onnx` exports it for onnxruntime."
    )


def verdicts(rows: list[dict], level_char: bool) -> list[str]:
    """Per target, the verdict paragraph and the found model's path and commands."""
    targets = sorted({r["target"] for r in rows if r["design"] == "planer" and r["target"] is not None})
    paragraphs = []
    for t in targets:
        if verdict := target_verdict(rows, t, level_char):
            paragraphs += [verdict, usage([r for r in rows if r["design"] == "planer" and r["target"] == t])]
    return paragraphs
