"""Decode speed of a gpt checkpoint in onnxruntime (``planer export --onnx``) against planer's PyTorch model.

    PYTHONPATH=src python benchmarks/onnx_decode.py --run runs/gpt/planer-t0.50 [--context 512] [--threads 2]
    PYTHONPATH=src python benchmarks/onnx_decode.py --run ... --rounds 5 --warmup 1 --context 32  # a quick check

The checkpoint is exported as ``planer export --onnx`` does (into a temporary folder, checked there against
planer). Both sides prefill the same ``--context`` random tokens once at batch 1; then every timed round decodes
one new token after them: onnxruntime fed the prefill's presents as its pasts (the graph returns past + 1 positions,
which are dropped), planer with its ``KVCache`` cut back to the context. Rounds are interleaved
(latency.time_interleaved: each round runs both, in a new random order), so load and clock drift hit both alike;
after the warm-up rounds the table gives medians (p10-p90) and tokens per second, and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch

from planer.io.checkpoint import load_checkpoint
from planer.io.onnx import session
from planer.latency.table import summarize, time_interleaved
from planer.models.gpt.cache import KVCache
from planer.models.gpt.onnx import export_onnx, io_names


def onnx_step(path: Path, model, ids: torch.Tensor, threads: int):
    """A call decoding ``ids``' last token in onnxruntime after a prefill of the others; its logits (vocab,)."""
    sess, (inputs, _) = session(path, threads), io_names(model)
    pasts = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[1:]}
    _, *presents = sess.run(None, {"input_ids": ids[:, :-1].numpy(), **pasts})
    feed = {"input_ids": ids[:, -1:].numpy(), **dict(zip(inputs[1:], presents))}
    return lambda: sess.run(None, feed)[0][0, -1]


def planer_step(model, ids: torch.Tensor):
    """A call decoding ``ids``' last token with planer's cache after a prefill of the others; its logits (vocab,)."""
    context = ids.size(1) - 1
    cache = KVCache(model, 1, context + 1)
    with torch.inference_mode():
        model(ids[:, :-1], cache)

    def step():
        cache.length = context
        with torch.inference_mode():
            return model(ids[:, -1:], cache, last_only=True)[0][0, -1].numpy()

    return step


def show(ms: dict[str, np.ndarray], model, args, diff: float) -> None:
    params = sum(t.numel() for t in model.parameters())
    print(f"decode of 1 token after {args.context}, batch 1, {args.threads} threads, {model.arch.short()} "
          f"({params / 1e6:.2f}M parameters), torch {torch.__version__}, onnxruntime {ort.__version__}; "
          f"{args.warmup} warm-up + {args.rounds} interleaved rounds; max |logit diff| {diff:.1e}")  # fmt: skip
    print("| runtime | ms per token, median (p10-p90) | tokens per second |\n|---|---|---|")
    for name, samples in ms.items():
        s = summarize(samples)
        print(f"| {name} | {s['median']:.3f} ({s['p10']:.3f}-{s['p90']:.3f}) | {1000 / s['median']:.1f} |")
    ratio = float(np.median(ms["planer"]) / np.median(ms["onnxruntime"]))
    print(f"onnxruntime decodes {ratio:.2f}x as fast as planer's PyTorch model (ratio of the medians)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="checkpoint directory of a gpt model")
    for name, default in [("context", 512), ("threads", 2), ("warmup", 5), ("rounds", 40)]:
        p.add_argument(f"--{name}", type=int, default=default)
    args = p.parse_args()
    model = load_checkpoint(args.run)[0].eval()
    if not 1 <= args.context < model.cfg.context:
        p.error(f"--context must leave room for the new token in the model's {model.cfg.context} positions")
    torch.set_num_threads(args.threads)
    ids = torch.randint(0, model.cfg.vocab_size, (1, args.context + 1), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(args.run, Path(tmp) / "model.onnx")
        fns = {"onnxruntime": onnx_step(Path(tmp) / "model.onnx", model, ids, args.threads),
               "planer": planer_step(model, ids)}  # fmt: skip
        diff = float(np.abs(fns["onnxruntime"]() - fns["planer"]()).max())
        ms = time_interleaved(fns, args.warmup, args.rounds, torch.device("cpu"))
    show(ms, model, args, diff)


if __name__ == "__main__":
    main()
