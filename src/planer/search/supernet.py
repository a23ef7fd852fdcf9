"""The supernet of phase 1: every block position holds all options of the search space (paper §2.2, Eq. 1).

A SuperBlock runs in one of three modes:
- ``hard``: one option, sampled from GumbelSoftmax(alpha, tau) by the supernet once per step, runs alone; this
  trains the weights at the cost of a single path.
- ``soft``: output = sum_i P_i * option_i(x) with P = GumbelSoftmax(alpha, tau); this trains alpha.
- ``argmax``: the option with the largest alpha runs alone, deterministically.
Memory is kept at the super block's input, so every attention option sees the same memory whatever ran before.
The options' weights are shared: with a choice fixed, the supernet computes exactly what the standalone model of
that architecture computes with the same weights.

The supernet is the backbone's own model (``backbones.build_model``) with super blocks for blocks, held as
``SuperNet.model``: whatever surrounds the blocks (embedding, positions, final norm, output layer, memory) is the
backbone's, so one supernet serves Transformer-XL and gpt alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.evaluation.importance import Ranking
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_block, build_model
from planer.models.blocks import Block
from planer.training.inherit import copy_outside_blocks, transfer, unit_order


class SuperBlock(Block):
    def __init__(self, options: list[BlockSpec], cfg: ModelConfig):
        super().__init__()
        self.options = list(options)
        self.candidates = nn.ModuleList(build_block(o, cfg) for o in self.options)
        self.alpha = nn.Parameter(torch.zeros(len(self.options)))
        self.uses_memory = any(c.uses_memory for c in self.candidates)
        self.mode, self.tau, self.choice = "argmax", 1.0, 0
        self.generator: torch.Generator | None = None  # the Gumbel noise's source (the same on every rank)
        self.probs: torch.Tensor | None = None  # the P of the last soft forward, for the latency estimate

    def gumbel_softmax(self, tau: float) -> torch.Tensor:
        """Softmax((alpha + Gumbel noise) / tau), the noise drawn from this block's generator."""
        u = torch.rand(self.alpha.shape, generator=self.generator).to(self.alpha.device)
        exponential = (-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20)
        noise = -torch.log(exponential)
        return F.softmax((self.alpha + noise) / tau, dim=-1)

    def sample(self, tau: float) -> int:
        """Draw the option a hard step runs: the argmax of a Gumbel-softmax sample of alpha."""
        with torch.no_grad():
            self.choice = int(self.gumbel_softmax(tau).argmax())
        return self.choice

    def aux_loss(self) -> torch.Tensor | None:
        """The auxiliary loss of the option that ran, or in soft mode the P-weighted sum of the options' losses."""
        if self.mode == "soft":
            losses = [p * loss for p, c in zip(self.probs, self.candidates) if (loss := c.aux_loss()) is not None]
            return torch.stack(losses).sum() if losses else None
        choice = self.choice if self.mode == "hard" else int(self.alpha.argmax())
        return self.candidates[choice].aux_loss()

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        if self.mode == "hard":
            return self.candidates[self.choice](x, mem)
        if self.mode == "argmax":
            return self.candidates[int(self.alpha.argmax())](x, mem)
        self.probs = self.gumbel_softmax(self.tau)
        return sum(p * c(x, mem) for p, c in zip(self.probs, self.candidates))


class SuperNet(nn.Module):
    """The backbone's model (``cfg.model.backbone``) whose blocks are super blocks over the same options at every
    position; forward and the auxiliary loss are the model's.

    The super blocks are built before the model, and the model's parameters are the supernet's in the model's
    order: the random draws at construction and the order of every sum over the weights (the gradient norm) are
    those the search has always had.
    """

    def __init__(self, cfg: ModelConfig, space: list[str], positions: int):
        super().__init__()
        options = [BlockSpec.parse(s) for s in space]
        self.cfg = cfg
        self.model = build_model(cfg, blocks=[SuperBlock(options, cfg) for _ in range(positions)])
        self.space = [str(o) for o in options]

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.blocks

    def forward(self, idx: torch.Tensor, mems: list | None = None) -> tuple[torch.Tensor, list]:
        return self.model(idx, mems)

    def aux_loss(self) -> torch.Tensor:
        return self.model.aux_loss()

    def set_mode(self, mode: str, tau: float = 1.0) -> None:
        for block in self.blocks:
            block.mode, block.tau = mode, tau

    def use_generator(self, generator: torch.Generator) -> None:
        """Draw all Gumbel noise from ``generator``: ranks seeded alike sample the same paths in every step."""
        for block in self.blocks:
            block.generator = generator

    def sample(self, tau: float) -> list[int]:
        return [block.sample(tau) for block in self.blocks]

    def alphas(self) -> list[nn.Parameter]:
        return [block.alpha for block in self.blocks]

    def weights(self) -> list[nn.Parameter]:
        alpha_ids = {id(a) for a in self.alphas()}
        return [p for p in self.parameters() if id(p) not in alpha_ids]

    def alpha_matrix(self) -> torch.Tensor:
        return torch.stack([a.detach() for a in self.alphas()])

    def sampled_probs(self) -> torch.Tensor:
        """P of the last soft forward, (positions, options), differentiable with respect to alpha."""
        return torch.stack([block.probs for block in self.blocks])

    def derive(self) -> Arch:
        """The strongest option at every position (paper §2.3)."""
        return Arch(tuple(block.options[int(block.alpha.argmax())] for block in self.blocks))


def warm_start(net: SuperNet, baseline: nn.Module, ranking: Ranking | None = None) -> int:
    """Initialise the supernet's options from a trained baseline of the same length; returns how many were.

    Options trained from scratch inside a short search stay weaker than the baseline's own blocks, and the latency
    loss then wins every comparison: the search drops attention it would have kept. Starting each option from the
    baseline block at its position (``planer.training.inherit.transfer``: attention from its most important heads by
    ``ranking``, see ``planer.evaluation.importance``, its first heads where there is none; feed-forward as is,
    narrowed to its most important hidden units by ``ranking``, or as copies of it in MoE experts and wide blocks) lets the architecture weights compare options that already
    work, and starts them where phase 2's ``--init-from`` and the knapsack search start them. Everything outside
    the blocks (embedding, positions, final norm, output layer) is copied as it is.
    """
    if len(net.blocks) != len(baseline.blocks) or baseline.cfg.d_model != net.cfg.d_model:
        raise PlanerError("the warm-start model does not match the supernet's length or width")
    copy_outside_blocks(net.model, baseline, "the warm-start model")
    done = 0
    for position, (block, spec, source) in enumerate(zip(net.blocks, baseline.arch, baseline.blocks)):
        order = unit_order(ranking or {}, position, source)
        for option, candidate in zip(block.options, block.candidates):
            done += transfer(candidate, option, source, spec, order)
    return done
