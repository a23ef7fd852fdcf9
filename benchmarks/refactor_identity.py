"""Behaviour identity of a refactor: the same tiny stages run with two source trees, their outputs compared bit for bit.

A refactor that should change nothing is checked by running the previous main and the new one side by side:

    git worktree add /tmp/old-main <previous commit>
    .venv/bin/python benchmarks/refactor_identity.py --old /tmp/old-main/src --new src --out /tmp/identity

Each tree runs, through its own ``python -m planer``: a Transformer-XL training with MoE (whole, and SIGKILLed
part-way then resumed), a Gumbel search and a knapsack search with its rerank from a trained baseline over one
shared latency table (profiled once, so timings cannot differ), and a Llama training with a single validation at
its end (so its checkpoint is its last step's weights). Timings and wall times are left out of the comparison; the
table says, per output, whether the trees agree, and lists the gpt validation losses, which the backbone interface
is allowed to change (they now come from the evaluation scorer).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

TINY = ["model.d_model=32", "model.n_head=4", "model.d_inner=64", "model.n_layer=2", "model.tgt_len=16",
        "model.mem_len=16", "model.dropout=0.1", "model.n_experts=4", "train.batch_size=8", "train.lr=0.02",
        "train.warmup=10", "train.eval_batches=4", "train.ckpt_every=10", "eval.batch_size=4",
        "latency.repeats=3", "latency.warmup=1", "latency.batch_size=2"]  # fmt: skip
LLAMA = ["model.backbone=gpt", "model.flavour=llama", "model.n_kv_head=2", "model.mem_len=0"]
SEARCH = ["search.epochs=4", "search.steps_per_epoch=30", "search.freeze_fraction=0.25",
          "search.space=[skip, attn:1, attn:4, ffl, moe:top1]", "search.rerank=2", "search.rerank_steps=30", "search.limits={}"]  # fmt: skip
TIMINGS = {"tok_s", "weight_step_ms", "seconds", "ms_per_step", "wall_seconds"}
ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "shakespeare-char.yaml"


def planer(src: Path, sub: str, out: Path, *extra: str, sets: list[str]) -> list[str]:
    data = ROOT / "data" / "tinyshakespeare.txt"
    flags = [a for s in [f"data.path={data}", *TINY, *sets] for a in ("--set", s)]
    return [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(src)!r}); from planer.cli import main; sys.exit(main())",
            sub, "--config", str(CONFIG), "--out", str(out), *flags, *extra]  # fmt: skip


def run(cmd: list[str]) -> None:
    result = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if result.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd[3:6])}\n{result.stderr[-3000:]}")


def run_killed(cmd: list[str], out: Path, min_step: int) -> None:
    """``cmd`` SIGKILLed once it has saved a resume state at ``min_step`` or later, then resumed."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # fmt: skip
    while proc.poll() is None:
        states = sorted((out / "resume").glob("step-*")) if (out / "resume").is_dir() else []
        if states and int(states[-1].name.split("-")[1]) >= min_step:
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    proc.wait()
    run([*cmd, "--resume"])


def tensors_digest(path: Path) -> str:
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(path))
    h = hashlib.sha256()
    for name in sorted(weights):
        h.update(name.encode())
        h.update(weights[name].contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def strip(value):
    if isinstance(value, dict):
        return {k: strip(v) for k, v in value.items() if k not in TIMINGS}
    if isinstance(value, list):
        return [strip(v) for v in value]
    return value


def jsonl(path: Path) -> list:
    return [strip(json.loads(line)) for line in path.read_text().splitlines()]


def stages(src: Path, out: Path, lut: Path) -> dict:
    """Every stage's outputs under ``out``, digested."""
    arch = ["--arch", "attn:2 moe:top1 attn:4 ffl"]
    steps = ["train.steps=300", "train.eval_every=100"]
    run(planer(src, "train", out / "txl", *arch, sets=steps))
    run_killed(planer(src, "train", out / "txl-cut", *arch, sets=steps), out / "txl-cut", 150)
    run(planer(src, "train", out / "base", sets=["train.steps=150", "train.eval_every=150"]))
    run(planer(src, "search", out / "gumbel", "--method", "gumbel", "--target", "0.6", "--lut", str(lut), sets=SEARCH))
    run(planer(src, "search", out / "knapsack", "--method", "knapsack", "--target", "0.6", "--lut", str(lut),
               "--init-from", str(out / "base"), sets=SEARCH))  # fmt: skip
    run(planer(src, "train", out / "llama", sets=[*LLAMA, "train.steps=200", "train.eval_every=200"]))
    record = {}
    for name in ("txl", "txl-cut", "base", "llama"):
        record[f"{name} weights"] = tensors_digest(out / name / "model.safetensors")
        metrics = jsonl(out / name / "metrics.jsonl")
        record[f"{name} train losses"] = [m for m in metrics if "valid_loss" not in m]
        record[f"{name} valid losses"] = [m for m in metrics if "valid_loss" in m]
    record["gumbel supernet"] = tensors_digest(out / "gumbel" / "supernet.safetensors")
    record["gumbel search.jsonl"] = jsonl(out / "gumbel" / "search.jsonl")
    for name in ("gumbel", "knapsack"):
        record[f"{name} arch.json"] = strip(json.loads((out / name / "arch.json").read_text()))
    return json.loads(json.dumps(record).replace(str(out), "<out>"))  # paths inside records name the tree's folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--old", type=Path, required=True, help="the previous tree's src folder")
    parser.add_argument("--new", type=Path, required=True, help="the new tree's src folder")
    parser.add_argument("--out", type=Path, required=True, help="a folder for both trees' outputs")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    lut = args.out / "lut"
    if not (lut / "lut.json").exists():
        run(planer(args.old.resolve(), "profile", lut, sets=SEARCH))
    records = {}
    for side in ("old", "new"):
        digest = args.out / f"{side}.json"
        if not digest.exists():  # resumable: a tree already run is not run again
            digest.write_text(json.dumps(stages(getattr(args, side).resolve(), args.out / side, lut / "lut.json")))
        records[side] = json.loads(digest.read_text())
    print(f"| output | {args.old} vs {args.new} |\n|---|---|")
    for key in records["old"]:
        same = records["old"][key] == records["new"].get(key)
        print(f"| {key} | {'identical' if same else 'DIFFERENT'} |")
    assert records["new"]["txl weights"] == records["new"]["txl-cut weights"], "the resumed training differs"
    for side in ("old", "new"):
        print(f"{side} llama valid losses: {[m['valid_loss'] for m in records[side]['llama valid losses']]}")


if __name__ == "__main__":
    main()
