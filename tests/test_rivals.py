"""Matched-latency dense rivals: built on every axis and sized to the found model's latency."""

import pytest

from planer.config import load_config
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.search.designs import RIVAL_TOLERANCE, rivals, width_rival

FIXED = 1.0
BLOCKS = {"skip": 0.0, "attn:1": 1.0, "attn:2": 1.6, "attn:4": 3.0, "ffl": 1.0}


def hand_table():
    def stats(v):
        return {"median": v, "p10": v, "p90": v}

    return LatencyTable({}, stats(FIXED), {k: stats(v) for k, v in BLOCKS.items()}, {})


def scaled_by_width(models):
    """A deterministic stand-in for timing: the table's estimate, the blocks' part in proportion to d_model."""
    table = hand_table()
    return {name: FIXED + (table.estimate(m.arch) - FIXED) * m.cfg.d_model / 64 for name, m in models.items()}


@pytest.fixture
def cfg():
    return load_config(None, ["model.d_model=64", "model.n_head=4", "model.d_inner=128", "model.n_layer=4"])


def test_rivals_are_built_and_sized_to_the_found_model(cfg):
    cfg.model.vocab_size = 50
    found = Arch.parse("attn:2 ffl attn:2 ffl attn:1 ffl skip ffl")  # 9.2 ms of a 17 ms baseline
    got = {r.name: r for r in rivals(found, hand_table(), cfg, measure=scaled_by_width)}
    assert list(got) == ["dense-depth", "dense-heads", "dense-width"]
    assert str(got["dense-depth"].arch) == "attn:4 ffl attn:4 ffl skip skip skip skip"
    assert str(got["dense-heads"].arch) == "attn:1 ffl " * 3 + "attn:1 ffl"
    assert got["dense-width"].model == {"d_model": 32, "d_inner": 64}
    assert str(got["dense-width"].arch) == str(Arch.baseline(4, 4))
    for rival in got.values():
        assert len(rival.arch) == 8 and rival.within and abs(rival.ratio - 1) <= RIVAL_TOLERANCE
    assert got["dense-depth"].ratio == pytest.approx(9.0 / 9.2)
    assert got["dense-width"].sized_by == "measured" and got["dense-depth"].sized_by == "table"
    assert got["dense-width"].to_dict()["arch"] == Arch.baseline(4, 4).specs()


def test_an_axis_that_cannot_match_returns_the_closest_and_says_so(cfg):
    cfg.model.vocab_size = 50
    found = Arch.parse("attn:1 ffl attn:1 ffl skip ffl skip skip")  # 6 ms: 1 layer gives 5, 2 give 9
    got = {r.name: r for r in rivals(found, hand_table(), cfg, measure=scaled_by_width)}
    depth = got["dense-depth"]
    assert depth.ratio == pytest.approx(5 / 6) and not depth.within and "closest" in depth.to_dict()["note"]
    heads = got["dense-heads"]  # no h alone fits 4 layers (attn:1 gives 9 ms): fewer layers are tried too
    assert heads.within and str(heads.arch) == "attn:2 ffl attn:2 ffl skip skip skip skip"


def test_width_rival_is_timed_side_by_side_with_the_found_model(tiny_cfg):
    cfg = tiny_cfg("model.vocab_size=65", "latency.batch_size=2")
    rival = width_rival(Arch.parse("attn:1 ffl skip ffl"), cfg)
    assert rival.name == "dense-width" and rival.sized_by == "measured" and rival.ratio > 0
    assert rival.model["d_model"] % 4 == 0 and rival.model["d_model"] < 32
