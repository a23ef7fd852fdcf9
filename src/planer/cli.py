"""The ``planer`` command: argument parsing only; every sub-command calls one library function.

A PlanerError (bad input) becomes one line on stderr and exit code 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

from planer.errors import PlanerError
from planer.training.allocator import keep_freed_memory


def _arch(value: str | None, cfg):
    from planer.models.arch import Arch
    from planer.search.designs import named_arch

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
    from planer.config import load_config, steps_for_tokens
    from planer.training.loop import RunOptions
    from planer.training.train import Recipe, train

    cfg = load_config(args.config, args.set)
    arch = _arch(args.arch, cfg)
    if args.block_tokens and not args.teacher:
        raise PlanerError("--block-tokens distils blocks from a teacher: give --teacher too")
    if args.block_tokens < 0:
        raise PlanerError(f"--block-tokens must be 0 or more, got {args.block_tokens}")
    teacher, init_from = (Path(p) if p else None for p in (args.teacher, args.init_from))
    recipe = Recipe(teacher, init_from, steps_for_tokens(cfg, args.block_tokens))
    summary = train(cfg, args.out, arch, recipe, RunOptions(force=args.force, resume=args.resume))
    if _rank() == 0:
        print(
            f"trained {arch.short()} ({summary.params:,} parameters) in {summary.seconds:.0f} s: "
            f"best valid loss {summary.best_valid_loss:.4f} -> {args.out}"
        )


def cmd_evaluate(args) -> None:
    from planer.evaluation.evaluate import evaluate_run

    result = evaluate_run(args.run, args.split, args.text, args.device)
    if args.json:
        print(json.dumps(result))
        return
    where = args.text or args.split
    bpc = f", {result['bpc']:.4f} bpc" if result["bpc"] is not None else ""
    print(
        f"{where}: loss {result['loss']:.4f} nats/token, ppl {result['ppl']:.3f}{bpc} "
        f"over {result['tokens']:,} tokens ({result['unk']} outside the vocabulary)"
    )


def cmd_profile(args) -> None:
    from planer.config import load_config
    from planer.latency.table import profile_dir

    overrides = list(args.set)
    if args.batch is not None:
        overrides.append(f"latency.batch_size={args.batch}")
    if args.device is not None:
        overrides.append(f"latency.device={args.device}")
    table, path = profile_dir(load_config(args.config, overrides), args.out, force=args.force, progress=True)
    fp, how = table.fingerprint, "reused" if table.reused else f"profiled in {table.settings['seconds']:.0f} s"
    print(
        f"{path}: {how}; {fp['device']}, {fp['dtype']}, {fp['threads']} thread(s), batch {fp['batch']}, "
        f"tgt_len {fp['tgt_len']}, mem_len {fp['mem_len']}"
    )
    for name, stats in [("fixed", table.fixed), *table.blocks.items()]:
        print(f"  {name:12s} {stats['median']:9.3f} ms  (p10 {stats['p10']:.3f}, p90 {stats['p90']:.3f})")


def cmd_bench(args) -> None:
    from planer.latency.table import bench

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


def _limits(text: str) -> str:
    """``--limits 1:0.55,64:0.6`` as the ``--set`` of search.limits (checked there like the config file's)."""
    try:
        pairs = [(int(b), float(f)) for b, f in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise PlanerError(f"--limits expects BATCH:FRACTION pairs such as 1:0.55,64:0.6, got '{text}'") from None
    return "search.limits={" + ", ".join(f"{b}: {f!r}" for b, f in pairs) + "}"


def _add_limits(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--limits",
        help="BATCH:FRACTION,...: the found model must also stay within FRACTION of the baseline's latency at each "
        "BATCH, as estimated by a latency table profiled there (knapsack only; default: search.limits)",
    )


def cmd_search(args) -> None:
    from planer.config import load_config
    from planer.io.records import SearchRecord
    from planer.search.designs import iso_config
    from planer.search.methods import run_search
    from planer.training.loop import RunOptions

    cfg = load_config(args.config, [*args.set, *([_limits(args.limits)] if args.limits else [])])
    if args.space == "iso":
        cfg = iso_config(cfg)
    options = RunOptions(force=args.force, resume=args.resume)
    method = args.method or cfg.search.method
    arch = run_search(method, cfg, args.out, args.target, args.lut, args.init_from, options)
    if _rank() > 0:
        return
    estimate = SearchRecord.read(Path(args.out)).estimate
    print(
        f"found {arch.short()}: estimated {estimate.estimated_ratio:.3f} of the baseline's latency "
        f"(target {args.target:g}) -> {args.out}/arch.json"
    )
    if not estimate.meets_target:
        gap = estimate.estimated_ratio - args.target
        print(f"planer: warning: the found architecture is over its target by {gap:.3f} of the baseline's latency "
              f"({estimate.estimated_ratio:.3f} for {args.target:g})", file=sys.stderr)  # fmt: skip


def cmd_run(args) -> None:
    from planer.config import load_config
    from planer.pipeline import Plan, parse_designs, run_pipeline
    from planer.report.rows import collect
    from planer.report.verdict import verdicts

    overrides = list(args.set)
    methods = [m.strip() for m in (args.method or "").split(",") if m.strip()]
    if methods:
        overrides.append(f"search.method={methods[0]}")
    if args.batch:
        overrides.append(f"latency.batch_size={args.batch}")
    if args.limits:
        overrides.append(_limits(args.limits))
    cfg = load_config(args.config, overrides)
    plan = Plan(
        targets=tuple(_floats(args.targets, "--targets")),
        methods=tuple(methods[1:]),
        designs=parse_designs(args.designs),
        seeds=args.seeds,
        batches=tuple(_ints(args.batches, "--batches")),
        baseline=Path(args.baseline) if args.baseline else None,
    )
    result = run_pipeline(cfg, args.out, plan, force=args.force)
    skipped = [name for name, status in result.stages if status != "ran"]
    if skipped:
        print(f"planer run: {len(skipped)} stage(s) were done before and skipped: {', '.join(skipped)}")
    out = result.path
    rows = collect(out)
    level_char = rows[0].eval.get("valid", {}).get("bpc") is not None
    for line in verdicts(rows, level_char, cfg.latency.batch_size):
        print(line.replace("**", ""))
    print(f"report: {out / 'report.md'}")


def _show(value) -> str:
    """A config value as it would be written after ``--set``."""
    if isinstance(value, list):
        return "[" + ", ".join(map(_show, value)) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value) if value != "" else "''"


def cmd_config(args) -> None:
    from planer.config import describe, load_config

    rows = [("key", "type", "default", "value")]
    rows += [
        (key, kind, _show(default), _show(value))
        for key, kind, default, value in describe(load_config(args.config, args.set))
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[3])


def cmd_export(args) -> None:
    from planer.io.checkpoint import export

    if args.format and args.hf is None:
        raise PlanerError("--format chooses the form of an --hf folder; --onnx and --gguf have none")
    if args.gguf_type and args.gguf is None:
        raise PlanerError("--gguf-type chooses the tensor type of a --gguf file")
    if args.gguf is not None:
        result = export(args.run, "gguf", args.gguf, args.force, kind=args.gguf_type or "f32")
        pads = result["padded"]
        padded = f" ({pads} with a zero feed-forward after an attention that had none)" if pads else ""
        print(
            f"wrote {result['path']}: llama.cpp {result['architecture']}, {result['layers']} layers{padded}, {result['type']}"
        )
        return
    if args.hf is not None:
        result = export(args.run, args.format or "hf", args.hf, args.force)
        how = "with planer's modeling code: load it with trust_remote_code=True" if result["remote_code"] else "plain"
        print(f"wrote {result['path']}: {result['architecture']}, {how}")
        return
    result = export(args.run, "onnx", args.onnx, args.force)
    print(
        f"wrote {result['path']}: {result['arch']}, inputs {', '.join(result['inputs'])}; outputs "
        f"{', '.join(result['outputs'])}; onnxruntime's logits within {result['max_diff']:.1e} of planer's (relative to their scale)"
    )


def cmd_import(args) -> None:
    from planer.models.gpt.gguf import import_gguf
    from planer.models.gpt.hf import import_hf

    source = args.hf or args.gguf
    result = import_hf(args.hf, args.out) if args.hf else import_gguf(args.gguf, args.out)
    print(
        f"imported {source} ({result['flavour']}, {result['params']:,} parameters, {result['arch']}) "
        f"-> {result['path']}"
    )


def _prompt(args, vocab) -> list[int]:
    if args.prompt_ids is None:
        return vocab.encode(vocab.tokenize(args.prompt))[0].tolist()
    try:
        return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
    except ValueError:
        raise PlanerError(f"--prompt-ids expects token ids separated by spaces, got '{args.prompt_ids}'") from None


def cmd_generate(args) -> None:
    from planer import load
    from planer.evaluation.generate import generate

    model, vocab = load(args.run, args.device)
    prompt = _prompt(args, vocab)
    out = generate(model, prompt, args.tokens, args.temperature, args.top_k, args.seed)
    print(" ".join(map(str, out)) if args.ids else vocab.decode(prompt + out))


def cmd_report(args) -> None:
    from planer.report.markdown import write_report

    print(f"wrote {write_report(args.run)}")


PROG = "planer"


def short_usage(parser: argparse.ArgumentParser) -> str:
    """The command with its required arguments, then ``[options]``: a usage that fits in the one line of an error."""

    def spell(action: argparse.Action) -> str:
        return f"{action.option_strings[0]} {action.metavar or action.dest.upper()}"

    parts = [parser.prog]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            parts.append("COMMAND")
        elif action.required:
            parts.append(spell(action))
    for group in parser._mutually_exclusive_groups:
        if group.required:
            parts.append("(" + " | ".join(spell(a) for a in group._group_actions) + ")")
    return " ".join([*parts, "[options]"])


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """Every sub-command's parser by name, as the parser holds them (for the no-command hint and the README test)."""
    actions = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(actions[0].choices) if actions else {}


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as the one ``planer: error:`` line every other bad input gets, and a usage hint."""

    def error(self, message: str):
        where = "" if self.prog == PROG else f"{self.prog}: "
        hint = f"usage: {short_usage(self)}; see '{self.prog} --help'"
        self.exit(2, f"planer: error: {where}{message} ({hint})\n")


def _override(text: str) -> str:
    """``--set``'s value, checked as it is parsed: ``--set train.steps 40`` is told to write ``train.steps=40``
    instead of argparse's 'unrecognized arguments: 40'."""
    from planer.config import parse_override

    try:
        parse_override(text)
    except PlanerError as e:  # an ArgumentError without an argument: argparse reports the message as it is
        raise argparse.ArgumentError(None, str(e)) from None
    return text


OVERWRITE = "overwrite a non-empty output directory"


def _config_command(
    sub, name: str, help: str, func, out_help: str = "output directory", force_help: str = OVERWRITE
) -> argparse.ArgumentParser:
    """A sub-command that reads a config (with overrides) and writes into an output directory."""
    p = sub.add_parser(name, help=help)
    p.add_argument("--config", required=True, help="YAML config")
    p.add_argument("--out", required=True, help=out_help)
    _set_option(p)
    p.add_argument("--force", action="store_true", help=force_help)
    p.set_defaults(func=func)
    return p


def _set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--set",
        action="append",
        default=[],
        type=_override,
        metavar="KEY=VALUE",
        help="override a config value, e.g. train.lr=3e-4 (repeatable; 'planer config' lists the keys)",
    )


