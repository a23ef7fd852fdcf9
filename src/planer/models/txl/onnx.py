"""Export of a trained Transformer-XL to ONNX, so the found model runs where planer does not (onnxruntime).

The graph is the forward of one segment with the memory as explicit tensors, since a graph holds no state:

    inputs   idx        int64 (batch, tgt)              token ids
             mem.B      float (batch, mem, d_model)     for every memory-using block B (its attention blocks)
    outputs  logits     float (batch, tgt, vocab)
             new_mem.B  float (batch, new_mem, d_model) the next segment's mem.B

Batch, segment length and memory length are all dynamic: the first segment takes memories of length 0, every
next one the ``new_mem.B`` the last returned (at most mem_len long), exactly as ``TransformerXL.forward`` threads
them. Blocks without memory (feed-forward, skip, MoE) have no memory tensor, and a model with mem_len 0 has none.

The graph is traced by torch's TorchScript-based exporter (``dynamo=False``: the dynamo one needs onnxscript and
specialises sizes 0 and 1, which the first segment's empty memory has). MoE blocks are traced with their dense
path (``impl="dense"``, see models/moe.py): the sorted dispatch reads expert sizes back to Python, which a trace would
freeze at the sizes of its example. The model planer trains and evaluates is never changed: export works on a copy.
"""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from planer.errors import PlanerError
from planer.io.checkpoint import load_checkpoint
from planer.models.moe import MoEFeedForward
from planer.models.txl.model import TransformerXL

OPSET = 17


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
    """A copy of ``model`` in eval mode whose MoE blocks run their dense, trace-friendly path."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.impl = "dense"
    return SegmentGraph(model).eval()


def io_names(model: TransformerXL) -> tuple[list[str], list[str]]:
    memory = memory_blocks(model)
    return ["idx", *(f"mem.{b}" for b in memory)], ["logits", *(f"new_mem.{b}" for b in memory)]


def _require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise PlanerError(f"ONNX export needs {' and '.join(missing)}: pip install 'planer[onnx]'")


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
    with warnings.catch_warnings():  # the exporter's notes on tracing and its own deprecation; parity is checked
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            (idx, *mems),
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
        )
    _annotate(path, model)


def _annotate(path: Path, model: TransformerXL) -> None:
    """Record in the file what a user of the graph needs to know to feed it."""
    import onnx

    cfg = model.cfg
    proto = onnx.load(str(path))
    meta = {
        "planer.arch": " ".join(model.arch.specs()),
        "planer.memory_blocks": json.dumps(memory_blocks(model)),
        "planer.mem_len": str(model.mem_len),
        "planer.tgt_len": str(cfg.tgt_len),
        "planer.vocab_size": str(cfg.vocab_size),
    }
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session on ``path`` with a fixed thread count, as planer's latency measurements use."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


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
            worst = max(worst, float(np.abs(out[0] - logits.float().cpu().numpy()).max()))
            feed_mems = dict(zip(inputs[1:], out[1:]))
    return worst


def _check_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise PlanerError(f"{out} is a directory; --onnx takes a file name, e.g. {out / 'model.onnx'}")
    if out.exists() and not force:
        raise PlanerError(f"{out} exists; pass --force to overwrite it")


def export_onnx(run_dir: str | Path, out: str | Path, force: bool = False, tolerance: float = 1e-4) -> dict:
    """``planer export --onnx``: the checkpoint in ``run_dir`` as an ONNX file at ``out``, checked in onnxruntime.

    The file is written under a temporary name and renamed once its logits match planer's within ``tolerance``
    over two segments, so a failed export leaves nothing behind.
    """
    out = Path(out)
    _require_onnx()
    model, cfg, _ = load_checkpoint(run_dir)
    if not isinstance(model, TransformerXL):
        raise PlanerError(f"ONNX export supports the Transformer-XL backbone, not '{cfg.model.backbone}'")
    _check_target(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write_onnx(model, tmp)
        diff = parity(model, tmp)
        if not diff <= tolerance:
            raise PlanerError(f"the exported graph's logits differ from planer's by {diff:.2e}; nothing written")
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    inputs, outputs = io_names(model)
    return {"path": str(out), "arch": model.arch.short(), "inputs": inputs, "outputs": outputs, "max_diff": diff}
