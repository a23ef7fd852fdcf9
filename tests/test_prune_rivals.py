"""The pruned rivals: the trained baseline without the layers of least block influence (ShortGPT) or without the
sublayers a greedy removal finds least useful (FinerCut), sized to the found model's latency like the dense ones."""

import json

import pytest
import torch
from conftest import cli_sets, tiny_gpt, tiny_model, tiny_overrides

from planer.cli import main
from planer.errors import PlanerError
from planer.evaluation.importance import Sample
from planer.evaluation.pruning import block_influence, cos_distance, final_states, removal_changes, skipping
from planer.io.checkpoint import save_checkpoint
from planer.io.data import load_corpus
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.pipeline import Plan, parse_designs
from planer.search.designs import (
    DENSE_RIVALS,
    PRUNE_RIVALS,
    RIVAL_TOLERANCE,
    Calibration,
    drop_layers_rival,
    drop_sublayers_rival,
    rivals,
)

FOUND = Arch.parse("attn:4 ffl attn:2 ffl ffl skip")  # 5.8 ms: one layer dropped (5.7 ms) lands within 5%


def hand_table() -> LatencyTable:
    """Chosen latencies: fixed 0.5 ms, attn:4 2.0, ffl 0.6, so the 3-layer baseline is 8.3 ms and a layer 2.6 ms."""
    ms = {"skip": 0.0, "attn:2": 1.5, "attn:4": 2.0, "ffl": 0.6, "fixed": 0.5}
    stats = {k: {"median": v, "p10": v, "p90": v} for k, v in ms.items()}
    return LatencyTable({}, stats.pop("fixed"), stats, {})


def silenced(model: torch.nn.Module, *positions: int) -> torch.nn.Module:
    """``model`` with the blocks at ``positions`` writing nothing (output projection zero): a pre-norm block is then
    the identity, x + 0."""
    with torch.no_grad():
        for p in positions:
            block = model.blocks[p]
            last = block.out if block.n_head else block.down
            last.weight.zero_()
            if last.bias is not None:
                last.bias.zero_()
    return model


def gpt3(*silent: int) -> torch.nn.Module:
    """A 3-layer gpt2 of random weights large enough that every block changes its input, ``silent`` silenced."""
    torch.manual_seed(0)
    return silenced(build_model(tiny_gpt(n_layer=3, init_std=0.2), Arch.baseline(3, 4)).eval(), *silent)


def sample(vocab: int = 50, mem_len: int = 0) -> Sample:
    torch.manual_seed(1)
    return Sample(torch.randint(0, vocab, (400,)), batch_size=2, tgt_len=16, mem_len=mem_len, segments=3)


def test_block_influence_ranks_an_identity_layer_first_and_drop_layers_drops_it():
    model = gpt3(2, 3)  # layer 1: its attention (position 2) and feed-forward (position 3) write nothing
    influence = block_influence(model, sample())
    assert influence[1] == pytest.approx(0.0, abs=1e-6) and min(influence[0], influence[2]) > 1e-3
    table = hand_table()
    rival = drop_layers_rival(table.estimate(FOUND), table, Calibration(model, sample()))
    assert str(rival.arch) == "attn:4 ffl skip skip attn:4 ffl" and rival.within
    assert rival.ratio == pytest.approx(5.7 / 5.8) and rival.sized_by == "table"
    assert rival.measured["block_influence"] == influence and rival.measured["drop_order"][0] == 1
    assert rival.to_dict()["measured"]["drop_order"] == rival.measured["drop_order"]


def brute_force(model, data, removed, reference) -> dict[int, float]:
    """The output change of every further single removal, each pruned model run whole (nothing replayed)."""
    kept = [p for p in range(len(model.blocks)) if p not in removed]
    changes = {}
    for p in kept:
        with skipping(model, [*removed, p]):
            changes[p] = cos_distance(final_states(model, data), reference)
    return changes


@pytest.mark.parametrize("backbone", ["gpt", "txl"])
def test_replayed_changes_match_running_every_removal_whole(backbone):
    """Replaying the blocks before a removal gives the changes a whole run of each pruned model gives, on the first
    step and on one after a removal (the Transformer-XL with memory)."""
    torch.manual_seed(0)
    cfg = tiny_gpt(n_layer=3, init_std=0.2) if backbone == "gpt" else tiny_model(n_layer=3, vocab_size=50)
    model, data = build_model(cfg, Arch.baseline(3, 4)).eval(), sample(mem_len=cfg.mem_len)
    reference = final_states(model, data)
    for removed in ([], [2]):
        got, expected = removal_changes(model, data, removed, reference), brute_force(model, data, removed, reference)
        assert got.keys() == expected.keys() and got == pytest.approx(expected, abs=1e-6)
    assert final_states(model, data)[0].equal(reference[0])  # every block back in place