def _version() -> str:
    from importlib import metadata

    from planer import __version__

    try:
        torch = metadata.version("torch")
    except metadata.PackageNotFoundError:
        torch = "not installed"
    return f"planer {__version__} (torch {torch}, Python {platform.python_version()})"


def _add_train(sub) -> None:
    p = _config_command(sub, "train", "train an architecture (default: the baseline, from scratch)", cmd_train)
    p.add_argument("--arch", help="baseline (default), sandwich:K, par, a list of block specs, or an arch.json file")
    p.add_argument("--teacher", help="trained model directory to distil from (distill.weight, distill.temperature)")
    p.add_argument(
        "--init-from",
        help="start from a trained model of the same width (its most important heads, "
        "feed-forward blocks, upcycled experts) or from a search folder's supernet options",
    )
    p.add_argument(
        "--block-tokens",
        type=int,
        default=0,
        help="of the training's tokens, how many first train each block that differs from the teacher's alone, "
        "towards the teacher block's output (block-wise distillation; default 0)",
    )
    p.add_argument("--resume", action="store_true", help="continue from the newest state in OUT/resume")


def _add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="evaluate a checkpoint on a split or a text file")
    p.add_argument("--run", required=True, help="directory holding model.safetensors and config.json")
    p.add_argument("--split", default="valid", choices=["train", "valid", "test"], help="split (default valid)")
    p.add_argument("--text", help="evaluate on this text file instead of a split")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)


