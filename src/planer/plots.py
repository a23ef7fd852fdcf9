"""The figures of a report, as PNG files: what people would rather look at than tables.

Each function takes the rows that ``report.collect`` read back from a run directory and writes one figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from planer.arch import BlockSpec  # noqa: E402

KIND_COLORS = {"skip": "#f0f0f0", "ffl": "#4c9f70", "ffl-wide": "#1f5e3a", "moe1": "#e6a23c", "moe2": "#b5651d"}
ATTN_COLORS = {1: "#c6dbef", 2: "#6baed6", 4: "#2171b5", 8: "#08306b"}


def block_color(spec: BlockSpec) -> str:
    if spec.kind == "attn":
        return ATTN_COLORS.get(spec.heads, "#08519c")
    if spec.kind == "ffl":
        return KIND_COLORS["ffl" if spec.width == 1 else "ffl-wide"]
    if spec.kind == "moe":
        return KIND_COLORS["moe1" if spec.top_k == 1 else "moe2"]
    return KIND_COLORS["skip"]


def legend_handles() -> list[Patch]:
    handles = [Patch(facecolor=c, edgecolor="grey", label=f"attn {h} head{'s' * (h > 1)}") for h, c in ATTN_COLORS.items()]
    labels = {"skip": "skip", "ffl": "feed-forward", "ffl-wide": "wide feed-forward", "moe1": "MoE top-1",
              "moe2": "MoE top-2"}
    return handles + [Patch(facecolor=KIND_COLORS[k], edgecolor="grey", label=v) for k, v in labels.items()]


def arch_strips(rows: list[dict], path: Path) -> None:
    """One row of coloured cells per model, like the paper's Figures 7 and 8."""
    width = max(len(r["arch"]) for r in rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * width + 3), 0.5 * len(rows) + 1.6))
    for y, r in enumerate(rows):
        for x, spec in enumerate(r["arch"]):
            ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, facecolor=block_color(spec), edgecolor="grey", lw=0.5))
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), -0.1)
    ax.set_yticks([y + 0.45 for y in range(len(rows))], [r["name"] for r in rows])
    ax.set_xticks([x + 0.475 for x in range(width)], [str(x + 1) for x in range(width)], fontsize=7)
    ax.set_xlabel("block position (input at the left)")
    ax.set_title("Architectures")
    ax.legend(handles=legend_handles(), loc="upper center", bbox_to_anchor=(0.5, -0.35 if len(rows) < 4 else -0.2),
              ncol=5, fontsize=7, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def speedups(rows: list[dict], path: Path) -> None:
    """Measured end-to-end speed-up over the baseline at every batch size, like the paper's Figure 4."""
    benched = [r for r in rows if r["bench"]]
    batches = sorted({b["batch"] for r in benched for b in r["bench"]["batches"]})
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(batches) * max(1, len(benched)) / 2 + 3), 3.6))
    width = 0.8 / max(1, len(benched))
    for i, r in enumerate(benched):
        per = {b["batch"]: b["speedup"] for b in r["bench"]["batches"]}
        xs = [j + i * width for j in range(len(batches))]
        bars = ax.bar(xs, [per.get(b, 0.0) for b in batches], width, label=r["name"])
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="baseline")
    ax.set_xticks([j + width * (len(benched) - 1) / 2 for j in range(len(batches))], [str(b) for b in batches])
    ax.set_xlabel("batch size (segments)")
    ax.set_ylabel("speed-up over the baseline (x)")
    ax.set_title("Measured end-to-end speed-up")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def pareto(rows: list[dict], batch: int, metric: str, path: Path) -> None:
    """Accuracy against measured latency (relative to the baseline) for every model."""
    fig, ax = plt.subplots(figsize=(5.5, 4.0))
    for r in rows:
        valid = r["eval"].get("valid")
        if not valid:
            continue
        per = {b["batch"]: b for b in r["bench"].get("batches", [])}
        latency = 1.0 if r["name"] == "baseline" else (1.0 / per[batch]["speedup"] if batch in per else None)
        if latency is None:
            continue
        score = valid["bpc"] if metric == "BPC" else valid["ppl"]
        marker = "*" if r["name"] == "baseline" else "o"
        ax.scatter([latency], [score], marker=marker, s=140 if marker == "*" else 50, zorder=3)
        ax.annotate(r["name"], (latency, score), textcoords="offset points", xytext=(6, 4), fontsize=7)
    ax.set_xlabel(f"measured latency relative to the baseline (batch {batch})")
    ax.set_ylabel(f"validation {metric} (lower is better)")
    ax.set_title("Accuracy against latency")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def search_evolution(records: list[dict], space: list[str], title: str, path: Path) -> None:
    """Per position and epoch, the most probable option (colour) and its probability (shade)."""
    epochs, positions = len(records), len(records[0]["probs"])
    specs = [BlockSpec.parse(s) for s in space]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * epochs + 3), 0.3 * positions + 1.8))
    for x, rec in enumerate(records):
        for y, probs in enumerate(rec["probs"]):
            best = max(range(len(probs)), key=probs.__getitem__)
            ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, facecolor=block_color(specs[best]),
                                       alpha=0.25 + 0.75 * probs[best], edgecolor="grey", lw=0.4))
            ax.text(x + 0.47, y + 0.5, f"{probs[best]:.2f}", ha="center", va="center", fontsize=5)
    ax.set_xlim(0, epochs)
    ax.set_ylim(positions, 0)
    ax.set_xticks([x + 0.47 for x in range(epochs)], [str(r["epoch"]) for r in records], fontsize=7)
    ax.set_yticks([y + 0.45 for y in range(positions)], [str(y + 1) for y in range(positions)], fontsize=7)
    ax.set_xlabel("epoch")
    ax.set_ylabel("block position")
    ax.set_title(title)
    ax.legend(handles=legend_handles(), loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7, frameon=False)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def estimate_vs_measured(points: list[tuple[str, float, float]], batch: int, path: Path) -> None:
    """Estimated against measured latency relative to the baseline, like the paper's Figure 5b."""
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    top = max(1.05, *[max(e, m) for _, e, m in points]) * 1.05
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=0.8, label="y = x")
    for name, est, meas in points:
        ax.scatter([est], [meas], zorder=3)
        ax.annotate(name, (est, meas), textcoords="offset points", xytext=(5, 3), fontsize=7)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("estimated latency / baseline (latency table)")
    ax.set_ylabel(f"measured latency / baseline (batch {batch})")
    ax.set_title("Estimated and measured latency")
    ax.legend(fontsize=7)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
