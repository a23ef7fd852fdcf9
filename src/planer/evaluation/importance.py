"""Head importance: how much a trained model's loss rises when one attention head alone is removed; and the
importance of a feed-forward block's hidden units (``rank_units``).

Keeping the first h heads of a trained attention block is no choice at all: on the default config the found arch
filled that way started at 4.38 BPC, against 2.29 for the baseline, and at 2.90 with each block's most important
heads instead. Importance is measured, not read off weight norms: a head is removed by zeroing its slice of the
block's output projection (its output then adds nothing to the residual), the language-model loss is measured on a
fixed sample of training segments, in order, with memory, and the weights are restored. The sample is the same for
every head and every option (see search/knapsack.py), so the numbers compare with each other and are deterministic.
A change at one position leaves every block before it as it was, so those blocks are not run again: their output
on the sample is recorded once (``record_blocks``) and replayed (``replaying``), which halves the cost of a
measurement on average and gives the same numbers, bit for bit.
Both backbones' attention blocks are ranked alike: a gpt block's query head writes through its own columns of
the output projection too (its key/value heads are shared within a group; inheritance keeps whole groups).
"""

from __future__ import annotations

from collections.abc import Collection, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from tqdm import tqdm

from planer.config import Config
from planer.evaluation.evaluate import evaluate_ids
from planer.models.blocks import Block, Skip

# block position -> (head, loss increase in nats), most important first
Ranking = dict[int, list[tuple[int, float]]]
# per block position, (input, output) of every call of its block on a sample
Recorded = list[list[tuple[torch.Tensor, torch.Tensor]]]


@dataclass(frozen=True)
class Sample:
    """The training segments losses are compared on: the first ``segments`` of ``batch_size`` streams of ``ids``.

    The streams' memories are filled first (``mem_len`` tokens, unscored), as in evaluation. A few segments of
    many streams cost little and spread the sample over the whole training split.
    """

    ids: torch.Tensor
    batch_size: int = 16
    tgt_len: int = 64
    mem_len: int = 64
    segments: int = 8


def calibration_sample(cfg: Config, ids: torch.Tensor) -> Sample:
    """The sample of ``ids`` that heads and the knapsack's options are measured on, ``search.sample_segments`` long."""
    m = cfg.model
    return Sample(ids, cfg.eval.batch_size, m.tgt_len, m.mem_len, cfg.search.sample_segments)


def sample_loss(model: nn.Module, sample: Sample) -> float:
    """Mean loss (nats per token) of ``model`` on ``sample``, in eval mode without gradients."""
    return evaluate_ids(model, sample.ids, sample.batch_size, sample.tgt_len, sample.mem_len, sample.segments)["loss"]


@torch.no_grad()
def record_blocks(model: nn.Module, sample: Sample) -> tuple[float, Recorded]:
    """The model's sample loss, and per position the (input, output) of its block in every call on the sample."""
    recorded: Recorded = [[] for _ in model.blocks]
    hooks = [
        block.register_forward_hook(lambda _m, args, out, p=p: recorded[p].append((args[0], out)))
        for p, block in enumerate(model.blocks)
    ]
    try:
        loss = sample_loss(model, sample)
    finally:
        for hook in hooks:
            hook.remove()
    return loss, recorded


class Replay(Block):
    """Stands for the blocks before a position: it returns, call by call, what entered that position when the
    whole model ran the sample. A sample's calls come in the same order every time, so after the last call of one
    run on the sample it starts again with the first."""

    def __init__(self, outputs: list[torch.Tensor]):
        super().__init__()
        self.outputs, self.calls = outputs, 0

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        out = self.outputs[self.calls]
        if out.shape != x.shape:
            raise RuntimeError(f"replayed call {self.calls} has shape {tuple(out.shape)}, the model's {tuple(x.shape)}")
        self.calls = (self.calls + 1) % len(self.outputs)
        return out


@contextmanager
def replaying(model: nn.Module, position: int, recorded: Recorded) -> Iterator[None]:
    """Within it, the model's blocks before ``position`` replay what ``record_blocks`` recorded instead of running."""
    saved = list(model.blocks[:position])
    for p in range(position - 1):
        model.blocks[p] = Skip()
    if position:
        model.blocks[position - 1] = Replay([out for _, out in recorded[position - 1]])
    try:
        yield
    finally:
        for p, block in enumerate(saved):
            model.blocks[p] = block


@torch.no_grad()
def rank_units(model: nn.Module, recorded: Recorded, positions: Collection[int] | None = None) -> Ranking:
    """Every feed-forward block's hidden units (or those of the blocks at ``positions``), most important first.

    A unit's importance is the mean size of what it adds to the block's output on the sample: the mean of its
    activation's magnitude times the norm of its column of the second layer. That is the activation-based
    ranking Minitron prunes neurons by, weighed by what the unit writes, and it needs only the block's own inputs,
    which ``record_blocks`` holds, rather than a loss measured per unit (1,536 of them per SmolLM2 block).
    Ties keep the lower unit first.
    """
    ranking: Ranking = {}
    for position, block in enumerate(model.blocks):
        parts = block.feed_forward() if isinstance(block, Block) else None
        if parts is None or (positions is not None and position not in positions):
            continue
        second = parts[1]
        total = torch.zeros(second.in_features, dtype=torch.float64)
        count = 0

        def add(_module, args):
            nonlocal count
            total.add_(args[0].abs().flatten(0, -2).sum(0).double().cpu())
            count += args[0].flatten(0, -2).size(0)

        hook = second.register_forward_pre_hook(add)
        try:
            for x, _ in recorded[position]:
                block(x)
        finally:
            hook.remove()
        importance = (total / max(count, 1) * second.weight.double().norm(dim=0).cpu()).tolist()
        order = sorted(range(len(importance)), key=lambda u: (-importance[u], u))
        ranking[position] = [(u, importance[u]) for u in order]
    return ranking


@torch.no_grad()
def head_increases(model: nn.Module, position: int, sample: Sample, base: float) -> list[float]:
    """The loss increase over ``base`` when each head of the attention block at ``position`` alone is removed."""
    block = model.blocks[position]
    weight = block.out.weight  # (d_model, n_head * d_head): head i writes through columns i*Dh .. (i+1)*Dh
    increases = []
    for head in range(block.n_head):
        cols = slice(head * block.d_head, (head + 1) * block.d_head)
        saved = weight[:, cols].clone()
        weight[:, cols] = 0.0
        try:
            increases.append(sample_loss(model, sample) - base)
        finally:
            weight[:, cols] = saved
    return increases


def rank_heads(
    model: nn.Module,
    sample: Sample,
    recorded: tuple[float, Recorded] | None = None,
    bar: tqdm | None = None,
    positions: Collection[int] | None = None,
) -> Ranking:
    """Every attention block's heads (or those of the blocks at ``positions``), most important (largest loss
    increase when removed) first.

    Ties keep the lower head first, so a ranking is a pure function of the weights and the sample. ``recorded``:
    ``record_blocks`` of the model on the sample, when the caller has it; ``bar`` advances by one per head.
    """
    base, blocks = recorded or record_blocks(model, sample)
    ranking: Ranking = {}
    for position, block in enumerate(model.blocks):
        if block.n_head and (positions is None or position in positions):  # an attention block (see Block)
            with replaying(model, position, blocks):
                increases = head_increases(model, position, sample, base)
            order = sorted(range(len(increases)), key=lambda h: (-increases[h], h))
            ranking[position] = [(h, increases[h]) for h in order]
            if bar is not None:
                bar.update(len(increases))
    return ranking