def _add_profile(sub) -> None:
    p = _config_command(sub, "profile", "measure every candidate block on this device into DIR/lut.json", cmd_profile,
                        "directory for lut.json (a run directory)", "profile again even if DIR/lut.json exists")  # fmt: skip
    p.add_argument("--batch", help="batch size to profile at (default: latency.batch_size)")
    p.add_argument("--device", help="cpu, cuda or auto (default: latency.device)")


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="end-to-end latency of a checkpoint beside the baseline")
    p.add_argument("--run", required=True, help="directory holding model.safetensors and config.json")
    p.add_argument("--baseline", help="baseline checkpoint directory (default: the baseline arch, random weights)")
    p.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    p.add_argument("--device", help="cpu, cuda or auto (default: the run's latency.device)")
    p.add_argument("--threads", type=int, help="CPU threads (default: the run's latency.threads)")
    p.add_argument("--repeats", type=int, help="timed rounds per batch size (default: the run's latency.repeats)")
    p.set_defaults(func=cmd_bench)


def _add_search(sub) -> None:
    p = _config_command(sub, "search", "phase 1: search an architecture for a latency target", cmd_search,
                        "output directory (arch.json; the gumbel search also search.jsonl)")  # fmt: skip
    p.add_argument("--target", required=True, type=float, help="latency target, a fraction of the baseline's in (0, 1]")
    p.add_argument("--lut", help="latency table to use (default: OUT/lut.json, profiled if absent)")
    p.add_argument(
        "--init-from",
        help="trained or imported baseline checkpoint to start from (gumbel: the supernet's options; knapsack: "
        "required, the options are swapped into it); its architecture replaces the config's model section, all but "
        "model.tgt_len and what only training reads",
    )
    p.add_argument("--method", choices=["gumbel", "knapsack"], help="search method (default: search.method, knapsack)")
    p.add_argument("--resume", action="store_true", help="continue from the newest state in OUT/resume")
    _add_limits(p)
    p.add_argument(
        "--space",
        choices=["config", "iso"],
        default="config",
        help="iso: the config's space with every MoE option replaced by an FFL of as many parameters",
    )


