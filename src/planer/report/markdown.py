"""The report of a run directory: a Markdown table of every model's accuracy and latency.

Everything is read back from the files the stages wrote, so a report can be made again at any time.
"""

from __future__ import annotations

import json
import platform
import statistics
from functools import cache
from pathlib import Path

import torch

from planer.config import config_from_dict
from planer.errors import PlanerError
from planer.io.checkpoint import load_meta, read_json_object
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.models.backbone import backbone
from planer.report import plots
from planer.report.details import latency_ms, samples_section, search_confidence, searches, wall_times
from planer.report.samples import SAMPLE_FILE, model_sample, prompt_text
from planer.report.verdict import is_found, verdicts

DESIGN_ORDER = ("baseline", "planer", "dense-depth", "dense-heads", "dense-width", "iso", "sandwich", "par")


def _estimator(lut: dict, baseline: Arch | None):
    """The latency table's estimate of an arch as a fraction of the baseline's (None where the table cannot say)."""
    try:
        table = LatencyTable(lut["fingerprint"], lut["fixed"], lut["blocks"], lut.get("settings", {}))
    except KeyError:
        table = None

    def estimate(arch: Arch) -> float | None:
        if table is None or baseline is None:
            return None
        try:
            return table.estimate(arch) / table.estimate(baseline)
        except PlanerError:  # a block the table does not hold
            return None

    return estimate


def model_dirs(run_dir: Path) -> list[Path]:
    """The trained models in ``run_dir``: every folder holding a finished training (``summary.json``)."""
    if not run_dir.is_dir():
        raise PlanerError(f"{run_dir} is not a folder")
    if (run_dir / "summary.json").exists():
        raise PlanerError(f"{run_dir} is one model's folder; report on the folder that holds it (and its baseline)")
    dirs = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / "summary.json").exists())
    if not dirs:
        raise PlanerError(f"{run_dir} holds no trained planer model (no folder with a summary.json): nothing to report")
    return dirs


def describe(d: Path) -> dict:
    """A model's design, target and repeat from its manifest (``run.json``, written by ``planer run``); a model
    trained by hand has none, and is the baseline when its arch is its config's baseline arch."""
    read_json_object(d / "summary.json")  # a damaged one is refused here, before anything is written
    manifest = read_json_object(d / "run.json")
    if manifest:
        design = manifest.get("rival") or manifest["design"]
        return {"design": design, "target": manifest.get("target"), "seed": manifest.get("repeat", 1),
                "search": manifest.get("search"), "recipe": manifest.get("recipe", {})}  # fmt: skip
    meta = load_meta(d)
    n_layer, n_head = meta["config"]["model"]["n_layer"], meta["config"]["model"]["n_head"]
    is_base = meta.get("arch") == Arch.baseline(n_layer, n_head).specs()
    return {"design": "baseline" if is_base else "other", "target": None, "seed": 1, "search": None, "recipe": {}}


def export_hint(model_dir: Path, arch: Arch) -> str:
    """How the model leaves planer, in its backbone's words (``Backbone.export_hint``)."""
    cfg = config_from_dict(load_meta(model_dir)["config"]).model
    return backbone(cfg).export_hint(model_dir, cfg, arch)


def collect(run_dir: Path) -> list[dict]:
    """One row per trained model in the folder: the baseline, then PLANER, the rivals, iso, Sandwich and PAR."""
    chosen = read_json_object(run_dir / "sandwich.json").get("chosen")
    described = {d: describe(d) for d in model_dirs(run_dir)}
    base = next(
        (read_json_object(d / "summary.json")["arch"] for d, v in described.items() if v["design"] == "baseline"), None
    )
    estimate = _estimator(read_json_object(run_dir / "lut.json"), Arch.parse(" ".join(base)) if base else None)
    rows = []
    for d, info in described.items():
        summary = read_json_object(d / "summary.json")
        search = read_json_object(run_dir / info["search"] / "arch.json") if info["search"] else {}
        arch = Arch.parse(" ".join(summary["arch"]))
        rows.append({"name": d.name, "path": d, **info, "chosen": d.name == chosen, "arch": arch,
                     "params": summary["params"], "seconds": summary.get("seconds"), "summary": summary,
                     "sample": read_json_object(d / SAMPLE_FILE), "export": export_hint(d, arch),
                     "eval": read_json_object(d / "eval.json"), "bench": read_json_object(d / "bench.json"),
                     "target": info["target"] if info["target"] is not None else search.get("target"),
                     "estimated_ratio": search.get("estimated_ratio") or estimate(arch), "found": search})  # fmt: skip
    order = {d: i for i, d in enumerate(DESIGN_ORDER)}
    rank = lambda d: order["planer"] + 0.5 if is_found(d) and d != "planer" else order.get(d, len(order))  # noqa: E731
    rows.sort(key=lambda r: (rank(r["design"]), r["target"] or 0.0, r["seed"], r["name"]))
    return rows


