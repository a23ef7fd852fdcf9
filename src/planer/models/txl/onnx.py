"""Export of a trained Transformer-XL to ONNX, so the found model runs where planer does not (onnxruntime).

The graph is the forward of one segment with the memory as explicit tensors, since a graph holds no state:

    inputs   idx        int64 (batch, tgt)              token ids
             mem.B      float (batch, mem, d_model)     for every memory-using block B (its attention blocks)
    outputs  logits     float (batch, tgt, vocab)
             new_mem.B  float (batch, new_mem, d_model) the next segment's mem.B

Batch, segment length and memory length are all dynamic: the first segment takes memories of length 0, every
next one the ``new_mem.B`` the last returned (at most mem_len long), exactly as ``TransformerXL.forward`` threads
them. Blocks without memory (feed-forward, skip, MoE) have no memory tensor, and a model with mem_len 0 has none.

How the graph is traced, and when the file is kept: see io/onnx.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planer.errors import PlanerError
from planer.io.checkpoint import load_checkpoint
from planer.io.onnx import (
    annotate,
    check_target,
    logit_gap,
    require_onnx,
    session,
    trace,
    traceable_copy,
    write_checked,
)
from planer.models.txl.model import TransformerXL


def memory_blocks(model: TransformerXL) -> list[int]:
    """The positions of the blocks whose memory the graph takes and returns."""
    if model.mem_len == 0:
        return []
    return [i for i, block in enumerate(model.blocks) if block.uses_memory]


class SegmentGraph(nn.Module):
    """``TransformerXL.forward`` with its memory list spelled as flat tensors: what a graph can take and return."""

    def __init__(self, model: TransformerXL):
        super().__init__()
        self.model = model
        self.memory = memory_blocks(model)

    def forward(self, idx: torch.Tensor, *mems: torch.Tensor) -> tuple[torch.Tensor, ...]:
        full: list[torch.Tensor | None] = [None] * len(self.model.blocks)
        for block, mem in zip(self.memory, mems):
            full[block] = mem
        logits, new_mems = self.model(idx, full)
        return (logits, *(new_mems[block] for block in self.memory))


def traceable(model: TransformerXL) -> SegmentGraph:
    """A copy of ``model`` to trace (see io/onnx.py's traceable_copy), with its memory as flat tensors."""
    return SegmentGraph(traceable_copy(model)).eval()


def io_names(model: TransformerXL) -> tuple[list[str], list[str]]:
    memory = memory_blocks(model)
    return ["idx", *(f"mem.{b}" for b in memory)], ["logits", *(f"new_mem.{b}" for b in memory)]


def write_onnx(model: TransformerXL, path: Path) -> None:
    """Trace ``model`` (a copy, see traceable) into an ONNX file at ``path``, every axis but d_model dynamic."""
    graph, cfg = traceable(model), model.cfg
    inputs, outputs = io_names(model)
    batch, device = 2, model.embed.weight.device
    idx = torch.zeros(batch, cfg.tgt_len, dtype=torch.long, device=device)
    mems = [model.embed.weight.new_zeros(batch, model.mem_len, cfg.d_model) for _ in graph.memory]
    axes = {"idx": {0: "batch", 1: "tgt"}, "logits": {0: "batch", 1: "tgt"}}
    axes |= {name: {0: "batch", 1: "mem"} for name in inputs[1:]}
    axes |= {name: {0: "batch", 1: "new_mem"} for name in outputs[1:]}
    trace(graph, (idx, *mems), path, (inputs, outputs), axes)
    annotate(path, metadata(model))


def metadata(model: TransformerXL) -> dict[str, str]:
    """What a user of the graph needs to know to feed it."""
    cfg = model.cfg
    return {
        "planer.arch": " ".join(model.arch.specs()),
        "planer.memory_blocks": json.dumps(memory_blocks(model)),
        "planer.mem_len": str(model.mem_len),
        "planer.tgt_len": str(cfg.tgt_len),
        "planer.vocab_size": str(cfg.vocab_size),
    }


def empty_memories(model: TransformerXL, batch: int) -> dict[str, np.ndarray]:
    """The first segment's memory inputs: one (batch, 0, d_model) tensor per memory-using block."""
    inputs, _ = io_names(model)
    return {name: np.zeros((batch, 0, model.cfg.d_model), np.float32) for name in inputs[1:]}


def parity(model: TransformerXL, path: str | Path, segments: int = 2, batch: int = 2, seed: int = 0) -> float:
    """The largest difference between planer's logits and onnxruntime's over consecutive segments of random tokens.

    Each side threads its own memories: the first segment starts without memory, every next one takes what the
    last returned, so a wrong memory output shows up in the next segment's logits.
    """
    gen = torch.Generator().manual_seed(seed)
    sess, (inputs, _) = session(path), io_names(model)
    model = model.eval()
    mems, feed_mems, worst = None, empty_memories(model, batch), 0.0
    with torch.no_grad():
        for _ in range(segments):
            idx = torch.randint(0, model.cfg.vocab_size, (batch, model.cfg.tgt_len), generator=gen)
            logits, mems = model(idx.to(model.embed.weight.device), mems)
            out = sess.run(None, {"idx": idx.numpy(), **feed_mems})
            worst = max(worst, logit_gap(out[0], logits))
            feed_mems = dict(zip(inputs[1:], out[1:]))
    return worst


def export_onnx(run_dir: str | Path, out: str | Path, force: bool = False, tolerance: float = 1e-4) -> dict:
    """``planer export --onnx``: the checkpoint in ``run_dir`` as an ONNX file at ``out``, checked in onnxruntime.

    The file is written under a temporary name and renamed once its logits match planer's within ``tolerance``
    over two segments, so a failed export leaves nothing behind.
    """
    out = Path(out)
    require_onnx()
    model, cfg, _ = load_checkpoint(run_dir)
    if not isinstance(model, TransformerXL):
        raise PlanerError(f"ONNX export supports the Transformer-XL backbone, not '{cfg.model.backbone}'")
    check_target(out, force)
    diff = write_checked(out, lambda tmp: write_onnx(model, tmp), lambda tmp: parity(model, tmp), tolerance,
                         "two segments")  # fmt: skip
    inputs, outputs = io_names(model)
    return {"path": str(out), "arch": model.arch.short(), "inputs": inputs, "outputs": outputs, "max_diff": diff}
