"""Training of a fixed architecture: the baseline, a named design, or the arch that the search found (phase 2).

Segments are served in order with memory carried across them, as Transformer-XL trains. The checkpoint kept is
the best on validation, since small corpora overfit long before the schedule ends.
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from planer import distributed
from planer import resume as resume_lib
from planer.arch import Arch
from planer.checkpoint import atomic_write_text, save_checkpoint
from planer.config import Config, TrainConfig, saved_config_matches
from planer.data import Corpus, Segments, load_corpus, stream_share
from planer.distributed import Env
from planer.errors import PlanerError
from planer.evaluate import evaluate_ids
from planer.model import TransformerXL, token_nll
from planer.optim import Lamb, lr_at

LOG_EVERY = 10


def prepare_out_dir(path: str | Path, force: bool, create: bool = True) -> Path:
    """Create the output directory; one that already holds files is refused unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PlanerError(f"output path {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not force:
        raise PlanerError(f"output directory {path} is not empty; pass --force to overwrite it (or --resume)")
    if create:
        path.mkdir(parents=True, exist_ok=True)
    return path


def open_out_dir(path: str | Path, cfg: Config, force: bool, resume: bool, env: Env, done: str):
    """The output directory and, with ``resume``, the newest state in it (None to start afresh).

    ``done`` names the file that marks a finished run (there is nothing to resume in one).

    Resuming checks that the directory was made with this config: continuing another run's state would mix two
    runs. Every rank checks before rank 0 writes anything, so all of them refuse the same input.
    """
    path = Path(path)
    state = None
    ours = (path / "config.yaml").exists()
    if resume and ours:
        if not saved_config_matches(path / "config.yaml", cfg):
            raise PlanerError(f"cannot resume in {path}: it was made with a different config")
        newest = resume_lib.newest_state(path)
        if (path / done).exists() and newest is None:
            raise PlanerError(f"nothing to resume in {path}: the run there has finished")
        state = resume_lib.load_state(newest) if newest is not None else None
    path = prepare_out_dir(path, force or (resume and ours), create=env.main)
    distributed.barrier(env)
    if env.main:
        cfg.save(path / "config.yaml")
    return path, state


def open_log(path: Path, size: int, env: Env):
    """A JSON-lines log continued at ``size`` bytes (what a resumed state had written); ranks but 0 write nothing."""
    if not env.main:
        return open(os.devnull, "w")
    if size:
        resume_lib.truncate_log(path, size)
        return open(path, "a", buffering=1)
    return open(path, "w", buffering=1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, precision: str):
    """Mixed precision on CUDA only; CPU training stays in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class WeightTrainer:
    """LAMB, the schedule, clipping and mixed precision: one optimisation step of a model's weights.

    Used by fixed-architecture training and by the weight steps of the search alike. Under data parallelism the
    loss is scaled by this rank's ``share`` of the batch and the gradients summed over ranks, which gives every
    rank the gradient of the whole batch.
    """

    def __init__(self, params, tc: TrainConfig, device: torch.device, env: Env = Env(), share: float = 1.0):
        self.tc, self.device, self.env, self.share = tc, device, env, share
        self.params = [p for p in params if p.requires_grad]
        self.opt = Lamb(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and tc.precision == "fp16")
        self.step_count = 0

    def step(self, model: TransformerXL, x: torch.Tensor, y: torch.Tensor, mems) -> tuple[float, list]:
        """One step; returns the batch's mean cross-entropy (over all ranks) and the next memories."""
        tc = self.tc
        lr = lr_at(self.step_count, tc.lr, tc.warmup, tc.steps, tc.eta_min)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, tc.precision):
            logits, mems = model(x, mems)
            ce = token_nll(logits, y).mean()
            loss = ce + tc.balance_coef * model.aux_loss()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss * self.share).backward()
        distributed.average_grads(self.params, self.env)
        self.scaler.unscale_(self.opt)
        if tc.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        return distributed.all_sum(ce.item() * self.share, self.env, self.device), mems

    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors, meta = resume_lib.optimizer_state(self.opt, "optim")
        return tensors, {**meta, "step_count": self.step_count, "scaler": self.scaler.state_dict()}

    def load_state(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        resume_lib.load_optimizer(self.opt, tensors, meta, "optim")
        self.step_count = meta["step_count"]
        if meta["scaler"]:
            self.scaler.load_state_dict(meta["scaler"])


class ExpertLoads:
    """Tokens routed to each expert of every MoE block, summed between evaluations (over all ranks).

    Reported as each block's busiest expert relative to a uniform share (1.0 is perfect balance), the number that
    decides an MoE block's tail latency.
    """

    def __init__(self, model: torch.nn.Module, env: Env = Env()):
        self.blocks = [m for m in model.modules() if hasattr(m, "expert_counts")]
        self.counts = [None] * len(self.blocks)
        self.env = env
        self.last: dict = {}

    def add(self) -> None:
        for i, block in enumerate(self.blocks):
            counts = block.expert_counts.float().cpu()
            self.counts[i] = counts if self.counts[i] is None else self.counts[i] + counts

    def take(self) -> dict:
        """The loads since the last call (a collective under data parallelism: every rank calls it)."""
        if not self.blocks or self.counts[0] is None:
            return {}
        counts = [distributed.gather_rows(c[None], self.env, [1] * self.env.world).sum(0) for c in self.counts]
        self.last = {
            "expert_load_max": [round(float(c.max() / c.mean()), 4) for c in counts],
            "expert_load_min": [round(float(c.min() / c.mean()), 4) for c in counts],
        }
        self.counts = [None] * len(self.blocks)
        return self.last

    def tensors(self) -> dict[str, torch.Tensor]:
        return {f"loads.{i}": c for i, c in enumerate(self.counts) if c is not None}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """This rank's counts from a resume state (rows are ranks)."""
        rank = self.env.rank
        self.counts = [
            tensors[f"loads.{i}"][rank] if f"loads.{i}" in tensors and rank < len(tensors[f"loads.{i}"]) else None
            for i in range(len(self.blocks))
        ]
        if any(c is None for c in self.counts):
            self.counts = [None] * len(self.blocks)


def save_training_state(
    out_dir: Path,
    env: Env,
    device: torch.device,
    batch_size: int,
    modules: dict[str, torch.nn.Module],
    trainer: WeightTrainer,
    mems,
    loads: ExpertLoads | None,
    meta: dict,
    extra: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write a resume state (rank 0), with every rank's memories and random generators gathered into it.

    The memories are stored as the whole batch, as one process would hold them, so a state also resumes under
    another number of processes.
    """
    rows = env.rows(batch_size)
    tensors: dict[str, torch.Tensor] = {}
    if mems is not None:
        mems = [None if m is None else distributed.gather_rows(m, env, rows) for m in mems]
    mem_tensors, present = resume_lib.mems_tensors(mems, "mems")
    tensors.update(mem_tensors)
    for name, state in resume_lib.rng_tensors("rng", device).items():
        tensors[name] = distributed.gather_rows(state.to(device)[None], env, [1] * env.world).cpu()
    for name, c in (loads.tensors() if loads is not None else {}).items():
        tensors[name] = distributed.gather_rows(c[None], env, [1] * env.world)
    opt_tensors, opt_meta = trainer.state()
    tensors.update(opt_tensors)
    for prefix, module in modules.items():
        tensors.update(resume_lib.module_tensors(module, prefix))
    tensors.update(extra or {})
    if env.main:
        resume_lib.save_state(
            out_dir,
            trainer.step_count,
            tensors,
            {**meta, "optimizer": opt_meta, "mems": present, "world": env.world, "python_rng": resume_lib.python_rng()},
        )
    distributed.barrier(env)


def restore_rank_state(
    tensors: dict[str, torch.Tensor], meta: dict, env: Env, device: torch.device, batch_size: int
) -> list | None:
    """This rank's memories and random generators from a resume state; returns the memories."""
    resume_lib.restore_rng(tensors, "rng", device, env.rank)
    resume_lib.restore_python_rng(meta["python_rng"])
    mems = resume_lib.load_mems(tensors, meta["mems"], "mems", device)
    if mems is None:
        return None
    lo, hi = stream_share(batch_size, env.rank, env.world)
    return [None if m is None else m[lo:hi] for m in mems]


def train(
    cfg: Config,
    out_dir: str | Path,
    arch: Arch,
    force: bool = False,
    corpus: Corpus | None = None,
    quiet: bool = False,
    resume: bool = False,
) -> dict:
    """Train ``arch`` from scratch and keep the best-on-valid checkpoint in ``out_dir``; returns a summary.

    Every ``train.ckpt_every`` steps a full state goes to ``out_dir/resume``; ``resume`` continues from the
    newest one (or starts afresh where there is none), and ends with the weights an uninterrupted run ends with.
    Started by torchrun, every rank trains on its share of each batch and rank 0 alone writes.
    """
    if len(arch) != 2 * cfg.model.n_layer:
        raise PlanerError(
            f"the architecture has {len(arch)} blocks, but model.n_layer={cfg.model.n_layer} means "
            f"{2 * cfg.model.n_layer}; give {2 * cfg.model.n_layer} blocks or set model.n_layer"
        )
    corpus = corpus or load_corpus(cfg.data)
    cfg.model.vocab_size = len(corpus.vocab)
    tc = cfg.train
    env, device = distributed.setup(tc.device)
    segments = Segments(corpus.train, tc.batch_size, cfg.model.tgt_len, rank=env.rank, world=env.world)
    out_dir, state = open_out_dir(out_dir, cfg, force, resume, env, done="summary.json")
    seed_everything(tc.seed)
    model = TransformerXL(cfg.model, arch).to(device)
    trainer = WeightTrainer(model.parameters(), tc, device, env, segments.share)
    distributed.broadcast_module(model, env)
    torch.manual_seed(tc.seed + env.rank)  # dropout masks differ between ranks

    progress = {"step": 0, "best": math.inf, "seconds": 0.0, "step_seconds": 0.0, "log_bytes": 0, "window": []}
    mems, loads = None, ExpertLoads(model, env)
    if state is not None:
        tensors, meta = state
        resume_lib.load_module(model, tensors, "model", out_dir)
        trainer.load_state(tensors, meta["optimizer"])
        mems = restore_rank_state(tensors, meta, env, device, tc.batch_size)
        loads.load(tensors)
        progress = meta["progress"]
    log = open_log(out_dir / "metrics.jsonl", progress["log_bytes"], env)
    started = time.perf_counter() - progress["seconds"]
    step_seconds = progress["step_seconds"]
    best = progress["best"]
    tokens_per_step = tc.batch_size * cfg.model.tgt_len
    bar = tqdm(
        range(progress["step"], tc.steps),
        desc=f"train {arch.short()[:24]}",
        disable=quiet or not env.main,
        dynamic_ncols=True,
        initial=progress["step"],
        total=tc.steps,
    )
    window_start, window_loss = time.perf_counter(), list(progress["window"])
    try:
        for step in bar:
            k = step % len(segments)
            if k == 0:
                mems = None
            x, y = (t.to(device) for t in segments[k])
            model.train()
            tic = time.perf_counter()
            loss, mems = trainer.step(model, x, y, mems)
            step_seconds += time.perf_counter() - tic
            loads.add()
            if not math.isfinite(loss):
                raise PlanerError(
                    f"training diverged at step {step + 1} (loss {loss}); the best checkpoint and the "
                    "last resume state are kept"
                )
            window_loss.append(loss)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == tc.steps:
                elapsed = time.perf_counter() - window_start
                tok_s = len(window_loss) * tokens_per_step / elapsed
                record = {
                    "step": step + 1,
                    "lr": trainer.opt.param_groups[0]["lr"],
                    "loss": sum(window_loss) / len(window_loss),
                    "tok_s": tok_s,
                }
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:.0f}")
                window_start, window_loss = time.perf_counter(), []
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
                load_stats = loads.take()
                if env.main:
                    val = evaluate_ids(
                        model,
                        corpus.valid,
                        cfg.eval.batch_size,
                        cfg.eval.tgt_len or cfg.model.tgt_len,
                        cfg.eval.mem_len or cfg.model.mem_len,
                        tc.eval_batches,
                    )["loss"]
                    improved = val < best
                    if improved:
                        best = val
                        save_checkpoint(out_dir, model, cfg, corpus.vocab, step=step + 1, valid_loss=val)
                    log.write(json.dumps({"step": step + 1, "valid_loss": val, "best": improved, **load_stats}) + "\n")
                    if not quiet:
                        bar.write(
                            f"step {step + 1}: valid loss {val:.4f} ({val / math.log(2):.3f} bits)"
                            + (" *" if improved else "")
                        )
                window_start = time.perf_counter()
            if tc.ckpt_every and (step + 1) % tc.ckpt_every == 0 and step + 1 < tc.steps:
                log.flush()
                progress = {
                    "step": step + 1,
                    "best": best,
                    "seconds": time.perf_counter() - started,
                    "step_seconds": step_seconds,
                    "log_bytes": log.tell(),
                    "window": window_loss,
                }
                save_training_state(
                    out_dir, env, device, tc.batch_size, {"model": model}, trainer, mems, loads, {"progress": progress}
                )
    finally:
        log.close()
    best = distributed.all_sum(best if env.main else 0.0, env, device)  # rank 0 evaluated; every rank returns it
    summary = {
        "best_valid_loss": best,
        "seconds": time.perf_counter() - started,
        "steps": tc.steps,
        "ms_per_step": 1000 * step_seconds / tc.steps,
        "params": model.num_params(),
        "arch": arch.specs(),
        **loads.last,
    }
    if env.main:
        atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")  # marks a finished run
        resume_lib.clear_states(out_dir)
    distributed.barrier(env)
    return summary
