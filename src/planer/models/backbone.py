"""The one place that knows which module builds which backbone (``model.backbone``: txl or gpt).

Everything else builds models and blocks through these two functions, so it runs on either backbone unchanged.
"""

from __future__ import annotations

from torch import nn

from planer.config import ModelConfig
from planer.models.arch import Arch, BlockSpec
from planer.models.gpt import model as gpt
from planer.models.txl import model


def build_model(cfg: ModelConfig, arch: Arch | None = None, blocks: list[nn.Module] | None = None) -> nn.Module:
    """A ``TransformerXL`` or a ``GPT``: the same constructor, attributes and forward."""
    cls = gpt.GPT if cfg.backbone == "gpt" else model.TransformerXL
    return cls(cfg, arch, blocks)


def build_block(spec: BlockSpec, cfg: ModelConfig) -> nn.Module:
    return (gpt.build_block if cfg.backbone == "gpt" else model.build_block)(spec, cfg)
