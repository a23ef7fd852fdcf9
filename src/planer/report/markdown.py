"""The report of a run directory: a Markdown table of every model's accuracy and latency.

Everything is read back from the files the stages wrote, so a report can be made again at any time.
"""

from __future__ import annotations

import dataclasses
import platform
import statistics
from functools import cache
from pathlib import Path

import torch

from planer.errors import PlanerError
from planer.io.checkpoint import read_json_object
from planer.latency.llamacpp import RECORD as LLAMACPP_RECORD
from planer.report import plots
from planer.report.details import (
    Search,
    in_llamacpp,
    latency_ms,
    samples_section,
    search_confidence,
    searches,
    table_row,
    wall_times,
    workload_words,
)
from planer.report.rows import ModelRow, bench_batches, collect
from planer.report.samples import model_sample, prompt_text
from planer.report.verdict import verdicts


def _score(result: dict | None, level_char: bool) -> str:
    if not result:
        return "–"
    return f"{result['bpc']:.3f}" if level_char else f"{result['ppl']:.2f}"


def _before(row: ModelRow, split: str, level_char: bool) -> str:
    """A pruned rival's score before phase 2 (the baseline's blocks it keeps, untrained), to follow its score."""
    before = row.before_training.get(split)
    return f" ({_score(before, level_char)} before training)" if before else ""


def results_table(rows: list[ModelRow], level_char: bool) -> str:
    batches = bench_batches(rows)
    metric = "BPC" if level_char else "PPL"
    head = [
        "model",
        "arch",
        "params",
        f"valid {metric}",
        f"test {metric}",
        "est. latency",
        *[f"speed-up b{b}" for b in batches],
    ]
    lines = [table_row(head), "|" + "---|" * len(head)]
    for r in rows:
        speedups = [f"{r.by_batch[b]['speedup']:.2f}x" if b in r.by_batch else "–" for b in batches]
        est = (
            "–"
            if r.estimated_ratio is None
            else f"{r.estimated_ratio:.2f}" + (f" (target {r.target:.2f})" if r.target is not None else "")
        )
        name = r.name + (" (chosen K)" if r.chosen else "")
        scores = [_score(r.eval.get(split), level_char) + _before(r, split, level_char) for split in ("valid", "test")]
        lines.append(table_row([name, f"`{r.arch.short()}`", f"{r.params / 1e6:.2f}M", *scores, est, *speedups]))
    return "\n".join(lines)


def repeatability_table(rows: list[ModelRow], level_char: bool) -> str:
    """Mean and range of accuracy and speed-up over the seeds of every searched design and target."""
    groups: dict[tuple, list[ModelRow]] = {}
    for r in rows:
        if r.target is not None:
            groups.setdefault((r.design, r.target), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return ""
    metric = "bpc" if level_char else "ppl"
    batches = bench_batches(rows)
    head = [
        "design",
        "target",
        "seeds",
        f"valid {metric.upper()}",
        f"test {metric.upper()}",
        *[f"speed-up b{b}" for b in batches],
    ]
    lines = [table_row(head), "|" + "---|" * len(head)]

    def spread(values: list[float], fmt: str) -> str:
        if len(values) < 2:
            return "–"
        return (
            f"{statistics.mean(values):{fmt}} ± {statistics.stdev(values):{fmt}} "
            f"({min(values):{fmt}}–{max(values):{fmt}})"
        )

    for (design, target), members in sorted(groups.items()):
        cells = [design, f"{target:.2f}", str(len(members))]
        for split in ("valid", "test"):
            cells.append(spread([m.eval[split][metric] for m in members if m.eval.get(split)], ".3f"))
        for b in batches:
            cells.append(spread([m.by_batch[b]["speedup"] for m in members if b in m.by_batch], ".2f"))
        lines.append(table_row(cells))
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """``run_dir/report.md`` and its figures: the verdict first, then the table of every model, then the rest."""
    run_dir = Path(run_dir)
    rows = collect(run_dir)
    meta = read_json_object(rows[0].path / "config.json")
    level_char = meta.get("vocab", {}).get("level") == "char"
    lut = read_json_object(run_dir / "lut.json")
    rows, sampled, missing = draw_samples(rows)
    found = searches(run_dir)
    text = [f"# planer report: {run_dir.name}", ""]
    text += [line for v in verdicts(rows, level_char, lut.get("fingerprint", {}).get("batch")) for line in (v, "")]
    text += [_settings(lut, rows), "", results_table(rows, level_char), ""]
    sections = [
        architectures(rows),
        repeatability(rows, level_char),
        sandwich_sweep(read_json_object(run_dir / "sandwich.json").get("valid_loss", {})),
        latency_ms(rows),
        in_llamacpp(read_json_object(run_dir / LLAMACPP_RECORD), rows),
        wall_times(rows, found, lut),
        search_confidence(found),
        samples_section(rows, sampled, missing),
    ]
    text += [line for section in sections if section for line in (*section, "")]
    text += figures(run_dir, rows, lut, found, "BPC" if level_char else "PPL")
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def draw_samples(rows: list[ModelRow]) -> tuple[list[ModelRow], dict[str, dict], str]:
    """The rows with every model's text sample (drawn once, see ``samples``), the samples by name, and why the
    first one missing is: a report made after the data or a model's weights went away still stands, without the
    samples it cannot draw."""
    prompt = cache(lambda: prompt_text(rows[0].path))
    drawn, sampled, missing = [], {}, ""
    for r in rows:
        try:
            r = dataclasses.replace(r, sample=model_sample(r.path, prompt))
            sampled[r.name] = r.sample
        except PlanerError as e:
            missing = missing or f"{r.name}: {e}"
        drawn.append(r)
    return drawn, sampled, missing


def architectures(rows: list[ModelRow]) -> list[str]:
    return [
        "Architectures, block by block (s skip, aH attention with H heads, aHkK the same over K key/value heads, f "
        "feed-forward, fN feed-forward of N hidden units, m1/m2 MoE top-1/top-2):",
        "",
        *[f"- {r.name}: `{r.arch}`" for r in rows],
    ]


def repeatability(rows: list[ModelRow], level_char: bool) -> list[str]:
    table = repeatability_table(rows, level_char)
    return ["Repeatability over seeds (mean ± standard deviation, and range):", "", table] if table else []


def sandwich_sweep(sweep: dict) -> list[str]:
    if not sweep:
        return []
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sweep.items())
    return [f"Sandwich: K chosen on the valid split; valid loss (nats per token) of each K: {losses}."]


def _settings(lut: dict, rows: list[ModelRow]) -> str:
    """Where and how the latencies were measured, in one paragraph."""
    fp = lut.get("fingerprint", {})
    device = fp.get("device", platform.processor() or platform.machine())
    env = next((r.bench for r in rows if r.bench), {})
    timing = ""
    if env:
        e, st = env["environment"], env["settings"]
        timing = (
            f" Speed-ups are end-to-end: {workload_words(env)}, timed side by side with "
            f"the baseline ({st['repeats']} interleaved rounds after {st['warmup']} warm-up, median) on "
            f"{e['device']}, {e['dtype']}, {e['threads']} thread(s)."
        )
    table = (
        f" The latency table was profiled at batch {fp['batch']}, {fp['dtype']}, {fp['threads']} thread(s); "
        "'est. latency' is its estimate as a fraction of the baseline's."
        if fp
        else ""
    )
    limits = sorted({(k.batch, k.estimate.target) for r in rows if r.found and r.found.knapsack
                     for k in r.found.knapsack.limits})  # fmt: skip
    kept = (
        " The search also kept its estimate within "
        + ", ".join(f"{f:g} of the baseline's at batch {b}" for b, f in limits)
        + " (search.limits, each from a table profiled at that batch)."
        if limits
        else ""
    )
    return f"Measured on {device}, torch {torch.__version__}, Python {platform.python_version()}.{table}{kept}{timing}"


def figures(run_dir: Path, rows: list[ModelRow], lut: dict, found: dict[str, Search], metric: str) -> list[str]:
    """Write every figure the run's files allow (``found``: its searches); returns the Markdown that shows them."""
    shown = []

    def add(name: str, caption: str) -> None:
        shown.extend([f"![{caption}]({name})", ""])

    plots.arch_strips(rows, run_dir / "archs.png")
    add("archs.png", "architectures")
    if any(r.bench for r in rows):
        batches = bench_batches(rows)
        lut_batch = lut.get("fingerprint", {}).get("batch")
        batch = lut_batch if lut_batch in batches else batches[len(batches) // 2]
        plots.speedups(rows, run_dir / "speedup.png")
        add("speedup.png", "speed-up per batch size")
        if any(r.eval.get("valid") and r.bench for r in rows):  # models trained by hand may be unscored
            plots.pareto(rows, batch, metric, run_dir / "pareto.png")
            add("pareto.png", "accuracy against latency")
        points = [
            (r, r.estimated_ratio, 1.0 / r.by_batch[batch]["speedup"])
            for r in rows
            if r.estimated_ratio and r.design != "baseline" and batch in r.by_batch
        ]
        if points:
            plots.estimate_vs_measured(points, batch, run_dir / "latency_estimate.png")
            add("latency_estimate.png", "estimated against measured latency")
    if lut.get("blocks"):
        plots.block_latencies(lut, run_dir / "blocks.png")
        add("blocks.png", "block latencies")
    for name, search in found.items():
        if name.startswith("search-") and search.log:
            title = f"{name}: most probable option per block"
            plots.search_evolution(search.log, search.record.space, title, run_dir / f"{name}.png")
            add(f"{name}.png", f"architecture probabilities during {name}")
    return shown
