"""The ``planer`` command: argument parsing only; every sub-command calls one library function.

A PlanerError (bad input) becomes one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from planer.allocator import keep_freed_memory
from planer.errors import PlanerError


def _arch(value: str | None, cfg):
    from planer.arch import Arch
    from planer.designs import named_arch

    named = named_arch(value or "baseline", cfg.model)
    if named is not None:
        return named
    if Path(value).is_file():
        return Arch.load(value)
    if value.endswith(".json") or "/" in value:
        raise PlanerError(f"architecture file not found: {value}")
    return Arch.parse(value)


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints results."""
    return int(os.environ.get("RANK", "0"))


def cmd_train(args) -> None:
    from planer.config import load_config
    from planer.train import train

    cfg = load_config(args.config, args.set)
    arch = _arch(args.arch, cfg)
    summary = train(cfg, args.out, arch, force=args.force, resume=args.resume)
    if _rank() == 0:
        print(
            f"trained {arch.short()} ({summary['params']:,} parameters) in {summary['seconds']:.0f} s: "
            f"best valid loss {summary['best_valid_loss']:.4f} -> {args.out}"
        )


def cmd_evaluate(args) -> None:
    from planer.evaluate import evaluate_run

    result = evaluate_run(args.run, args.split, args.text, args.device)
    if args.json:
        print(json.dumps(result))
        return
    where = args.text or args.split
    bpc = f", {result['bpc']:.4f} bpc" if result["bpc"] is not None else ""
    print(
        f"{where}: loss {result['loss']:.4f} nats/token, ppl {result['ppl']:.3f}{bpc} "
        f"over {result['tokens']:,} tokens ({result['unk']} unseen in training)"
    )


def cmd_profile(args) -> None:
    from planer.config import load_config
    from planer.latency import profile_dir

    overrides = list(args.set)
    if args.batch is not None:
        overrides.append(f"latency.batch_size={args.batch}")
    if args.device is not None:
        overrides.append(f"latency.device={args.device}")
    table, path = profile_dir(load_config(args.config, overrides), args.out, force=args.force)
    fp, how = table.fingerprint, "reused" if table.reused else f"profiled in {table.settings['seconds']:.0f} s"
    print(
        f"{path}: {how}; {fp['device']}, {fp['dtype']}, {fp['threads']} thread(s), batch {fp['batch']}, "
        f"tgt_len {fp['tgt_len']}, mem_len {fp['mem_len']}"
    )
    for name, stats in [("fixed", table.fixed), *table.blocks.items()]:
        print(f"  {name:12s} {stats['median']:9.3f} ms  (p10 {stats['p10']:.3f}, p90 {stats['p90']:.3f})")


def cmd_bench(args) -> None:
    from planer.latency import bench

    result = bench(
        args.run,
        args.baseline,
        _ints(args.batch, "--batch"),
        device=args.device,
        threads=args.threads,
        repeats=args.repeats,
    )
    print(
        f"{args.run}/bench.json: {result['environment']['device']}, {result['environment']['threads']} thread(s); "
        f"baseline: {result['baseline']}"
    )
    for row in result["batches"]:
        print(
            f"  batch {row['batch']:4d}: model {row['model']['median']:9.3f} ms, "
            f"baseline {row['baseline']['median']:9.3f} ms, speed-up {row['speedup']:.2f}x"
        )


def _floats(text: str, what: str) -> list[float]:
    try:
        return [float(t) for t in text.split(",")]
    except ValueError:
        raise PlanerError(f"{what} expects comma-separated numbers, got '{text}'") from None


def _ints(text: str, what: str) -> list[int]:
    try:
        return [int(t) for t in text.split(",")]
    except ValueError:
        raise PlanerError(f"{what} expects comma-separated integers, got '{text}'") from None


def cmd_search(args) -> None:
    from planer.config import load_config
    from planer.designs import iso_space
    from planer.search import search

    cfg = load_config(args.config, args.set)
    if args.space == "iso":
        cfg.search.space = iso_space(cfg.search.space, cfg.model.n_experts)
    arch = search(
        cfg, args.out, args.target, lut_path=args.lut, force=args.force, init_from=args.init_from, resume=args.resume
    )
    if _rank() > 0:
        return
    meta = json.loads((Path(args.out) / "arch.json").read_text())
    print(
        f"found {arch.short()}: estimated {meta['estimated_ratio']:.3f} of the baseline's latency "
        f"(target {args.target:g}) -> {args.out}/arch.json"
    )


