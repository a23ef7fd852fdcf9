"""The gpt backbone: blocks, grouped-query heads, MoE experts of the MLP's shape, sliding evaluation, sampling."""

import math

import pytest
import torch
from conftest import LLAMA_SETTINGS, tiny_gpt, tiny_model

from planer.config import load_config
from planer.errors import PlanerError
from planer.evaluation.evaluate import evaluate_sliding
from planer.evaluation.generate import generate
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_block, build_model
from planer.models.gpt.model import GPT, MLP, kv_heads
from planer.models.language_model import token_nll
from planer.models.moe import MoEConfig, MoEFeedForward
from planer.models.txl.model import TransformerXL


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_every_block_kind_runs_forward_and_backward(flavour):
    torch.manual_seed(0)
    cfg = tiny_gpt(flavour)
    model = build_model(cfg, Arch.parse("attn:4 ffl attn:1 moe:top2 skip ffl:x2 attn:2 moe:top1"))
    assert isinstance(model, GPT) and model.mem_len == 0
    logits, mems = model(torch.randint(0, 50, (2, 16)))
    assert logits.shape == (2, 16, 50) and mems == [None] * 8
    assert model.aux_loss().item() > 0
    (logits.logsumexp(-1).mean() + model.aux_loss()).backward()
    assert all(p.grad is not None for n, p in model.named_parameters() if "router" not in n)
    with pytest.raises(PlanerError, match="at most 16 tokens"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_attention_is_causal():
    torch.manual_seed(0)
    model = build_model(tiny_gpt("llama"), Arch.parse("attn:4 ffl")).eval()
    idx = torch.randint(0, 50, (1, 12))
    changed = idx.clone()
    changed[0, 8:] = (changed[0, 8:] + 1) % 50
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0][:, :8], model(changed)[0][:, :8])


def test_key_value_heads_keep_the_grouping():
    cfg = tiny_gpt("llama", n_head=8, d_model=64, n_kv_head=2)
    assert [kv_heads(cfg, h) for h in (8, 4, 2, 1, 6)] == [2, 1, 1, 1, 1]
    assert [kv_heads(tiny_gpt("gpt2", n_head=8, d_model=64), h) for h in (8, 4, 1)] == [8, 4, 1]
    assert kv_heads(tiny_gpt("llama", n_head=4, n_kv_head=2), 5) == 1  # 5 * 2 // 4 = 2 does not divide 5
    block = build_block(BlockSpec("attn", heads=8), cfg)
    assert block.qkv.out_features == (8 + 2 * 2) * 8


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_experts_upcycled_from_the_mlp_equal_it(flavour):
    """Every expert a copy of the MLP: the MoE block computes the MLP block, whatever the routing."""
    torch.manual_seed(0)
    cfg = tiny_gpt(flavour)
    mlp = build_block(BlockSpec("ffl"), cfg)
    moe = build_block(BlockSpec("moe", top_k=2), cfg)
    assert isinstance(mlp, MLP) and isinstance(moe, MoEFeedForward)
    with torch.no_grad():
        torch.nn.init.normal_(mlp.norm.weight)
        moe.norm.load_state_dict(mlp.norm.state_dict())
        moe.w1.copy_(mlp.up.weight.expand_as(moe.w1))
        moe.w2.copy_(mlp.down.weight.expand_as(moe.w2))
        if flavour == "gpt2":
            torch.nn.init.normal_(mlp.up.bias)
            moe.b1.copy_(mlp.up.bias.expand_as(moe.b1))
            moe.b2.copy_(mlp.down.bias.expand_as(moe.b2))
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(moe(x), mlp(x))
    moe.eval()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), mlp(x))  # the CPU inference path (prepacked weights)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_gpt_experts_match_the_sequential_reference(activation):
    """The grouped experts' own backward, for the new activations, against autograd through the paper's loop."""
    torch.manual_seed(0)
    kw = dict(dropout=0.0, activation=activation, bias=activation == "gelu")
    grouped = MoEFeedForward(MoEConfig(16, 24, 4, 2, **kw), pre_norm=True)
    reference = MoEFeedForward(MoEConfig(16, 24, 4, 2, impl="sequential", **kw), pre_norm=True)
    reference.load_state_dict(grouped.state_dict())
    x = torch.randn(2, 9, 16, requires_grad=True)
    outputs, grads = [], []
    for block in (grouped, reference):
        y = block(x)
        y.square().sum().backward()
        outputs.append(y.detach())
        grads.append([x.grad.clone()] + [p.grad.clone() for p in block.parameters()])
        x.grad = None
    torch.testing.assert_close(outputs[0], outputs[1])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert set(grouped.state_dict()) >= {"w1", "w2", "router.weight"}
    assert ("b1" in grouped.state_dict()) == (activation == "gelu")


