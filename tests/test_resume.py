"""Resume: a training and a search killed part-way by a real SIGKILL finish like uninterrupted runs."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import LLAMA_SETTINGS, cli_sets, tiny_overrides
from safetensors.torch import load_file

from planer.config import load_config
from planer.latency.table import profile_dir

pytestmark = pytest.mark.slow  # trains, or starts processes that do

# Dropout on, so that a resumed run must restore the random state too, a resume state every 10 steps, and the
# learning rate these runs were written for.
RESUMABLE = tiny_overrides("model.dropout=0.1", "train.lr=0.02", "train.ckpt_every=10", "latency.batch_size=2")


def command(sub: str, config, out, *extra) -> list[str]:
    args = [sub, "--config", str(config), "--out", str(out), *cli_sets(RESUMABLE), *extra]
    return [sys.executable, "-m", "planer", *args]


def kill_after_state(cmd: list[str], out, min_step: int) -> None:
    """Start ``cmd`` and SIGKILL it as soon as it has written a resume state at ``min_step`` or later."""
    proc = subprocess.Popen(
        cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    deadline = time.time() + 300
    while time.time() < deadline:
        states = sorted((out / "resume").glob("step-*")) if (out / "resume").is_dir() else []
        if states and int(states[-1].name.split("-")[1]) >= min_step:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return
        assert proc.poll() is None, "the run ended before it could be killed"
        time.sleep(0.01)
    proc.kill()
    raise AssertionError("no resume state appeared")


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]


def same_tensors(a, b) -> bool:
    a, b = load_file(str(a)), load_file(str(b))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def without_timings(path) -> list[dict]:
    drop = {"tok_s", "weight_step_ms"}
    return [{k: v for k, v in json.loads(line).items() if k not in drop} for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_killed_training_resumes_to_the_same_weights(tiny_text, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")
    arch = [*cli_sets(["train.steps=400", "train.eval_every=100"]), "--arch", "attn:2 moe:top1 attn:4 ffl"]
    run(command("train", config, tmp_path / "full", *arch))
    kill_after_state(command("train", config, tmp_path / "cut", *arch), tmp_path / "cut", 150)
    assert not (tmp_path / "cut" / "summary.json").exists()
    run(command("train", config, tmp_path / "cut", *arch, "--resume"))
    assert same_tensors(tmp_path / "full" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert without_timings(tmp_path / "full" / "metrics.jsonl") == without_timings(tmp_path / "cut" / "metrics.jsonl")
    assert not (tmp_path / "cut" / "resume").exists()  # states are removed once the run has finished


LLAMA = cli_sets(LLAMA_SETTINGS)


@pytest.mark.slow
@pytest.mark.parametrize("backbone", [[], LLAMA], ids=["txl", "llama"])
def test_killed_distilled_inherited_training_resumes_to_the_same_weights(tiny_text, tmp_path, backbone):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")
    schedule = cli_sets(["train.steps=300", "train.eval_every=100"])
    run(command("train", config, tmp_path / "base", *schedule, "--set", "train.steps=100", *backbone))
    recipe = [*schedule, "--arch", "attn:2 ffl attn:1 moe:top1", "--teacher", str(tmp_path / "base"), "--init-from",
              str(tmp_path / "base"), *backbone]  # fmt: skip
    run(command("train", config, tmp_path / "full", *recipe))
    kill_after_state(command("train", config, tmp_path / "cut", *recipe), tmp_path / "cut", 150)
    run(command("train", config, tmp_path / "cut", *recipe, "--resume"))
    assert same_tensors(tmp_path / "full" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    assert without_timings(tmp_path / "full" / "metrics.jsonl") == without_timings(tmp_path / "cut" / "metrics.jsonl")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert summary["recipe"] == {"teacher": str(tmp_path / "base"), "init_from": str(tmp_path / "base")}


@pytest.mark.slow
def test_a_training_killed_after_its_block_distillation_resumes_without_redoing_it(tiny_text, tmp_path):
    """Block-wise distillation ends in the whole training's first resume state: a run killed then resumes from
    it, and ends with the weights of an uninterrupted run."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")
    schedule = cli_sets(["train.steps=200", "train.eval_every=100", "train.batch_size=4", *LLAMA_SETTINGS])
    run(command("train", config, tmp_path / "base", *schedule))
    base = str(tmp_path / "base")
    # 4 x 16 tokens a step: 50 of the 200 steps distil the narrowed attention block alone
    recipe = [*schedule, "--arch", "attn:2 ffl attn:4 ffl", "--teacher", base, "--init-from", base,
              "--block-tokens", "3200"]  # fmt: skip
    run(command("train", config, tmp_path / "full", *recipe))
    kill_after_state(command("train", config, tmp_path / "cut", *recipe), tmp_path / "cut", 0)
    distilled = json.loads((tmp_path / "cut" / "blocks.json").read_text())
    run(command("train", config, tmp_path / "cut", *recipe, "--resume"))
    assert json.loads((tmp_path / "cut" / "blocks.json").read_text()) == distilled  # not distilled again
    assert same_tensors(tmp_path / "full" / "model.safetensors", tmp_path / "cut" / "model.safetensors")
    summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
    assert (summary["steps"], summary["block_distillation"]["steps"]) == (200, 50)


