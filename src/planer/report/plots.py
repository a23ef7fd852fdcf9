"""The figures of a report, as PNG files: what people would rather look at than tables.

Each function takes the rows that ``report.rows.collect`` read back from a run directory and writes one figure.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import to_rgb  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

from planer.models.arch import BlockSpec  # noqa: E402
from planer.report.rows import ModelRow, bench_batches  # noqa: E402

KIND_COLORS = {"skip": "#f0f0f0", "ffl": "#4c9f70", "ffl-narrow": "#a1d99b", "ffl-wide": "#1f5e3a", "moe1": "#e6a23c",
               "moe2": "#b5651d"}  # fmt: skip
ATTN_COLORS = {1: "#c6dbef", 2: "#6baed6", 4: "#2171b5", 8: "#08306b"}


def block_color(spec: BlockSpec) -> str:
    if spec.kind == "attn":
        return ATTN_COLORS.get(spec.heads, "#08519c")
    if spec.kind == "ffl":
        return KIND_COLORS["ffl-narrow" if spec.neurons else "ffl" if spec.width == 1 else "ffl-wide"]
    if spec.kind == "moe":
        return KIND_COLORS["moe1" if spec.top_k == 1 else "moe2"]
    return KIND_COLORS["skip"]


def legend_handles() -> list[Patch]:
    handles = [
        Patch(facecolor=c, edgecolor="grey", label=f"attn {h} head{'s' * (h > 1)}") for h, c in ATTN_COLORS.items()
    ]
    labels = {
        "skip": "skip",
        "ffl": "feed-forward",
        "ffl-narrow": "narrowed feed-forward",
        "ffl-wide": "wide feed-forward",
        "moe1": "MoE top-1",
        "moe2": "MoE top-2",
    }
    return handles + [Patch(facecolor=KIND_COLORS[k], edgecolor="grey", label=v) for k, v in labels.items()]


def arch_strips(rows: list[ModelRow], path: Path) -> None:
    """One row of coloured cells per model, like the paper's Figures 7 and 8."""
    width = max(len(r.arch) for r in rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.45 * width + 3), 0.5 * len(rows) + 1.6))
    for y, r in enumerate(rows):
        for x, spec in enumerate(r.arch):
            ax.add_patch(plt.Rectangle((x, y), 0.95, 0.9, facecolor=block_color(spec), edgecolor="grey", lw=0.5))
    ax.set_xlim(0, width)
    ax.set_ylim(len(rows), -0.1)
    ax.set_yticks([y + 0.45 for y in range(len(rows))], [r.name for r in rows])
    ax.set_xticks([x + 0.475 for x in range(width)], [str(x + 1) for x in range(width)], fontsize=7)
    ax.set_xlabel("block position (input at the left)")
    ax.set_title("Architectures")
    below_labels = 0.55 / (fig.get_figheight() * (fig.subplotpars.top - fig.subplotpars.bottom))  # 0.55 inch
    ax.legend(
        handles=legend_handles(),
        loc="upper center",
        bbox_to_anchor=(0.5, -below_labels),
        ncol=5,
        fontsize=7,
        frameon=False,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


DESIGN_STYLE = {
    "baseline": ("black", "*"),
    "planer": ("#d62728", "o"),
    "planer-gumbel": ("#e377c2", "h"),  # a second search method of the same run
    "planer-knapsack": ("#e377c2", "h"),
    "dense-depth": ("#8c564b", "v"),
    "dense-heads": ("#ff7f0e", "P"),
    "dense-width": ("#17becf", "X"),
    "drop-layers": ("#bcbd22", "<"),
    "drop-sublayers": ("#393b79", ">"),
    "iso": ("#9467bd", "s"),
    "sandwich": ("#1f77b4", "^"),
    "par": ("#2ca02c", "D"),
    "other": ("grey", "x"),
}


SEED_LINES = ("-", "--", ":", "-.")


def design_point(ax, design: str, x: float, y: float, labelled: set) -> str:
    """One model as a point in its design's colour and marker, the legend naming each design once; its colour."""
    color, marker = DESIGN_STYLE.get(design, DESIGN_STYLE["other"])
    size = 150 if marker == "*" else 45
    ax.scatter([x], [y], marker=marker, color=color, s=size, zorder=3, label=None if design in labelled else design)
    labelled.add(design)
    return color


def lighter(color: str, amount: float) -> tuple[float, float, float]:
    """``color`` mixed with white: 0 keeps it, 1 is white."""
    return tuple(c + (1.0 - c) * amount for c in to_rgb(color))


def speedups(rows: list[ModelRow], path: Path) -> None:
    """Measured end-to-end speed-up over the baseline against batch size, one line per model (paper Figure 4).

    Each design has its colour, darker for tighter latency targets; repeats with other seeds are dashed or dotted.
    """
    benched = [r for r in rows if r.bench]

    def variant(r: ModelRow) -> tuple[float, str]:  # seeds of one target share a shade; fixed designs go by name
        return (r.target, "") if r.target is not None else (0.0, r.name)

    variants = {d: sorted({variant(r) for r in benched if r.design == d}) for d in {r.design for r in benched}}
    fig, ax = plt.subplots(figsize=(6.5, 4.0))
    for r in benched:
        color, marker = DESIGN_STYLE.get(r.design, DESIGN_STYLE["other"])
        siblings = variants[r.design]
        shade = siblings.index(variant(r)) / max(1, len(siblings) - 1)
        points = sorted((batch, b["speedup"]) for batch, b in r.by_batch.items())
        ax.plot(
            [p[0] for p in points],
            [p[1] for p in points],
            marker=marker,
            color=lighter(color, 0.6 * shade),
            ls=SEED_LINES[(r.seed - 1) % len(SEED_LINES)],
            lw=1.0,
            label=r.name,
        )
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="baseline")
    batches = bench_batches(benched)
    ax.set_xscale("log", base=2)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel("batch size (segments)")
    ax.set_ylabel("speed-up over the baseline (x)")
    ax.set_title("Measured end-to-end speed-up")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 + len(benched) // 16)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def pareto(rows: list[ModelRow], batch: int, metric: str, path: Path) -> None:
    """Accuracy against measured latency (relative to the baseline), one colour and marker per design."""
    fig, ax = plt.subplots(figsize=(6.0, 4.4))
    labelled, tags = set(), []
    for r in rows:
        valid = r.eval.get("valid")
        per = r.by_batch
        latency = 1.0 if r.design == "baseline" else (1.0 / per[batch]["speedup"] if batch in per else None)
        if not valid or latency is None:
            continue
        score = valid["bpc"] if metric == "BPC" else valid["ppl"]
        color = design_point(ax, r.design, latency, score, labelled)
        tags.append((latency, score, color, point_tag(r)))
    label_points(ax, tags)
    ax.set_xlabel(f"measured latency relative to the baseline (batch {batch})")
    ax.set_ylabel(f"validation {metric} (lower is better)")
    sandwich = any(r.design == "sandwich" for r in rows)  # its labels say K only where one ran
    ax.set_title("Accuracy against latency (labels: latency target" + (", or Sandwich K)" if sandwich else ")"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def block_latencies(lut: dict, path: Path) -> None:
    """Every profiled block's latency, with its p10-p90 spread (paper Figure 6)."""
    names = list(lut["blocks"])
    stats = [lut["blocks"][n] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(names) + 1.5), 3.6))
    colors = [block_color(BlockSpec.parse(n)) for n in names]
    medians = [s["median"] for s in stats]
    errors = [[m - s["p10"] for m, s in zip(medians, stats)], [s["p90"] - m for m, s in zip(medians, stats)]]
    bars = ax.bar(range(len(names)), medians, color=colors, edgecolor="grey", yerr=errors, capsize=3)
    ax.bar_label(bars, fmt="%.2f", fontsize=7, padding=2)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    fp = lut["fingerprint"]
    ax.set_ylabel("latency (ms), median and p10-p90")
    ax.set_xlabel("block")
    ax.set_title(f"Block latencies: {fp['device']}, batch {fp['batch']}, {fp['threads']} thread(s)", fontsize=9)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def search_evolution(records: list[dict], space: list[str], title: str, path: Path) -> None:
    """Per position and epoch, the most probable option (colour) and its probability (the number in the cell).

    Colours stay unshaded: attention widths are shades of one blue, so shading by probability would blur them.
    """
    epochs, positions = len(records), len(records[0]["probs"])
    specs = [BlockSpec.parse(s) for s in space]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.5 * epochs + 3), 0.3 * positions + 1.8))
    undecided = Patch(facecolor="white", edgecolor="#c8c8c8", hatch="//", label="all options equal")
    ties = False
    for x, rec in enumerate(records):
        for y, probs in enumerate(rec["probs"]):
            best = max(range(len(probs)), key=probs.__getitem__)
            tie = max(probs) - min(probs) < 1e-6  # the first epoch: no option leads yet, whatever argmax says
            ties |= tie
            color = "white" if tie else block_color(specs[best])
            ax.add_patch(
                plt.Rectangle(
                    (x, y),
                    0.95,
                    0.9,
                    facecolor=color,
                    hatch="//" if tie else None,
                    edgecolor="#c8c8c8" if tie else "grey",
                    lw=0.4,
                )
            )
            dark = sum(to_rgb(color)) < 1.5
            ax.text(
                x + 0.47,
                y + 0.5,
                f"{probs[best]:.2f}",
                ha="center",
                va="center",
                fontsize=6,
                color="white" if dark else "black",
            )
    ax.set_xlim(0, epochs)
    ax.set_ylim(positions, 0)
    labels, corrections = [], 0
    for r in records:  # the end-of-search correction's epochs all carry the last epoch's number
        corrections += bool(r.get("correction"))
        labels.append(f"c{corrections}" if r.get("correction") else str(r["epoch"]))
    ax.set_xticks([x + 0.47 for x in range(epochs)], labels, fontsize=7)
    ax.set_yticks([y + 0.45 for y in range(positions)], [str(y + 1) for y in range(positions)], fontsize=7)
    ax.set_xlabel("epoch" + (" (c1, c2, ...: end-of-search latency correction)" if corrections else ""))
    ax.set_ylabel("block position")
    ax.set_title(title)
    ax.legend(
        handles=legend_handles() + [undecided] * ties,
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
        fontsize=7,
        frameon=False,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def label_points(ax, points: list[tuple[float, float, str, str]]) -> None:
    """Label scatter points (x, y, colour, text) without labels covering each other or the points.

    Points of one colour closer than 3% of the axes share one label, so that a cluster of models reads as one.
    Each label takes the first of four places around its point (right above, right below, left above, left below)
    that overlaps no marker and no label placed before it; where none is free, the first.
    """
    ax.figure.canvas.draw()  # settle the axes limits
    (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
    groups: list[list] = []
    for x, y, color, text in points:
        if not text:
            continue
        near = next(
            (
                g
                for g in groups
                if g[2] == color and abs(g[0] - x) < 0.03 * (x1 - x0) and abs(g[1] - y) < 0.03 * (y1 - y0)
            ),
            None,
        )
        if near is None:
            groups.append([x, y, color, [text]])
        else:
            near[3].append(text)
    renderer = ax.figure.canvas.get_renderer()
    marker = 4 * ax.figure.dpi / 72  # about a marker's radius, in pixels
    taken = []
    for x, y, _, _ in points:
        px, py = ax.transData.transform((x, y))
        taken.append(Bbox.from_extents(px - marker, py - marker, px + marker, py + marker))
    places = [
        ((5, 3), "left", "bottom"),
        ((5, -3), "left", "top"),
        ((-5, 3), "right", "bottom"),
        ((-5, -3), "right", "top"),
    ]
    for x, y, color, texts in groups:

        def place(offset, ha, va):
            label = ax.annotate(
                ", ".join(texts),
                (x, y),
                textcoords="offset points",
                xytext=offset,
                ha=ha,
                va=va,
                fontsize=6,
                color=color,
            )
            return label, label.get_window_extent(renderer)

        for spot in places:
            label, box = place(*spot)
            if not any(box.overlaps(t) for t in taken):
                break
            label.remove()
        else:
            label, box = place(*places[0])
        taken.append(box)


def point_tag(row: ModelRow) -> str:
    """The short label of a model in a scatter plot: its latency target (and seed), or Sandwich's K."""
    if row.target is not None:
        return f"{row.target:.2f}" + (f" s{row.seed}" if row.seed > 1 else "")
    return row.name.removeprefix("sandwich-") if row.design == "sandwich" else ""


def estimate_vs_measured(points: list[tuple[ModelRow, float, float]], batch: int, path: Path) -> None:
    """Estimated against measured latency relative to the baseline, like the paper's Figure 5b."""
    fig, ax = plt.subplots(figsize=(5.2, 4.2))
    top = max(1.05, *[max(e, m) for _, e, m in points]) * 1.05
    ax.plot([0, top], [0, top], color="grey", ls="--", lw=0.8, label="y = x")
    labelled, tags = set(), []
    for row, est, meas in points:
        color = design_point(ax, row.design, est, meas, labelled)
        tags.append((est, meas, color, point_tag(row)))
    label_points(ax, tags)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel("estimated latency / baseline (latency table)")
    ax.set_ylabel(f"measured latency / baseline (batch {batch})")
    ax.set_title("Estimated and measured latency (labels: target)", fontsize=10)
    ax.legend(fontsize=7, loc="upper left")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
