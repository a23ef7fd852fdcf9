"""The Transformer-XL language model, built from a ModelConfig and an Arch.

Token embedding scaled by sqrt(d_model), the arch's blocks in order, and an output layer tied to the embedding.
Each memory-using block keeps the hidden states that entered it during the last ``mem_len`` positions; the
caller threads those memories from one segment to the next.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.models.arch import Arch, BlockSpec
from planer.models.blocks import Skip
from planer.models.language_model import LanguageModel, init_weights
from planer.models.txl.blocks import FeedForward, RelAttention

Mems = list  # one tensor (batch, <= mem_len, d_model) per block, or None for blocks without memory


def build_block(spec: BlockSpec, cfg: ModelConfig) -> nn.Module:
    if spec.kind == "skip":
        return Skip()
    if spec.kind == "attn":
        if spec.kv:
            raise PlanerError(f"block {spec}: the txl backbone's attention has no key/value heads of its own to share")
        return RelAttention(cfg.d_model, spec.heads, cfg.d_head, cfg.dropout, cfg.dropatt)
    if spec.kind == "ffl":
        return FeedForward(cfg.d_model, spec.hidden(cfg.d_inner), cfg.dropout)
    if spec.kind == "moe":
        from planer.models.moe import MoEConfig, MoEFeedForward

        return MoEFeedForward(
            MoEConfig(cfg.d_model, cfg.d_inner, spec.experts or cfg.n_experts, spec.top_k, cfg.moe_dropout)
        )
    raise ValueError(f"no block of kind {spec.kind}")


class TransformerXL(LanguageModel):
    def __init__(self, cfg: ModelConfig, arch: Arch | None = None, blocks: list[nn.Module] | None = None):
        """Build the blocks from ``arch``, or take ready-made ``blocks`` (the supernet's super blocks)."""
        super().__init__(cfg, arch, cfg.mem_len)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = self.make_blocks(arch, blocks, build_block)
        self.out_bias = nn.Parameter(torch.zeros(cfg.vocab_size))
        init_weights(self, cfg.init_std)

    def forward(self, idx: torch.Tensor, mems: Mems | None = None) -> tuple[torch.Tensor, Mems]:
        """Logits (batch, len, vocab) for a segment of token ids (batch, len), and the memories for the next."""
        mems = mems if mems is not None else self.init_mems()
        h = self.drop(self.embed(idx) * math.sqrt(self.cfg.d_model))
        new_mems = []
        for block, mem in zip(self.blocks, mems):
            new_mems.append(self._remember(h, mem) if block.uses_memory else None)
            h = block(h, mem)
        logits = F.linear(h, self.embed.weight, self.out_bias)
        return logits, new_mems

    def _remember(self, h: torch.Tensor, mem: torch.Tensor | None) -> torch.Tensor | None:
        if self.mem_len == 0:
            return None
        with torch.no_grad():
            cat = h if mem is None else torch.cat([mem, h], dim=1)
            return cat[:, -self.mem_len :].detach()