def _score(result: dict | None, level_char: bool) -> str:
    if not result:
        return "–"
    return f"{result['bpc']:.3f}" if level_char else f"{result['ppl']:.2f}"


def results_table(rows: list[dict], level_char: bool) -> str:
    batches = sorted({row["batch"] for r in rows for row in r["bench"].get("batches", [])})
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
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        per_batch = {row["batch"]: row for row in r["bench"].get("batches", [])}
        speedups = [f"{per_batch[b]['speedup']:.2f}x" if b in per_batch else "–" for b in batches]
        est = (
            "–"
            if r["estimated_ratio"] is None
            else f"{r['estimated_ratio']:.2f}" + (f" (target {r['target']:.2f})" if r["target"] is not None else "")
        )
        name = r["name"] + (" (chosen K)" if r["chosen"] else "")
        lines.append(
            "| "
            + " | ".join(
                [
                    name,
                    f"`{r['arch'].short()}`",
                    f"{r['params'] / 1e6:.2f}M",
                    _score(r["eval"].get("valid"), level_char),
                    _score(r["eval"].get("test"), level_char),
                    est,
                    *speedups,
                ]
            )
            + " |"
        )
    return "\n".join(lines)


def repeatability_table(rows: list[dict], level_char: bool) -> str:
    """Mean and range of accuracy and speed-up over the seeds of every searched design and target."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if r["target"] is not None:
            groups.setdefault((r["design"], r["target"]), []).append(r)
    groups = {k: v for k, v in groups.items() if len(v) > 1}
    if not groups:
        return ""
    metric = "bpc" if level_char else "ppl"
    batches = sorted({row["batch"] for r in rows for row in r["bench"].get("batches", [])})
    head = [
        "design",
        "target",
        "seeds",
        f"valid {metric.upper()}",
        f"test {metric.upper()}",
        *[f"speed-up b{b}" for b in batches],
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

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
            cells.append(spread([m["eval"][split][metric] for m in members if m["eval"].get(split)], ".3f"))
        for b in batches:
            cells.append(
                spread(
                    [row["speedup"] for m in members for row in m["bench"].get("batches", []) if row["batch"] == b],
                    ".2f",
                )
            )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_report(run_dir: str | Path) -> Path:
    """``run_dir/report.md`` and its figures: the verdict first, then the table of every model, then the rest."""
    run_dir = Path(run_dir)
    rows = collect(run_dir)
    meta = read_json_object(rows[0]["path"] / "config.json")
    level_char = meta.get("vocab", {}).get("level") == "char"
    lut = read_json_object(run_dir / "lut.json")
    sampled, missing = draw_samples(rows)
    found = searches(run_dir)
    text = [f"# planer report: {run_dir.name}", ""]
    text += [line for v in verdicts(rows, level_char, lut.get("fingerprint", {}).get("batch")) for line in (v, "")]
    text += [_settings(lut, rows), "", results_table(rows, level_char), ""]
    sections = [
        architectures(rows),
        repeatability(rows, level_char),
        sandwich_sweep(read_json_object(run_dir / "sandwich.json").get("valid_loss", {})),
        latency_ms(rows),
        wall_times(rows, found, lut),
        search_confidence(found),
        samples_section(rows, sampled, missing),
    ]
    text += [line for section in sections if section for line in (*section, "")]
    text += figures(run_dir, rows, lut, "BPC" if level_char else "PPL")
    path = run_dir / "report.md"
    path.write_text("\n".join(text) + "\n")
    return path


def draw_samples(rows: list[dict]) -> tuple[dict[str, dict], str]:
    """Every model's text sample (drawn once, see ``samples``) by name, and why the first one missing is: a report
    made after the data or a model's weights went away still stands, without the samples it cannot draw."""
    prompt = cache(lambda: prompt_text(rows[0]["path"]))
    sampled, missing = {}, ""
    for r in rows:
        try:
            r["sample"] = sampled[r["name"]] = model_sample(r["path"], prompt)
        except PlanerError as e:
            missing = missing or f"{r['name']}: {e}"
    return sampled, missing


