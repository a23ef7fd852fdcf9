"""The report's sections after its main table: what a ratio alone hides.

Absolute latencies in milliseconds (a 2x speed-up of 0.3 ms may not matter where 2x of 300 ms does), the wall time
of every stage (what the result cost), how sure each search was of the options it chose, and a sample of each
model's text. Each function reads what the stages wrote and returns Markdown lines, or none when there is nothing
to show.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

from planer.errors import PlanerError
from planer.io.records import KnapsackDetails, SearchRecord, arch_of
from planer.models.arch import Arch, BlockSpec
from planer.report.rows import ModelRow, bench_batches
from planer.report.samples import SEED, TOKENS


def table_row(cells: list[str]) -> str:
    """One row of a Markdown table."""
    return "| " + " | ".join(cells) + " |"


WORKLOAD_WORDS = {
    "segment": "the forward of one segment with full memory",
    "prefill": "the prefill of a {tokens}-token prompt",
    "decode": "one new token with a key/value cache (ms per token)",
}


def workload_words(bench: dict) -> str:
    """What the timed call was, from bench.json (one written before workloads timed segments)."""
    return WORKLOAD_WORDS[bench.get("workload", "segment")].format(tokens=bench.get("tokens_per_call"))


def tokens_per_second(bench: dict, batch: int, ms: float) -> float:
    """The new tokens a model reads per second in ``ms`` per call at ``batch`` (decode: tokens generated); a
    bench.json from before workloads timed segments of its ``tgt_len``."""
    return 1000.0 * batch * (bench.get("tokens_per_call") or bench["tgt_len"]) / ms


def latency_ms(rows: list[ModelRow]) -> list[str]:
    """Each model's median ms per segment at each batch size (bench.json), and the baseline's beside them."""
    batches = bench_batches(rows)
    if not batches:
        return []
    base = {b: [r.by_batch[b]["baseline"]["median"] for r in rows if b in r.by_batch] for b in batches}
    times = max(len(v) for v in base.values())
    name = next((r.name for r in rows if r.design == "baseline"), "baseline")

    def base_cell(values: list[float]) -> str:
        spread = f" ({min(values):.2f}–{max(values):.2f})" if len(values) > 1 else ""
        return f"{statistics.median(values):.2f}{spread}" if values else "–"

    beside = (
        "the model in the same rounds"
        if times == 1
        else f"each model in the same rounds; its row is the median of those {times} timings, with their range"
    )
    bench = next(r.bench for r in rows if r.bench)
    lines = [
        f"Latency in milliseconds: the median of {workload_words(bench)} at each batch size, and the tokens per "
        f"second that makes. The baseline was timed beside {beside}.",
        "",
        table_row(["model", *[f"ms b{b}" for b in batches], *[f"tok/s b{b}" for b in batches]]),
        "|" + "---|" * (2 * len(batches) + 1),
        table_row([name, *[base_cell(base[b]) for b in batches],
                   *[f"{tokens_per_second(bench, b, statistics.median(base[b])):.0f}" for b in batches]]),
    ]  # fmt: skip
    for r in rows:
        per = r.by_batch
        if per:
            ms = [per[b]["model"]["median"] if b in per else None for b in batches]
            speed = [f"{tokens_per_second(bench, b, m):.0f}" if m else "–" for b, m in zip(batches, ms)]
            lines.append(table_row([r.name, *[f"{m:.2f}" if m else "–" for m in ms], *speed]))
    return lines


def in_llamacpp(record: dict, rows: list[ModelRow]) -> list[str]:
    """llamacpp.json's timings (``benchmarks/llamacpp_bench.py --record``) beside each model's PyTorch speed-up at
    batch 1: the two runtimes price blocks differently, and a CPU user runs the first."""
    if not record:
        return []
    try:
        pytorch = {r.name: r.by_batch[1]["speedup"] for r in rows if 1 in r.by_batch}
        lines = [
            "## In llama.cpp",
            "",
            f"{record['runtime']}, {record['threads']} threads, batch 1: a {record['prompt']}-token prompt, then "
            f"{record['decode']} decode steps; medians of {record['rounds']} interleaved rounds, every file beside "
            f"the baseline's (`{record['baseline']}`). PyTorch's speed-up is this run's own at batch 1.",
            "",
            "| model | file | MB | prefill ms / token | decode ms / token | decode tokens / s | prefill speed-up "
            "| decode speed-up | PyTorch speed-up |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for name, m in record["models"].items():
            torch_up = f"{pytorch[name]:.2f}x" if name in pytorch else "–"
            lines.append(
                table_row(
                    [
                        name,
                        f"`{m['file']}`",
                        f"{m['bytes'] / 1e6:.1f}",
                        f"{m['prefill_ms']:.3f}",
                        f"{m['decode_ms']:.3f}",
                        f"{1000 / m['decode_ms']:.1f}",
                        f"{m['prefill_speedup']:.2f}x",
                        f"{m['decode_speedup']:.2f}x",
                        torch_up,
                    ]
                )  # fmt: skip
            )
    except (KeyError, TypeError, AttributeError, ZeroDivisionError):
        raise PlanerError(
            "llamacpp.json is damaged (not what llamacpp_bench.py --record writes); move it away"
        ) from None
    return lines


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 120:
        return f"{seconds:.1f} s" if seconds < 10 else f"{seconds:.0f} s"
    minutes = round(seconds / 60)
    return f"{minutes} min" if minutes < 120 else f"{minutes // 60} h {minutes % 60:02d} min"


@dataclass(frozen=True)
class Search:
    """A search folder of the run: its arch.json, and its search.jsonl (the Gumbel search's epochs; else none)."""

    record: SearchRecord
    log: list[dict]


def searches(run_dir: Path) -> dict[str, Search]:
    """Every search folder in ``run_dir`` (one holding an arch.json), by name."""
    found = {}
    for d in sorted(p for p in run_dir.iterdir() if (p / SearchRecord.FILE).is_file()):
        log = d / "search.jsonl"
        records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()] if log.exists() else []
        found[d.name] = Search(SearchRecord.read(d), records)
    return found


