import pytest

from planer.errors import PlanerError
from planer.io.records import Estimate, GumbelDetails, SearchRecord
from planer.models.arch import Arch, BlockSpec


def test_parse_round_trip():
    text = "skip attn:1 attn:8 ffl ffl:x8 moe:top1 moe:top2 moe:top2:e16"
    arch = Arch.parse(text)
    assert str(arch) == text
    assert [b.kind for b in arch] == ["skip", "attn", "attn", "ffl", "ffl", "moe", "moe", "moe"]
    assert arch.blocks[6].top_k == 2 and arch.blocks[7].experts == 16


def test_baseline():
    assert str(Arch.baseline(2, 8)) == "attn:8 ffl attn:8 ffl"


@pytest.mark.parametrize(
    "bad", ["attn", "attn:0", "attn:x", "conv", "ffl:y2", "ffl:0", "ffl:-4", "moe:top3", "moe:top2:e1", "skip:1", ""]
)
def test_unknown_blocks_are_refused(bad):
    with pytest.raises(PlanerError):
        BlockSpec.parse(bad) if bad else Arch.parse(bad)


def test_arch_json_round_trip(tmp_path):
    """A search's arch.json is an architecture file ``--arch`` reads."""
    arch = Arch.parse("attn:2 moe:top1 skip ffl")
    estimate = Estimate(target=0.5, baseline_ms=2.0, estimated_ms=1.0, estimated_ratio=0.5, meets_target=True)
    SearchRecord(arch=arch.specs(), estimate=estimate, details=GumbelDetails()).save(tmp_path)
    assert Arch.load(tmp_path / "arch.json") == arch


def test_bad_arch_json(tmp_path):
    path = tmp_path / "arch.json"
    path.write_text('{"arch": "attn:8"}')
    with pytest.raises(PlanerError):
        Arch.load(path)
