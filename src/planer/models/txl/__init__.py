"""The Transformer-XL backbone (the paper's), as the rest of planer sees it: see models/backbone.py."""

from __future__ import annotations

import shlex
from pathlib import Path

from torch import nn

from planer.config import Config, ModelConfig
from planer.evaluation.evaluate import evaluate_ids
from planer.models.arch import Arch
from planer.models.backbone import Backbone, Scorer
from planer.models.txl.model import TransformerXL, build_block


def check(cfg: ModelConfig) -> None:
    """The shared checks cover everything a Transformer-XL is built from."""


def scorer(model: nn.Module, cfg: Config, max_segments: int) -> Scorer:
    """Segments in order with memory carried across them (eval.tgt_len / eval.mem_len, the model's by default)."""
    e = cfg.eval
    tgt_len, mem_len = e.tgt_len or cfg.model.tgt_len, e.mem_len or cfg.model.mem_len
    return lambda ids: evaluate_ids(model, ids, e.batch_size, tgt_len, mem_len, max_segments)


def fingerprint(cfg: ModelConfig) -> dict:
    """Nothing beyond the shared fields (which tables written before the backbone interface hold too)."""
    return {}


def export_hint(model_dir: Path, cfg: ModelConfig, arch: Arch) -> str:
    return f"`planer export --run {shlex.quote(str(model_dir))} --onnx model.onnx` exports it for onnxruntime."


BACKBONE = Backbone(
    name="Transformer-XL",
    model=TransformerXL,
    block=build_block,
    check=check,
    scorer=scorer,
    fingerprint=fingerprint,
    exporters={"onnx": "planer.models.txl.onnx:export_onnx"},
    export_hint=export_hint,
)