def wall_times(rows: list[ModelRow], found: dict[str, Search], lut: dict) -> list[str]:
    """The wall time of every stage that recorded one, in the order ``planer run`` runs them, and their sum."""
    stages = []

    def training(r: ModelRow) -> None:
        s = r.summary
        tokens = f" ({s.tokens:,} tokens)" if s.tokens is not None else ""
        note = f"{s.steps} steps{tokens}, {s.ms_per_step:.1f} ms a step" if s.ms_per_step is not None else ""
        stages.append((f"train {r.name}", s.seconds, note or f"copied from {s.adopted_from or '?'}"))

    def searched(name: str) -> tuple[str, float | None, str]:
        return f"search {name}", found[name].record.seconds, found[name].record.method

    for r in rows:
        if r.design == "baseline":
            training(r)
    profiled = lut.get("settings", {}).get("seconds")
    if lut:
        stages.append(("profile blocks (lut.json)", profiled, f"{len(lut.get('blocks', {}))} blocks"))
    listed = set()
    for r in rows:
        if r.search in found and r.search not in listed:
            listed.add(r.search)
            stages.append(searched(r.search))
        if r.sizing_seconds is not None:
            stages.append((f"size {r.name}", r.sizing_seconds, "its blocks chosen, scored before training"))
        if r.design != "baseline":
            training(r)
    stages += [searched(n) for n in found if n not in listed]
    total = sum(s for _, s, _ in stages if s is not None)
    lines = [
        "Wall time of each stage (evaluation and benchmarks not counted):",
        "",
        table_row(["stage", "wall time", "what"]),
    ]
    lines += ["|---|---|---|", *[table_row([n, duration(s), note]) for n, s, note in stages]]
    return [*lines, table_row(["total", duration(total), ""])]


