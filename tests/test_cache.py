"""The gpt backbone's key/value cache: prefill and decode give the full forward's logits at every position."""

import pytest
import torch

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.evaluation.generate import generate
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.models.gpt.cache import KVCache

ARCH = "attn:4 moe:top2 skip ffl attn:2 ffl:x2 attn:1 skip"  # grouped heads, fewer heads, a skip, MoE


def tiny(flavour: str, **kw) -> ModelConfig:
    values = dict(backbone="gpt", flavour=flavour, d_model=32, n_head=4, d_inner=48, n_layer=4, tgt_len=16)
    values |= dict(mem_len=0, dropout=0.0, n_experts=4, moe_dropout=0.0, vocab_size=50, n_positions=40)
    if flavour == "llama":
        values |= dict(n_kv_head=2, tie_embeddings=False)
    return ModelConfig(**(values | kw))


def random_model(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    model = build_model(cfg, Arch.parse(ARCH)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@pytest.mark.parametrize("chunks", [[7, 1, 1, 1, 1, 1], [3, 4, 1, 5, 1]], ids=["prefill-decode", "chunked"])
@torch.no_grad()
def test_cached_logits_equal_the_full_forward_at_every_position(flavour, chunks):
    model = random_model(tiny(flavour))
    ids = torch.randint(0, 50, (2, sum(chunks)), generator=torch.Generator().manual_seed(1))
    full, _ = model(ids)
    cache, parts, start = KVCache(model, 2, 40), [], 0
    for n in chunks:
        logits, cache = model(ids[:, start : start + n], cache)
        parts.append(logits)
        start += n
    assert cache.length == sum(chunks)
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)


@torch.no_grad()
def test_only_attention_blocks_keep_a_cache_of_their_own_key_value_heads():
    model = random_model(tiny("llama"))
    cache = KVCache(model, 3, 12)
    kept = [(i, layer.k.shape) for i, layer in enumerate(cache.layers) if layer is not None]
    assert kept == [(0, (3, 2, 12, 8)), (4, (3, 1, 12, 8)), (6, (3, 1, 12, 8))]  # attn:4 over 2 groups; 2 and 1 over 1


@torch.no_grad()
def test_last_only_is_the_last_position_of_the_whole():
    model = random_model(tiny("llama"))
    ids = torch.randint(0, 50, (1, 9), generator=torch.Generator().manual_seed(2))
    full, _ = model(ids)
    last, _ = model(ids, KVCache(model, 1, 9), last_only=True)
    assert last.shape == (1, 1, 50) and torch.allclose(last[0, 0], full[0, -1], atol=1e-5, rtol=0)


@torch.no_grad()
def test_a_full_cache_and_a_long_prompt_are_refused():
    model = random_model(tiny("llama"))
    cache = KVCache(model, 1, 4)
    model(torch.zeros(1, 3, dtype=torch.long), cache)
    with pytest.raises(PlanerError, match="holds 4 positions: 3 cached and 2 new do not fit"):
        model(torch.zeros(1, 2, dtype=torch.long), cache)
    with pytest.raises(PlanerError, match="the prompt has 41 tokens, more than the model's 40 positions"):
        generate(model, [1] * 41, 2, temperature=0)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
@torch.no_grad()
def test_greedy_generation_with_the_cache_equals_full_forwards_and_slides_past_the_positions(flavour):
    """Up to the model's 40 positions every token equals greedy decoding by full forwards; when the 41st is
    needed, the newest 20 tokens are prefilled again into an emptied cache, and decoding goes on from them."""
    model = random_model(tiny(flavour))
    prompt = [3, 14, 15, 9, 26]
    out = generate(model, prompt, 60, temperature=0)
    context, expected = list(prompt), []
    for _ in range(60):
        expected.append(int(model(torch.tensor([context]))[0][0, -1].argmax()))
        context.append(expected[-1])
        if len(context) > 40:
            context = context[-20:]
    assert out == expected
