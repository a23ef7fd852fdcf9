"""The one training loop: everything a run of weight steps needs besides its own algorithm.

Fixed-architecture training (the baseline, a design, a rival, phase 2) and the search (phase 1) share the same
machinery: the output directory and its resolved config, seeding, devices and ranks, the model's broadcast, the
optimiser step with its losses (distillation from a teacher, auxiliary losses), the log and the progress bar,
periodic evaluation with the best checkpoint, and resume states. ``Loop`` owns it, so that training and the Gumbel search
hold only their algorithms, and a new kind of run adds no copy of the setup.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from planer.config import Config, TrainConfig, saved_config_matches, with_vocab_size
from planer.errors import PlanerError
from planer.io.checkpoint import save_checkpoint
from planer.io.data import Corpus, Segments, load_corpus, stream_share
from planer.models.backbone import backbone
from planer.training import distributed
from planer.training import resume as resume_lib
from planer.training.distributed import Env
from planer.training.step import WeightTrainer

LOG_EVERY = 10


@dataclass(frozen=True)
class RunOptions:
    """How a run treats its output directory and the terminal, apart from what it computes."""

    force: bool = False  # overwrite a non-empty output directory
    resume: bool = False  # continue from the newest state in OUT/resume
    quiet: bool = False  # no progress bar or messages
    corpus: Corpus | None = None  # the corpus already loaded (the pipeline shares one among its stages)


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


def open_out_dir(path: str | Path, cfg: Config, options: RunOptions, env: Env, done: str):
    """The output directory and, with ``resume``, the newest state in it (None to start afresh).

    ``done`` names the file that marks a finished run (there is nothing to resume in one). Resuming checks that
    the directory was made with this config: continuing another run's state would mix two runs. Every rank checks
    before rank 0 writes anything, so all of them refuse the same input.
    """
    path = Path(path)
    state = None
    ours = (path / "config.yaml").exists()
    if options.resume and ours:
        if not saved_config_matches(path / "config.yaml", cfg):
            raise PlanerError(f"cannot resume in {path}: it was made with a different config")
        newest = resume_lib.newest_state(path)
        if (path / done).exists() and newest is None:
            raise PlanerError(f"nothing to resume in {path}: the run there has finished")
        state = resume_lib.load_state(newest) if newest is not None else None
    path = prepare_out_dir(path, options.force or (options.resume and ours), create=env.main)
    distributed.barrier(env)
    if env.main:
        cfg.save(path / "config.yaml")
    return path, state


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


class ExpertLoads:
    """Tokens routed to each expert of every MoE block, summed between evaluations (over all ranks).

    Reported as each block's busiest expert relative to a uniform share (1.0 is perfect balance), the number that
    decides an MoE block's tail latency.
    """

    def __init__(self, model: torch.nn.Module, env: Env):
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
        """Every rank's counts since the last evaluation, one row per rank, for a resume state (a collective)."""
        world = self.env.world
        return {
            f"loads.{i}": distributed.gather_rows(c[None], self.env, [1] * world)
            for i, c in enumerate(self.counts)
            if c is not None
        }

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        """This rank's counts from a resume state (rows are ranks)."""
        rank = self.env.rank
        self.counts = [
            tensors[f"loads.{i}"][rank] if f"loads.{i}" in tensors and rank < len(tensors[f"loads.{i}"]) else None
            for i in range(len(self.blocks))
        ]
        if any(c is None for c in self.counts):
            self.counts = [None] * len(self.blocks)


