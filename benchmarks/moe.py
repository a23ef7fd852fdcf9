"""Latency of the MoE block against the dense FFL of the same active width, and against the paper's sequential MoE.

    PYTHONPATH=src python benchmarks/moe.py                    # both shape sets, batch 1, 8 and 64 (~2 min)
    PYTHONPATH=src python benchmarks/moe.py --quick            # batch 1 and 8, 3 rounds
    PYTHONPATH=src python benchmarks/moe.py --glibc-defaults   # without the allocator setting planer applies

By default the benchmark keeps freed memory in glibc's heap, as the ``planer`` command does (planer/allocator.py):
with glibc's defaults every allocation of 32 MiB or more (an MoE block's stacked weight gradient at d_model 512)
gets fresh pages from mmap and freed heap memory goes back to the system, so every training step page-faults its
gradients in again. ``--glibc-defaults`` measures that cost.

Every candidate is a whole block (residual and LayerNorm included) built in one process and timed in interleaved
rounds (A B C A B C ...), so drift in clock speed or background load hits all of them alike; a block's time is the
median over rounds after warm-up. "Inference" is a forward under ``torch.inference_mode()`` in eval mode;
"training" is forward + backward of the output's sum in train mode (dropout on), gradients cleared between rounds.

The dense FFL is timed twice for inference: as ``blocks.FeedForward`` and with the same oneDNN-prepacked weights the
MoE block uses, and the ratios are to the faster of the two, so the MoE gets no trick the baseline was denied. In
training both run the same plain PyTorch (MKL) products. Top-1 is compared with an FFL of d_inner hidden units,
top-2 with 2 * d_inner (the same active width). "Routing only" is the MoE block with experts that compute nothing
(router, top-k, sort, gathers, gates, residual and LayerNorm), so MoE minus it is what the experts cost.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from planer.models.moe import MoEConfig, MoEFeedForward, PackedWeights, packed_linear
from planer.models.txl.blocks import FeedForward
from planer.training.allocator import keep_freed_memory

SHAPES = {"default": (128, 512, 64), "paper": (512, 2048, 192)}  # d_model, d_inner, tgt_len


class PackedFeedForward(FeedForward):
    """The dense FFL with oneDNN-prepacked weights at inference, as the MoE block does for its experts."""

    def __init__(self, d_model: int, d_inner: int, dropout: float):
        super().__init__(d_model, d_inner, dropout)
        self.packed = PackedWeights()

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        if torch.is_grad_enabled() or self.training:
            return super().forward(x)
        (w1,), (w2,) = self.packed.get(self.fc1.weight, self.fc2.weight)
        flat = x.reshape(-1, x.shape[-1])
        y = packed_linear(packed_linear(flat, w1, self.fc1.bias, relu=True), w2, self.fc2.bias)
        return self.norm(x + y.view_as(x))


class RoutingOnly(MoEFeedForward):
    """The MoE block with experts that compute nothing: what routing, gathers, residual and LayerNorm cost."""

    def _experts(self, flat: torch.Tensor, token: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        counts.tolist()  # the real path reads the sizes too
        return flat.index_select(0, token)


def candidates(d_model: int, d_inner: int, experts: int, training: bool) -> dict[str, torch.nn.Module]:
    blocks = {}
    for k in (1, 2):
        blocks[f"dense{k}"] = FeedForward(d_model, k * d_inner, 0.1)
        if not training:
            blocks[f"packed{k}"] = PackedFeedForward(d_model, k * d_inner, 0.1)
        blocks[f"moe{k}"] = MoEFeedForward(MoEConfig(d_model, d_inner, experts, k, 0.2))
        blocks[f"seq{k}"] = MoEFeedForward(MoEConfig(d_model, d_inner, experts, k, 0.2, impl="sequential"))
        blocks[f"route{k}"] = RoutingOnly(MoEConfig(d_model, d_inner, experts, k, 0.2))
    for block in blocks.values():
        for p in block.parameters():
            if p.dim() > 1:
                torch.nn.init.normal_(p, 0.0, 0.02)
        block.train(training)
    return blocks


def time_round(blocks: dict[str, torch.nn.Module], x: torch.Tensor, training: bool) -> dict[str, float]:
    times = {}
    for name, block in blocks.items():
        if training:
            block.zero_grad(set_to_none=True)
            start = time.perf_counter()
            block(x).sum().backward()
        else:
            with torch.inference_mode():
                start = time.perf_counter()
                block(x)
        times[name] = time.perf_counter() - start
    return times


def measure(d_model, d_inner, tgt_len, batch, experts, training, warmup, repeats, budget) -> dict[str, float]:
    """Median times in ms; rounds beyond the third stop once ``budget`` seconds are spent, so big shapes stay short."""
    torch.manual_seed(0)
    blocks = candidates(d_model, d_inner, experts, training)
    x = torch.randn(batch, tgt_len, d_model, requires_grad=training)
    for _ in range(warmup):
        time_round(blocks, x, training)
    rounds, start = [], time.perf_counter()
    while len(rounds) < repeats and (len(rounds) < 3 or time.perf_counter() - start < budget):
        rounds.append(time_round(blocks, x, training))
    return {name: statistics.median(r[name] for r in rounds) * 1e3 for name in blocks} | {"rounds": len(rounds)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--shapes",
        nargs="+",
        default=list(SHAPES),
        choices=list(SHAPES) + ["custom"],
        help="shape sets: default (d_model 128, d_inner 512, tgt_len 64), paper (512, 2048, 192)",
    )
    parser.add_argument("--d-model", type=int, help="with --shapes custom")
    parser.add_argument("--d-inner", type=int, help="with --shapes custom")
    parser.add_argument("--tgt-len", type=int, help="with --shapes custom")
    parser.add_argument("--batch", type=int, nargs="+", help="segments per batch (default 1 8 64; --quick 1 8)")
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, help="timed rounds (default 9; --quick 3)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--budget",
        type=float,
        default=8.0,
        help="seconds of timed rounds per (shape, mode, batch), after at least 3 rounds",
    )
    parser.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    parser.add_argument("--quick", action="store_true", help="a smoke run: batch 1 and 8, 3 rounds")
    parser.add_argument(
        "--glibc-defaults",
        action="store_true",
        help="leave glibc's allocator as it is instead of keeping freed memory, as planer does",
    )
    args = parser.parse_args()
    if "custom" in args.shapes and None in (args.d_model, args.d_inner, args.tgt_len):
        parser.error("--shapes custom needs --d-model, --d-inner and --tgt-len")
    batches = args.batch or ([1, 8] if args.quick else [1, 8, 64])
    repeats = args.repeats or (3 if args.quick else 9)
    torch.set_num_threads(args.threads)

    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32 CPU, {args.experts} experts; "
        f"median of up to {repeats} interleaved rounds (at least 3, {args.budget:g} s budget each) "
        f"after {args.warmup} warm-up; times in ms, ratios to the best dense"
    )
    kept = not args.glibc_defaults and keep_freed_memory()
    env = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_") or k == "LD_PRELOAD"}
    print(f"allocator: {'freed memory kept (planer/allocator.py)' if kept else env or 'glibc defaults'}\n")
    for shape in args.shapes:
        custom = (args.d_model, args.d_inner, args.tgt_len)
        d_model, d_inner, tgt_len = custom if shape == "custom" else SHAPES[shape]
        print(f"### {shape}: d_model {d_model}, d_inner {d_inner}, tgt_len {tgt_len}\n")
        print(
            "| mode | batch | tokens | top-k | dense FFL | dense prepacked | MoE | MoE / dense "
            "| routing only / dense | sequential | seq / dense | rounds |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for mode in args.modes:
            training = mode == "training"
            for batch in batches:
                t = measure(d_model, d_inner, tgt_len, batch, args.experts, training, args.warmup, repeats, args.budget)
                for k in (1, 2):
                    dense = min(t[f"dense{k}"], t.get(f"packed{k}", float("inf")))
                    packed = f"{t[f'packed{k}']:.3f}" if not training else "-"
                    print(
                        f"| {mode} | {batch} | {batch * tgt_len} | {k} | {t[f'dense{k}']:.3f} | {packed} "
                        f"| {t[f'moe{k}']:.3f} | {t[f'moe{k}'] / dense:.2f} | {t[f'route{k}'] / dense:.2f} "
                        f"| {t[f'seq{k}']:.3f} | {t[f'seq{k}'] / dense:.2f} | {t['rounds']} |",
                        flush=True,
                    )
        print()


if __name__ == "__main__":
    main()
