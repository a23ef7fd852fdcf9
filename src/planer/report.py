"""The report of a run directory: a Markdown table of every model's accuracy and latency.

Everything is read back from the files the stages wrote, so a report can be made again at any time.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

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
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path
