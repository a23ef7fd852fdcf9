"""The report's verdict in words: for every target, how much faster the found model is than the baseline, what
that costs in accuracy, whether the target was met, and how it does against every rival: their measured latency
relative to it, and their accuracy, and whether it beats every rival of matched latency (within 5%).

A difference between two models is only called a win when it exceeds twice the larger of their seed spreads
(standard deviations over repeats); with a single seed there is no spread, and the verdict says so.
"""

from __future__ import annotations

import math
import shlex
import statistics

from planer.report.rows import ModelRow, is_found
from planer.search.designs import RIVALS

COMPETITORS = ("iso", *RIVALS)  # what a found model is compared with


def metric_name(level_char: bool) -> str:
    return "bpc" if level_char else "ppl"


def group_stats(members: list[ModelRow], split: str, metric: str) -> tuple[float, float, int] | None:
    """Mean, standard deviation (0 for one seed) and count of a design's score over its repeats."""
    values = [m.eval[split][metric] for m in members if m.eval.get(split)]
    if not values:
        return None
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def mean_speedups(members: list[ModelRow]) -> dict[int, float]:
    per_batch: dict[int, list[float]] = {}
    for m in members:
        for batch, row in m.by_batch.items():
            per_batch.setdefault(batch, []).append(row["speedup"])
    return {b: statistics.mean(v) for b, v in sorted(per_batch.items())}


def _fmt(stats: tuple[float, float, int], digits: int) -> str:
    mean, sd, n = stats
    return f"{mean:.{digits}f}" + (f" ± {sd:.{digits}f}" if n > 1 else "")


MATCHED = 0.05  # a rival is at the found model's latency when its measured latency is within this fraction of it


def compare(found: list[ModelRow], rival: list[ModelRow], split: str, metric: str, digits: int) -> str:
    """How the found model scores against a rival on one split: better or worse only beyond twice the larger seed
    spread, a tie within it; with one seed each there is no spread, and the words say so."""
    a, b = group_stats(found, split, metric), group_stats(rival, split, metric)
    if a is None or b is None:
        return f"no {split} score"
    gap, spread = b[0] - a[0], max(a[1], b[1])
    way = "better" if gap > 0 else "worse"
    if a[2] < 2 or b[2] < 2:
        return f"{way} on {split} by {abs(gap):.{digits}f}"
    if abs(gap) <= 2 * spread:
        return (
            f"tied on {split} ({way} by {abs(gap):.{digits}f}, within twice the seed spread, {2 * spread:.{digits}f})"
        )
    return f"{way} on {split} by {abs(gap):.{digits}f} (seed spread {spread:.{digits}f})"


