"""The backbone interface: everything that differs between model families, in one record per family.

Training, search, latency, evaluation, inheritance, export and the report run on any backbone by asking its
``Backbone`` (``backbone(cfg)``) and never compare the family's name; the name appears only here, as a registry
key, and inside each family's own folder (models/txl, models/gpt). A new family is a folder defining ``BACKBONE``
and one line in ``REGISTRY``. Families are imported when first asked for, so that their modules may use generic
ones (checkpoints, evaluation) that build models through this one.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from planer.config import Config, ModelConfig
from planer.errors import PlanerError
from planer.models.arch import Arch, BlockSpec

REGISTRY = {"txl": "planer.models.txl", "gpt": "planer.models.gpt"}  # model.backbone -> the package of its BACKBONE

Scorer = Callable[[torch.Tensor], dict]  # token ids (n,) -> {"loss": nats per scored token, "tokens": count}


@dataclass(frozen=True)
class Backbone:
    """One model family, as the rest of planer sees it.

    - ``model(cfg, arch, blocks)``: the language model, from an arch or from ready-made blocks (super blocks).
    - ``block(spec, cfg)``: one block of a spec, initialised as the family's models start theirs.
    - ``check(cfg)``: the config checks only this family needs; one PlanerError line each.
    - ``scorer(model, cfg, max_segments)``: how the model's loss on a token stream is measured, for
      ``planer evaluate``, training's validation and the rerank alike (one path); ``max_segments`` > 0 scores
      only the stream's first segments (a quick validation), 0 the whole stream.
    - ``fingerprint(cfg)``: the config fields besides the shared ones that a latency table depends on.
    - ``exporters``: export format -> ``function(run_dir, out, force)``, imported when used.
    - ``export_hint(model_dir, cfg, arch)``: the report's sentence on how the model leaves planer.
    """

    name: str
    model: Callable[..., nn.Module]
    block: Callable[[BlockSpec, ModelConfig], nn.Module]
    check: Callable[[ModelConfig], None]
    scorer: Callable[[nn.Module, Config, int], Scorer]
    fingerprint: Callable[[ModelConfig], dict]
    exporters: Mapping[str, str]
    export_hint: Callable[[Path, ModelConfig, Arch], str]

    def exporter(self, fmt: str) -> Callable:
        """The function writing ``fmt``, or a PlanerError naming the formats this family has."""
        if fmt not in self.exporters:
            raise PlanerError(
                f"a {self.name} model has no {fmt} export; it exports as {' or '.join(sorted(self.exporters))}"
            )
        module, _, function = self.exporters[fmt].partition(":")
        return getattr(importlib.import_module(module), function)


def backbone(cfg: ModelConfig) -> Backbone:
    """The family ``cfg.backbone`` names; a PlanerError for a name no family has."""
    if cfg.backbone not in REGISTRY:
        raise PlanerError(
            f"config model.backbone must be {' or '.join(repr(k) for k in REGISTRY)}, got '{cfg.backbone}'"
        )
    return importlib.import_module(REGISTRY[cfg.backbone]).BACKBONE


def build_model(cfg: ModelConfig, arch: Arch | None = None, blocks: list[nn.Module] | None = None) -> nn.Module:
    """The family's language model: the same constructor, attributes and forward for every family."""
    return backbone(cfg).model(cfg, arch, blocks)


def build_block(spec: BlockSpec, cfg: ModelConfig) -> nn.Module:
    return backbone(cfg).block(spec, cfg)
