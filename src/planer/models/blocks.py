"""What every block of every backbone offers its model, and the block that is left out.

Every block has the same call, ``block(x, mem)`` with x of shape (batch, len, d_model) and mem the state this
block carries from earlier segments or None, and returns the new hidden states. Blocks that use memory say so
with ``uses_memory``; the model keeps that memory for them. A block with a loss of its own (the MoE balance loss)
returns it from ``aux_loss``, so that every container, a super block too, can pass it on without knowing which
blocks have one.
"""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """What every block offers its model: whether it keeps memory, and the auxiliary loss of its last forward."""

    uses_memory = False

    def aux_loss(self) -> torch.Tensor | None:
        return None


class Skip(Block):
    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        return x