def rivals_sentence(
    found: list[ModelRow], groups: dict[str, list[ModelRow]], metric: str, digits: int, batch: int | None
) -> str:
    """The found model against every rival: their measured latency relative to it at ``batch`` (the latency
    table's), and the accuracy comparison on valid and test; then whether it beats every rival of matched latency."""
    mine = mean_speedups(found)
    batch = batch if batch in mine else (sorted(mine)[len(mine) // 2] if mine else None)
    parts, matched, beaten = [], [], []
    for design, members in groups.items():
        if is_found(design):
            continue
        theirs = mean_speedups(members)
        where = ""
        if batch in theirs:
            rel = mine[batch] / theirs[batch]  # the rival's latency over the found model's
            where = (f", {abs(rel - 1):.1%} {'slower' if rel > 1 else 'faster'}" if abs(rel - 1) > MATCHED
                     else f", at its latency ({rel - 1:+.1%})")  # fmt: skip
            if abs(rel - 1) <= MATCHED:
                matched.append(design)
        words = [compare(found, members, split, metric, digits) for split in ("valid", "test")]
        if all(w.startswith("better") for w in words):  # a win only counts with seeds on both sides (below)
            beaten.append(design)
        parts.append(f"{design}{where}: the found model is {' and '.join(words)}")
    if not parts:
        return ""
    one_seed = " (one seed each, so no seed spread to weigh the differences against)" if len(found) < 2 else ""
    text = f"Against the rivals (latency at batch {batch}){one_seed}: " + "; ".join(parts) + "."
    if matched:
        won, lost = [d for d in matched if d in beaten], [d for d in matched if d not in beaten]
        if len(found) < 2 or any(len(groups[d]) < 2 for d in matched):
            text += (f" With one seed no win over a rival within {MATCHED:.0%} of its latency ({', '.join(matched)}) "
                     "is claimed: the differences above have no spread to be weighed against.")  # fmt: skip
        elif not lost:
            text += (f" It beats every rival within {MATCHED:.0%} of its latency ({', '.join(matched)}) on both "
                     "splits by more than twice the seed spread.")  # fmt: skip
        else:
            text += (f" It does not beat every rival within {MATCHED:.0%} of its latency on both splits by more "
                     f"than twice the seed spread: it beats {', '.join(won) or 'none of them'}, "
                     f"not {', '.join(lost)}.")  # fmt: skip
    else:
        text += f" No rival lands within {MATCHED:.0%} of its measured latency."
    return text


def target_verdict(
    rows: list[ModelRow], target: float, level_char: bool, batch: int | None, design: str = "planer"
) -> str:
    """One paragraph for ``design``'s found model at ``target``: speed-ups, accuracy against the baseline, target
    met, and the rivals (the same for every search method)."""
    metric, digits = metric_name(level_char), 3 if level_char else 2
    base = next((r for r in rows if r.design == "baseline"), None)
    groups: dict[str, list[ModelRow]] = {}
    for r in rows:
        if r.target == target and (r.design in COMPETITORS or is_found(r.design)):
            groups.setdefault(r.design, []).append(r)
    found = groups.get(design)
    if not found:
        return ""
    speed = mean_speedups(found)
    test = group_stats(found, "test", metric)
    label = "" if len(_found_designs(rows, target)) < 2 else f", {found[0].method} search"
    parts = [f"**Target {target:.2f}{label}**: the found model (`{found[0].arch.short()}`"
             + (f", {len(found)} seeds" if len(found) > 1 else "") + ")"]  # fmt: skip
    if speed:
        parts.append(
            " is " + " / ".join(f"{v:.2f}x" for v in speed.values()) + " faster than the baseline at batch "
            + " / ".join(str(b) for b in speed)
        )  # fmt: skip
    base_test = base.eval.get("test", {}).get(metric) if base else None
    if test and base_test:
        change = 100 * (test[0] - base_test) / base_test
        parts.append(
            f", with test {metric.upper()} {_fmt(test, digits)} ({change:+.1f}% on the baseline's {base_test:.{digits}f})"
        )
    met = all(r.meets_target for r in found)
    ratios = [r.estimated_ratio for r in found if r.estimated_ratio]
    if ratios:
        parts.append(f"; target {'met' if met else 'NOT met'} (estimate {statistics.mean(ratios):.2f})")
    text = "".join(parts) + "."
    against = rivals_sentence(found, groups, metric, digits, batch)
    return text + (" " + against if against else "")


def _found_designs(rows: list[ModelRow], target: float) -> list[str]:
    designs = {r.design for r in rows if is_found(r.design) and r.target == target}
    return sorted(designs, key=lambda d: (d != "planer", d))


def methods_sentence(rows: list[ModelRow], target: float, level_char: bool) -> str:
    """The search methods against each other at ``target``: the same baseline, rivals and phase-2 recipe, so their
    found models' accuracy and speed and the searches' wall time say which method to use."""
    designs = _found_designs(rows, target)
    if len(designs) < 2:
        return ""
    metric, digits = metric_name(level_char), 3 if level_char else 2
    group = {d: [r for r in rows if r.design == d and r.target == target] for d in designs}
    first = group[designs[0]]
    parts = []
    for d in designs[1:]:
        words = [compare(first, group[d], split, metric, digits) for split in ("valid", "test")]
        parts.append(
            f"against the {group[d][0].method} search's model, the {first[0].method} search's is " + " and ".join(words)
        )
    seconds = ", ".join(f"{group[d][0].method} {_search_seconds(group[d])}" for d in designs)
    return (
        f"**Search methods at target {target:.2f}** (same baseline, rivals and phase-2 recipe): "
        + "; ".join(parts)
        + f". Search wall time per seed: {seconds}."
    )


def _search_seconds(found: list[ModelRow]) -> str:
    times = [r.found.seconds for r in found if r.found is not None and r.found.seconds is not None]
    if not times:
        return "not recorded"
    mean = statistics.mean(times)
    return f"{mean:.0f} s" if mean >= 10 else f"{mean:.1f} s"


def usage(found: list[ModelRow]) -> str:
    """Where the found model is (the best on valid of its seeds) and the commands that use it, with the prompt of
    its text sample when it has one."""
    best = min(found, key=lambda r: r.eval.get("valid", {}).get("loss", math.inf))
    path = shlex.quote(str(best.path))
    prompt = shlex.quote(best.sample.get("prompt") or "TEXT")
    seeds = f" (the best on valid of its {len(found)} seeds)" if len(found) > 1 else ""
    return (
        f"The found model{seeds} is `{best.path}`: `planer generate --run {path} --prompt {prompt}` writes text "
        f"with it, and {best.export}"
    )


def verdicts(rows: list[ModelRow], level_char: bool, batch: int | None = None) -> list[str]:
    """Per target, the verdict paragraph and the found model's path and commands; rivals' latencies are compared
    at ``batch`` (the latency table's; by default the middle batch benchmarked)."""
    targets = sorted({r.target for r in rows if is_found(r.design) and r.target is not None})
    paragraphs = []
    for t in targets:
        for design in _found_designs(rows, t):
            if verdict := target_verdict(rows, t, level_char, batch, design):
                paragraphs += [verdict, usage([r for r in rows if r.design == design and r.target == t])]
        if methods := methods_sentence(rows, t, level_char):
            paragraphs.append(methods)
    return paragraphs
