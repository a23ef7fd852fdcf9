"""What every backbone's ONNX exporter shares: the trace, the file's metadata, onnxruntime sessions, and the rule
that a file is kept only once onnxruntime gives planer's logits.

Graphs are traced by torch's TorchScript-based exporter (``dynamo=False``: the dynamo one needs onnxscript and
specialises sizes 0 and 1, which an empty memory or cache and a one-token decode step have). MoE blocks are traced
with their dense path (``impl="dense"``, see models/moe.py): the sorted dispatch reads expert sizes back to Python,
which a trace would freeze at the sizes of its example. The model planer trains and evaluates is never changed:
export works on a copy. ``aten::rms_norm`` (Llama's norm), which that exporter has no ONNX form for (ONNX has
RMSNormalization from opset 23 only, past the exporter's 20), is spelled in opset-17 ops (``rms_norm`` below).
"""

from __future__ import annotations

import copy
import importlib.util
import os
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.onnx import symbolic_helper

from planer.errors import PlanerError
from planer.models.moe import MoEFeedForward

OPSET = 17


def require_onnx() -> None:
    missing = [name for name in ("onnx", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:
        raise PlanerError(f"ONNX export needs {' and '.join(missing)}: pip install 'planer[onnx]'")


def traceable_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode whose MoE blocks run their dense, trace-friendly path."""
    model = copy.deepcopy(model).eval()
    for module in model.modules():
        if isinstance(module, MoEFeedForward):
            module.impl = "dense"
    return model


@symbolic_helper.parse_args("v", "is", "v", "f")
def rms_norm(g, x, shape: list[int], weight, eps: float):
    """``torch.nn.functional.rms_norm`` as ONNX ops: x / sqrt(mean(x * x over the last dims) + eps) * weight."""
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes_i=list(range(-len(shape), 0)))  # opset 17: axes attribute
    scale = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps, dtype=torch.float32))))
    return g.op("Mul", g.op("Div", x, scale), weight)


def trace(graph: nn.Module, example: tuple, path: Path, names: tuple[list[str], list[str]], axes: dict) -> None:
    """Write ``graph`` traced on ``example`` to ``path``, its inputs and outputs named ``names``, ``axes`` dynamic."""
    inputs, outputs = names
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", rms_norm, OPSET)
    with warnings.catch_warnings():  # the exporter's notes on tracing and its own deprecation; parity is checked
        warnings.simplefilter("ignore")
        torch.onnx.export(
            graph,
            example,
            str(path),
            dynamo=False,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=axes,
            opset_version=OPSET,
        )


def annotate(path: Path, meta: dict[str, str]) -> None:
    """Record in the file what a user of the graph needs to know to feed it."""
    import onnx

    proto = onnx.load(str(path))
    onnx.helper.set_model_props(proto, meta)
    onnx.save(proto, str(path))


def session(path: str | Path, threads: int = 1):
    """An onnxruntime CPU session on ``path`` with a fixed thread count, as planer's latency measurements use.

    Its threads sleep between calls instead of spinning: spinning threads kept both cores busy after each call and
    slowed whatever ran next in an interleaved timing (planer's PyTorch decode of SmolLM2 went from 44 to 62 ms)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def check_target(out: Path, force: bool) -> None:
    if out.is_dir():
        raise PlanerError(f"{out} is a directory; --onnx takes a file name, e.g. {out / 'model.onnx'}")
    if out.exists() and not force:
        raise PlanerError(f"{out} exists; pass --force to overwrite it")


def logit_gap(theirs: np.ndarray, ours: torch.Tensor) -> float:
    """The largest difference between onnxruntime's logits and planer's, relative to the largest of planer's in
    magnitude once that exceeds 1: float32 rounding grows with the logits' scale (a 30-layer model's reach ~30),
    and an absolute bound that a tiny model meets would fail a real one for rounding alone."""
    ours = ours.float().cpu().numpy()
    return float(np.abs(theirs - ours).max() / max(1.0, float(np.abs(ours).max())))


def write_checked(
    out: Path, write: Callable[[Path], None], parity: Callable[[Path], float], tolerance: float, what: str
) -> float:
    """Write a graph with ``write`` under a temporary name and rename it to ``out`` once ``parity`` (the largest
    ``logit_gap`` from planer's, over ``what``) is within ``tolerance``: a failed export leaves nothing."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    try:
        write(tmp)
        diff = parity(tmp)
        if not diff <= tolerance:
            raise PlanerError(
                f"the exported graph's logits differ from planer's by {diff:.2e} (relative) over {what}; nothing written"
            )
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff
