"""What one timed call does: the workload a latency is measured on (``latency.workload``).

- ``segment``: the forward of one (batch, tgt_len) segment with every attention memory full, the steady state of
  a Transformer-XL's evaluation and of training-style scoring.
- ``prefill``: the forward of a (batch, ``latency.prompt``) prompt into an empty key/value cache (a Transformer-XL:
  into empty memories), the time to the first token.
- ``decode``: one new token per sequence after ``latency.context`` cached positions, the time per token once
  generation runs. A Transformer-XL has no cache: its decode is one new token with its memory full (``mem_len``),
  the way ``planer generate`` runs it.

The state a call reads (cache, memories) is made once and reset before every call, so only the forward is timed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from planer.config import LatencyConfig
from planer.errors import PlanerError


def random_ids(model: torch.nn.Module, batch: int, length: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randint(0, model.cfg.vocab_size, (batch, length), device=gen.device, generator=gen)


def full_memories(model: torch.nn.Module, batch: int, gen: torch.Generator) -> list:
    """Random memories of ``mem_len`` positions for the blocks that keep memory (None for the rest)."""
    device = gen.device
    dtype = model.embed.weight.dtype
    return [
        torch.randn(batch, model.mem_len, model.cfg.d_model, device=device, generator=gen).to(dtype)
        if block.uses_memory and model.mem_len
        else None
        for block in model.blocks
    ]


def cached_and_new(lc: LatencyConfig, tgt_len: int) -> tuple[int, int]:
    """The positions a call of ``lc.workload`` finds cached before it, and the new ones it reads per sequence (a
    segment's cached positions are its memory, which the model's own ``mem_len`` sizes)."""
    return {"segment": (0, tgt_len), "prefill": (0, lc.prompt), "decode": (lc.context, 1)}[lc.workload]


def workload_state(model: torch.nn.Module, batch: int, lc: LatencyConfig, gen: torch.Generator):
    """(state, reset, new) of a call under ``lc.workload``: what the model's forward reads (its decoding state; for
    a model with memory, full memories standing for the cache, or None before a prefill), the reset that puts the
    state back before every call (None: nothing to put back), and the new positions each sequence reads."""
    cached, new = cached_and_new(lc, model.cfg.tgt_len)
    if lc.workload == "segment":
        return full_memories(model, batch, gen), None, new
    try:
        state = model.decoding_state(batch, cached + new)
    except PlanerError as e:
        raise PlanerError(f"latency.workload {lc.workload} ({cached} cached, {new} new positions): {e}") from None
    if state is None:
        return (full_memories(model, batch, gen) if cached else None), None, new

    def reset():
        state.length = cached

    return state, reset, new


def workload_call(model: torch.nn.Module, batch: int, lc: LatencyConfig, device: torch.device) -> Callable:
    """The call to time for ``model`` at ``batch`` under ``lc.workload``; a PlanerError when the model cannot hold
    the workload's positions."""
    gen = torch.Generator(device=device).manual_seed(0)
    state, reset, new = workload_state(model, batch, lc, gen)
    idx = random_ids(model, batch, new, gen)
    if reset is None:
        return lambda: model(idx, state)

    def call():
        reset()
        return model(idx, state, last_only=True)

    return call


def chain_call(
    model: torch.nn.Module, positions: Sequence[int], batch: int, lc: LatencyConfig, device: torch.device
) -> Callable:
    """The call of ``model``'s blocks at ``positions`` alone, in order, under ``lc.workload``: random hidden states of
    the new positions' shape, each block reading what the model's forward would hand it of its state (its layer of
    the key/value cache, reset before every call, or its full memory), so that nothing but the blocks is timed."""
    gen = torch.Generator(device=device).manual_seed(positions[0])
    state, reset, new = workload_state(model, batch, lc, gen)
    h = torch.randn(batch, new, model.cfg.d_model, device=device, generator=gen).to(model.embed.weight.dtype)
    chain = [(model.blocks[p], None if state is None else state[p]) for p in positions]

    def call():
        if reset is not None:
            reset()
        x = h
        for block, read in chain:
            x = block(x, read)
        return x

    return call
