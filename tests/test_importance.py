"""Head importance and weight inheritance: the ranking finds the heads that matter, and inheriting everything
reproduces the source model."""

import pytest
import torch
from conftest import tiny_model

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.evaluation.importance import Sample, rank_heads
from planer.models.arch import Arch
from planer.models.txl.model import TransformerXL
from planer.search.supernet import SuperNet, warm_start
from planer.training.inherit import from_supernet, inherit

CFG = tiny_model()


def two_segments(model, x):
    with torch.no_grad():
        first, mems = model(x[:, :8])
        second, _ = model(x[:, 8:], mems)
    return first, second


def test_inheriting_every_head_and_block_reproduces_the_source_exactly():
    torch.manual_seed(0)
    source = TransformerXL(CFG, Arch.baseline(2, 4)).eval()
    ranking = {0: [(2, 0.3), (0, 0.2), (3, 0.1), (1, 0.0)], 2: [(1, 0.5), (3, 0.4), (0, 0.2), (2, 0.1)]}
    torch.manual_seed(1)  # the copy's own initialisation differs: only inherited weights can make it equal
    copy = inherit(source, source.arch, ranking).eval()
    x = torch.randint(0, 40, (2, 16))
    for got, expected in zip(two_segments(copy, x), two_segments(source, x)):
        assert torch.equal(got, expected)


def test_widened_and_upcycled_blocks_compute_what_the_source_does():
    torch.manual_seed(0)
    source = TransformerXL(CFG, Arch.baseline(2, 4)).eval()
    model = inherit(source, Arch.parse("attn:4 ffl:x2 attn:4 moe:top2"), {}).eval()
    x = torch.randint(0, 40, (2, 16))
    for got, expected in zip(two_segments(model, x), two_segments(source, x)):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_fewer_heads_keep_the_ranked_ones():
    """attn:2 from a ranking that prefers heads 3 and 1 computes the source block with heads 0 and 2 silenced."""
    torch.manual_seed(0)
    source = TransformerXL(CFG, Arch.baseline(2, 4)).eval()
    ranking = {0: [(3, 0.2), (1, 0.1), (0, 0.0), (2, -0.1)]}
    model = inherit(source, Arch.parse("attn:2 ffl skip ffl"), ranking).eval()
    h = torch.randn(2, 8, 32)
    full = source.blocks[0]
    with torch.no_grad():
        got = model.blocks[0](h)
        for head in (0, 2):
            full.out.weight[:, head * 8 : (head + 1) * 8] = 0.0
        torch.testing.assert_close(got, full(h), atol=1e-5, rtol=1e-5)


def test_ranking_puts_a_head_that_matters_before_a_silenced_one(trained_tiny):
    model, corpus = trained_tiny
    d_head = model.cfg.d_head
    with torch.no_grad():
        model.blocks[0].out.weight[:, 2 * d_head : 3 * d_head] = 0.0  # head 2 of block 0 writes nothing
    sample = Sample(corpus.train, batch_size=8, tgt_len=16, mem_len=16, segments=4)
    ranking = rank_heads(model, sample)
    assert sorted(ranking) == [0, 2] and all(len(heads) == 4 for heads in ranking.values())
    scores = dict(ranking[0])
    assert scores[2] == 0.0  # removing a silent head changes nothing
    order = [h for h, _ in ranking[0]]
    assert ranking[0][0][1] > 0.0 and order.index(2) > 0
    assert all(order.index(h) < order.index(2) for h, s in scores.items() if s > 0)
    assert rank_heads(model, sample) == ranking  # deterministic given the sample
    assert torch.equal(model.blocks[0].out.weight[:, 2 * d_head : 3 * d_head], torch.zeros(32, d_head))  # restored
    assert rank_heads(model, sample, positions={2}) == {2: ranking[2]}  # one block's ranking is the same alone


def test_inheriting_ranks_only_the_blocks_that_keep_fewer_heads(trained_tiny, tiny_cfg, tmp_path, monkeypatch):
    """Keeping every head needs no ranking (all are kept in order): a rival that only skips blocks costs no
    ranking run, and a reduced block is ranked alone."""
    from planer.io.checkpoint import save_checkpoint
    from planer.training import train

    model, corpus = trained_tiny
    cfg = tiny_cfg("model.n_experts=4")
    cfg.model.vocab_size = len(corpus.vocab)
    (tmp_path / "base").mkdir()
    save_checkpoint(tmp_path / "base", model, cfg, corpus.vocab)
    ranked = []
    real = train.rank_heads
    monkeypatch.setattr(train, "rank_heads", lambda *a, **k: ranked.append(k["positions"]) or real(*a, **k))
    train.inherited_weights(tmp_path / "base", cfg, Arch.parse("attn:4 skip skip ffl"), corpus)
    train.inherited_weights(tmp_path / "base", cfg, Arch.parse("attn:4 ffl attn:2 ffl"), corpus)
    assert ranked == [{2}]


def test_what_cannot_be_inherited_is_refused():
    source = TransformerXL(CFG, Arch.baseline(2, 4))
    with pytest.raises(PlanerError, match="d_model"):
        inherit(source, source.arch, {}, ModelConfig(d_model=64, n_head=8, d_inner=64, vocab_size=40))
    with pytest.raises(PlanerError, match="of 4"):
        inherit(source, Arch.parse("attn:4 ffl"), {})
    with pytest.raises(PlanerError, match="block 1"):
        inherit(source, Arch.parse("attn:4 attn:2 attn:4 ffl"), {})  # attention where the source has an FFL
    with pytest.raises(PlanerError, match="block 0"):
        inherit(TransformerXL(CFG, Arch.parse("attn:2 ffl attn:4 ffl")), source.arch, {})  # more heads than it has


def test_from_supernet_takes_the_options_weights():
    torch.manual_seed(0)
    space = ["skip", "attn:1", "attn:2", "ffl", "moe:top1"]
    net = SuperNet(CFG, space, 4).eval()
    arch = Arch.parse("attn:2 moe:top1 skip ffl")
    model = from_supernet(net, arch).eval()
    net.set_mode("hard")
    for block, spec in zip(net.blocks, arch):
        block.choice = space.index(str(spec))
    x = torch.randint(0, 40, (2, 16))
    for got, expected in zip(two_segments(model, x), two_segments(net, x)):
        assert torch.equal(got, expected)
    with pytest.raises(PlanerError, match="options"):
        from_supernet(net, Arch.parse("attn:4 ffl ffl ffl"))


def test_warm_start_keeps_the_ranked_heads():
    torch.manual_seed(0)
    baseline = TransformerXL(CFG, Arch.baseline(2, 4)).eval()
    net = SuperNet(CFG, ["attn:1", "ffl"], 4)
    warm_start(net, baseline, {0: [(3, 1.0), (0, 0.5), (1, 0.2), (2, 0.1)]})
    torch.testing.assert_close(net.blocks[0].candidates[0].r_w_bias[0], baseline.blocks[0].r_w_bias[3])
    torch.testing.assert_close(net.blocks[2].candidates[0].r_w_bias[0], baseline.blocks[2].r_w_bias[0])  # unranked
