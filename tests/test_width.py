"""Narrowed feed-forward blocks (``ffl:N``): spelled, built, ranked, inherited, profiled and searched."""

import pytest
import torch
from conftest import tiny_gpt, tiny_model

from planer.errors import PlanerError
from planer.evaluation.importance import Sample, rank_units, record_blocks
from planer.latency.table import profile
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_model
from planer.search.knapsack import measure
from planer.training.inherit import can_inherit, inherit, narrow


@pytest.mark.parametrize("text", ["ffl:48", "ffl:x2", "ffl"])
def test_feed_forward_specs_read_back_as_written(text):
    assert str(BlockSpec.parse(text)) == text


def test_a_narrowed_block_has_its_units_and_a_short_code():
    spec = BlockSpec.parse("ffl:24")
    assert spec.hidden(64) == 24 and BlockSpec.parse("ffl:x2").hidden(64) == 128
    assert Arch.parse("attn:4 ffl:24 skip ffl").short() == "a4f24sf"
    with pytest.raises(PlanerError, match="ffl:N"):
        BlockSpec.parse("ffl:0")


@pytest.mark.parametrize("cfg", [tiny_model(), tiny_gpt("llama"), tiny_gpt("gpt2")], ids=["txl", "llama", "gpt2"])
def test_narrowing_to_every_unit_in_any_order_reproduces_the_block(cfg):
    torch.manual_seed(0)
    source = build_model(cfg, Arch.baseline(1, cfg.n_head)).eval().blocks[1]
    torch.manual_seed(1)
    copy = build_model(cfg, Arch.baseline(1, cfg.n_head)).eval().blocks[1]
    units = source.feed_forward()[1].in_features
    order = [(u, 0.0) for u in torch.randperm(units).tolist()]
    narrow(copy, source, order)
    x = torch.randn(2, 5, cfg.d_model)
    with torch.no_grad():
        assert torch.equal(copy(x), source(x))


@pytest.mark.parametrize("cfg", [tiny_model(), tiny_gpt("llama")], ids=["txl", "llama"])
def test_a_narrowed_block_is_the_source_with_the_other_units_silenced(cfg):
    torch.manual_seed(0)
    source = build_model(cfg, Arch.baseline(1, cfg.n_head)).eval()
    kept = [5, 1, 9]
    order = [(u, 1.0) for u in kept] + [(u, 0.0) for u in range(cfg.d_inner) if u not in kept]
    model = inherit(source, Arch.parse(f"attn:{cfg.n_head} ffl:3"), {1: order}).eval()
    x = torch.randn(2, 5, cfg.d_model)
    block, full = model.blocks[1], source.blocks[1]
    silenced = [u for u in range(cfg.d_inner) if u not in kept]
    with torch.no_grad():
        got = block(x)
        full.feed_forward()[1].weight[:, silenced] = 0.0
        torch.testing.assert_close(got, full(x), atol=1e-6, rtol=1e-6)


def test_the_unit_ranking_puts_a_unit_without_input_last():
    """A SwiGLU unit whose gate and up rows are zero adds nothing to the block's output: it is ranked last."""
    cfg = tiny_gpt("llama")
    torch.manual_seed(0)
    model = build_model(cfg, Arch.baseline(1, cfg.n_head)).eval()
    up = model.blocks[1].up.weight  # (2 * d_inner, d_model): the gates' rows, then the ups'
    dead = 7
    with torch.no_grad():
        up[dead] = 0.0
        up[cfg.d_inner + dead] = 0.0
    _, recorded = record_blocks(model, Sample(torch.randint(0, 50, (400,)), 2, 16, 0, 4))
    ranking = rank_units(model, recorded)
    assert list(ranking) == [1]
    assert ranking[1][-1] == (dead, 0.0) and all(importance > 0 for _, importance in ranking[1][:-1])


def test_narrowed_options_are_profiled_and_estimated(tiny_cfg):
    cfg = tiny_cfg("search.space=[skip,attn:2,attn:4,ffl:16,ffl:32,ffl]", "latency.repeats=5", "latency.warmup=1")
    cfg.model.vocab_size = 40
    table = profile(cfg)
    assert {"ffl:16", "ffl:32"} <= set(table.blocks)
    assert table.estimate(Arch.parse("attn:4 ffl:16 attn:4 ffl:32")) > table.estimate(
        Arch.parse("attn:4 skip attn:4 skip")
    )


def test_the_knapsack_measures_narrowed_options_from_the_ranked_units():
    cfg = tiny_gpt("llama")
    torch.manual_seed(0)
    baseline = build_model(cfg, Arch.baseline(2, cfg.n_head)).eval()
    sample = Sample(torch.randint(0, 50, (400,)), 2, 16, 0, 2)
    measured = measure(baseline, ["skip", "ffl:16", "ffl"], sample)
    increases = dict(zip(measured.options, zip(*measured.increases)))
    # at the feed-forward positions the full block costs nothing, a narrowed one something
    assert [increases["ffl"][p] for p in (1, 3)] == [0.0, 0.0]
    assert all(increases["ffl:16"][p] not in (None, 0.0) for p in (1, 3))
    assert can_inherit(baseline, Arch.parse("attn:4 ffl:16 skip ffl:40"))


