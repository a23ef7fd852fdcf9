"""Training of a fixed architecture: the baseline, a named design, or the arch that the search found (phase 2).

Segments are served in order with memory carried across them, as Transformer-XL trains. The checkpoint kept is
the best on validation, since small corpora overfit long before the schedule ends.
"""

from __future__ import annotations

import json
import math
import random
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from tqdm import tqdm

from planer.arch import Arch
from planer.checkpoint import atomic_write_text, save_checkpoint
from planer.config import Config, TrainConfig
from planer.data import Corpus, Segments, load_corpus
from planer.errors import PlanerError
from planer.evaluate import evaluate_ids
from planer.model import TransformerXL, token_nll
from planer.optim import Lamb, lr_at

LOG_EVERY = 10


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PlanerError("device 'cuda' was asked for, but no CUDA device is available")
    return torch.device(name)


def prepare_out_dir(path: str | Path, force: bool) -> Path:
    """Create the output directory; one that already holds files is refused unless ``force``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise PlanerError(f"output path {path} exists and is not a directory")
    if path.exists() and any(path.iterdir()) and not force:
        raise PlanerError(f"output directory {path} is not empty; pass --force to overwrite it")
    path.mkdir(parents=True, exist_ok=True)
    return path


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

    Used by fixed-architecture training and by the weight steps of the search alike.
    """

    def __init__(self, params, tc: TrainConfig, device: torch.device):
        self.tc, self.device = tc, device
        self.params = [p for p in params if p.requires_grad]
        self.opt = Lamb(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and tc.precision == "fp16")
        self.step_count = 0

    def step(self, model: TransformerXL, x: torch.Tensor, y: torch.Tensor, mems) -> tuple[float, list]:
        tc = self.tc
        lr = lr_at(self.step_count, tc.lr, tc.warmup, tc.steps, tc.eta_min)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, tc.precision):
            logits, mems = model(x, mems)
            ce = token_nll(logits, y).mean()
            loss = ce + tc.balance_coef * model.balance_loss()
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        if tc.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, tc.clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.step_count += 1
        return ce.item(), mems


class ExpertLoads:
    """Tokens routed to each expert of every MoE block, summed between evaluations.

    Reported as each block's busiest expert relative to a uniform share (1.0 is perfect balance), the number that
    decides an MoE block's tail latency.
    """

    def __init__(self, model: torch.nn.Module):
        self.blocks = [m for m in model.modules() if hasattr(m, "expert_counts")]
        self.counts = [None] * len(self.blocks)
        self.last: dict = {}

    def add(self) -> None:
        for i, block in enumerate(self.blocks):
            counts = block.expert_counts.float().cpu()
            self.counts[i] = counts if self.counts[i] is None else self.counts[i] + counts

    def take(self) -> dict:
        if not self.blocks or self.counts[0] is None:
            return {}
        self.last = {"expert_load_max": [round(float(c.max() / c.mean()), 4) for c in self.counts],
                     "expert_load_min": [round(float(c.min() / c.mean()), 4) for c in self.counts]}
        self.counts = [None] * len(self.blocks)
        return self.last


def train(cfg: Config, out_dir: str | Path, arch: Arch, force: bool = False, corpus: Corpus | None = None,
          quiet: bool = False) -> dict:
    """Train ``arch`` from scratch and keep the best-on-valid checkpoint in ``out_dir``; returns a summary."""
    if len(arch) != 2 * cfg.model.n_layer:
        raise PlanerError(f"the architecture has {len(arch)} blocks, but model.n_layer={cfg.model.n_layer} means "
                          f"{2 * cfg.model.n_layer}; give {2 * cfg.model.n_layer} blocks or set model.n_layer")
    corpus = corpus or load_corpus(cfg.data)
    cfg.model.vocab_size = len(corpus.vocab)
    tc = cfg.train
    segments = Segments(corpus.train, tc.batch_size, cfg.model.tgt_len)
    out_dir = prepare_out_dir(out_dir, force)
    device = resolve_device(tc.device)
    seed_everything(tc.seed)
    model = TransformerXL(cfg.model, arch).to(device)
    trainer = WeightTrainer(model.parameters(), tc, device)
    cfg.save(out_dir / "config.yaml")

    best, mems, started, step_seconds = math.inf, None, time.perf_counter(), 0.0
    loads = ExpertLoads(model)
    tokens_per_step = tc.batch_size * cfg.model.tgt_len
    log = open(out_dir / "metrics.jsonl", "w", buffering=1)
    bar = tqdm(range(tc.steps), desc=f"train {arch.short()[:24]}", disable=quiet, dynamic_ncols=True)
    window_start, window_loss = time.perf_counter(), []
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
                raise PlanerError(f"training diverged at step {step + 1} (loss {loss}); the best checkpoint is kept")
            window_loss.append(loss)
            if (step + 1) % LOG_EVERY == 0 or step + 1 == tc.steps:
                elapsed = time.perf_counter() - window_start
                tok_s = len(window_loss) * tokens_per_step / elapsed
                record = {"step": step + 1, "lr": trainer.opt.param_groups[0]["lr"],
                          "loss": sum(window_loss) / len(window_loss), "tok_s": tok_s}
                log.write(json.dumps(record) + "\n")
                bar.set_postfix(loss=f"{record['loss']:.3f}", tok_s=f"{tok_s:.0f}")
                window_start, window_loss = time.perf_counter(), []
            if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
                val = evaluate_ids(model, corpus.valid, cfg.eval.batch_size, cfg.eval.tgt_len or cfg.model.tgt_len,
                                   cfg.eval.mem_len or cfg.model.mem_len, tc.eval_batches)["loss"]
                improved = val < best
                if improved:
                    best = val
                    save_checkpoint(out_dir, model, cfg, corpus.vocab, step=step + 1, valid_loss=val)
                log.write(json.dumps({"step": step + 1, "valid_loss": val, "best": improved, **loads.take()}) + "\n")
                if not quiet:
                    bar.write(f"step {step + 1}: valid loss {val:.4f} ({val / math.log(2):.3f} bits)"
                              + (" *" if improved else ""))
                window_start = time.perf_counter()
    finally:
        log.close()
    summary = {"best_valid_loss": best, "seconds": time.perf_counter() - started, "steps": tc.steps,
               "ms_per_step": 1000 * step_seconds / tc.steps, "params": model.num_params(), "arch": arch.specs(),
               **loads.last}
    atomic_write_text(out_dir / "summary.json", json.dumps(summary, indent=2) + "\n")  # marks a finished run
    return summary
