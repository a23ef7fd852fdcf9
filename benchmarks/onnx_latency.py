"""onnxruntime latency of a found model beside its baseline at several batch sizes: the speed-up where it is deployed.

    PYTHONPATH=src python benchmarks/onnx_latency.py --run runs/demo/planer-t0.50 --baseline runs/demo/baseline
    PYTHONPATH=src python benchmarks/onnx_latency.py --config configs/shakespeare-char.yaml \\
        --arch "attn:2 ffl attn:4 ffl attn:2 ffl skip ffl"              # random weights: they time the same
    PYTHONPATH=src python benchmarks/onnx_latency.py ... --repeats 5 --warmup 2  # a quick check

Both models are exported as ``planer export --onnx`` does (export.py) and run in onnxruntime CPU sessions with a
fixed thread count. What is timed is ``planer bench``'s unit: the forward of one (batch, tgt_len) segment with
every memory full (mem_len). Rounds are interleaved (latency.time_interleaved: every round runs each model once,
in a new random order), so load and clock drift hit both alike; after the warm-up rounds, the table gives medians
(p10-p90) and the ratio of the medians. Without ``--baseline`` the baseline is the config's baseline architecture
with random weights.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch

from planer.config import load_config
from planer.io.checkpoint import load_checkpoint
from planer.io.onnx import session
from planer.latency.table import known_vocab_size, private_rng, summarize, time_interleaved
from planer.models.arch import Arch
from planer.models.txl.model import TransformerXL
from planer.models.txl.onnx import io_names, write_onnx


def models(args) -> dict[str, TransformerXL]:
    """The baseline and the model to compare, from checkpoints or built with random weights."""
    if args.run:
        model, cfg, _ = load_checkpoint(args.run)
    else:
        cfg = known_vocab_size(load_config(args.config, args.set))
        with private_rng(torch.device("cpu")):
            model = TransformerXL(cfg.model, Arch.parse(args.arch))
    if args.baseline:
        baseline = load_checkpoint(args.baseline)[0]
    else:
        with private_rng(torch.device("cpu"), seed=1):
            baseline = TransformerXL(cfg.model, Arch.baseline(cfg.model.n_layer, cfg.model.n_head))
    return {"baseline": baseline.eval(), "model": model.eval()}


def segment_feed(model: TransformerXL, batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids and full memories for one segment, by the graph's input names."""
    rng, cfg = np.random.default_rng(seed), model.cfg
    inputs, _ = io_names(model)
    feed = {"idx": rng.integers(0, cfg.vocab_size, (batch, cfg.tgt_len), dtype=np.int64)}
    for name in inputs[1:]:
        feed[name] = rng.standard_normal((batch, model.mem_len, cfg.d_model), dtype=np.float32)
    return feed


def measure(graphs: dict[str, tuple], batches: list[int], args) -> list[dict]:
    rows = []
    for batch in batches:
        fns = {}
        for name, (model, sess) in graphs.items():
            feed = segment_feed(model, batch)
            fns[name] = lambda sess=sess, feed=feed: sess.run(None, feed)
        samples = time_interleaved(fns, args.warmup, args.repeats, torch.device("cpu"))
        stats = {name: summarize(ms) for name, ms in samples.items()}
        rows.append({"batch": batch, **stats, "speedup": stats["baseline"]["median"] / stats["model"]["median"]})
    return rows


def show(rows: list[dict], archs: dict[str, str], args) -> None:
    print(f"onnxruntime, CPU, {args.threads} thread(s), {args.warmup} warm-up + {args.repeats} timed rounds")
    print(f"  baseline {archs['baseline']}, model {archs['model']}; ms per segment, median (p10-p90)")
    print("| batch | baseline ms | model ms | speed-up |\n|---|---|---|---|")
    for row in rows:
        cells = [f"{row[k]['median']:.3f} ({row[k]['p10']:.3f}-{row[k]['p90']:.3f})" for k in ("baseline", "model")]
        print(f"| {row['batch']} | {cells[0]} | {cells[1]} | {row['speedup']:.2f}x |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--run", help="checkpoint directory of the model to compare (e.g. a found model)")
    source.add_argument("--config", help="build the model from this config with random weights (with --arch)")
    parser.add_argument("--arch", help="with --config: the architecture, block specs or arch.json")
    parser.add_argument("--set", action="append", default=[], help="with --config: config overrides")
    parser.add_argument("--baseline", help="baseline checkpoint directory (default: baseline arch, random weights)")
    parser.add_argument("--batch", default="1,8,64", help="comma-separated batch sizes (default 1,8,64)")
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (default 1)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds per batch size (default 10)")
    parser.add_argument("--repeats", type=int, default=50, help="timed rounds per batch size (default 50)")
    args = parser.parse_args()
    if args.config and not args.arch:
        parser.error("--config needs --arch")
    built = models(args)
    with tempfile.TemporaryDirectory() as tmp:
        graphs = {}
        for name, model in built.items():
            write_onnx(model, Path(tmp) / f"{name}.onnx")
            graphs[name] = (model, session(Path(tmp) / f"{name}.onnx", args.threads))
        rows = measure(graphs, [int(b) for b in args.batch.split(",")], args)
    show(rows, {name: model.arch.short() for name, model in built.items()}, args)


if __name__ == "__main__":
    main()
