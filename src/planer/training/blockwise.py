"""Block-wise distillation: each block phase 2 changed learns alone to do its teacher block's job, before the model
is trained whole (after Puzzle's BLD, Bercovich et al. 2024).

A narrowed block inherits part of a trained block and starts far from what the layers after it expect. Trained
inside the whole model, it shares every step's gradient with the 49k-way output layer and every other block. Here
it sees the teacher block's input and is pulled towards the teacher block's output, so a step costs one forward
pass of the teacher and the changed blocks' own forward and backward passes: on SmolLM2 about a third of a
whole-model step. Blocks are independent given the teacher's activations, so all of them train in the same step.
A skipped block has nothing to learn; an architecture that only skips blocks spends its whole budget on the whole
model.

The loss of a block is the squared error of its output over the squared size of the teacher block's change to the
residual stream (the part a block adds to its input): blocks whose contributions differ in scale weigh the same.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from planer.config import TrainConfig
from planer.models.arch import Arch
from planer.training import distributed
from planer.training.distributed import Env
from planer.training.optim import Lamb, lr_at
from planer.training.step import Teacher

BLOCKS_FILE = "blocks.json"  # a training's record of its block-wise distillation


def changed_blocks(arch: Arch, source: Arch) -> list[int]:
    """The positions where ``arch`` has a block with weights that differs from ``source``'s block there."""
    return [p for p, (spec, src) in enumerate(zip(arch, source)) if spec.kind != "skip" and spec != src]


def block_loss(out: torch.Tensor, target: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """|out - target|^2 / |target - x|^2: the error relative to the teacher block's change to its input x."""
    return (out - target).pow(2).sum() / (target - x).pow(2).sum().clamp_min(1e-12)


def distil_blocks(
    model: torch.nn.Module,
    teacher: Teacher,
    positions: list[int],
    batches: Iterable[tuple[torch.Tensor, bool]],
    tc: TrainConfig,
    bar=None,
    share: float = 1.0,
    env: Env = Env(),
) -> dict:
    """Train ``model``'s blocks at ``positions``, each towards the ``teacher``'s block there, one step a batch
    (under data parallelism, this rank's ``share`` of the batch, the gradients summed over the ranks of ``env``).

    ``batches``: ``tc.steps`` of (token ids (B, T), whether the segment starts the stream afresh). LAMB at
    ``tc.lr`` with its warm-up and cosine schedule over ``tc.steps``, clipped as phase 2 is. Returns the mean loss per block over
    the first and the last tenth of the steps, and the seconds taken.
    """
    blocks = [model.blocks[p] for p in positions]
    params = [w for block in blocks for w in block.parameters() if w.requires_grad]
    opt = Lamb(params, lr=tc.lr, weight_decay=tc.weight_decay)
    calls: dict[int, tuple] = {}  # position -> (the teacher block's arguments, its output) in this step
    hooks = [
        teacher.model.blocks[p].register_forward_hook(lambda _m, args, out, p=p: calls.__setitem__(p, (args, out)))
        for p in positions
    ]
    losses, tic = [], time.perf_counter()
    model.train()
    try:
        for step, (x, reset) in enumerate(batches):
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc.lr, tc.warmup, tc.steps, tc.eta_min)
            teacher.logits(x, reset)  # fills ``calls``
            loss = torch.stack([block_loss(b(*calls[p][0]), calls[p][1], calls[p][0][0]) for p, b in zip(positions, blocks)])  # fmt: skip
            opt.zero_grad(set_to_none=True)
            (loss.sum() * share).backward()
            distributed.average_grads(params, env)
            if tc.clip > 0:
                torch.nn.utils.clip_grad_norm_(params, tc.clip)
            opt.step()
            losses.append(loss.detach())
            if bar is not None:
                bar.set_postfix(loss=f"{loss.mean().item():.3f}")
                bar.update()
    finally:
        for hook in hooks:
            hook.remove()
    tenth = max(1, len(losses) // 10)
    return {"steps": len(losses), "seconds": time.perf_counter() - tic, "positions": positions,
            "first_loss": per_block_mean(losses[:tenth]), "last_loss": per_block_mean(losses[-tenth:])}  # fmt: skip


def per_block_mean(losses: list[torch.Tensor]) -> list[float]:
    """Each block's mean over steps of ``losses`` (one row of block losses a step)."""
    return [round(v, 4) for v in torch.stack(losses).mean(0).tolist()]
