"""``planer search --method``: the knapsack pick through the CLI, and what it refuses."""

import json

from planer.arch import Arch
from planer.cli import main
from planer.loop import RunOptions
from planer.train import train


def test_knapsack_search_through_the_cli(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("train.steps=60", "train.eval_every=60")
    train(cfg, tmp_path / "base", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    sets = [a for s in ("latency.batch_size=2", "train.steps=60", "model.n_layer=2") for a in ("--set", s)]
    config = tmp_path / "c.yaml"
    config.write_text(
        "\n".join(
            [
                "data:",
                f"  path: {cfg.data.path}",
                "model:",
                "  d_model: 32",
                "  n_head: 4",
                "  d_inner: 64",
                "  tgt_len: 16",
                "  mem_len: 16",
                "latency:",
                "  repeats: 3",
                "  warmup: 1",
                "eval:",
                "  batch_size: 4",
            ]
        )  # fmt: skip
        + "\n"
    )
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
