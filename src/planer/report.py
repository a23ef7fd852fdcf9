"""The report of a run directory: a Markdown table of every model's accuracy and latency.

Everything is read back from the files the stages wrote, so a report can be made again at any time.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from planer import plots
from planer.arch import Arch
from planer.errors import PlanerError


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def collect(run_dir: Path) -> list[dict]:
    """One row per trained model in the run directory, the baseline first."""
    dirs = [run_dir / "baseline"] + sorted(p for p in run_dir.iterdir() if p.is_dir() and p.name != "baseline"
                                           and (p / "summary.json").exists())
    rows = []
    for d in dirs:
        summary = _read(d / "summary.json")
        if not summary:
            continue
        name = d.name
        search = _read(run_dir / name.replace("planer-", "search-") / "arch.json") if name.startswith("planer-") else {}
        rows.append({"name": name, "arch": Arch.parse(" ".join(summary["arch"])), "params": summary["params"],
                     "eval": _read(d / "eval.json"), "bench": _read(d / "bench.json"),
                     "target": search.get("target"), "estimated_ratio": search.get("estimated_ratio")})
    return rows


def _score(result: dict | None, level_char: bool) -> str:
    if not result:
        return "–"
    return f"{result['bpc']:.3f}" if level_char else f"{result['ppl']:.2f}"


def results_table(rows: list[dict], level_char: bool) -> str:
    batches = sorted({row["batch"] for r in rows for row in r["bench"].get("batches", [])})
    metric = "BPC" if level_char else "PPL"
    head = ["model", "arch", "params", f"valid {metric}", f"test {metric}", "est. latency", *[f"speed-up b{b}" for b in batches]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_batch = {row["batch"]: row for row in r["bench"].get("batches", [])}
        speedups = [f"{per_batch[b]['speedup']:.2f}x" if b in per_batch else "–" for b in batches]
        est = f"{r['estimated_ratio']:.2f} (target {r['target']:.2f})" if r["estimated_ratio"] else "1.00"
        lines.append("| " + " | ".join([r["name"], f"`{r['arch'].short()}`", f"{r['params'] / 1e6:.2f}M",
                                        _score(r["eval"].get("valid"), level_char),
                                        _score(r["eval"].get("test"), level_char), est, *speedups]) + " |")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    run_dir = Path(run_dir)
    if not (run_dir / "baseline" / "summary.json").exists():
        raise PlanerError(f"{run_dir} holds no finished baseline: nothing to report")
    meta = _read(run_dir / "baseline" / "config.json")
    level_char = meta.get("vocab", {}).get("level") == "char"
    rows = collect(run_dir)
    lut = _read(run_dir / "lut.json")
    device = lut.get("fingerprint", {}).get("device", platform.processor() or platform.machine())
    text = [f"# planer report: {run_dir.name}", "",
            f"Measured on {device}, torch {torch.__version__}. Estimated latency is the latency table's estimate as a "
            "fraction of the baseline's; speed-ups are end-to-end, measured side by side with the baseline.", "",
            results_table(rows, level_char), "",
            "Architectures, block by block (s skip, aH attention with H heads, f feed-forward, m1/m2 MoE top-1/top-2):", ""]
    text += [f"- {r['name']}: `{r['arch']}`" for r in rows]
    text += ["", *figures(run_dir, rows, lut.get("fingerprint", {}).get("batch"), "BPC" if level_char else "PPL")]
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def figures(run_dir: Path, rows: list[dict], lut_batch: int | None, metric: str) -> list[str]:
    """Write every figure the run's files allow; returns the Markdown that shows them."""
    shown = []

    def add(name: str, caption: str) -> None:
        shown.extend([f"![{caption}]({name})", ""])

    plots.arch_strips(rows, run_dir / "archs.png")
    add("archs.png", "architectures")
    if any(r["bench"] for r in rows):
        batches = sorted({b["batch"] for r in rows for b in r["bench"].get("batches", [])})
        batch = lut_batch if lut_batch in batches else batches[len(batches) // 2]
        plots.speedups(rows, run_dir / "speedup.png")
        add("speedup.png", "speed-up per batch size")
        plots.pareto(rows, batch, metric, run_dir / "pareto.png")
        add("pareto.png", "accuracy against latency")
        points = [(r["name"], r["estimated_ratio"], 1.0 / per[batch]["speedup"])
                  for r in rows if r["estimated_ratio"]
                  for per in [{b["batch"]: b for b in r["bench"].get("batches", [])}] if batch in per]
        if points:
            plots.estimate_vs_measured(points, batch, run_dir / "latency_estimate.png")
            add("latency_estimate.png", "estimated against measured latency")
    for search_dir in sorted(run_dir.glob("search-*")):
        log = search_dir / "search.jsonl"
        found = _read(search_dir / "arch.json")
        if log.exists() and found:
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            name = f"{search_dir.name}.png"
            plots.search_evolution(records, found["space"], f"Search {search_dir.name}: most probable option",
                                   run_dir / name)
            add(name, f"architecture probabilities during {search_dir.name}")
    return shown
