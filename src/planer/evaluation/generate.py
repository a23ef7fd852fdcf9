"""Sampling from any planer model, one token at a time.

One loop for every backbone: the model's own decoder (``LanguageModel.decoder``) says how it is fed, with its
memory, its key/value cache (the prompt prefilled once, then each new token alone) or its window read again.
Temperature 0 is greedy decoding; ``top_k`` keeps the k likeliest tokens before sampling. Sampling draws
from a generator of its own, seeded, so the same call gives the same tokens and leaves torch's global RNG alone.
"""

from __future__ import annotations

import torch
from torch import nn

from planer.errors import PlanerError


def pick(logits: torch.Tensor, temperature: float, top_k: int, gen: torch.Generator) -> int:
    """The next token from one position's logits (vocab,)."""
    if temperature == 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if 0 < top_k < logits.numel():
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(logits.softmax(-1), 1, generator=gen))


@torch.no_grad()
def generate(
    model: nn.Module, prompt: list[int], tokens: int, temperature: float = 1.0, top_k: int = 0, seed: int = 0
) -> list[int]:
    """``tokens`` new token ids after ``prompt`` (ids too), from a model in eval mode."""
    vocab = model.cfg.vocab_size
    if not prompt:
        raise PlanerError("generation needs a prompt of at least one token")
    if not all(0 <= t < vocab for t in prompt):
        raise PlanerError(f"prompt ids must be in [0, {vocab}), got {[t for t in prompt if not 0 <= t < vocab][0]}")
    if tokens < 0 or temperature < 0 or top_k < 0:
        raise PlanerError("--tokens, --temperature and --top-k must not be negative")
    was_training = model.training
    model.eval()
    gen = torch.Generator().manual_seed(seed)
    decoder = model.decoder(len(prompt) + tokens)
    seq, fresh = list(prompt), list(prompt)
    try:
        for _ in range(tokens):
            fresh = [pick(decoder.step(fresh).cpu(), temperature, top_k, gen)]
            seq += fresh
    finally:
        model.train(was_training)
    return seq[len(prompt) :]
