"""Weight inheritance: start a block, a whole architecture, or a supernet's options from trained weights.

A block starts from a trained block at the same position when one can become the other without losing what it
learnt: the same spec is copied; ``attn:h`` keeps the h most important heads of an ``attn:H`` (H >= h, ranked by
evaluation/importance.py; each backbone's attention block says how it keeps heads, ``Block.inherit_heads``); a
wider feed-forward block is copies of a narrower one (``widen``), a narrower one keeps the most important hidden
units of a wider one (``narrow``, ranked by evaluation/importance.py too); a mixture of experts is experts that are copies
of a feed-forward block (``upcycle``). ``skip`` has nothing to inherit. Phase 1's warm start, phase 2's
``--init-from`` and the knapsack search's option measurements all go through ``transfer``, so the three start from
the same weights. A block only ever starts from a block of its own kind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.evaluation.importance import Ranking
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_model
from planer.models.blocks import Block, FeedForwardParts, UnitOrder

if TYPE_CHECKING:
    from planer.search.supernet import SuperNet

MATCHING = ("backbone", "flavour", "d_model", "d_head", "vocab_size", "tie_embeddings")  # what must agree to inherit


def ffl_parts(block: nn.Module) -> FeedForwardParts | None:
    """A feed-forward block's parts (see ``Block.feed_forward``); None for any other block."""
    return block.feed_forward() if isinstance(block, Block) else None


def upcycle(dst: nn.Module, src: nn.Module) -> None:
    """Start every expert of an MoE block as a copy of a trained feed-forward block (the router stays as it is).

    With top-2 routing the block then computes exactly what the feed-forward block does (the two gates sum to 1);
    with top-1 its output is scaled by the winning gate. Bias-free experts (Llama) have no biases to copy.
    """
    first, second, _, _ = ffl_parts(src)
    with torch.no_grad():
        dst.w1.copy_(first.weight.expand_as(dst.w1))
        dst.w2.copy_(second.weight.expand_as(dst.w2))
        if first.bias is not None:
            dst.b1.copy_(first.bias.expand_as(dst.b1))
            dst.b2.copy_(second.bias.expand_as(dst.b2))
    dst.norm.load_state_dict(src.norm.state_dict())


def widen(dst: nn.Module, src: nn.Module) -> None:
    """Start a feed-forward block M times as wide as a trained one as M copies of it, each writing 1/M of the output.

    The wide block then computes exactly what the trained one does, the iso-parameter counterpart of ``upcycle``.
    Any element-wise activation allows it; SwiGLU's gate and up rows are repeated each within their own half.
    """
    (a, b, act, _), (a_src, b_src, _, _) = ffl_parts(dst), ffl_parts(src)
    copies = a.out_features // a_src.out_features
    parts = 2 if act == "swiglu" else 1
    hidden = a_src.out_features // parts
    with torch.no_grad():
        a.weight.copy_(a_src.weight.view(parts, hidden, -1).repeat(1, copies, 1).reshape(-1, a.in_features))
        b.weight.copy_(b_src.weight.repeat(1, copies) / copies)
        if a_src.bias is not None:
            a.bias.copy_(a_src.bias.view(parts, hidden).repeat(1, copies).reshape(-1))
            b.bias.copy_(b_src.bias)
    dst.norm.load_state_dict(src.norm.state_dict())


def narrow(dst: nn.Module, src: nn.Module, order: UnitOrder) -> None:
    """Start a feed-forward block of fewer hidden units than a trained one from that one's most important units.

    The units kept stay in source order, so keeping every unit reproduces the source exactly. SwiGLU keeps a unit's
    gate row and up row together (its first layer stacks the gates, then the ups).
    """
    (a, b, act, _), (a_src, b_src, _, _) = ffl_parts(dst), ffl_parts(src)
    hidden = b_src.in_features
    kept = torch.tensor(sorted(unit for unit, _ in order[: b.in_features]), device=a_src.weight.device)
    rows = torch.cat([kept + part * hidden for part in range(2 if act == "swiglu" else 1)])
    with torch.no_grad():
        a.weight.copy_(a_src.weight[rows])
        b.weight.copy_(b_src.weight[:, kept])
        if a_src.bias is not None:
            a.bias.copy_(a_src.bias[rows])
            b.bias.copy_(b_src.bias)
    dst.norm.load_state_dict(src.norm.state_dict())


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def _widens(dst: nn.Module, src: nn.Module) -> bool:
    """Whether ``dst`` is a feed-forward block of ``src``'s kind, a whole number of times as wide."""
    d, s = ffl_parts(dst), ffl_parts(src)
    return (
        d is not None
        and s is not None
        and type(dst) is type(src)
        and d[2] == s[2]
        and d[0].in_features == s[0].in_features
        and d[0].out_features % s[0].out_features == 0
    )


def _narrows(dst: nn.Module, src: nn.Module) -> bool:
    """Whether ``dst`` is a feed-forward block of ``src``'s kind with fewer hidden units."""
    d, s = ffl_parts(dst), ffl_parts(src)
    return (
        d is not None
        and s is not None
        and type(dst) is type(src)
        and d[2] == s[2]
        and d[0].in_features == s[0].in_features
        and d[0].out_features < s[0].out_features
    )


def _upcycles(dst: nn.Module, src: nn.Module) -> bool:
    """Whether the MoE block ``dst`` has experts of the feed-forward block ``src``'s shape, activation and norm."""
    s = ffl_parts(src)
    return (
        s is not None
        and hasattr(dst, "w1")
        and dst.w1.shape[1:] == s[0].weight.shape
        and (dst.activation, dst.pre_norm) == (s[2], s[3])
        and type(dst.norm) is type(src.norm)
    )


