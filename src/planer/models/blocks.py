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

UnitOrder = list[tuple[int, float]]  # a block's heads or hidden units, most important first, with their importance
# A feed-forward block's first and second linear layers, its activation and whether it is pre-norm: what widening
# and upcycling read (SwiGLU's first layer stacks the gate's rows, then the up projection's)
FeedForwardParts = tuple[nn.Linear, nn.Linear, str, bool]


class Block(nn.Module):
    """What every block offers its model and the generic code around it, whatever its backbone.

    Besides memory and the auxiliary loss: an attention block's query heads (``n_head``, 0 for other blocks; each
    writes through its own ``d_head`` columns of ``out``), which importance ranks and inheritance keeps; and a
    feed-forward block's parts, which widening and upcycling copy. Each backbone's blocks say how they keep
    heads, so the code that inherits weights never asks which backbone it runs on.
    """

    uses_memory = False
    n_head = 0

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def reset_parameters(self, std: float) -> None:
        """Draw the parameters that are neither a linear, an embedding nor a norm layer's (none by default)."""

    def feed_forward(self) -> FeedForwardParts | None:
        """This block's parts if it is a feed-forward block, else None."""
        return None

    def inherit_heads(self, src: Block, order: UnitOrder) -> bool:
        """Start this attention block from the most important heads (``order``) of the trained ``src`` of its
        own kind; whether it could (False for blocks without heads)."""
        return False


class Skip(Block):
    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        return x
