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
from planer.models.blocks import Block, FeedForwardParts, Skip, UnitOrder
from planer.models.gpt.cache import CacheDecoder, KVCache, LayerCache, cached_attention
from planer.models.language_model import LanguageModel, init_weights
from planer.models.moe import MoEConfig, MoEFeedForward, activate


def kv_heads(cfg: ModelConfig, heads: int) -> int:
    """Key/value heads of an ``attn:heads`` block: about heads * n_kv_head / n_head, at least 1, dividing heads."""
    return grouped(heads, cfg.n_head, cfg.n_kv_head or cfg.n_head)


def grouped(heads: int, n_head: int, n_kv: int) -> int:
    """The key/value heads ``heads`` query heads keep of a grouping of ``n_head`` over ``n_kv``: about heads *
    n_kv / n_head, at least 1, dividing heads."""
    n = max(1, heads * n_kv // n_head)
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
    """Causal self-attention with ``heads`` query heads and ``kv`` key/value heads (by default ``kv_heads(cfg, heads)``).

    q, k and v come from one fused projection, laid out [q (heads * d_head), k, v], one product instead of three.
    """

    def __init__(self, cfg: ModelConfig, heads: int, kv: int = 0):
        super().__init__()
        self.heads, self.kv, self.d_head, self.dropatt = heads, kv or kv_heads(cfg, heads), cfg.d_head, cfg.dropatt
        bias = cfg.flavour == "gpt2"
        self.norm = make_norm(cfg)
        self.qkv = nn.Linear(cfg.d_model, (heads + 2 * self.kv) * cfg.d_head, bias=bias)
        self.out = nn.Linear(heads * cfg.d_head, cfg.d_model, bias=bias)
        self.drop = nn.Dropout(cfg.dropout)
        self.rotary, self.theta = cfg.flavour == "llama", cfg.rope_theta
        self.tables: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_head(self) -> int:
        """The query heads, under ``Block``'s name: head importance counts every backbone's heads alike."""
        return self.heads

    def inherit_heads(self, src: Block, order: UnitOrder) -> bool:
        """The query heads and key/value groups ``kept_groups`` chooses of ``src`` (see ``copy_grouped_heads``)."""
        return copy_grouped_heads(self, src, order)

    def _rotary(self, start: int, T: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin for positions start .. start+T-1, from tables kept while they are long enough.

        Not precomputed for the whole context: models such as Llama 3 allow 131072 positions, 2 GB of tables. A
        position's entries do not depend on the table's length, so a longer table's rows are the same numbers.
        """
        if self.tables is None or self.tables[0].size(0) < start + T or self.tables[0].device != device:
            self.tables = tuple(t.to(device) for t in rotary_tables(start + T, self.d_head, self.theta))
        return tuple(t[start : start + T] for t in self.tables)

    def forward(self, x: torch.Tensor, mem: LayerCache | None = None) -> torch.Tensor:
        """The block's output for new positions (B, T, d_model); with a cache, after every position it holds."""
        B, T, _ = x.shape
        H, K, Dh = self.heads, self.kv, self.d_head
        start = 0 if mem is None else mem.start
        q, k, v = self.qkv(self.norm(x)).split([H * Dh, K * Dh, K * Dh], dim=-1)
        q = q.view(B, T, H, Dh).transpose(1, 2)  # (B, H, T, Dh)
        k = k.view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
        v = v.view(B, T, K, Dh).transpose(1, 2)  # (B, K, T, Dh)
        if self.rotary:
            cos, sin = (t.to(q.dtype) for t in self._rotary(start, T, x.device))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if mem is None:
            # query head i reads key/value head i // (H / K), as Hugging Face's grouped-query attention does
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.dropatt if self.training else 0.0, is_causal=True, enable_gqa=K != H
            )  # (B, H, T, Dh)
        else:
            y = cached_attention(q, *mem.extend(k, v), start)
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

    def feed_forward(self) -> FeedForwardParts:
        return self.up, self.down, self.act, True

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        return x + self.drop(self.down(activate(self.up(self.norm(x)), self.act)))


def kept_groups(order: UnitOrder, heads: int, kv: int, keep: int, keep_kv: int) -> tuple[list[int], list[int]] | None:
    """The query heads and key/value heads an ``attn:keep`` with ``keep_kv`` key/value heads keeps of a block with
    ``heads`` query heads over ``kv`` key/value heads; None when none can.

    Query head i of an ``attn:H`` reads key/value head i // (H / K). A reduced ``attn:h`` has k = ``kv_heads(cfg,
    h)`` key/value heads, each read by g = h / k query heads, and a query head is only worth keeping with the keys
    and values it was trained with. So the reduced block keeps k whole source groups: from every source group its
    g most important query heads, and of the groups the k whose kept heads have the largest summed importance
    (ties: the lower group). That is the choice with the largest summed importance under that constraint. Kept
    groups, and the query heads within them, stay in source order, so inheriting every head reproduces the source
    exactly. Where g exceeds the source's group size no choice keeps the pairing, and the block is not inherited.

    The query heads come grouped (the j-th reads the j // (keep / keep_kv)-th kept key/value head), each group in
    source order.
    """
    size, want = heads // kv, keep // keep_kv
    if keep_kv > kv or want > size or keep % keep_kv:
        return None
    best = {g: [(h, s) for h, s in order if h // size == g][:want] for g in range(kv)}
    groups = sorted(sorted(range(kv), key=lambda g: (-sum(s for _, s in best[g]), g))[:keep_kv])
    return [h for g in groups for h in sorted(h for h, _ in best[g])], groups


def copy_grouped_heads(dst: Attention, src: Attention, order: UnitOrder) -> bool:
    """Give a gpt attention block the query heads and key/value heads ``kept_groups`` chooses of a trained one
    (their rows of the fused q/k/v projection, the query heads' output columns, the output bias, the norm).

    A block with fewer key/value heads than the source groups it keeps (``attn:H/kvK``) shares one among as many
    consecutive kept groups: its key and value projections are theirs averaged, as grouped-query attention is
    made from a multi-head checkpoint (Ainslie et al., 2023). Where those heads are equal it computes what the
    source does.
    """
    H, K, Dh = src.heads, src.kv, src.d_head
    keep_kv = grouped(dst.heads, H, K)  # the source groups the query heads come from
    kept = kept_groups(order, H, K, dst.heads, keep_kv)
    if kept is None or dst.d_head != src.d_head or keep_kv % dst.kv:
        return False
    queries, groups = kept
    q_rows = torch.tensor(queries, device=src.qkv.weight.device)
    kv_rows = torch.tensor([H + g for g in groups] + [H + K + g for g in groups], device=src.qkv.weight.device)
    D, share = src.out.out_features, keep_kv // dst.kv
    w = src.qkv.weight.view(H + 2 * K, Dh, -1)  # the fused projection's row blocks: [q (H), k (K), v (K)]
    with torch.no_grad():
        kv = w[kv_rows].view(2 * dst.kv, share, Dh, -1).mean(1)  # every run of `share` kept groups averaged
        dst.qkv.weight.copy_(torch.cat([w[q_rows], kv]).reshape(-1, src.qkv.in_features))
        dst.out.weight.copy_(src.out.weight.view(D, H, Dh)[:, queries].reshape(D, -1))
        if src.qkv.bias is not None:
            bias = src.qkv.bias.view(H + 2 * K, Dh)
            kv = bias[kv_rows].view(2 * dst.kv, share, Dh).mean(1)
            dst.qkv.bias.copy_(torch.cat([bias[q_rows], kv]).reshape(-1))
            dst.out.bias.copy_(src.out.bias)
    dst.norm.load_state_dict(src.norm.state_dict())
    return True


def build_block(spec: BlockSpec, cfg: ModelConfig) -> Block:
    if spec.kind == "skip":
        return Skip()
    if spec.kind == "attn":
        return Attention(cfg, spec.heads, spec.kv)
    if spec.kind == "ffl":
        return MLP(cfg, spec.hidden(cfg.d_inner))
    if spec.kind == "moe":
        experts = MoEConfig(cfg.d_model, cfg.d_inner, spec.experts or cfg.n_experts, spec.top_k, cfg.moe_dropout,
                            activation=activation(cfg), bias=cfg.flavour == "gpt2")  # fmt: skip
        return MoEFeedForward(experts, norm=make_norm(cfg), pre_norm=True)
    raise ValueError(f"no block of kind {spec.kind}")


class GPT(LanguageModel):
    """The decoder-only language model; the same interface as ``TransformerXL``, with no memory (``mem_len`` 0)."""

    def __init__(self, cfg: ModelConfig, arch: Arch | None = None, blocks: list[nn.Module] | None = None):
        """Build the blocks from ``arch``, or take ready-made ``blocks`` (the supernet's super blocks)."""
        super().__init__(cfg, arch, 0)
        self.pos = nn.Embedding(cfg.context, cfg.d_model) if cfg.flavour == "gpt2" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = self.make_blocks(arch, blocks, build_block)
        self.norm = make_norm(cfg)
        self.head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg.init_std)

    def forward(
        self, idx: torch.Tensor, mems: list | KVCache | None = None, last_only: bool = False
    ) -> tuple[torch.Tensor, list | KVCache]:
        """Logits (batch, len, vocab) for token ids (batch, len), or of the last position only (batch, 1, vocab).

        With a ``KVCache`` the ids are the positions after those it holds: they are read with every cached
        position and added to the cache, which is returned. Otherwise (``mems`` None or per-block Nones, as
        training passes them) the ids are a whole sequence, and ``mems`` is returned empty.
        """
        cache = mems if isinstance(mems, KVCache) else None
        start, T = (cache.length if cache else 0), idx.size(1)
        if start + T > self.cfg.context:
            raise PlanerError(f"the model reads at most {self.cfg.context} tokens at once, got {start + T}")
        if cache:
            cache.check_room(T)
        h = self.embed(idx)  # (B, T, d_model)
        if self.pos is not None:
            h = h + self.pos(torch.arange(start, start + T, device=idx.device))
        h = self.drop(h)
        for block, layer in zip(self.blocks, cache.layers if cache else [None] * len(self.blocks)):
            h = block(h, layer)
        if cache:
            cache.length += T
        h = self.norm(h[:, -1:] if last_only else h)
        logits = F.linear(h, self.embed.weight if self.head is None else self.head.weight)  # (B, T, vocab)
        return logits, cache or self.init_mems()

    def decoding_state(self, batch: int, capacity: int) -> KVCache:
        return KVCache(self, batch, capacity)

    def decoder(self, capacity: int) -> CacheDecoder:
        return CacheDecoder(self, capacity)
