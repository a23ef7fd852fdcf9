"""The backbone interface: generic code never names a family, and a gpt model is judged by the loss
``planer evaluate`` reports, in training's validation and in the rerank alike."""

import ast
import json
import math
from pathlib import Path

import pytest
from conftest import LLAMA_SETTINGS

from planer.cli import main
from planer.config import load_config
from planer.errors import PlanerError
from planer.evaluation.evaluate import evaluate_run
from planer.io.checkpoint import load_checkpoint
from planer.io.data import load_corpus
from planer.models.arch import Arch
from planer.models.backbone import REGISTRY, backbone
from planer.search.methods import rerank
from planer.training.loop import RunOptions
from planer.training.train import train

SRC = Path(__file__).resolve().parents[1] / "src" / "planer"
NAMES = {"txl", "gpt", "gpt2", "llama"}
FAMILIES = [SRC / "models" / "txl", SRC / "models" / "gpt"]


def allowed_name_uses(tree: ast.Module, path: Path) -> set[int]:
    """The ids of the string constants ``path`` may hold a family name in: the registry's keys, and the config
    fields' defaults (the value a config file leaves out)."""
    allowed = set()
    for node in ast.walk(tree):
        if path.name == "backbone.py" and isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) == "REGISTRY":
            allowed |= {id(k) for k in node.value.keys}
        if path.name == "config.py" and isinstance(node, ast.ClassDef) and node.name == "ModelConfig":
            allowed |= {id(s.value) for s in node.body if isinstance(s, ast.AnnAssign)}
    return allowed


def test_generic_code_never_names_a_backbone():
    found = []
    for path in sorted(SRC.rglob("*.py")):
        if any(family in path.parents for family in FAMILIES):
            continue
        tree = ast.parse(path.read_text())
        allowed = allowed_name_uses(tree, path)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and node.value in NAMES and id(node) not in allowed:
                found.append(f"{path.relative_to(SRC)}:{node.lineno} {node.value!r}")
    assert not found, f"backbone names outside the backbones: {found}"


def test_the_registry_and_its_refusals(tiny_cfg):
    assert set(REGISTRY) == {"txl", "gpt"}
    assert {backbone(tiny_cfg().model).name, backbone(tiny_cfg(*LLAMA_SETTINGS).model).name} == {
        "Transformer-XL",
        "gpt",
    }
    with pytest.raises(PlanerError, match="model.backbone must be 'txl' or 'gpt', got 'bert'"):
        tiny_cfg("model.backbone=bert")
    with pytest.raises(PlanerError, match="a Transformer-XL model has no hf export; it exports as onnx"):
        backbone(tiny_cfg().model).exporter("hf")


def test_export_refuses_a_format_the_backbone_lacks_in_one_line(tiny_cfg, tmp_path, capsys):
    cfg = tiny_cfg("train.steps=2", "train.eval_every=2")
    train(cfg, tmp_path / "m", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    assert main(["export", "--run", str(tmp_path / "m"), "--hf", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no hf export" in err and not (tmp_path / "hf").exists()


def test_gpt_validation_is_the_loss_planer_evaluate_reports(tiny_cfg, tmp_path):
    """The best checkpoint is chosen on the scorer ``planer evaluate`` uses (a sliding window), so evaluating the
    kept checkpoint gives back the best validation loss exactly."""
    cfg = tiny_cfg(*LLAMA_SETTINGS, "train.steps=40", "train.eval_every=10", "train.eval_batches=0",
                   "model.n_positions=32", "eval.tgt_len=24", "eval.stride=8")  # fmt: skip
    summary = train(cfg, tmp_path / "m", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    logged = [json.loads(line) for line in (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["valid_loss"] for r in logged if "valid_loss" in r]
    assert len(losses) == 4 and summary.best_valid_loss == min(losses)
    assert evaluate_run(tmp_path / "m", "valid")["loss"] == summary.best_valid_loss


def test_gpt_validation_with_few_batches_scores_the_first_windows(tiny_cfg, tmp_path):
    """``train.eval_batches`` limits the same scorer to its first batches of windows: fewer tokens, a finite loss."""
    cfg = tiny_cfg(*LLAMA_SETTINGS, "model.n_positions=32", "eval.tgt_len=24", "eval.stride=8")
    train(cfg, tmp_path / "m", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    model, cfg, vocab = load_checkpoint(tmp_path / "m")
    valid = load_corpus(cfg.data, vocab).valid
    few, whole = (backbone(cfg.model).scorer(model, cfg, n)(valid) for n in (2, 0))
    assert few["tokens"] == 24 + 8 * (2 * cfg.eval.batch_size - 1) < whole["tokens"] == len(valid) - 1
    assert math.isfinite(few["loss"])


def test_rerank_scores_are_the_loss_planer_evaluate_reports(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*LLAMA_SETTINGS, "train.steps=30", "train.eval_every=30", "train.eval_batches=0",
                   "search.rerank_steps=10", "model.n_positions=32", "eval.tgt_len=32")  # fmt: skip
    train(cfg, tmp_path / "base", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    candidates = [Arch.parse("attn:2 ffl skip ffl"), Arch.parse("attn:4 ffl skip skip")]
    _, scores = rerank(cfg, tmp_path / "rerank", candidates, tmp_path / "base", RunOptions(quiet=True))
    for i, (arch, score) in enumerate(zip(candidates, scores)):
        assert evaluate_run(tmp_path / "rerank" / f"{i}-{arch.short()}", "valid")["loss"] == score.valid_loss


def test_config_checks_of_a_family_run_only_for_it(tiny_cfg):
    """The Llama flavour's rotary positions need an even head size; a Transformer-XL does not care."""
    with pytest.raises(PlanerError, match="rotary positions need an even head size"):
        load_config(None, [*LLAMA_SETTINGS, "model.d_model=36", "model.n_head=4", "model.n_kv_head=2"])
    assert load_config(None, ["model.d_model=36", "model.n_head=4"]).model.d_head == 9
