"""What a language model of every backbone offers the rest of planer, written once.

Training, the supernet, the latency table and checkpoints use a model through these: its config and arch, its token
embedding and blocks, a memory per block (None where a block keeps none), the auxiliary losses its blocks return,
and its size. Each backbone (txl/model.py, gpt/model.py) adds its own layers around the blocks and its forward.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from planer.config import ModelConfig
from planer.models.arch import Arch, BlockSpec
from planer.models.blocks import Block
from planer.models.decoding import MemoryDecoder, WindowDecoder


def init_weights(module: nn.Module, std: float) -> None:
    """Every family's initialisation, in module order: N(0, std) weights and zero biases for linear and embedding
    layers, identity norms, and what a block draws of its own (``Block.reset_parameters``)."""
    for m in module.modules():
        if init_normal(m, std):
            continue
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.reset_parameters()
        elif isinstance(m, Block):
            m.reset_parameters(std=std)


def init_normal(m: nn.Module, std: float) -> bool:
    """N(0, std) weights and zero biases for a linear or embedding layer (both backbones start them so); whether
    ``m`` was one."""
    if not isinstance(m, (nn.Linear, nn.Embedding)):
        return False
    nn.init.normal_(m.weight, 0.0, std)
    if getattr(m, "bias", None) is not None:
        nn.init.zeros_(m.bias)
    return True


class LanguageModel(nn.Module):
    def __init__(self, cfg: ModelConfig, arch: Arch | None, mem_len: int):
        super().__init__()
        self.cfg = cfg
        self.arch = arch
        self.mem_len = mem_len
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)

    def make_blocks(
        self,
        arch: Arch | None,
        blocks: list[nn.Module] | None,
        build_block: Callable[[BlockSpec, ModelConfig], nn.Module],
    ) -> nn.ModuleList:
        """The arch's blocks as the family builds them, or ready-made ``blocks`` (the supernet's super blocks)."""
        return nn.ModuleList(blocks if blocks is not None else [build_block(s, self.cfg) for s in arch])

    def decoder(self, capacity: int) -> MemoryDecoder | WindowDecoder:
        """How generation feeds this model up to ``capacity`` tokens: with its memory, or its window again."""
        return MemoryDecoder(self) if self.mem_len else WindowDecoder(self)

    def decoding_state(self, batch: int, capacity: int) -> object | None:
        """The state decoding starts from, for ``batch`` sequences of up to ``capacity`` positions: None for a
        model whose memories start empty (its forward makes them)."""
        return None

    def init_mems(self) -> list:
        return [None] * len(self.blocks)

    def aux_loss(self) -> torch.Tensor:
        """Sum of the blocks' auxiliary losses in the last forward (the MoE balance loss; 0 without MoE)."""
        losses = [loss for block in self.blocks if (loss := block.aux_loss()) is not None]
        return torch.stack(losses).sum() if losses else self.embed.weight.new_zeros(())

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Negative log-likelihood per token, in nats, shape (batch, len)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