def test_drop_sublayers_removes_first_the_sublayer_that_changes_nothing():
    model, data = gpt3(3), sample()  # the feed-forward block of layer 1 writes nothing
    first = brute_force(model, data, [], final_states(model, data))
    assert min(first, key=first.get) == 3 and first[3] == pytest.approx(0.0, abs=1e-6)
    table = hand_table()
    rival = drop_sublayers_rival(table.estimate(FOUND), table, Calibration(model, data))
    removals = rival.measured["removals"]
    assert removals[0]["position"] == 3 and removals[0]["block"] == "ffl"
    assert removals[0]["change"] == pytest.approx(first[3], abs=1e-7)
    # removed until the estimate reaches the found model's 5.8 ms; the rival is the prefix closest to it
    assert removals[-1]["ratio"] <= 1.0 < removals[-2]["ratio"]
    taken = rival.measured["taken"]
    assert rival.ratio == min((r["ratio"] for r in removals), key=lambda r: abs(r - 1)) == removals[taken - 1]["ratio"]
    assert [p for p, b in enumerate(rival.arch) if b.kind == "skip"] == sorted(r["position"] for r in removals[:taken])
    assert rival.within == (abs(rival.ratio - 1) <= RIVAL_TOLERANCE) and rival.sized_by == "table"


def test_pruned_rivals_need_the_baseline_and_are_asked_for_by_name_or_group():
    with pytest.raises(PlanerError, match="calibration sample"):
        rivals(FOUND, hand_table(), None, ("drop-layers",))
    space = ["skip", "attn:1", "ffl"]
    assert Plan(designs=parse_designs("prune")).rivals(space) == PRUNE_RIVALS
    assert Plan(designs=parse_designs("dense")).rivals(space) == DENSE_RIVALS
    assert Plan(designs=parse_designs("dense-depth,drop-sublayers,par")).rivals(space) == (
        "dense-depth",
        "drop-sublayers",
    )


def test_dense_brings_the_uniform_width_rival_where_the_space_narrows_feed_forward_blocks():
    narrowing = ["skip", "attn:1", "ffl:16", "ffl"]
    assert Plan(designs=parse_designs("dense")).rivals(narrowing) == (*DENSE_RIVALS, "uniform-width")
    assert Plan(designs=parse_designs("prune")).rivals(narrowing) == PRUNE_RIVALS


def test_planer_run_trains_the_pruned_rivals_from_the_baseline(tiny_cfg, tiny_text, tmp_path):
    """``planer run --designs drop-layers,drop-sublayers`` from a saved baseline: both sized, scored before phase 2,
    started from the baseline's blocks, trained, and in the report."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")
    sets = ("latency.batch_size=2", "train.steps=4", "train.eval_every=4", "search.sample_segments=2",
            "search.space=[skip, attn:1, attn:4, ffl]", "model.n_layer=3")  # fmt: skip
    cfg = tiny_cfg(*sets)
    vocab = load_corpus(cfg.data).vocab
    cfg.model.vocab_size = len(vocab)
    (tmp_path / "base").mkdir()
    save_checkpoint(tmp_path / "base", build_model(cfg.model, Arch.baseline(3, 4)), cfg, vocab)  # untrained: cheap
    run = ["run", "--config", str(config), *cli_sets(tiny_overrides(*sets)), "--out", str(tmp_path / "run"),
           "--targets", "0.6", "--designs", "drop-layers,drop-sublayers", "--batches", "2", "--method", "knapsack",
           "--baseline", str(tmp_path / "base")]  # fmt: skip
    assert main(run) == 0
    out = tmp_path / "run"
    sized = {r["name"]: r for r in json.loads((out / "planer-t0.60" / "rivals.json").read_text())}
    assert list(sized) == list(PRUNE_RIVALS)
    assert len(sized["drop-layers"]["measured"]["block_influence"]) == 3 and sized["drop-sublayers"]["measured"]
    for name, rival in sized.items():
        assert {"valid", "test"} <= rival["before_training"].keys() and rival["before_training"]["test"]["loss"] > 0
        assert rival["seconds"] > 0  # the sizing's own wall time, a stage of the report
        manifest = json.loads((out / f"{name}-t0.60" / "run.json").read_text())
        assert (manifest["design"], manifest["rival"], manifest["sizing"]) == ("prune", name, rival)
        assert manifest["recipe"]["init_from"] == str(out / "baseline")
        assert all(s in ("skip", b) for s, b in zip(rival["arch"], Arch.baseline(3, 4).specs()))
    report = (out / "report.md").read_text()
    assert "| drop-layers-t0.60 |" in report and "| drop-sublayers-t0.60 |" in report
    assert (
        "| size drop-sublayers-t0.60 |" in report
        and "before training)" in report
        and "drop-sublayers" in report.split("Against the rivals")[1].split("\n")[0]
    )