class Loop:
    """One run of weight steps into one output directory: its setup, its state, its log and its progress."""

    def __init__(self, cfg: Config, out_dir: str | Path, options: RunOptions, done: str):
        """Load the corpus, set up ranks, open ``out_dir`` (``done`` marks a finished run there) and seed.

        ``self.cfg`` is ``cfg`` resolved for the corpus (its vocabulary size), what the run builds its models from
        and saves; ``cfg`` itself is left as it was.
        """
        self.options = options
        self.corpus = options.corpus or load_corpus(cfg.data)
        self.cfg = cfg = with_vocab_size(cfg, len(self.corpus.vocab))
        self.env, self.device = distributed.setup(cfg.train.device)
        tc = cfg.train
        self.segments = Segments(
            self.corpus.train, tc.batch_size, cfg.model.tgt_len, rank=self.env.rank, world=self.env.world
        )
        path = Path(out_dir)
        self.created = not path.exists() or (path.is_dir() and not any(path.iterdir()))
        self.out_dir, self.state = open_out_dir(out_dir, cfg, options, self.env, done)
        seed_everything(tc.seed)

    @contextmanager
    def setting_up(self):
        """Bad input found while setting up (a teacher, a table, a target) leaves nothing behind in an output
        folder this run created, so the user's retry is not refused as "not empty"."""
        try:
            yield
        except PlanerError:
            if self.created and self.env.main:
                shutil.rmtree(self.out_dir, ignore_errors=True)
            raise

    def place(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move a freshly built model to this rank's device, give it rank 0's weights, and seed dropout per rank."""
        module.to(self.device)
        distributed.broadcast_module(module, self.env)
        torch.manual_seed(self.cfg.train.seed + self.env.rank)  # dropout masks differ between ranks
        return module

    def trainer(self, params, tc: TrainConfig, aux_coef: float) -> WeightTrainer:
        return WeightTrainer(params, tc, self.device, self.env, self.segments.share, aux_coef)

    def restore(self, modules: dict[str, torch.nn.Module], trainer: WeightTrainer) -> tuple[dict, dict, list | None]:
        """Load the resume state into ``modules`` and ``trainer``; returns its tensors, meta and this rank's memories.

        The random generators are restored too, so call this after ``place``.
        """
        tensors, meta = self.state
        for prefix, module in modules.items():
            resume_lib.load_module(module, tensors, prefix, self.out_dir)
        trainer.load_state(tensors, meta["optimizer"])
        resume_lib.restore_rng(tensors, "rng", self.device, self.env.rank)
        resume_lib.restore_python_rng(meta["python_rng"])
        if trainer.teacher is not None:
            trainer.teacher.mems = self._rank_mems(tensors, meta["teacher_mems"], "teacher_mems")
        return tensors, meta, self._rank_mems(tensors, meta["mems"], "mems")

    def _rank_mems(self, tensors: dict, present: list | None, prefix: str) -> list | None:
        mems = resume_lib.load_mems(tensors, present, prefix, self.device)
        if mems is None:
            return None
        lo, hi = stream_share(self.cfg.train.batch_size, self.env.rank, self.env.world)
        return [None if m is None else m[lo:hi] for m in mems]

    def _gathered_mems(self, mems: list | None, prefix: str) -> tuple[dict[str, torch.Tensor], list | None]:
        """Memories as the whole batch, as one process would hold them, so a state resumes under any world size."""
        rows = self.env.rows(self.cfg.train.batch_size)
        if mems is not None:
            mems = [None if m is None else distributed.gather_rows(m, self.env, rows) for m in mems]
        return resume_lib.mems_tensors(mems, prefix)

    def save_state(self, modules: dict[str, torch.nn.Module], trainer: WeightTrainer, mems, meta: dict,
                   extra: dict[str, torch.Tensor]) -> None:  # fmt: skip
        """Write a resume state (rank 0), with every rank's memories and random generators gathered into it."""
        env = self.env
        tensors, present = self._gathered_mems(mems, "mems")
        teacher_tensors, teacher_present = self._gathered_mems(
            trainer.teacher.mems if trainer.teacher is not None else None, "teacher_mems"
        )
        tensors.update(teacher_tensors)
        for name, state in resume_lib.rng_tensors("rng", self.device).items():
            tensors[name] = distributed.gather_rows(state.to(self.device)[None], env, [1] * env.world).cpu()
        opt_tensors, opt_meta = trainer.state()
        tensors.update(opt_tensors)
        for prefix, module in modules.items():
            tensors.update(resume_lib.module_tensors(module, prefix))
        tensors.update(extra)
        meta = {**meta, "optimizer": opt_meta, "mems": present, "teacher_mems": teacher_present, "world": env.world}
        if env.main:
            resume_lib.save_state(
                self.out_dir, trainer.step_count, tensors, {**meta, "python_rng": resume_lib.python_rng()}
            )
        distributed.barrier(env)

    def open_log(self, name: str, size: int):
        """A JSON-lines log continued at ``size`` bytes (what a resumed state had written); ranks but 0 write nothing."""
        if not self.env.main:
            return open(os.devnull, "w")
        path = self.out_dir / name
        if size:
            resume_lib.truncate_log(path, size)
            return open(path, "a", buffering=1)
        return open(path, "w", buffering=1)

    def bar(self, desc: str, initial: int, total: int) -> tqdm:
        """A progress bar that the caller advances (``update``); shown on rank 0 unless the run is quiet."""
        hidden = self.options.quiet or not self.env.main
        return tqdm(desc=desc, disable=hidden, dynamic_ncols=True, initial=initial, total=total)

    def finish(self, write_results) -> None:
        """On rank 0, ``write_results()`` (which writes the file that marks the run finished), then drop the
        resume states; every rank waits for it."""
        if self.env.main:
            write_results()
            resume_lib.clear_states(self.out_dir)
        distributed.barrier(self.env)

    def validate(self, model: torch.nn.Module) -> float:
        """Validation loss (nats per token) on rank 0: the backbone's scorer, the one ``planer evaluate`` uses, over
        the first ``train.eval_batches`` batches of the valid split (0: the whole split)."""
        score = backbone(self.cfg.model).scorer(model, self.cfg, self.cfg.train.eval_batches)
        return score(self.corpus.valid)["loss"]


@dataclass
class Progress:
    """Where a fixed-architecture training stands; saved in every resume state."""

    step: int = 0
    best: float = math.inf
    seconds: float = 0.0
    step_seconds: float = 0.0
    log_bytes: int = 0
    window: list | None = None


class Fit:
    """Weight steps over the stream of segments with periodic evaluation, keeping the best-on-valid checkpoint."""

    def __init__(self, loop: Loop, model: torch.nn.Module, trainer: WeightTrainer):
        self.loop, self.model, self.trainer = loop, model, trainer
        self.loads = ExpertLoads(model, loop.env)
        self.progress, self.mems = Progress(window=[]), None
        if loop.state is not None:
            tensors, meta, self.mems = loop.restore({"model": model}, trainer)
            self.loads.load(tensors)
            self.progress = Progress(**meta["progress"])

    def run(self, desc: str) -> dict:
        """Train to ``train.steps``; returns the summary (best valid loss, time, expert loads)."""
        loop, tc, p = self.loop, self.loop.cfg.train, self.progress
        log = loop.open_log("metrics.jsonl", p.log_bytes)
        started = time.perf_counter() - p.seconds
        bar = loop.bar(desc, p.step, tc.steps)
        self.window_start = time.perf_counter()
        try:
            for seg in loop.segments.walk(p.step, tc.steps - p.step):
                self._step(seg, bar, log)
                p.step = seg.position + 1
                bar.update()
                if p.step % tc.eval_every == 0 or p.step == tc.steps:
                    self._evaluate(bar, log)
                if tc.ckpt_every and p.step % tc.ckpt_every == 0 and p.step < tc.steps:
                    log.flush()
                    p.seconds, p.log_bytes = time.perf_counter() - started, log.tell()
                    state = {"progress": vars(p)}
                    loop.save_state({"model": self.model}, self.trainer, self.mems, state, self.loads.tensors())
        finally:
            log.close()
        best = distributed.all_sum(p.best if loop.env.main else 0.0, loop.env, loop.device)  # rank 0 evaluated
        return {"best_valid_loss": best, "seconds": time.perf_counter() - started, "steps": tc.steps,
                "tokens": tc.steps * tc.batch_size * loop.cfg.model.tgt_len,
                "ms_per_step": 1000 * p.step_seconds / tc.steps, **self.loads.last}  # fmt: skip

    def _step(self, seg, bar: tqdm, log) -> None:
        p, tc = self.progress, self.loop.cfg.train
        if seg.reset:
            self.mems = None
        x, y = seg.x.to(self.loop.device), seg.y.to(self.loop.device)
        self.model.train()
        tic = time.perf_counter()
        loss, self.mems = self.trainer.step(self.model, x, y, self.mems, seg.reset)
        p.step_seconds += time.perf_counter() - tic
        self.loads.add()
        if not math.isfinite(loss):
            raise PlanerError(
                f"training diverged at step {seg.position + 1} (loss {loss}); the best checkpoint and the "
                "last resume state are kept"
            )
        p.window.append(loss)
        step = seg.position + 1
        if step % LOG_EVERY == 0 or step == tc.steps:
            elapsed = time.perf_counter() - self.window_start
            tok_s = len(p.window) * tc.batch_size * self.loop.cfg.model.tgt_len / elapsed
            record = {"step": step, "lr": self.trainer.opt.param_groups[0]["lr"],
                      "loss": sum(p.window) / len(p.window), "tok_s": tok_s}  # fmt: skip
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:.0f}")
            self.window_start, p.window = time.perf_counter(), []

    def _evaluate(self, bar: tqdm, log) -> None:
        loop, p = self.loop, self.progress
        load_stats = self.loads.take()
        if loop.env.main:
            val = loop.validate(self.model)
            improved = val < p.best
            if improved:
                p.best = val
                save_checkpoint(loop.out_dir, self.model, loop.cfg, loop.corpus.vocab, step=p.step, valid_loss=val)
            log.write(json.dumps({"step": p.step, "valid_loss": val, "best": improved, **load_stats}) + "\n")
            if not loop.options.quiet:
                unit = (
                    f"({val / math.log(2):.3f} bits)"
                    if loop.corpus.vocab.level == "char"
                    else f"(ppl {math.exp(val):.2f})"
                )
                bar.write(f"step {p.step}: valid loss {val:.4f} {unit}" + (" *" if improved else ""))
        self.window_start = time.perf_counter()