def test_expert_dropout_with_gelu_trains():
    torch.manual_seed(0)
    block = MoEFeedForward(MoEConfig(16, 24, 4, 1, dropout=0.3, activation="gelu"), pre_norm=True).train()
    x = torch.randn(3, 5, 16, requires_grad=True)
    block(x).sum().backward()
    assert torch.isfinite(x.grad).all() and block.w1.grad.abs().sum() > 0


def test_sliding_window_scores_every_token_once_with_its_context():
    """Against a direct computation: each token's loss from one forward over exactly the context its window gives."""
    torch.manual_seed(0)
    model = build_model(tiny_gpt("llama"), Arch.parse("attn:4 ffl")).eval()
    ids = torch.randint(0, 50, (41,))
    window, stride = 16, 5
    result = evaluate_sliding(model, ids, window, stride, batch_size=3)
    n, losses = len(ids), []
    ends = [min(window + k * stride, n - 1) for k in range(n)]
    with torch.no_grad():
        for t in range(1, n):
            begin = max(0, next(e for e in ends if e >= t) - window)  # the first window that reaches token t
            logits, _ = model(ids[None, begin:t])
            losses.append(token_nll(logits[:, -1:], ids[None, t : t + 1]).item())
    assert result["tokens"] == n - 1
    assert math.isclose(result["loss"], sum(losses) / len(losses), rel_tol=1e-5)
    full = evaluate_sliding(model, ids[:17], window, 1, batch_size=8)  # 16 targets: one window, all its context
    with torch.no_grad():
        direct = token_nll(model(ids[None, :16])[0], ids[None, 1:17]).mean().item()
    assert math.isclose(full["loss"], direct, rel_tol=1e-6)
    with pytest.raises(PlanerError, match="stride"):
        evaluate_sliding(model, ids, window, window + 1, 1)


def test_greedy_generation_reads_the_sliding_context():
    torch.manual_seed(0)
    model = build_model(tiny_gpt("gpt2"), Arch.parse("attn:4 ffl")).eval()
    out = generate(model, [1, 2, 3], 30, temperature=0)
    seq = [1, 2, 3]
    with torch.no_grad():
        for _ in range(30):
            seq.append(int(model(torch.tensor([seq[-16:]]))[0][0, -1].argmax()))
    assert out == seq[3:]


def test_transformer_xl_generation_carries_its_memory():
    """With memory longer than the text, one token at a time with memory equals reading the whole text each time."""
    torch.manual_seed(0)
    cfg = tiny_model(d_inner=48, mem_len=64, vocab_size=30)
    model = TransformerXL(cfg, Arch.parse("attn:4 ffl attn:2 ffl")).eval()
    out = generate(model, [4, 5], 20, temperature=0)
    seq = [4, 5]
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0][0, -1].argmax()))
    assert out == seq[2:]


def test_sampling_is_seeded_and_top_k_limits_choices():
    torch.manual_seed(0)
    model = build_model(tiny_gpt("llama"), Arch.parse("attn:4 ffl")).eval()
    a = generate(model, [7], 20, temperature=1.0, seed=3)
    assert a == generate(model, [7], 20, temperature=1.0, seed=3)
    assert a != generate(model, [7], 20, temperature=1.0, seed=4)
    assert generate(model, [7], 10, temperature=1.0, top_k=1, seed=5) == generate(model, [7], 10, temperature=0)
    with pytest.raises(PlanerError, match="prompt ids"):
        generate(model, [50], 1)


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("model.backbone=bert", "model.backbone"),
        ("model.flavour=mistral", "model.flavour"),
        ("model.n_kv_head=3", "n_kv_head"),
        ("model.n_positions=8", "exceeds model.n_positions"),
        ("model.norm_eps=0", "norm_eps"),
    ],
)
def test_bad_gpt_config_values(override, fragment):
    with pytest.raises(PlanerError, match=fragment):
        load_config(None, ["model.backbone=gpt", override])


def test_tiny_gpt_trains(tiny_cfg, tmp_path):
    from planer.io.checkpoint import load_checkpoint
    from planer.training.loop import RunOptions
    from planer.training.train import train

    cfg = tiny_cfg(*LLAMA_SETTINGS)
    cfg.train.steps, cfg.train.eval_every = 30, 30
    summary = train(cfg, tmp_path / "gpt", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    assert summary.best_valid_loss < math.log(len(load_checkpoint(tmp_path / "gpt")[2]))
    assert isinstance(load_checkpoint(tmp_path / "gpt")[0], GPT)
