"""The key/value cache of a decoder model: prefill a prompt once, then decode one token at a time.

What a user of a decoder model waits for is the time to the first token (prefill) and the time per new token
(decode), and decode reads every attention block's past keys and values instead of recomputing them. The cache is
preallocated for ``capacity`` positions (no copy of the past per token, as a cache grown by concatenation makes),
one key and one value tensor per attention block, of that block's own key/value heads: a block with fewer
key/value groups keeps a smaller cache, and skipped blocks, MLPs and MoE blocks keep none.

    B  batch          K  key/value heads of the block     Dh  head size
    T  new positions  L  positions cached after them      g   query heads per key/value head (H = K * g)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planer.errors import PlanerError


class LayerCache:
    """One attention block's keys and values, (B, K, capacity, Dh) each, filled up to the cache's length."""

    def __init__(self, cache: KVCache, block: nn.Module, batch: int, like: torch.Tensor):
        self.cache = cache
        shape = (batch, block.kv, cache.capacity, block.d_head)
        self.k = like.new_zeros(shape)
        self.v = like.new_zeros(shape)

    @property
    def start(self) -> int:
        """The position of the first new token: every earlier one is cached."""
        return self.cache.length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new positions' keys and values (B, K, T, Dh); every position's so far, (B, K, L, Dh) each."""
        s, T = self.start, k.size(2)
        self.k[:, :, s : s + T] = k
        self.v[:, :, s : s + T] = v
        return self.k[:, :, : s + T], self.v[:, :, : s + T]


class KVCache:
    """The cache of every attention block of a model for ``batch`` sequences of at most ``capacity`` positions.

    ``layers`` lines up with the model's blocks (None where a block keeps nothing); ``length`` counts the cached
    positions, advanced by the model once all its blocks have read a forward's new positions.
    """

    def __init__(self, model: nn.Module, batch: int, capacity: int):
        if not 1 <= capacity <= model.cfg.context:
            raise PlanerError(f"a key/value cache holds 1 to the model's {model.cfg.context} positions, not {capacity}")
        self.capacity, self.length = capacity, 0
        like = model.embed.weight
        self.layers = [LayerCache(self, b, batch, like) if b.n_head else None for b in model.blocks]

    def __getitem__(self, position: int) -> LayerCache | None:
        """What the block at ``position`` reads, as a list of memories is indexed: its layer's cache, or None."""
        return self.layers[position]

    def check_room(self, new: int) -> None:
        if self.length + new > self.capacity:
            raise PlanerError(
                f"the key/value cache holds {self.capacity} positions: {self.length} cached and {new} new do not fit"
            )


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int) -> torch.Tensor:
    """Causal attention of T new queries (B, H, T, Dh) at positions start .. start+T-1 over every cached position's
    keys and values (B, K, L, Dh); (B, H, T, Dh).

    Query head i reads key/value head i // g. The g query heads of a group are stacked as g * T queries of that
    group's key/value head: no copy of the keys per query head, and no grouped-query attention, which ONNX's
    exporter lacks (``planer export --onnx`` traces the masked path, models/gpt/onnx.py). One new token sees every
    cached position, so it needs no mask; an empty cache takes the causal mask of the new positions alone.
    """
    B, H, T, Dh = q.shape
    K, L = k.size(1), k.size(2)
    if T == 1:
        return F.scaled_dot_product_attention(q.view(B, K, H // K, Dh), k, v).view(B, H, 1, Dh)
    if start == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=K != H)
    seen = torch.arange(L, device=q.device) <= torch.arange(start, start + T, device=q.device)[:, None]  # (T, L)
    stacked = q.reshape(B, K, H // K * T, Dh)  # head j * g + r at position t: row r * T + t of group j
    y = F.scaled_dot_product_attention(stacked, k, v, attn_mask=seen.repeat(H // K, 1))  # (B, K, g * T, Dh)
    return y.view(B, H, T, Dh)


class CacheDecoder:
    """Generation with the cache: the prompt prefilled once, then each new token alone.

    The cache holds at most the model's positions. When it is full, the newest half of the sequence is prefilled
    again into an emptied cache and decoding goes on: every token is then predicted from at least half the
    model's context, at the cost of one prefill per half context of new tokens (a model with rotary positions
    could shift its cache instead; one with learned positions cannot, so both slide the same way).
    """

    def __init__(self, model: nn.Module, capacity: int):
        self.model, self.seq = model, []
        self.cache = KVCache(model, 1, min(capacity, model.cfg.context))
        self.device = model.embed.weight.device

    def step(self, new: list[int]) -> torch.Tensor:
        """The logits (vocab,) of the token after ``new``, the sequence's latest tokens."""
        if not self.seq and len(new) > self.model.cfg.context:
            raise PlanerError(
                f"the prompt has {len(new)} tokens, more than the model's {self.model.cfg.context} positions"
            )
        self.seq += new
        if self.cache.length + len(new) > self.cache.capacity:
            self.cache.length = 0
            new = self.seq[-max(1, self.cache.capacity // 2) :]
        logits, _ = self.model(torch.tensor([new], device=self.device), self.cache, last_only=True)
        return logits[0, -1]