def cmd_run(args) -> None:
    from planer.config import load_config
    from planer.pipeline import parse_designs, run_pipeline

    cfg = load_config(args.config, args.set)
    out = run_pipeline(
        cfg,
        args.out,
        _floats(args.targets, "--targets"),
        designs=parse_designs(args.designs),
        seeds=args.seeds,
        force=args.force,
        batches=_ints(args.batches, "--batches"),
    )
    print((out / "report.md").read_text())


def cmd_report(args) -> None:
    from planer.report import write_report

    print(f"wrote {write_report(args.run)}")


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one ``planer: error:`` line every other bad input gets."""

    def error(self, message: str):
        self.exit(2, f"planer: error: {self.prog}: {message}\n")


def _config_command(sub, name: str, help: str, out_help: str, force_help: str, func) -> argparse.ArgumentParser:
    """A sub-command that reads a config (with overrides) and writes into an output directory."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=func)
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="planer", description="Latency-aware sparsely activated Transformers.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = _config_command(
        sub,
        "train",
        "train an architecture from scratch",
        "output directory",
        "overwrite a non-empty output directory",
        cmd_train,
    )
    p.add_argument("--arch", help="baseline (default), sandwich:K, par, a list of block specs, or an arch.json file")
    p.add_argument("--resume", action="store_true", help="continue from the newest state in OUT/resume")

    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split or a text file")
    p.add_argument("--run", required=True, help="directory holding model.safetensors and config.json")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    p.add_argument("--text", help="evaluate on this text file instead of a split")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = _config_command(
        sub,
        "profile",
        "measure every candidate block on this device into DIR/lut.json",
        "directory for lut.json (a run directory)",
        "profile again even if DIR/lut.json exists",
        cmd_profile,
    )
    p.add_argument("--batch", help="batch size to profile at (default: latency.batch_size)")
    p.add_argument("--device", help="cpu, cuda or auto (default: latency.device)")

    p = sub.add_parser("bench", help="end-to-end latency of a checkpoint beside the baseline")
    p.add_argument("--run", required=True, help="directory holding model.safetensors and config.json")
    p.add_argument("--baseline", help="baseline checkpoint directory (default: the baseline arch, random weights)")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's latency.device)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the run's latency.threads)")
    p.add_argument("--repeats", type=int, help="timed rounds per batch size (default: the run's latency.repeats)")
    p.set_defaults(func=cmd_bench)

    p = _config_command(
        sub,
        "search",
        "phase 1: search an architecture for a latency target",
        "output directory (search.jsonl, arch.json)",
        "overwrite a non-empty output directory",
        cmd_search,
    )
    p.add_argument("--target", required=True, type=float, help="latency target, a fraction of the baseline's in (0, 1]")
    p.add_argument("--lut", help="latency table to use (default: OUT/lut.json, profiled if absent)")
    p.add_argument("--init-from", help="trained baseline checkpoint to start the supernet's options from")
    p.add_argument("--resume", action="store_true", help="continue from the newest state in OUT/resume")
    p.add_argument(
        "--space",
        choices=["config", "iso"],
        default="config",
        help="iso: the config's space with every MoE option replaced by an FFL of as many parameters",
    )

    p = _config_command(
        sub,
        "run",
        "the whole pipeline into one run directory (resumable)",
        "run directory",
        "redo every stage",
        cmd_run,
    )
    p.add_argument("--targets", default="0.5", help="comma-separated latency targets (default 0.5)")
    p.add_argument(
        "--designs",
        default="",
        help="designs to compare against: sandwich, par, iso, sandwich:K (comma-separated; default none)",
    )
    p.add_argument("--batches", default="1,8,64", help="batch sizes of the end-to-end latency (default 1,8,64)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every search and retraining with this many seeds")

    p = sub.add_parser("report", help="write report.md for a run directory")
    p.add_argument("--run", required=True, help="run directory")
    p.set_defaults(func=cmd_report)
    return parser


DATA_PARALLEL = {"train", "search"}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, or a malformed command line (already reported in one line)
        return e.code
    try:
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and args.command not in DATA_PARALLEL:
            raise PlanerError(
                f"'planer {args.command}' runs in one process; only train and search run under torchrun with several"
            )
        args.func(args)
    except PlanerError as e:
        print(f"planer: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("planer: interrupted", file=sys.stderr)
        return 130
    return 0