def test_phase2_ranks_the_units_of_the_narrowed_blocks_only(trained_tiny, tiny_cfg, tmp_path, monkeypatch):
    from planer.io.checkpoint import save_checkpoint
    from planer.training import train

    model, corpus = trained_tiny
    cfg = tiny_cfg("model.n_experts=4")
    cfg.model.vocab_size = len(corpus.vocab)
    (tmp_path / "base").mkdir()
    save_checkpoint(tmp_path / "base", model, cfg, corpus.vocab)
    ranked = []
    real = train.rank_units
    monkeypatch.setattr(
        train, "rank_units", lambda m, rec, positions: ranked.append(positions) or real(m, rec, positions)
    )
    weights = train.inherited_weights(tmp_path / "base", cfg, Arch.parse("attn:4 ffl attn:4 ffl:16"), corpus)
    assert ranked == [{3}] and weights["blocks.3.fc1.weight"].shape == (16, cfg.model.d_model)


def test_the_uniform_width_rival_narrows_every_block_alike_to_the_nearest_latency(tiny_cfg):
    from conftest import hand_table

    from planer.search.designs import uniform_width_rival

    cfg = tiny_cfg()  # 2 layers, 4 heads, d_inner 64
    ms = {"skip": 0.0, "attn:2": 1.0, "attn:4": 2.0, "ffl:16": 0.4, "ffl:32": 0.8, "ffl": 1.6}
    table = hand_table(cfg, ms, fixed=1.0)
    # found model at 1 + 2 * (2.0 + 0.8) = 6.6 ms: attn:4 with ffl:32 everywhere hits it exactly
    rival = uniform_width_rival(6.6, table, cfg.model)
    assert rival.arch == Arch.parse("attn:4 ffl:32 attn:4 ffl:32") and rival.within
    # 1 + 2 * (1.0 + 0.4) = 3.8 ms: the fewest heads and the narrowest blocks
    assert uniform_width_rival(3.8, table, cfg.model).arch == Arch.parse("attn:2 ffl:16 attn:2 ffl:16")
    with pytest.raises(PlanerError, match="ffl:N"):
        uniform_width_rival(6.6, hand_table(cfg, {"attn:4": 2.0, "ffl": 1.6}), cfg.model)


def test_key_value_specs_read_back_and_need_a_divisor():
    spec = BlockSpec.parse("attn:9/kv1")
    assert (spec.heads, spec.kv, str(spec)) == (9, 1, "attn:9/kv1")
    assert Arch.parse("attn:9/kv3 ffl").short() == "a9k3f"
    for bad in ("attn:9/kv2", "attn:9/kv0", "attn:9/k1"):
        with pytest.raises(PlanerError, match="attn:H/kvK"):
            BlockSpec.parse(bad)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_merging_equal_key_value_heads_reproduces_the_logits(flavour):
    """Heads that read equal keys and values lose nothing when they share one key/value head."""
    cfg = tiny_gpt(flavour, n_kv_head=4 if flavour == "gpt2" else 2)
    torch.manual_seed(0)
    source = build_model(cfg, Arch.baseline(2, cfg.n_head)).eval()
    H, K, Dh = cfg.n_head, cfg.n_kv_head, cfg.d_head
    with torch.no_grad():
        for block in source.blocks[0::2]:
            w = block.qkv.weight.view(H + 2 * K, Dh, -1)
            w[H + 1 : H + K] = w[H]  # every key head equal to the first
            w[H + K + 1 :] = w[H + K]  # every value head equal to the first
            if block.qkv.bias is not None:
                b = block.qkv.bias.view(H + 2 * K, Dh)
                b[H + 1 : H + K], b[H + K + 1 :] = b[H], b[H + K]
    merged = inherit(source, Arch.parse(f"attn:{H}/kv1 ffl attn:{H}/kv1 ffl"), {}).eval()
    assert merged.blocks[0].kv == 1 and merged.blocks[0].qkv.out_features == (H + 2) * Dh
    ids = torch.randint(0, 50, (2, 16))
    torch.testing.assert_close(merged(ids)[0], source(ids)[0], atol=1e-5, rtol=1e-5)


def test_a_block_over_fewer_key_value_heads_decodes_with_a_smaller_cache():
    from planer.models.gpt.cache import KVCache

    cfg = tiny_gpt("llama")
    torch.manual_seed(0)
    model = build_model(cfg, Arch.parse("attn:4/kv1 ffl attn:4 ffl:16")).eval()
    ids = torch.randint(0, 50, (1, 12))
    cache = KVCache(model, 1, 16)
    assert [layer.k.shape[1] for layer in cache.layers if layer is not None] == [1, 2]
    with torch.no_grad():
        full, _ = model(ids)
        first, cache = model(ids[:, :8], cache)
        rest = [model(ids[:, i : i + 1], cache)[0] for i in range(8, 12)]
    torch.testing.assert_close(torch.cat([first, *rest], 1), full, atol=1e-5, rtol=0)


def test_the_txl_backbone_refuses_key_value_options():
    with pytest.raises(PlanerError, match="key/value"):
        build_model(tiny_model(), Arch.parse("attn:4/kv2 ffl attn:4 ffl"))


def test_width_and_key_value_options_are_profiled_at_decode(tiny_cfg):
    """At decode the block over one key/value head reads half the cache of the model's own grouping."""
    from conftest import LLAMA_SETTINGS

    cfg = tiny_cfg(*LLAMA_SETTINGS, "model.n_positions=48", "latency.context=40", "latency.workload=decode",
                   "latency.repeats=3", "latency.warmup=1", "latency.batch_size=2",
                   "search.space=[skip,attn:4,attn:4/kv1,ffl:32,ffl]")  # fmt: skip
    cfg.model.vocab_size = 40
    table = profile(cfg)
    assert {"attn:4/kv1", "ffl:32"} <= set(table.blocks)