def _add_run(sub) -> None:
    p = _config_command(sub, "run", "the whole pipeline into one run directory (resumable)", cmd_run, "run directory",
                        "redo every stage")  # fmt: skip
    p.add_argument("--targets", default="0.5", help="comma-separated latency targets (default 0.5)")
    p.add_argument(
        "--designs",
        default="",
        help="designs to compare against: dense (the matched-latency dense rivals, uniform-width too where the "
        "space offers ffl:N; or one of dense-depth, dense-heads, dense-width), prune (the baseline pruned to the "
        "found model's latency; or one of drop-layers, after ShortGPT, drop-sublayers, after FinerCut), "
        "uniform-width (every feed-forward block narrowed alike, after Minitron; the space must offer ffl:N), "
        "sandwich, par, iso, sandwich:K (comma-separated; default none)",
    )
    p.add_argument("--batches", default="1,8,64", help="batch sizes of the end-to-end latency (default 1,8,64)")
    p.add_argument("--seeds", type=int, default=1, help="repeat every search and retraining with this many seeds")
    p.add_argument(
        "--method",
        help="search method, gumbel or knapsack (default: search.method, knapsack); knapsack,gumbel runs both, "
        "the second against the first's rivals with the same recipe",
    )
    p.add_argument(
        "--batch",
        type=int,
        help="the batch size you deploy at: the latency table, the search's target "
        "and the rivals' sizes hold at it (default: latency.batch_size)",
    )
    p.add_argument(
        "--baseline",
        help="a trained or imported model (planer import) to start from instead of training a baseline; its "
        "architecture replaces the config's model section, all but model.tgt_len and what only training reads",
    )
    _add_limits(p)


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="write report.md for a run directory")
    p.add_argument("--run", required=True, help="run directory")
    p.set_defaults(func=cmd_report)


