"""The decoder-only backbone: GPT-2 and Llama flavours, built from a ModelConfig and an Arch.

The same block vocabulary as the Transformer-XL (see models/arch.py), but every block is pre-norm, ``x + f(norm(x))``,
and attention is causal over the current input only: no recurrent memory, so ``forward`` reads at most
``cfg.context`` tokens and callers slide a window over longer text (evaluation/evaluate.py, evaluation/generate.py).

    flavour   norm       positions             MLP                    attention        biases  output layer
    gpt2      LayerNorm  learned, absolute     GELU (tanh approx.)    multi-head       yes     tied to the embedding
    llama     RMSNorm    rotary (rotate-half)  SwiGLU                 grouped-query    no      tied or its own

Heads: every head has d_head = d_model / n_head. ``attn:H`` has H query heads and ``kv_heads(cfg, H)`` key/value
heads, which keeps the model's grouping: a baseline with n_head = 8 and n_kv_head = 2 gives attn:8 two key/value
heads, attn:4 and attn:2 one. MoE experts have the MLP's shape (see models/moe.py), so they can be upcycled from it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.models.arch import Arch, BlockSpec
from planer.models.blocks import Block, Skip
from planer.models.language_model import LanguageModel, init_normal
from planer.models.moe import MoEConfig, MoEFeedForward, activate


def kv_heads(cfg: ModelConfig, heads: int) -> int:
    """Key/value heads of an ``attn:heads`` block: about heads * n_kv_head / n_head, at least 1, dividing heads."""
    groups = cfg.n_kv_head or cfg.n_head
    n = max(1, heads * groups // cfg.n_head)
    while heads % n:
        n -= 1
    return n


def activation(cfg: ModelConfig) -> str:
    return "swiglu" if cfg.flavour == "llama" else "gelu"


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.flavour == "llama":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps)


def rotary_tables(length: int, d_head: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of position * frequency, each (length, d_head): the first half's frequencies repeated."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d_head, 2, dtype=torch.float32) / d_head)
    angles = torch.arange(length, dtype=torch.float32)[:, None] * inv_freq[None, :]  # (length, d_head / 2)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions in the rotate-half layout: dimension i pairs with i + d_head/2 (Hugging Face's Llama)."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


class Attention(Block):
    """Causal self-attention with ``heads`` query heads and ``kv_heads(cfg, heads)`` key/value heads.

    q, k and v come from one fused projection, laid out [q (heads * d_head), k, v], one product instead of three.
    """

    def __init__(self, cfg: ModelConfig, heads: int):
        super().__init__()
        self.heads, self.kv, self.d_head, self.dropatt = heads, kv_heads(cfg, heads), cfg.d_head, cfg.dropatt
        bias = cfg.flavour == "gpt2"
        self.norm = make_norm(cfg)
        self.qkv = nn.Linear(cfg.d_model, (heads + 2 * self.kv) * cfg.d_head, bias=bias)
        self.out = nn.Linear(heads * cfg.d_head, cfg.d_model, bias=bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.rotary, self.theta = cfg.flavour == "llama", cfg.rope_theta
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_head(self) -> int:
        """The query heads, under ``RelAttention``'s name: head importance counts heads of either alike."""
        return self.heads

    def _rotary(self, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions 0..T-1, kept for the next call of the same length and device.

        Not precomputed for the whole context: models such as Llama 3 allow 131072 positions, 2 GB of tables.
        """
        if self.tables is None or self.tables[0].size(0) != T or self.tables[0].device != device:
            self.tables = tuple(t.to(device) for t in rotary_tables(T, self.d_head, self.theta))
        return self.tables

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, Dh = self.heads, self.kv, self.d_head
        q, k, v = self.qkv(self.norm(x)).split([H * Dh, K * Dh, K * Dh], dim=-1)
        q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
        v = v.view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
        if self.rotary:
            cos, sin = (t.to(q.dtype) for t in self._rotary(T, x.device))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        # query head i reads key/value head i // (H / K), as Hugging Face's grouped-query attention does
        y = F.scaled_dot_product_attention(
            q, k, v, dropout_p=self.dropatt if self.training else 0.0, is_causal=True, enable_gqa=K != H
        )  # (B, H, T, Dh)
        return x + self.drop(self.out(y.transpose(1, 2).reshape(B, T, H * Dh)))


class MLP(Block):
    """The position-wise feed-forward: GELU (gpt2) or SwiGLU (llama, whose ``up`` stacks gate then up rows)."""

    def __init__(self, cfg: ModelConfig, d_inner: int):
        super().__init__()
        self.act, bias = activation(cfg), cfg.flavour == "gpt2"
        self.norm = make_norm(cfg)
        self.up = nn.Linear(cfg.d_model, d_inner * (2 if self.act == "swiglu" else 1), bias=bias)
        self.down = nn.Linear(d_inner, cfg.d_model, bias=bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.drop(self.down(activate(self.up(self.norm(x)), self.act)))


def build_block(spec: BlockSpec, cfg: ModelConfig) -> Block:
    if spec.kind == "skip":
        return Skip()
    if spec.kind == "attn":
        return Attention(cfg, spec.heads)
    if spec.kind == "ffl":
        return MLP(cfg, cfg.d_inner * spec.width)
    if spec.kind == "moe":
        experts = MoEConfig(cfg.d_model, cfg.d_inner, spec.experts or cfg.n_experts, spec.top_k, cfg.moe_dropout,
                            activation=activation(cfg), bias=cfg.flavour == "gpt2")  # fmt: skip
        return MoEFeedForward(experts, norm=make_norm(cfg), pre_norm=True)
    raise ValueError(f"no block of kind {spec.kind}")


def init_weights(module: nn.Module, std: float) -> None:
    """N(0, std) weights, zero biases, identity norms (GPT-2's initialisation without its depth scaling)."""
    for m in module.modules():
        if init_normal(m, std):
            continue
        if isinstance(m, (nn.LayerNorm, nn.RMSNorm)):
            m.reset_parameters()
        elif isinstance(m, MoEFeedForward):
            m.reset_parameters(std=std)


class GPT(LanguageModel):
    """The decoder-only language model; the same interface as ``TransformerXL``, with no memory (``mem_len`` 0)."""

    def __init__(self, cfg: ModelConfig, arch: Arch | None = None, blocks: list[nn.Module] | None = None):
        """Build the blocks from ``arch``, or take ready-made ``blocks`` (the supernet's super blocks)."""
        super().__init__(cfg, arch, 0)
        self.pos = nn.Embedding(cfg.context, cfg.d_model) if cfg.flavour == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(blocks if blocks is not None else [build_block(s, cfg) for s in arch])
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)

    def forward(self, idx: torch.Tensor, mems: list | None = None) -> tuple[torch.Tensor, list]:
        """Logits (batch, len, vocab) for token ids (batch, len); ``mems`` is accepted and returned empty."""
        T = idx.size(1)
        if T > self.cfg.context:
            raise PlanerError(f"the model reads at most {self.cfg.context} tokens at once, got {T}")
        h = self.embed(idx)  # (B, T, d_model)
        if self.pos is not None:
            h = h + self.pos(torch.arange(T, device=idx.device))
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, None)
        h = self.norm(h)
        logits = F.linear(h, self.embed.weight if self.head is None else self.head.weight)  # (B, T, vocab)
        return logits, self.init_mems()
