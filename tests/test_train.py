import json
import math

import pytest
import torch

from planer.config import Config
from planer.evaluation.evaluate import evaluate_run
from planer.io.checkpoint import load_checkpoint
from planer.models.arch import Arch
from planer.training.loop import RunOptions
from planer.training.optim import Lamb, lr_at
from planer.training.train import train


@pytest.mark.slow
def test_training_beats_uniform_loss(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.eval_batches=0")  # score the whole valid split, as evaluate_run does
    summary = train(cfg, tmp_path / "run", Arch.baseline(2, 4), options=RunOptions(quiet=True))
    lines = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_loss" in l for l in lines) and any("tok_s" in l for l in lines)
    model, loaded_cfg, vocab = load_checkpoint(tmp_path / "run")
    assert isinstance(loaded_cfg, Config) and len(vocab) == loaded_cfg.model.vocab_size
    assert summary.best_valid_loss < 0.7 * math.log(len(vocab))  # well under the uniform loss
    result = evaluate_run(tmp_path / "run", "valid")
    assert abs(result["loss"] - summary.best_valid_loss) < 1e-5
    assert result["bpc"] == result["loss"] / math.log(2)
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["valid"]["tokens"] == result["tokens"]


def test_training_is_deterministic(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=20", "train.eval_every=20", "model.n_layer=1")
    a = train(cfg, tmp_path / "a", Arch.parse("attn:2 ffl"), options=RunOptions(quiet=True))
    b = train(cfg, tmp_path / "b", Arch.parse("attn:2 ffl"), options=RunOptions(quiet=True))
    assert a.best_valid_loss == b.best_valid_loss
    wa, wb = load_checkpoint(tmp_path / "a")[0].state_dict(), load_checkpoint(tmp_path / "b")[0].state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_lamb_trust_ratio_clamps_weight_norm():
    big = torch.nn.Parameter(torch.full((100,), 5.0))  # norm 50, clamped to 10
    big.grad = torch.ones(100)
    opt = Lamb([big], lr=0.1)
    opt.step()
    # first step: update = m / sqrt(v) = g(1-b1) / (|g| sqrt(1-b2)) -> norm sqrt(100) * 0.1 / sqrt(0.001)
    update = torch.full((100,), 0.1 / math.sqrt(0.001))
    step = 0.1 * (10.0 / update.norm()) * update
    torch.testing.assert_close(big.detach(), torch.full((100,), 5.0) - step, rtol=1e-4, atol=1e-5)


def test_schedule_warms_up_then_decays():
    lrs = [lr_at(s, 1.0, 10, 100, 0.1) for s in range(101)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert abs(lrs[100] - 0.1) < 1e-9


@pytest.mark.slow
def test_moe_model_trains_with_balanced_experts(tiny_cfg, tmp_path):
    cfg = tiny_cfg("model.n_experts=4", "train.balance_coef=0.01")
    summary = train(
        cfg, tmp_path / "moe", Arch.parse("attn:4 moe:top1 attn:2 moe:top2"), options=RunOptions(quiet=True)
    )
    assert summary.best_valid_loss < 0.7 * math.log(len(load_checkpoint(tmp_path / "moe")[2]))
    assert len(summary.expert_load_max) == 2
    assert all(1.0 <= m < 2.0 for m in summary.expert_load_max)  # busiest expert within 2x of uniform
    assert all(0.0 < m <= 1.0 for m in summary.expert_load_min)  # and no expert starved
    evals = [json.loads(l) for l in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines() if "valid_loss" in l]
    assert all("expert_load_max" in e for e in evals)