def transfer(dst: nn.Module, dst_spec: BlockSpec, src: nn.Module, src_spec: BlockSpec, order: UnitOrder) -> bool:
    """Fill ``dst`` from the trained ``src`` where one can start as the other; returns whether it did.

    ``order``: ``src``'s heads or hidden units most important first, with their importance (see ``unit_order``).
    """
    if dst_spec == src_spec and type(dst) is type(src) and _same_shapes(dst, src):
        dst.load_state_dict(src.state_dict())
    elif dst_spec.kind == src_spec.kind == "attn" and type(dst) is type(src):
        return dst.inherit_heads(src, order)
    elif dst_spec.kind == src_spec.kind == "ffl" and _widens(dst, src):
        widen(dst, src)
    elif dst_spec.kind == src_spec.kind == "ffl" and _narrows(dst, src):
        narrow(dst, src, order)
    elif dst_spec.kind == "moe" and src_spec.kind == "ffl" and _upcycles(dst, src):
        upcycle(dst, src)
    else:
        return False
    return True


def hidden_units(block: nn.Module) -> int:
    """A feed-forward block's hidden units (0 for any other block)."""
    parts = ffl_parts(block)
    return 0 if parts is None else parts[1].in_features


def unit_order(ranking: Ranking, position: int, block: nn.Module) -> UnitOrder:
    """The heads of an attention ``block`` at ``position``, or the hidden units of a feed-forward one, most important
    first ([] for other blocks); without a ranking there, in order, all of importance 0 (so a reduced block keeps
    the first ones)."""
    units = hidden_units(block) or block.n_head
    if not units:
        return []
    return list(ranking[position]) if position in ranking else [(u, 0.0) for u in range(units)]


def copy_outside_blocks(dst: nn.Module, src: nn.Module, what: str = "the source") -> None:
    """Copy every tensor of ``src``'s state dict that is not a block's (embedding, positions, final norm, output
    layer and bias, whatever the backbone has) into ``dst``, which must hold the same ones in the same shapes."""
    ours = {k: v for k, v in dst.state_dict().items() if not k.startswith("blocks.")}
    theirs = {k: v for k, v in src.state_dict().items() if not k.startswith("blocks.")}
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        raise PlanerError(f"{what} differs outside its blocks (embedding, positions, output layer) from this model")
    with torch.no_grad():
        for k, v in ours.items():
            v.copy_(theirs[k])


def _check_matching(cfg: ModelConfig, source_cfg: ModelConfig) -> None:
    for key in MATCHING:
        if getattr(cfg, key) != getattr(source_cfg, key):
            raise PlanerError(
                f"cannot inherit from a model with {key} {getattr(source_cfg, key)} into one with {getattr(cfg, key)}"
            )


def inherit(source: nn.Module, arch: Arch, ranking: Ranking, cfg: ModelConfig | None = None) -> nn.Module:
    """A model of ``arch`` (built with ``cfg``, by default the source's) started from a trained model of the same
    backbone, width and length: at every position the block inherited from the source's (see ``transfer``),
    everything outside the blocks copied. Anything that cannot be inherited is refused, since a silently random
    block would make the start look better than it is.
    """
    cfg = cfg or source.cfg
    _check_matching(cfg, source.cfg)
    if len(arch) != len(source.blocks):
        raise PlanerError(f"cannot inherit {len(arch)} blocks from a model of {len(source.blocks)}")
    model = build_model(cfg, arch).to(source.embed.weight.device)
    copy_outside_blocks(model, source)
    for position, (spec, block, src_spec, src) in enumerate(zip(arch, model.blocks, source.arch, source.blocks)):
        if spec.kind != "skip" and not transfer(block, spec, src, src_spec, unit_order(ranking, position, src)):
            raise PlanerError(f"block {position} ({spec}) cannot be inherited from the source's {src_spec}")
    return model


def from_supernet(net: SuperNet, arch: Arch, cfg: ModelConfig | None = None) -> nn.Module:
    """The standalone model of ``arch`` with the weights the supernet's options at each position were trained to.

    ``net`` holds a search's supernet.safetensors and has ``arch``'s length; every block
    of ``arch`` must be one of the options at its position. ``cfg`` may differ from the supernet's in anything
    that leaves the shapes alone (dropout, lengths).
    """
    cfg = cfg or net.cfg
    if len(arch) != len(net.blocks):
        raise PlanerError(f"the architecture has {len(arch)} blocks, the supernet {len(net.blocks)}")
    model = build_model(cfg, arch).to(net.model.embed.weight.device)
    copy_outside_blocks(model, net.model, "the supernet")
    for position, (spec, block, option) in enumerate(zip(arch, model.blocks, net.blocks)):
        if spec not in option.options:
            raise PlanerError(f"block {position} ({spec}) is not among the supernet's options {net.space}")
        candidate = option.candidates[option.options.index(spec)]
        if not _same_shapes(block, candidate):
            raise PlanerError(f"block {position} ({spec}) does not match the supernet's option in shape")
        block.load_state_dict(candidate.state_dict())
    return model


def can_inherit(source: nn.Module, arch: Arch, cfg: ModelConfig | None = None) -> bool:
    """Whether ``inherit`` can start ``arch`` from ``source``: every block but a skip takes the source's block at
    its position (tried on a throwaway model, so the rule is ``transfer``'s own)."""
    cfg = cfg or source.cfg
    if len(arch) != len(source.blocks) or any(getattr(cfg, k) != getattr(source.cfg, k) for k in MATCHING):
        return False
    with torch.random.fork_rng(devices=[]):
        trial = build_model(cfg, arch)
    return all(
        spec.kind == "skip" or transfer(block, spec, src, src_spec, unit_order({}, i, src))
        for i, (spec, block, src_spec, src) in enumerate(zip(arch, trial.blocks, source.arch, source.blocks))
    )