def _code(spec: str) -> str:
    return Arch((BlockSpec.parse(spec),)).short()


def chosen_probabilities(record: SearchRecord, alpha: list[list[float]]) -> list[tuple[str, float]]:
    """Per position, the chosen option and its probability under ``alpha`` (the softmax of that position's row)."""
    space = [str(BlockSpec.parse(s)) for s in record.space]
    chosen = []
    for row, spec in zip(alpha, record.arch):
        top = max(row)
        weights = [math.exp(a - top) for a in row]
        chosen.append((spec, weights[space.index(str(BlockSpec.parse(spec)))] / sum(weights)))
    return chosen


def reranked(found: KnapsackDetails) -> str:
    """What the short training of the knapsack's candidates measured, and which it kept ("" without a rerank)."""
    scores = found.rerank
    if not scores:
        return ""
    shown = ", ".join(f"`{arch_of(c.arch).short()}` {c.valid_loss:.3f}" for c in scores)
    pick = arch_of(found.knapsack_pick["arch"]).short()
    return (f" The sum of single swaps picked `{pick}`; {len(scores)} picks trained {scores[0].steps} steps each "
            f"with phase 2's recipe scored (valid nats per token) {shown}, and the lowest was kept.")  # fmt: skip


def confidence(name: str, search: Search) -> str:
    """How sure one search was: the Gumbel search's final probabilities of its choices, or, for the knapsack's
    exact pick, the loss increase it predicted for each choice."""
    record, found = search.record, search.record.knapsack
    if found is not None:
        increases = [p.chosen_increase for p in found.positions]
        shown = ", ".join(f"{_code(p.chosen)} {inc:+.3f}" for p, inc in zip(found.positions, increases))
        text = (f"- `{name}` (knapsack): an exact pick under the latency budget, so no probabilities; the loss "
                f"increase it predicted for each chosen option, swapped alone into the baseline (nats per token): "
                f"{shown}; in all {sum(increases):+.3f} over the baseline's {found.baseline_loss:.3f}.")  # fmt: skip
        return text + reranked(found)
    if not search.log:
        return f"- `{name}`: no search.jsonl, so no probabilities to show."
    chosen = chosen_probabilities(record, search.log[-1]["alpha"])
    probs = [p for _, p in chosen]
    even = 1 / len(record.space)
    return (f"- `{name}` (Gumbel-softmax): the final probability of each chosen option, block by block: "
            + ", ".join(f"{_code(s)} {p:.2f}" for s, p in chosen)
            + f"; lowest {min(probs):.2f}, mean {statistics.mean(probs):.2f} (1 is certain; {even:.2f}, one in "
            f"{len(record.space)}, no preference at all).")  # fmt: skip


def search_confidence(found: dict[str, Search]) -> list[str]:
    if not found:
        return []
    return ["How sure each search was of what it chose:", "", *[confidence(n, s) for n, s in found.items()]]


def fenced(text: str) -> list[str]:
    """``text`` as a Markdown code block whose fence no run of backticks inside it can close."""
    fence = "`" * max(3, 1 + max(map(len, re.findall("`+", text)), default=0))
    return [fence + "text", *text.splitlines(), fence]


def samples_section(rows: list[ModelRow], sampled: dict[str, dict], missing: str) -> list[str]:
    """Each model's text after the shared prompt, and the command that prints it again."""
    note = [f"No text sample of {missing}"] if missing else []
    if not sampled:
        return note
    prompt = next(iter(sampled.values()))["prompt"]
    lines = [
        f"What each model writes after the prompt {prompt!r} (the first whole line of the valid split): {TOKENS} "
        f"tokens, seed {SEED}, temperature 1. `planer generate --run MODEL --prompt {shlex.quote(prompt)} --tokens "
        f"{TOKENS}` prints the same text.",
        "",
    ]
    for r in rows:
        if r.name in sampled:
            lines += [f"**{r.name}**:", "", *fenced(sampled[r.name]["text"]), ""]
    return [*lines, *note] if note else lines[:-1]
