"""How well does the latency table predict end-to-end latency? (the paper's Figures 5b and 6, on this machine)

Samples random architectures of the baseline's length from the search space, gives them random weights, measures
each end to end, and compares with the table's estimate. By default the table's probes and the architectures
are timed in the same interleaved rounds, so the comparison tests the estimator and not the machine's drift
between two sessions; ``--lut`` compares against a table profiled earlier instead, drift included.

    .venv/bin/python benchmarks/latency_fidelity.py [--config configs/shakespeare-char.yaml] [--archs 24]
        [--out benchmarks/out] [--lut runs/x/lut.json] [--seed 0] [--set latency.repeats=100 ...]
        [--arch-json runs/x/search-*/arch.json]   (these architectures, and random ones only with --archs)

Any backbone and workload (``latency.workload``): the gpt config's decode table is checked the same way.

Writes OUT/fidelity.md, OUT/fidelity.json, OUT/fidelity_scatter.png and OUT/block_latency.png.
``--compare A/lut.json B/lut.json`` instead prints how far two profiles lie apart (repeatability).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from planer.config import load_config  # noqa: E402
from planer.errors import PlanerError  # noqa: E402
from planer.latency.table import (  # noqa: E402
    DTYPES,
    FIXED,
    LatencyTable,
    known_vocab_size,
    latency_device,
    measuring,
    private_rng,
    probe_calls,
    probe_models,
    profiled_specs,
    sample_models,
    summarize,
    table_from_samples,
    time_interleaved,
)
from planer.latency.workload import workload_call  # noqa: E402
from planer.models.arch import Arch, BlockSpec  # noqa: E402
from planer.models.backbone import build_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "benchmarks" / "out"


def random_archs(cfg, count: int, seed: int) -> dict[str, Arch]:
    """The baseline and ``count`` distinct random architectures of its length, by their short names."""
    rng = random.Random(seed)
    positions = 2 * cfg.model.n_layer
    if count > len(set(cfg.search.space)) ** positions - 1:
        raise PlanerError(f"the search space holds fewer than {count} other architectures of length {positions}")
    archs = {"baseline": Arch.baseline(cfg.model.n_layer, cfg.model.n_head)}
    while len(archs) < count + 1:
        arch = Arch(tuple(BlockSpec.parse(rng.choice(cfg.search.space)) for _ in range(positions)))
        archs.setdefault(arch.short(), arch)
    return archs


def measure(cfg, archs: dict[str, Arch], lut: Path | None) -> tuple[LatencyTable, dict[str, np.ndarray]]:
    """The table, and every architecture's per-round end-to-end times.

    Without ``lut`` the table's probes run in the same rounds as the architectures, so both see the same load.
    """
    lc = cfg.latency
    device = latency_device(lc)
    with private_rng(device, seed=1):
        models = {
            name: build_model(cfg.model, arch).to(device=device, dtype=DTYPES[lc.dtype]) for name, arch in archs.items()
        }
    if lut is not None:
        table = LatencyTable.load(lut)
        table.check(cfg, where=str(lut))
        return table, sample_models(models, lc.batch_size, lc, device)
    specs = profiled_specs(cfg)
    fixed, blocks = probe_models(cfg, specs)
    with measuring([fixed, blocks, *models.values()], lc.threads):
        calls = probe_calls(cfg, specs, fixed, blocks)
        calls |= {f"arch {name}": workload_call(m, lc.batch_size, lc, device) for name, m in models.items()}
        samples = time_interleaved(calls, lc.warmup, lc.repeats, device, progress="timing probes and architectures")
    table = table_from_samples(cfg, {name: samples[name] for name in (FIXED, *specs)}, seconds=0.0)
    return table, {name: samples[f"arch {name}"] for name in models}


def workload_size(cfg) -> str:
    lc, m = cfg.latency, cfg.model
    return {"segment": f"tgt_len {m.tgt_len}, mem_len {m.mem_len}", "prefill": f"prompt {lc.prompt}",
            "decode": f"one token after {lc.context} cached"}[lc.workload]  # fmt: skip


def given_archs(cfg, paths: list[str]) -> dict[str, Arch]:
    """The baseline and the architectures of ``arch.json`` files (named by their folders), e.g. a search's picks."""
    archs = {"baseline": Arch.baseline(cfg.model.n_layer, cfg.model.n_head)}
    for path in paths:
        archs.setdefault(Path(path).parent.name, Arch.load(path))
    return archs


def compare(table: LatencyTable, archs: dict[str, Arch], samples: dict[str, np.ndarray]) -> tuple[list[dict], dict]:
    rows = []
    for name, arch in archs.items():
        measured = summarize(samples[name])
        estimated = table.estimate(arch)
        rows.append(
            {
                "name": name,
                "arch": str(arch),
                "estimated": round(estimated, 4),
                "measured": measured,
                "error": round((estimated - measured["median"]) / measured["median"], 4),
            }
        )
    est = np.array([r["estimated"] for r in rows])
    meas = np.array([r["measured"]["median"] for r in rows])
    summary = {
        "archs": len(rows),
        "pearson_r": round(float(np.corrcoef(est, meas)[0, 1]), 4),
        "median_abs_rel_error": round(float(np.median(np.abs(est - meas) / meas)), 4),
    }
    return rows, summary


