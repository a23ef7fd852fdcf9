"""The typed records of a run's files: what the previous version wrote reads back, and writes back the same keys and
values; an early version's file, missing what was added since or holding keys no longer known, still reads."""

import json

import pytest

from planer.errors import PlanerError
from planer.io.records import KnapsackDetails, Manifest, SearchRecord, TrainingSummary

ESTIMATE = {
    "target": 0.6,
    "baseline_ms": 0.5888,
    "estimated_ms": 0.3387,
    "estimated_ratio": 0.5752,
    "meets_target": True,
}
POSITION = {"options": ["skip", "attn:1", "ffl"], "latency_ms": [0.0, 0.09, 0.05], "increase": [0.3, 0.01, None],
            "chosen": "attn:1"}  # fmt: skip
# as the previous version wrote them (its key order)
GUMBEL = {"arch": ["skip", "ffl"], "method": "gumbel", "target": 0.6, "estimated_ms": 0.3387, "baseline_ms": 0.5888,
          "estimated_ratio": 0.5752, "meets_target": True, "window": [0.57, 0.6],
          "unfilled": {"arch": ["ffl", "ffl"], "estimated_ratio": 0.51}, "space": ["skip", "attn:1", "ffl"],
          "init_from": None, "seconds": 12.5}  # fmt: skip
KNAPSACK = {"arch": ["attn:1", "ffl"], "method": "knapsack", **ESTIMATE, "window": [0.57, 0.6],
            "limits": [{"batch": 1, **ESTIMATE}], "in_window": True, "blocks_ms": 0.2998, "predicted_increase": 0.0457,
            "baseline_loss": 3.02, "positions": [POSITION, {**POSITION, "chosen": "ffl"}],
            "heads": {"0": [[1, 0.2], [0, 0.1]]}, "distill": None,
            "candidates": [{"arch": ["attn:1", "ffl"], "layers_cut": 0, "estimated_ratio": 0.57, "limits": [0.5]}],
            "seconds": 40.1, "rerank": [{"arch": ["attn:1", "ffl"], "valid_loss": 3.0, "steps": 30, "seconds": 9.5}],
            "knapsack_pick": {"arch": ["attn:1", "ffl"], "predicted_increase": 0.0457}, "space": ["skip", "attn:1", "ffl"],
            "init_from": "/runs/demo/baseline"}  # fmt: skip
TRAINED = {"best_valid_loss": 1.9, "seconds": 30.2, "steps": 300, "ms_per_step": 99.1, "expert_load_max": [1.2],
           "expert_load_min": [0.8], "params": 1234, "arch": ["attn:2", "moe:top1"],
           "recipe": {"teacher": None, "init_from": None}}  # fmt: skip
ADOPTED = {"params": 1234, "arch": ["attn:2", "ffl"], "adopted_from": "/models/gpt2"}
MANIFESTS = [
    {"design": "baseline", "arch": ["attn:8", "ffl"], "seed": 1111, "recipe": {}},
    {"design": "planer", "target": 0.5, "repeat": 2, "search": "search-t0.50-s2", "method": "knapsack",
     "arch": ["attn:2", "ffl"], "seed": 1112, "recipe": {"teacher": "/b", "init_from": "/b"}},
    {"design": "dense", "rival": "dense-depth", "target": 0.5, "repeat": 1, "rival_of": "planer-t0.50",
     "sizing": {"name": "dense-depth", "arch": ["attn:8", "ffl"], "model": {"n_layer": 1}}, "arch": ["attn:8", "ffl"],
     "seed": 1111, "recipe": {"teacher": "/b", "init_from": None}},
    {"design": "sandwich", "arch": ["attn:8", "attn:8", "ffl", "ffl"], "seed": 1111, "recipe": {}},
]  # fmt: skip


def written(tmp_path, name: str, data: dict):
    (tmp_path / name).write_text(json.dumps(data, indent=2) + "\n")
    return tmp_path


@pytest.mark.parametrize("data", [GUMBEL, KNAPSACK, {**KNAPSACK, "rerank": None, "knapsack_pick": None}])
def test_a_search_record_of_the_previous_version_reads_and_writes_back_the_same(tmp_path, data):
    data = {k: v for k, v in data.items() if v is not None or k in ("init_from", "distill")}
    record = SearchRecord.read(written(tmp_path, "arch.json", data))
    assert record.to_dict() == data
    assert record.found.specs() == data["arch"] and record.estimate.estimated_ratio == data["estimated_ratio"]
    if data["method"] == "knapsack":
        assert isinstance(record.details, KnapsackDetails) and record.knapsack.positions[1].chosen_increase is None
        assert record.knapsack.limits[0].batch == 1 and record.knapsack.limits[0].estimate.meets_target
    else:
        assert record.knapsack is None and record.details.unfilled["arch"] == ["ffl", "ffl"]


def test_an_early_search_record_and_unknown_keys_still_read(tmp_path):
    """The first arch.json had no method, no meets_target, no window: the Gumbel search's, target not judged."""
    early = {"arch": ["skip", "ffl"], "target": 0.5, "estimated_ms": 1.0, "baseline_ms": 2.0, "estimated_ratio": 0.5,
             "space": ["skip", "ffl"], "from_the_future": [1, 2]}  # fmt: skip
    record = SearchRecord.read(written(tmp_path, "arch.json", early))
    assert record.method == "gumbel" and record.estimate.meets_target is None and record.seconds is None
    assert record.to_dict() == {**{k: v for k, v in early.items() if k != "from_the_future"}, "method": "gumbel",
                                "init_from": None}  # fmt: skip


def test_a_file_lacking_what_every_version_wrote_is_refused(tmp_path):
    with pytest.raises(PlanerError, match="arch.json is damaged .*lacks 'baseline_ms'"):
        SearchRecord.read(written(tmp_path, "arch.json", {"arch": ["ffl"], "target": 0.5}))
    with pytest.raises(PlanerError, match="summary.json is damaged .*lacks 'arch'"):
        TrainingSummary.read(written(tmp_path, "summary.json", {"params": 3}))
    assert Manifest.read(tmp_path) is None  # no run.json: not an error, a model trained by hand


@pytest.mark.parametrize("data", [TRAINED, ADOPTED])
def test_a_training_summary_of_the_previous_version_reads_and_writes_back_byte_for_byte(tmp_path, data):
    folder = written(tmp_path, "summary.json", data)
    before = (folder / "summary.json").read_text()
    summary = TrainingSummary.read(folder)
    assert summary.to_dict() == data and summary.params == 1234
    (folder / "summary.json").unlink()
    summary.save(folder)
    assert (folder / "summary.json").read_text() == before


@pytest.mark.parametrize("data", MANIFESTS)
def test_a_manifest_of_the_previous_version_reads_and_writes_back_byte_for_byte(tmp_path, data):
    (tmp_path / "run.json").write_text(json.dumps(data, indent=1) + "\n")
    before = (tmp_path / "run.json").read_text()
    manifest = Manifest.read(tmp_path)
    assert manifest.name == data.get("rival", data["design"]) and manifest.to_dict() == data
    (tmp_path / "run.json").unlink()
    manifest.save(tmp_path)
    assert (tmp_path / "run.json").read_text() == before
