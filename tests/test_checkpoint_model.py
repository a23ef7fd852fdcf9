"""``planer search --init-from DIR`` and ``planer run --baseline DIR``: the checkpoint decides the model, whatever
the config's model section says, but for the segments' length and what only training reads."""

import json

import pytest
import yaml
from conftest import cli_sets, tiny_overrides

from planer.cli import main
from planer.errors import PlanerError
from planer.io.checkpoint import WEIGHTS, load_weights, save_checkpoint, with_checkpoint_model
from planer.io.data import load_corpus
from planer.models.arch import Arch
from planer.models.backbone import build_model

# The checkpoint's model: deeper, wider and with less memory than the tiny config's, and another dropout
OTHER = ("model.d_model=48", "model.d_inner=96", "model.n_layer=3", "model.mem_len=8", "model.dropout=0.3")


def saved_model(tiny_cfg, out, *overrides):
    """An untrained model of ``overrides`` saved in ``out`` with the tiny corpus's vocabulary; returns its config."""
    cfg = tiny_cfg(*overrides)
    vocab = load_corpus(cfg.data).vocab
    cfg.model.vocab_size = len(vocab)
    out.mkdir()
    save_checkpoint(out, build_model(cfg.model, Arch.baseline(cfg.model.n_layer, cfg.model.n_head)), cfg, vocab)
    return cfg


@pytest.fixture
def command(tiny_text, tmp_path):
    """The start of a command line with the tiny config (the checkpoint's model nowhere in it) and ``sets``."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")

    def make(name, *sets):
        return [name, "--config", str(config), *cli_sets(tiny_overrides("latency.batch_size=2", *sets))]

    return make


def test_search_init_from_searches_the_checkpoint_model(tiny_cfg, command, tmp_path):
    """The knapsack and the Gumbel search over the checkpoint's 3 layers (6 positions), not the config's 2."""
    saved_model(tiny_cfg, tmp_path / "base", *OTHER)
    search = [*command("search", "train.steps=4", "search.epochs=1", "search.steps_per_epoch=2"), "--target", "0.8"]
    for method in ("knapsack", "gumbel"):
        out = tmp_path / method
        assert main([*search, "--out", str(out), "--method", method, "--init-from", str(tmp_path / "base")]) == 0
        found = json.loads((out / "arch.json").read_text())
        assert found["method"] == method and len(found["arch"]) == 6
        search += ["--lut", str(tmp_path / "knapsack" / "lut.json")]  # the table holds for the same model


def test_run_baseline_writes_the_checkpoint_model_with_the_configs_training_keys(
    tiny_cfg, command, tmp_path, monkeypatch
):
    """The run's config.yaml and its adopted baseline hold the checkpoint's architecture with the config's
    ``tgt_len`` and dropout; the run stops after the baseline stage."""

    class Stop(Exception):
        pass

    def stop(*args, **kwargs):
        raise Stop

    own = saved_model(tiny_cfg, tmp_path / "base", *OTHER).model
    monkeypatch.setattr("planer.pipeline.load_or_profile", stop)
    run = [*command("run", "model.tgt_len=8", "search.method=knapsack"), "--out", str(tmp_path / "run")]
    with pytest.raises(Stop):
        main([*run, "--baseline", str(tmp_path / "base")])
    model = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]
    assert (model["d_model"], model["n_layer"], model["mem_len"]) == (own.d_model, own.n_layer, own.mem_len)
    assert (model["tgt_len"], model["dropout"], model["n_positions"]) == (8, 0.0, own.tgt_len)
    baseline = json.loads((tmp_path / "run" / "baseline" / "config.json").read_text())
    assert baseline["config"]["model"] == model


def test_a_gpt_checkpoint_keeps_its_positions(tiny_cfg, tmp_path):
    """A gpt2 trained without n_positions learned as many positions as its tgt_len: a shorter tgt_len builds the
    same model, a longer one is refused."""
    settings = ("model.backbone=gpt", "model.mem_len=0", "model.tgt_len=16")
    saved_model(tiny_cfg, tmp_path / "gpt", *settings)
    shorter = with_checkpoint_model(tiny_cfg(*settings, "model.tgt_len=8"), tmp_path / "gpt")
    assert (shorter.model.tgt_len, shorter.model.n_positions) == (8, 16)
    load_weights(build_model(shorter.model, Arch.baseline(2, 4)), tmp_path / "gpt" / WEIGHTS)
    with pytest.raises(PlanerError, match=r"^with the model of .*: config model.tgt_len \(32\) exceeds model.n_posi"):
        with_checkpoint_model(tiny_cfg(*settings, "model.tgt_len=32"), tmp_path / "gpt")


def test_a_missing_checkpoint_is_one_line(tiny_cfg, tmp_path):
    with pytest.raises(PlanerError, match=r"no checkpoint in .*config.json is missing"):
        with_checkpoint_model(tiny_cfg(), tmp_path)