def _add_import(sub) -> None:
    p = sub.add_parser("import", help="a planer checkpoint from a Hugging Face folder (GPT-2, Llama) or GGUF (Llama)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--hf", help="folder with config.json, model.safetensors and tokenizer.json")
    source.add_argument("--gguf", metavar="FILE", help="a llama.cpp GGUF file of a Llama, quantized or not")
    p.add_argument("--out", required=True, help="new checkpoint directory (must not exist or be empty)")
    p.set_defaults(func=cmd_import)


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="sample text or token ids from a checkpoint")
    p.add_argument("--run", required=True, help="directory holding model.safetensors and config.json")
    prompt = p.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue")
    prompt.add_argument("--prompt-ids", help='token ids to continue, e.g. "5 17 3"')
    p.add_argument("--ids", action="store_true", help="print the new token ids on one line instead of text")
    p.add_argument("--tokens", type=int, default=100, help="tokens to generate (default 100)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy decoding (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k likeliest tokens (default 0: all)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling (default 0)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.set_defaults(func=cmd_generate)


def _add_config(sub) -> None:
    p = sub.add_parser("config", help="print the resolved config: every key with its type, default and value")
    p.add_argument("--config", help="YAML config (default: none, the defaults alone)")
    _set_option(p)
    p.set_defaults(func=cmd_config)


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a trained model in a form other runtimes load")
    p.add_argument("--run", required=True, help="directory holding model.safetensors and config.json")
    form = p.add_mutually_exclusive_group(required=True)
    form.add_argument(
        "--onnx",
        metavar="OUT",
        help="an ONNX file (e.g. model.onnx): token ids and the memory or key/value cache in, logits and the next "
        "one out",
    )
    form.add_argument("--hf", metavar="OUT", help="a Hugging Face model folder")
    form.add_argument(
        "--gguf",
        metavar="OUT",
        help="a llama.cpp GGUF file of a Llama-flavour model: llama where every layer is alike, else deci",
    )
    p.add_argument(
        "--format",
        choices=["decilm"],
        help="with --hf: decilm writes a Llama as DeciLMForCausalLM (block_configs: vLLM, TensorRT-LLM, llama.cpp's "
        "converter); default: plain Llama/GPT-2 where every layer is alike, else planer's modeling code",
    )
    p.add_argument(
        "--gguf-type",
        help="with --gguf: the type of its matrices, f32 (default), f16, q8_0, q5_1, q5_0, q4_1 or q4_0 (norms stay "
        "f32; rows not in 32s f16; a 4- or 5-bit file's embedding q8_0)",
    )
    p.add_argument("--force", action="store_true", help="overwrite an existing output")
    p.set_defaults(func=cmd_export)


# Each adds one sub-command's parser; in this order `planer --help` lists them.
COMMANDS = (_add_train, _add_evaluate, _add_profile, _add_bench, _add_search, _add_run, _add_report, _add_import,
            _add_generate, _add_config, _add_export)  # fmt: skip


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Latency-aware sparsely activated Transformers.")
    parser.add_argument("--version", action="version", version=_version(), help="print the versions and exit")
    sub = parser.add_subparsers(
        dest="command",
        required=True,
        parser_class=_Parser,
        metavar="COMMAND",
        help="planer COMMAND --help: its options",
    )
    for add in COMMANDS:
        add(sub)
    return parser


DATA_PARALLEL = {"train", "search"}


def main(argv: list[str] | None = None) -> int:
    keep_freed_memory()
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    try:
        if not argv:  # a first try: what there is to run on stdout, the error's one line on stderr
            parser.print_help()
            parser.error(f"no command given; choose one of {', '.join(subcommands(parser))}")
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a malformed command line (already reported in one line)
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
