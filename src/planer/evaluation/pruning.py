"""What two layer-pruning methods measure on a trained model over the calibration sample (see importance.py's
``Sample``), for the rivals that drop the baseline's blocks (search/designs.py).

- Block influence (ShortGPT, Men et al. 2024): a layer whose output is nearly its input does little. Its BI is
  1 - the mean over the sample's tokens of cos(hidden state entering the layer, hidden state leaving it), read off
  one recorded run: the input of its attention position 2i and the output of its feed-forward position 2i + 1.
- Greedy sublayer removal (FinerCut, Zhang et al. 2024): attention and feed-forward positions are removed one at a
  time, each step the one whose removal changes the model's output on the sample least.

Both only ever replace a block by ``skip``, so the blocks they keep are the trained model's own.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from planer.evaluation.importance import Sample, record_blocks, replaying, sample_loss
from planer.models.blocks import Skip


@contextmanager
def skipping(model: nn.Module, positions: Iterable[int]) -> Iterator[None]:
    """Within it, the model's blocks at ``positions`` are ``skip``, restored after. Each position gets a ``Skip``
    of its own, so that a hook on one position (``record_blocks``) records that position's calls alone."""
    saved = {p: model.blocks[p] for p in positions}
    for p in saved:
        model.blocks[p] = Skip()
    try:
        yield
    finally:
        for p, block in saved.items():
            model.blocks[p] = block


def cos_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """1 - the mean over every token of the cosine of its hidden states in ``a`` and ``b``: the same calls, each
    (batch, len, d_model). 0 when every token's state only changed in scale."""
    cos = torch.cat([F.cosine_similarity(x.float(), y.float(), dim=-1).flatten() for x, y in zip(a, b, strict=True)])
    return 1.0 - cos.double().mean().item()


def block_influence(model: nn.Module, sample: Sample) -> list[float]:
    """Every layer's block influence, layer i being positions 2i (attention) and 2i + 1 (feed-forward).

    Every token the sample runs through the model counts (the memory's warm-up too: what a layer does there is what
    later tokens attend to)."""
    blocks = record_blocks(model, sample)[1]
    return [
        cos_distance([x for x, _ in blocks[2 * i]], [y for _, y in blocks[2 * i + 1]]) for i in range(len(blocks) // 2)
    ]


def final_states(model: nn.Module, sample: Sample) -> list[torch.Tensor]:
    """The hidden states leaving the model's last position, call by call on ``sample``: each (batch, len, d_model)."""
    states: list[torch.Tensor] = []
    hook = model.blocks[-1].register_forward_hook(lambda _m, _args, out: states.append(out))
    try:
        sample_loss(model, sample)
    finally:
        hook.remove()
    return states


def removal_changes(
    model: nn.Module, sample: Sample, removed: list[int], reference: list[torch.Tensor]
) -> dict[int, float]:
    """With ``removed`` skipped, the output change (``cos_distance`` of the final hidden states to ``reference``,
    the unpruned model's) of removing each further block that is not a skip, by position.

    Removing the block at p leaves every position before it as it was, so those are replayed from one recorded
    run of the pruned model (``replaying``) instead of run again: half the cost on average, the same numbers."""
    with skipping(model, removed):
        recorded = record_blocks(model, sample)[1]
        candidates = [p for p, block in enumerate(model.blocks) if not isinstance(block, Skip)]
        changes = {}
        for p in candidates:
            with replaying(model, p, recorded), skipping(model, [p]):
                changes[p] = cos_distance(final_states(model, sample), reference)
    return changes


@dataclass(frozen=True)
class Removal:
    """One step of the greedy removal: the position removed and the output change with it and every earlier one."""

    position: int
    change: float


def removal_order(model: nn.Module, sample: Sample, until: Callable[[list[int]], bool]) -> list[Removal]:
    """FinerCut's greedy order: remove, step by step, the block (attention or feed-forward, not yet a skip) whose
    removal changes the model's output least, until ``until(removed positions)`` holds or no block is left.

    The output compared is the final hidden state, what leaves the last position, not the logits: the logits are
    that state through the output layer (and a gpt model's final norm), fixed maps that add nothing a removal
    changes; it is the same kind of measure as the block influence of ``drop-layers``, a cosine of hidden states,
    so the two rivals differ in what they remove, not in how they measure; and the unpruned model's reference
    over the sample is tokens x d_model, not tokens x vocabulary (SmolLM2: 576 against 49,152 per token, 19 MB
    against 1.6 GB on an 8,192-token sample). Ties go to the lower position.

    Cost: every step runs the sample once per block left (the positions before it replayed), so O(positions^2)
    forwards over the sample in all, about half that in blocks run.
    """
    reference = final_states(model, sample)
    order: list[Removal] = []
    with tqdm(desc="drop-sublayers: removals", unit="removal", disable=None, leave=False) as bar:
        while not until([r.position for r in order]):
            changes = removal_changes(model, sample, [r.position for r in order], reference)
            if not changes:
                break
            p = min(changes, key=lambda q: (changes[q], q))
            order.append(Removal(p, changes[p]))
            bar.update()
    return order
