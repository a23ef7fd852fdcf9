"""The Transformer-XL's blocks: relative-position attention with memory and the post-LayerNorm feed-forward.

Every block carries its own residual connection and post-LayerNorm, as in Transformer-XL, so blocks can be
arranged freely; ``block(x, mem)`` as every block (see models/blocks.py).
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from planer.errors import PlanerError
from planer.models.blocks import Block, FeedForwardParts, UnitOrder


class FeedForward(Block):
    def __init__(self, d_model: int, d_inner: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_inner)
        self.fc2 = nn.Linear(d_inner, d_model)
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def feed_forward(self) -> FeedForwardParts:
        return self.fc1, self.fc2, "relu", False

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(F.relu(self.fc1(x)))
        return self.norm(x + self.drop(self.fc2(h)))


def sinusoid(distances: torch.Tensor, d_model: int) -> torch.Tensor:
    """Sinusoidal embeddings of relative distances, shape (len(distances), d_model)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, d_model, 2, device=distances.device, dtype=torch.float32) / d_model))
    angles = distances.float()[:, None] * inv_freq[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


@functools.lru_cache(maxsize=64)
def distance_table(klen: int, d_model: int, device: torch.device, dtype: torch.dtype, inference: bool) -> torch.Tensor:
    """``sinusoid`` of the distances klen-1 ... 0, (klen, d_model), made once per size and shared by every block.

    It depends on sizes only, so each attention block recomputing it (ten small ops) was a fixed cost that
    dominated a one-sequence forward. ``inference`` keys it apart: a tensor made under inference mode cannot be
    saved for a backward pass.
    """
    return sinusoid(torch.arange(klen - 1, -1, -1, device=device), d_model).to(dtype)


@functools.lru_cache(maxsize=64)
def future_bias(qlen: int, klen: int, device: torch.device, dtype: torch.dtype, inference: bool) -> torch.Tensor:
    """-inf where query i (the last ``qlen`` of ``klen`` positions) would see a later key, else 0; (qlen, klen).

    Added to the scores rather than filled in with a boolean mask: on a CPU the broadcast fill cost a one-sequence
    forward as much as a matrix product.
    """
    future = torch.ones(qlen, klen, dtype=torch.bool, device=device).triu(1 + klen - qlen)
    return torch.zeros(qlen, klen, device=device, dtype=dtype).masked_fill(future, float("-inf"))


def rel_shift(x: torch.Tensor) -> torch.Tensor:
    """Realign scores against distances (klen-1 ... 0) into scores against keys.

    x[..., i, j] scores query i against the distance klen-1-j. The result's [..., i, j] scores query i against key j,
    i.e. the distance mlen+i-j, for every j <= mlen+i (the rest is masked by causality). The zero-pad-and-view trick
    does this without a gather.
    """
    *lead, qlen, klen = x.shape
    padded = torch.cat([x.new_zeros(*lead, qlen, 1), x], dim=-1)
    return padded.view(*lead, klen + 1, qlen)[..., 1:, :].reshape(*lead, qlen, klen)


class RelAttention(Block):
    """Multi-head attention with relative positions over [memory, input] (Dai et al., 2019).

    ``n_head`` heads of ``d_head`` each: fewer heads cost less, which is what PLANER trades for accuracy.
    """

    uses_memory = True

    def __init__(self, d_model: int, n_head: int, d_head: int, dropout: float, dropatt: float):
        super().__init__()
        self.n_head, self.d_head, self.dropatt = n_head, d_head, dropatt
        self.qkv = nn.Linear(d_model, 3 * n_head * d_head, bias=False)
        self.r_net = nn.Linear(d_model, n_head * d_head, bias=False)
        self.out = nn.Linear(n_head * d_head, d_model, bias=False)
        self.r_w_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.r_r_bias = nn.Parameter(torch.zeros(n_head, d_head))
        self.drop = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d_model)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.r_w_bias, 0.0, std)
        nn.init.normal_(self.r_r_bias, 0.0, std)

    def inherit_heads(self, src: Block, order: UnitOrder) -> bool:
        """The ``n_head`` most important of ``src``'s heads, kept in their order (see ``copy_heads``)."""
        if self.n_head > src.n_head or self.d_head != src.d_head:
            return False
        copy_heads(self, src, sorted(h for h, _ in order[: self.n_head]))
        return True

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        B, T, D = x.shape
        H, Dh = self.n_head, self.d_head
        cat = x if mem is None or mem.size(1) == 0 else torch.cat([mem, x], dim=1)
        K = cat.size(1)

        # Queries of the new positions only; keys and values of memory and input (the same fused weight).
        w_q, w_kv = self.qkv.weight.split([H * Dh, 2 * H * Dh])
        q = F.linear(x, w_q).view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k, v = F.linear(cat, w_kv).view(B, K, 2, H, Dh).permute(2, 0, 3, 1, 4)  # each (B, H, K, Dh)
        inference = torch.is_inference_mode_enabled()
        r = self.r_net(distance_table(K, D, x.device, x.dtype, inference))
        r = r.view(K, H, Dh).transpose(0, 1)  # (H, K, Dh)

        # Position term (query + r_r_bias) . r, realigned to keys; the content term is left to the fused kernel,
        # with r_w_bias folded into the query.
        scale = 1.0 / math.sqrt(Dh)
        pos = rel_shift(torch.matmul((q + self.r_r_bias[:, None]) * scale, r.transpose(-1, -2)))  # (B, H, T, K)
        bias = pos.add_(future_bias(T, K, x.device, x.dtype, inference))
        att = F.scaled_dot_product_attention(
            q + self.r_w_bias[:, None],
            k,
            v,
            attn_mask=bias,
            dropout_p=self.dropatt if self.training else 0.0,
            scale=scale,
        )
        out = self.out(att.transpose(1, 2).reshape(B, T, H * Dh))
        return self.norm(x + self.drop(out))


def copy_heads(dst: RelAttention, src: RelAttention, heads: list[int]) -> None:
    """Give an attention block with h heads the listed h heads of a trained one (queries, keys, values, relative
    positions, output columns, both position biases) and its LayerNorm."""
    H, Dh, D = src.n_head, src.d_head, src.out.out_features
    if len(heads) != dst.n_head or dst.d_head != Dh or not all(0 <= h < H for h in heads):
        raise PlanerError(f"cannot give {dst.n_head} heads of {dst.d_head} dims the heads {heads} of {H} x {Dh}")
    idx = torch.tensor(heads, device=src.out.weight.device)
    with torch.no_grad():
        dst.qkv.weight.copy_(src.qkv.weight.view(3, H, Dh, D)[:, idx].reshape(-1, D))  # (3 * h * Dh, D)
        dst.r_net.weight.copy_(src.r_net.weight.view(H, Dh, D)[idx].reshape(-1, D))  # (h * Dh, D)
        dst.out.weight.copy_(src.out.weight.view(D, H, Dh)[:, idx].reshape(D, -1))  # (D, h * Dh)
        dst.r_w_bias.copy_(src.r_w_bias[idx])  # (h, Dh)
        dst.r_r_bias.copy_(src.r_r_bias[idx])
    dst.norm.load_state_dict(src.norm.state_dict())