def architectures(rows: list[dict]) -> list[str]:
    return [
        "Architectures, block by block (s skip, aH attention with H heads, f feed-forward, m1/m2 MoE top-1/top-2):",
        "",
        *[f"- {r['name']}: `{r['arch']}`" for r in rows],
    ]


def repeatability(rows: list[dict], level_char: bool) -> list[str]:
    table = repeatability_table(rows, level_char)
    return ["Repeatability over seeds (mean ± standard deviation, and range):", "", table] if table else []


def sandwich_sweep(sweep: dict) -> list[str]:
    if not sweep:
        return []
    losses = ", ".join(f"{k} {v:.4f}" for k, v in sweep.items())
    return [f"Sandwich: K chosen on the valid split; valid loss (nats per token) of each K: {losses}."]


def _settings(lut: dict, rows: list[dict]) -> str:
    """Where and how the latencies were measured, in one paragraph."""
    fp = lut.get("fingerprint", {})
    device = fp.get("device", platform.processor() or platform.machine())
    env = next((r["bench"] for r in rows if r["bench"]), {})
    timing = ""
    if env:
        e, st = env["environment"], env["settings"]
        timing = (
            f" Speed-ups are end-to-end forward passes over one segment with memory, timed side by side with "
            f"the baseline ({st['repeats']} interleaved rounds after {st['warmup']} warm-up, median) on "
            f"{e['device']}, {e['dtype']}, {e['threads']} thread(s)."
        )
    table = (
        f" The latency table was profiled at batch {fp['batch']}, {fp['dtype']}, {fp['threads']} thread(s); "
        "'est. latency' is its estimate as a fraction of the baseline's."
        if fp
        else ""
    )
    limits = sorted({(k["batch"], k["target"]) for r in rows for k in r["found"].get("limits", [])})
    kept = (
        " The search also kept its estimate within "
        + ", ".join(f"{f:g} of the baseline's at batch {b}" for b, f in limits)
        + " (search.limits, each from a table profiled at that batch)."
        if limits
        else ""
    )
    return f"Measured on {device}, torch {torch.__version__}, Python {platform.python_version()}.{table}{kept}{timing}"


def figures(run_dir: Path, rows: list[dict], lut: dict, metric: str) -> list[str]:
    """Write every figure the run's files allow; returns the Markdown that shows them."""
    shown = []

    def add(name: str, caption: str) -> None:
        shown.extend([f"![{caption}]({name})", ""])

    plots.arch_strips(rows, run_dir / "archs.png")
    add("archs.png", "architectures")
    if any(r["bench"] for r in rows):
        batches = sorted({b["batch"] for r in rows for b in r["bench"].get("batches", [])})
        lut_batch = lut.get("fingerprint", {}).get("batch")
        batch = lut_batch if lut_batch in batches else batches[len(batches) // 2]
        plots.speedups(rows, run_dir / "speedup.png")
        add("speedup.png", "speed-up per batch size")
        if any(r["eval"].get("valid") and r["bench"] for r in rows):  # models trained by hand may be unscored
            plots.pareto(rows, batch, metric, run_dir / "pareto.png")
            add("pareto.png", "accuracy against latency")
        points = [
            (r, r["estimated_ratio"], 1.0 / per[batch]["speedup"])
            for r in rows
            if r["estimated_ratio"] and r["design"] != "baseline"
            for per in [{b["batch"]: b for b in r["bench"].get("batches", [])}]
            if batch in per
        ]
        if points:
            plots.estimate_vs_measured(points, batch, run_dir / "latency_estimate.png")
            add("latency_estimate.png", "estimated against measured latency")
    if lut.get("blocks"):
        plots.block_latencies(lut, run_dir / "blocks.png")
        add("blocks.png", "block latencies")
    for search_dir in sorted(run_dir.glob("search-*")):
        log = search_dir / "search.jsonl"
        found = read_json_object(search_dir / "arch.json")
        if log.exists() and found:
            records = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
            name = f"{search_dir.name}.png"
            plots.search_evolution(
                records, found["space"], f"{search_dir.name}: most probable option per block", run_dir / name
            )
            add(name, f"architecture probabilities during {search_dir.name}")
    return shown
