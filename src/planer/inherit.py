"""Weight inheritance: start a block, a whole architecture, or a supernet's options from trained weights.

A block starts from a trained block at the same position when one can become the other without losing what it
learnt: the same spec is copied; ``attn:h`` keeps the h most important heads of an ``attn:H`` (H >= h, see
importance.py); a wider feed-forward block is copies of a narrower one (``widen``); a mixture of experts is
experts that are copies of a feed-forward block (``upcycle``). ``skip`` has nothing to inherit. Phase 1's warm start,
phase 2's ``--init-from`` and the knapsack search's option measurements all go through ``transfer``, so the
three start from the same weights.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from planer.arch import Arch, BlockSpec
from planer.blocks import FeedForward, RelAttention
from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.importance import Ranking
from planer.model import TransformerXL

if TYPE_CHECKING:
    from planer.supernet import SuperNet


def copy_heads(dst: RelAttention, src: RelAttention, heads: list[int]) -> None:
    """Give an attention block with h heads the listed h heads of a trained one (queries, keys, values, relative
    positions, output columns, both position biases) and its LayerNorm."""
    H, Dh, D = src.n_head, src.d_head, src.out.out_features
    if len(heads) != dst.n_head or dst.d_head != Dh or not all(0 <= h < H for h in heads):
        raise PlanerError(f"cannot give {dst.n_head} heads of {dst.d_head} dims the heads {heads} of {H} x {Dh}")
    idx = torch.tensor(heads, device=src.out.weight.device)
    with torch.no_grad():
        dst.qkv.weight.copy_(src.qkv.weight.view(3, H, Dh, D)[:, idx].reshape(-1, D))  # (3 * h * Dh, D)
        dst.r_net.weight.copy_(src.r_net.weight.view(H, Dh, D)[idx].reshape(-1, D))  # (h * Dh, D)
        dst.out.weight.copy_(src.out.weight.view(D, H, Dh)[:, idx].reshape(D, -1))  # (D, h * Dh)
        dst.r_w_bias.copy_(src.r_w_bias[idx])  # (h, Dh)
        dst.r_r_bias.copy_(src.r_r_bias[idx])
    dst.norm.load_state_dict(src.norm.state_dict())


def upcycle(dst: nn.Module, src: FeedForward) -> None:
    """Start every expert of an MoE block as a copy of a trained feed-forward block (the router stays as it is).

    With top-2 routing the block then computes exactly what the feed-forward block does (the two gates sum to 1);
    with top-1 its output is scaled by the winning gate.
    """
    with torch.no_grad():
        dst.w1.copy_(src.fc1.weight.expand_as(dst.w1))
        dst.b1.copy_(src.fc1.bias.expand_as(dst.b1))
        dst.w2.copy_(src.fc2.weight.expand_as(dst.w2))
        dst.b2.copy_(src.fc2.bias.expand_as(dst.b2))
    dst.norm.load_state_dict(src.norm.state_dict())


def widen(dst: FeedForward, src: FeedForward) -> None:
    """Start a feed-forward block M times as wide as a trained one as M copies of it, each writing 1/M of the output.

    The wide block then computes exactly what the trained one does, the iso-parameter counterpart of ``upcycle``.
    """
    copies = dst.fc1.out_features // src.fc1.out_features
    with torch.no_grad():
        dst.fc1.weight.copy_(src.fc1.weight.repeat(copies, 1))
        dst.fc1.bias.copy_(src.fc1.bias.repeat(copies))
        dst.fc2.weight.copy_(src.fc2.weight.repeat(1, copies) / copies)
        dst.fc2.bias.copy_(src.fc2.bias)
    dst.norm.load_state_dict(src.norm.state_dict())


def _same_shapes(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape for k in sa)


def transfer(dst: nn.Module, dst_spec: BlockSpec, src: nn.Module, src_spec: BlockSpec, heads: list[int]) -> bool:
    """Fill ``dst`` from the trained ``src`` where one can start as the other; returns whether it did.

    ``heads`` are ``src``'s heads most important first (attention only); ``attn:h`` keeps the first h of them.
    """
    if dst_spec == src_spec and _same_shapes(dst, src):
        dst.load_state_dict(src.state_dict())
    elif dst_spec.kind == src_spec.kind == "attn" and dst.n_head <= src.n_head and dst.d_head == src.d_head:
        copy_heads(dst, src, sorted(heads[: dst.n_head]))
    elif (
        dst_spec.kind == src_spec.kind == "ffl"
        and dst.fc1.in_features == src.fc1.in_features
        and dst.fc1.out_features % src.fc1.out_features == 0
    ):
        widen(dst, src)
    elif dst_spec.kind == "moe" and src_spec.kind == "ffl" and dst.w1.shape[1:] == src.fc1.weight.shape:
        upcycle(dst, src)
    else:
        return False
    return True


def head_order(ranking: Ranking, position: int, block: nn.Module) -> list[int]:
    """The heads of an attention ``block`` at ``position`` most important first ([] for other blocks)."""
    if not isinstance(block, RelAttention):
        return []
    return [h for h, _ in ranking[position]] if position in ranking else list(range(block.n_head))


def inherit(source: TransformerXL, arch: Arch, ranking: Ranking, cfg: ModelConfig | None = None) -> TransformerXL:
    """A model of ``arch`` (built with ``cfg``, by default the source's) started from a trained model of the same
    width and length: at every position the block inherited from the source's (see ``transfer``), the embedding
    and output bias copied. Anything that cannot be inherited is refused, since a silently random block would
    make the start look better than it is.
    """
    cfg = cfg or source.cfg
    for key in ("d_model", "d_head", "vocab_size"):
        if getattr(cfg, key) != getattr(source.cfg, key):
            raise PlanerError(
                f"cannot inherit from a model with {key} {getattr(source.cfg, key)} into one with {getattr(cfg, key)}"
            )
    if len(arch) != len(source.blocks):
        raise PlanerError(f"cannot inherit {len(arch)} blocks from a model of {len(source.blocks)}")
    model = TransformerXL(cfg, arch).to(source.embed.weight.device)
    model.embed.load_state_dict(source.embed.state_dict())
    with torch.no_grad():
        model.out_bias.copy_(source.out_bias)
    for position, (spec, block, src_spec, src) in enumerate(zip(arch, model.blocks, source.arch, source.blocks)):
        if spec.kind != "skip" and not transfer(block, spec, src, src_spec, head_order(ranking, position, src)):
            raise PlanerError(f"block {position} ({spec}) cannot be inherited from the source's {src_spec}")
    return model


def from_supernet(net: SuperNet, arch: Arch, cfg: ModelConfig | None = None) -> TransformerXL:
    """The standalone model of ``arch`` with the weights the supernet's options at each position were trained to.

    ``net`` holds a search's supernet.safetensors and has ``arch``'s length; every block
    of ``arch`` must be one of the options at its position. ``cfg`` may differ from the supernet's in anything
    that leaves the shapes alone (dropout, lengths).
    """
    cfg = cfg or net.cfg
    if len(arch) != len(net.blocks):
        raise PlanerError(f"the architecture has {len(arch)} blocks, the supernet {len(net.blocks)}")
    model = TransformerXL(cfg, arch).to(net.embed.weight.device)
    model.embed.load_state_dict(net.embed.state_dict())
    with torch.no_grad():
        model.out_bias.copy_(net.out_bias)
    for position, (spec, block, option) in enumerate(zip(arch, model.blocks, net.blocks)):
        if spec not in option.options:
            raise PlanerError(f"block {position} ({spec}) is not among the supernet's options {net.space}")
        candidate = option.candidates[option.options.index(spec)]
        if not _same_shapes(block, candidate):
            raise PlanerError(f"block {position} ({spec}) does not match the supernet's option in shape")
        block.load_state_dict(candidate.state_dict())
    return model


def can_inherit(source: TransformerXL, arch: Arch, cfg: ModelConfig | None = None) -> bool:
    """Whether ``inherit`` can start ``arch`` from ``source``: every block but a skip takes the source's block at
    its position (tried on a throwaway model, so the rule is ``transfer``'s own)."""
    cfg = cfg or source.cfg
    if len(arch) != len(source.blocks) or any(getattr(cfg, k) != getattr(source.cfg, k) for k in ("d_model", "d_head")):
        return False
    with torch.random.fork_rng(devices=[]):
        trial = TransformerXL(cfg, arch)
    return all(
        spec.kind == "skip" or transfer(block, spec, src, src_spec, head_order({}, i, src))
        for i, (spec, block, src_spec, src) in enumerate(zip(arch, trial.blocks, source.arch, source.blocks))
    )
