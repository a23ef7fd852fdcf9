"""One optimisation step of a model's weights: LAMB, the schedule, clipping, mixed precision, and the loss.

The loss is the cross-entropy, or its blend with a trained teacher's logits (distillation, phase 2 learning from
the baseline), plus the model's auxiliary losses (the MoE balance loss). Training and the search's weight steps
both step through ``WeightTrainer``; the search's architecture steps share ``autocast``.
"""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from planer.config import DistillConfig, TrainConfig
from planer.io.checkpoint import load_checkpoint
from planer.models.language_model import token_nll
from planer.training import distributed
from planer.training import resume as resume_lib
from planer.training.distributed import Env
from planer.training.optim import Lamb, lr_at


def autocast(device: torch.device, precision: str):
    """Mixed precision on CUDA only; CPU training stays in fp32."""
    if device.type != "cuda" or precision == "fp32":
        return nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def distill_loss(
    student: torch.Tensor, teacher: torch.Tensor, ce: torch.Tensor, weight: float, temperature: float
) -> torch.Tensor:
    """(1 - w) * CE + w * T^2 * KL(teacher || student), both distributions softened by T, mean over tokens.

    T^2 keeps the soft term's gradient on the scale of the hard one whatever T is (Hinton et al.).
    """
    log_s = F.log_softmax(student.float() / temperature, dim=-1)  # (B, T, V)
    log_t = F.log_softmax(teacher.float() / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - log_s)).sum(-1).mean()
    return (1.0 - weight) * ce + weight * temperature**2 * kl


class Teacher:
    """A trained model whose logits a student learns from; it carries its own memory across segments."""

    def __init__(self, path: str | Path, dc: DistillConfig):
        with torch.random.fork_rng(devices=[]):  # building it must not move the student's random stream
            self.model, _, self.vocab = load_checkpoint(path)
        self.model.eval()
        self.weight, self.temperature = dc.weight, dc.temperature
        self.mems: list | None = None

    def to(self, device: torch.device) -> Teacher:
        self.model.to(device)
        return self

    @torch.no_grad()
    def logits(self, x: torch.Tensor, reset: bool) -> torch.Tensor:
        if reset:
            self.mems = None
        logits, self.mems = self.model(x, self.mems)
        return logits


class WeightTrainer:
    """LAMB, the schedule, clipping, mixed precision and the loss: one optimisation step of a model's weights.

    The loss is the cross-entropy, or its blend with a teacher's logits (``distill_loss``), plus ``aux_coef``
    times the model's auxiliary losses. Under data parallelism the loss is scaled by this rank's ``share`` of the
    batch and the gradients summed over ranks, which gives every rank the gradient of the whole batch.
    """

    def __init__(self, params, tc: TrainConfig, device: torch.device, env: Env, share: float, aux_coef: float):
        self.tc, self.device, self.env, self.share, self.aux_coef = tc, device, env, share, aux_coef
        self.params = [p for p in params if p.requires_grad]
        self.opt = Lamb(self.params, lr=tc.lr, weight_decay=tc.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and tc.precision == "fp16")
        self.teacher: Teacher | None = None
        self.step_count = 0

    def step(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, mems, reset: bool) -> tuple[float, list]:
        """One step on segment (x, y); returns the batch's mean cross-entropy (over all ranks) and the next memories.

        ``reset``: the segment does not continue the last one, so the teacher's memory starts afresh too.
        """
        tc = self.tc
        lr = lr_at(self.step_count, tc.lr, tc.warmup, tc.steps, tc.eta_min)
        for group in self.opt.param_groups:
            group["lr"] = lr
        with autocast(self.device, tc.precision):
            logits, mems = model(x, mems)
            ce = token_nll(logits, y).mean()
            loss = ce
            if self.teacher is not None:
                t = self.teacher
                loss = distill_loss(logits, t.logits(x, reset), ce, t.weight, t.temperature)
            if self.aux_coef:
                loss = loss + self.aux_coef * model.aux_loss()
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
