"""``planer search --method``: the knapsack pick through the CLI, and what it refuses."""

import json

from conftest import cli_sets, tiny_overrides

from planer.cli import main
from planer.models.arch import Arch
from planer.search.methods import rerank
from planer.training.loop import RunOptions
from planer.training.train import train


def test_knapsack_search_through_the_cli(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("train.steps=60", "train.eval_every=60")
    train(cfg, tmp_path / "base", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {cfg.data.path}\n")
    sets = cli_sets(tiny_overrides("train.steps=60", "train.eval_every=60", "latency.batch_size=2"))
    base = ["search", "--config", str(config), "--target", "0.7", *sets]
    assert main([*base, "--out", str(tmp_path / "k"), "--method", "knapsack"]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert (
        main([*base, "--out", str(tmp_path / "k"), "--method", "knapsack", "--init-from", str(tmp_path / "base")]) == 0
    )
    found = json.loads((tmp_path / "k" / "arch.json").read_text())
    assert found["method"] == "knapsack" and found["meets_target"] and len(found["arch"]) == 4
    assert all(p["chosen"] in p["options"] for p in found["positions"])
    assert "found" in capsys.readouterr().out
    # reranked: the pick and the pick with its top layer cut, each trained briefly; the arch.json tells of the kept one
    rerank_sets = [
        "--set",
        "search.rerank=2",
        "--set",
        "search.rerank_steps=6",
        "--lut",
        str(tmp_path / "k" / "lut.json"),
    ]
    out = tmp_path / "r"
    assert (
        main([*base, *rerank_sets, "--out", str(out), "--method", "knapsack", "--init-from", str(tmp_path / "base")])
        == 0
    )
    reranked = json.loads((out / "arch.json").read_text())
    candidates = [c["arch"] for c in reranked["candidates"]]
    assert candidates[0] == found["arch"] and all(c[-2:] == ["skip", "skip"] for c in candidates[1:])
    if len(candidates) == 1:  # the pick already cuts its top layer (the table is timed): nothing else to train
        assert "rerank" not in reranked and reranked["arch"] == found["arch"]
        return
    scores = reranked["rerank"]
    assert reranked["arch"] == min(scores, key=lambda c: c["valid_loss"])["arch"] and reranked["meets_target"]
    assert reranked["knapsack_pick"]["arch"] == found["arch"]
    assert [p["chosen"] for p in reranked["positions"]] == reranked["arch"]
    assert reranked["seconds"] >= sum(c["seconds"] for c in scores)  # the search's time counts its trainings


def test_rerank_keeps_the_candidate_a_short_phase_2_scores_best(tiny_cfg, tmp_path):
    """Every candidate trains ``search.rerank_steps`` steps with phase 2's recipe (inherited where it can be,
    distilled), and the one with the lowest validation loss is kept."""
    cfg = tiny_cfg("train.steps=60", "train.eval_every=60", "search.rerank_steps=12")
    train(cfg, tmp_path / "base", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    candidates = [
        Arch.parse("attn:1 ffl attn:1 ffl"),
        Arch.parse("attn:4 ffl skip skip"),
        Arch.parse("ffl ffl skip ffl"),
    ]
    chosen, scores = rerank(cfg, tmp_path / "rerank", candidates, tmp_path / "base", RunOptions(quiet=True))
    assert [s.arch for s in scores] == [c.specs() for c in candidates]
    assert chosen == candidates[min(range(3), key=lambda i: scores[i].valid_loss)]
    for i, (arch, score) in enumerate(zip(candidates, scores)):
        summary = json.loads((tmp_path / "rerank" / f"{i}-{arch.short()}" / "summary.json").read_text())
        assert summary["steps"] == 12 and summary["best_valid_loss"] == score.valid_loss
        assert summary["recipe"]["teacher"] == str(tmp_path / "base")
        assert summary["recipe"]["init_from"] == (None if i == 2 else str(tmp_path / "base"))  # ffl at an attn place
