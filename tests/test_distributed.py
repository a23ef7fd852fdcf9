"""Data parallelism: torchrun with two CPU processes (gloo) trains and searches like one process.

Both ranks must end with identical weights and alpha (a rank that drew another path or missed an all-reduce would
drift), and the two-process result must equal a single process with the same global batch, split unevenly here
(7 streams: 4 + 3) so that the per-rank loss weighting is checked too. Dropout is off and so is the balance loss,
the two things that are per rank by design (each rank draws its own dropout masks and balances its own tokens).
"""

import os
import subprocess
import sys

import pytest
import torch
from conftest import LLAMA_SETTINGS, ROOT, cli_sets, tiny_overrides
from safetensors.torch import load_file

from planer.config import load_config
from planer.latency.table import profile_dir

pytestmark = pytest.mark.slow  # trains, or starts processes that do

# The tiny config (no dropout) without expert dropout or balance loss, 7 streams (4 + 3), a few steps of each.
SETTINGS = tiny_overrides("model.moe_dropout=0.0", "train.batch_size=7", "train.steps=12", "train.eval_every=6",
                          "train.eval_batches=2", "train.warmup=3", "train.lr=0.02", "train.balance_coef=0.0",
                          "train.device=cpu", "search.epochs=3", "search.steps_per_epoch=6",
                          "search.freeze_fraction=0.3", "latency.batch_size=2")  # fmt: skip


def worker(launcher: list[str], config, lut, out, settings: list[str]) -> None:
    cmd = [*launcher, str(ROOT / "tests" / "ddp_worker.py"), str(config), str(lut), str(out)]
    cmd += cli_sets(settings)
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("backbone", [[], LLAMA_SETTINGS], ids=["txl", "llama"])
def test_two_ranks_agree_with_each_other_and_with_one_process(tiny_text, tmp_path, backbone):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tiny_text}\nsearch:\n  space: [skip, attn:1, attn:4, ffl, moe:top1]\n")
    settings = SETTINGS + backbone
    profile_dir(load_config(config, settings), tmp_path / "lut")
    lut = tmp_path / "lut" / "lut.json"
    worker([sys.executable], config, lut, tmp_path / "single", settings)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    worker(torchrun, config, lut, tmp_path / "ddp", settings)
    for stage in ("train", "search"):
        one = load_file(str(tmp_path / "single" / f"{stage}-rank0.safetensors"))
        r0 = load_file(str(tmp_path / "ddp" / f"{stage}-rank0.safetensors"))
        r1 = load_file(str(tmp_path / "ddp" / f"{stage}-rank1.safetensors"))
        assert r0.keys() == r1.keys() == one.keys()
        assert all(torch.equal(r0[k], r1[k]) for k in r0), f"{stage}: the ranks drifted apart"
        for k in r0:
            assert torch.allclose(r0[k], one[k], rtol=1e-4, atol=1e-5), f"{stage}: {k} differs from one process"
        alphas = [k for k in r0 if k.endswith("alpha")]
        assert stage == "train" or (alphas and any(r0[k].abs().sum() > 0 for k in alphas))  # alpha was trained
    # rank 0 alone wrote the outputs, and they are complete
    assert (tmp_path / "ddp" / "train" / "summary.json").exists() and (
        tmp_path / "ddp" / "search" / "arch.json"
    ).exists()
