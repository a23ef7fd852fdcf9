import pytest

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.search.designs import iso_space, named_arch, par, sandwich, sandwich_sweep


def test_sandwich_order_and_counts():
    arch = sandwich(6, 8, 2)
    assert str(arch) == "attn:8 attn:8 " + "attn:8 ffl " * 4 + "ffl ffl"
    assert len(arch) == 12
    assert sum(b.kind == "attn" for b in arch) == 6 == sum(b.kind == "ffl" for b in arch)
    assert sandwich(6, 8, 0) == named_arch("baseline", ModelConfig(n_layer=6, n_head=8))


def test_par_attention_in_lower_two_thirds():
    for n_layer in (4, 12, 16):
        arch = par(n_layer, 8)
        kinds = [b.kind for b in arch]
        attn = [i for i, k in enumerate(kinds) if k == "attn"]
        assert len(arch) == 2 * n_layer
        assert len(attn) == max(1, round(2 * n_layer / 5))
        assert max(attn) < (2 * len(arch)) // 3 + 1
        gaps = {b - a for a, b in zip(attn, attn[1:])}
        assert not gaps or max(gaps) - min(gaps) <= 1  # evenly spaced
        assert set(kinds) == {"attn", "ffl"}


def test_named_arch_errors():
    cfg = ModelConfig(n_layer=4)
    assert named_arch("attn:8 ffl", cfg) is None
    with pytest.raises(PlanerError):
        named_arch("sandwich:x", cfg)
    with pytest.raises(PlanerError):
        named_arch("sandwich:9", cfg)


def test_sandwich_sweep_values_are_distinct_orders():
    for n_layer in (2, 3, 4, 12):
        ks = sandwich_sweep(n_layer)
        assert ks[0] == 1 and len({str(sandwich(n_layer, 8, k)) for k in ks}) == len(ks)
    assert sandwich_sweep(4) == [1, 2] and sandwich_sweep(12) == [1, 2, 3, 4] and sandwich_sweep(2) == [1]


def test_iso_space_replaces_experts_with_as_many_parameters():
    space = ["skip", "attn:2", "ffl", "moe:top1", "moe:top2", "moe:top1:e16"]
    assert iso_space(space, 8) == ["skip", "attn:2", "ffl", "ffl:x8", "ffl:x16"]