def markdown(cfg, table: LatencyTable, rows: list[dict], summary: dict, shared_rounds: bool) -> str:
    fp = table.fingerprint
    lines = [
        f"Latency fidelity on {fp['device']}, {fp['dtype']}, {fp['threads']} thread(s), batch {fp['batch']}, "
        f"workload {cfg.latency.workload} ({workload_size(cfg)}), {cfg.latency.repeats} rounds; table "
        + ("profiled in the same rounds" if shared_rounds else f"from {table.settings.get('created')}"),
        "",
        "| arch | estimated ms | measured ms (p10-p90) | error |",
        "|---|---:|---:|---:|",
    ]
    for r in rows:
        m = r["measured"]
        lines.append(
            f"| {r['name']} | {r['estimated']:.3f} | {m['median']:.3f} ({m['p10']:.3f}-{m['p90']:.3f}) "
            f"| {100 * r['error']:+.1f}% |"
        )
    lines += [
        "",
        f"Pearson r = {summary['pearson_r']:.4f} over {summary['archs']} architectures; "
        f"median absolute relative error = {100 * summary['median_abs_rel_error']:.1f}%",
    ]
    return "\n".join(lines) + "\n"


def scatter(rows: list[dict], summary: dict, path: Path) -> None:
    est = [r["estimated"] for r in rows]
    meas = [r["measured"]["median"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(est, meas, s=18, label="random architectures")
    base = next(r for r in rows if r["name"] == "baseline")
    ax.scatter([base["estimated"]], [base["measured"]["median"]], s=40, marker="*", color="C3", label="baseline")
    hi = 1.05 * max(est + meas)
    ax.plot([0, hi], [0, hi], "k--", lw=1, label="y = x")
    ax.set(
        xlim=(0, hi),
        ylim=(0, hi),
        xlabel="estimated latency (ms)",
        ylabel="measured end-to-end latency (ms)",
        title=f"Estimated vs measured (r = {summary['pearson_r']:.3f})",
    )
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def block_bars(cfg, table: LatencyTable, path: Path) -> None:
    ref = f"attn:{cfg.model.n_head}"
    names = list(table.blocks)
    norm = table.latency(ref)
    med = np.array([table.blocks[n]["median"] for n in names]) / norm
    lo = med - np.array([table.blocks[n]["p10"] for n in names]) / norm
    hi = np.array([table.blocks[n]["p90"] for n in names]) / norm - med
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.bar(names, med, yerr=[np.maximum(lo, 0), np.maximum(hi, 0)], capsize=3, color="C0")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    fp = table.fingerprint
    ax.set(
        ylabel=f"latency relative to {ref}",
        xlabel="block",
        title=f"Block latency, {fp['device']}, batch {fp['batch']}, d_model {fp['d_model']}",
    )
    ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def repeatability(a: LatencyTable, b: LatencyTable) -> str:
    """How far two profiles of the same fingerprint lie apart, block by block, as |a - b| / mean."""

    def rel(x, y):
        return abs(x - y) / max((x + y) / 2, 1e-9)

    lines = ["| block | median A | median B | diff | p10 diff |", "|---|---:|---:|---:|---:|"]
    diffs = {q: [] for q in ("median", "p10")}
    for spec in a.blocks:
        for q in diffs:
            diffs[q].append(rel(a.blocks[spec][q], b.blocks[spec][q]))
        lines.append(
            f"| {spec} | {a.blocks[spec]['median']:.3f} | {b.blocks[spec]['median']:.3f} "
            f"| {100 * diffs['median'][-1]:.1f}% | {100 * diffs['p10'][-1]:.1f}% |"
        )
    lines.append(
        f"\nmedian over blocks: {100 * np.median(diffs['median']):.1f}% (medians), "
        f"{100 * np.median(diffs['p10']):.1f}% (p10s)"
    )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "shakespeare-char.yaml"))
    parser.add_argument("--archs", type=int, help="random architectures besides the baseline (default: 24, none with "
                        "--arch-json)")  # fmt: skip
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output directory")
    parser.add_argument("--lut", help="compare with this lut.json instead of profiling in the same rounds")
    parser.add_argument("--seed", type=int, default=0, help="seed of the architecture sample")
    parser.add_argument("--arch-json", nargs="+", metavar="ARCH", help="these arch.json files instead of random archs")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.add_argument("--compare", nargs=2, metavar="LUT", help="only compare two lut.json files of one fingerprint")
    args = parser.parse_args(argv)
    try:
        if args.compare:
            a, b = (LatencyTable.load(path) for path in args.compare)
            if a.fingerprint != b.fingerprint:
                raise PlanerError("the two tables have different fingerprints")
            print(repeatability(a, b))
            return 0
        cfg = known_vocab_size(load_config(args.config, args.set))
        archs = (
            random_archs(cfg, 24 if args.archs is None else args.archs, args.seed)
            if args.archs or not args.arch_json
            else {}
        )
        archs |= given_archs(cfg, args.arch_json) if args.arch_json else {}
        table, samples = measure(cfg, archs, Path(args.lut) if args.lut else None)
    except PlanerError as e:
        print(f"latency_fidelity: error: {e}", file=sys.stderr)
        return 2
    rows, summary = compare(table, archs, samples)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if out.resolve() == DEFAULT_OUT and not (out / ".gitignore").exists():
        (out / ".gitignore").write_text("*\n")  # results of this machine, never committed
    text = markdown(cfg, table, rows, summary, shared_rounds=args.lut is None)
    (out / "fidelity.md").write_text(text)
    (out / "fidelity.json").write_text(
        json.dumps({"summary": summary, "rows": rows, "table": table.to_dict()}, indent=1) + "\n"
    )
    scatter(rows, summary, out / "fidelity_scatter.png")
    block_bars(cfg, table, out / "block_latency.png")
    print(text + f"wrote {out}/fidelity.md, fidelity.json, fidelity_scatter.png, block_latency.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