@pytest.mark.slow
def test_killed_search_resumes_to_the_same_weights_and_alpha(tiny_text, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        f"data:\n  path: {tiny_text}\nsearch:\n  epochs: 6\n  steps_per_epoch: 40\n"
        "  freeze_fraction: 0.2\n  space: [skip, attn:1, attn:4, ffl, moe:top1]\n"
    )
    profile_dir(load_config(config, RESUMABLE), tmp_path / "lut")
    lut = ["--target", "0.6", "--lut", str(tmp_path / "lut" / "lut.json"), "--method", "gumbel"]
    run(command("search", config, tmp_path / "full", *lut))
    kill_after_state(command("search", config, tmp_path / "cut", *lut), tmp_path / "cut", 130)
    assert not (tmp_path / "cut" / "arch.json").exists()
    run(command("search", config, tmp_path / "cut", *lut, "--resume"))
    assert same_tensors(tmp_path / "full" / "supernet.safetensors", tmp_path / "cut" / "supernet.safetensors")
    full, cut = without_timings(tmp_path / "full" / "search.jsonl"), without_timings(tmp_path / "cut" / "search.jsonl")
    assert full == cut and len(full) >= 6  # every epoch's alpha, probabilities and losses
    assert all(
        torch.isfinite(torch.tensor(r["alpha"])).all() and r.get("arch_ce", 0) == r.get("arch_ce", 0) for r in full
    )
    full_arch, cut_arch = (json.loads((tmp_path / run / "arch.json").read_text()) for run in ("full", "cut"))
    assert full_arch.pop("seconds") > 0 and cut_arch.pop("seconds") > 0 and full_arch == cut_arch  # wall times differ
    again = subprocess.run(
        command("search", config, tmp_path / "full", *lut, "--resume"), capture_output=True, text=True
    )
    assert again.returncode == 2 and "has finished" in again.stderr


def test_resume_refuses_another_config(tiny_text, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")
    schedule = cli_sets(["train.steps=20", "train.eval_every=20"])
    run(command("train", config, tmp_path / "run", *schedule))
    other = command("train", config, tmp_path / "run", *schedule, "--set", "train.lr=0.5", "--resume")
    result = subprocess.run(other, capture_output=True, text=True)
    assert result.returncode == 2 and "different config" in result.stderr
    same = command("train", config, tmp_path / "run", *schedule, "--resume")
    result = subprocess.run(same, capture_output=True, text=True)
    assert result.returncode == 2 and "has finished" in result.stderr


def test_divergence_stops_and_keeps_the_last_good_state(tiny_cfg, tmp_path, monkeypatch):
    """A weight turned NaN at step 26 makes the loss non-finite: training stops with a clear error, and the best
    checkpoint and the step-20 resume state (finite) are kept as they were."""
    import pytest

    from planer.errors import PlanerError
    from planer.models.arch import Arch
    from planer.training.loop import RunOptions
    from planer.training.resume import load_state, newest_state
    from planer.training.step import WeightTrainer
    from planer.training.train import train

    step = WeightTrainer.step

    def poisoned(self, model, x, y, mems, reset):
        if self.step_count == 25:
            with torch.no_grad():
                model.embed.weight[0, 0] = float("nan")
                model.embed.weight[x.flatten()] = float("nan")
        return step(self, model, x, y, mems, reset)

    monkeypatch.setattr(WeightTrainer, "step", poisoned)
    cfg = tiny_cfg("train.steps=60", "train.eval_every=10", "train.ckpt_every=10")
    with pytest.raises(PlanerError, match="training diverged at step 26"):
        train(cfg, tmp_path / "run", Arch.parse("attn:2 ffl attn:4 ffl"), options=RunOptions(quiet=True))
    tensors, meta = load_state(newest_state(tmp_path / "run"))
    assert meta["progress"]["step"] == 20 and all(
        torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point()
    )
    best = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in best.values())
    assert json.loads((tmp_path / "run" / "config.json").read_text())["step"] <= 20


@pytest.mark.slow
def test_a_phase2_budget_in_tokens_is_honoured_after_a_resume(tiny_text, tmp_path):
    """phase2.tokens sets every phase-2 model's steps (rounded up to whole steps); a run killed in a phase-2
    training and resumed trains exactly that budget, and records it with the wall time of both parts."""
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\n")
    # 4 x 16 tokens a step: 3000 tokens are 46.9 steps, so 47 (3008 tokens); the baseline trains 40
    budget = cli_sets(["search.method=knapsack", "train.steps=40", "train.eval_every=40", "train.batch_size=4",
                       "model.tgt_len=16", "phase2.tokens=3000"])  # fmt: skip
    cmd = command("run", config, tmp_path / "run", *budget, "--targets", "0.6")
    kill_after_state(cmd, tmp_path / "run" / "planer-t0.60", 20)
    assert not (tmp_path / "run" / "planer-t0.60" / "summary.json").exists()
    run(cmd)  # planer run resumes where it stopped
    summary = json.loads((tmp_path / "run" / "planer-t0.60" / "summary.json").read_text())
    assert (summary["steps"], summary["tokens"]) == (47, 47 * 4 * 16) and summary["seconds"] > 0
    records = [json.loads(line) for line in (tmp_path / "run" / "planer-t0.60" / "metrics.jsonl").open()]
    steps = [r["step"] for r in records if "valid_loss" not in r]
    assert steps == sorted(set(steps)) and steps[-1] == 47  # logged once each: no step trained twice
    baseline = json.loads((tmp_path / "run" / "baseline" / "summary.json").read_text())
    assert baseline["steps"] == 40
