"""Named architectures to compare PLANER against (paper §3.1), all with the baseline's number of blocks.

- ``baseline``: ``attn:H ffl`` repeated n_layer times.
- ``sandwich:K``: Sandwich Transformer ordering s^K (sf)^(n-K) f^K (Press et al.): K attention blocks first, K
  feed-forward blocks last, the same blocks as the baseline reordered.
- ``par``: a PAR Transformer ordering (Mandava et al.): attention only in the lower two thirds, evenly spaced,
  about one attention block in five, feed-forward everywhere else.
- the iso-parameter search space: every MoE option replaced by a dense feed-forward block with as many
  parameters (E x d_inner hidden units), which tells whether PLANER's gain comes from sparsity or from capacity.
- the matched-latency rivals of a found model (``rivals``): the dense ones (``dense``), the Transformer-XLs a
  user would shrink by hand to the found model's latency, with fewer layers, fewer heads everywhere, or a narrower
  d_model; and the pruned ones (``prune``), the trained baseline with the blocks two layer-pruning methods measure
  as least useful on a calibration sample replaced by ``skip``: whole layers of least block influence (ShortGPT,
  ``drop-layers``) or attention and feed-forward blocks one at a time, greedily (FinerCut, ``drop-sublayers``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from planer.config import Config, ModelConfig, validate_backbone
from planer.errors import PlanerError
from planer.evaluation.importance import Sample
from planer.evaluation.pruning import block_influence, removal_order
from planer.latency.table import DTYPES, LatencyTable, latency_device, measure_models, private_rng
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_model


def sandwich(n_layer: int, n_head: int, k: int) -> Arch:
    if not 0 <= k <= n_layer:
        raise PlanerError(f"sandwich:K needs 0 <= K <= n_layer ({n_layer}), got {k}")
    s, f = BlockSpec("attn", heads=n_head), BlockSpec("ffl")
    return Arch((s,) * k + (s, f) * (n_layer - k) + (f,) * k)


def sandwich_sweep(n_layer: int) -> list[int]:
    """The K values ``sandwich`` chooses among on the valid split: 1 .. n_layer/3 (1 and 2 at least).

    K = n_layer - 1 orders the blocks exactly as K = n_layer does, so K stops below n_layer.
    """
    return list(range(1, max(1, min(n_layer - 1, max(2, n_layer // 3))) + 1))


def par(n_layer: int, n_head: int) -> Arch:
    blocks = 2 * n_layer
    n_attn = max(1, round(blocks / 5))
    lower = max(n_attn, (2 * blocks) // 3)
    attn_at = {round(i * lower / n_attn) for i in range(n_attn)}
    return Arch(tuple(BlockSpec("attn", heads=n_head) if i in attn_at else BlockSpec("ffl") for i in range(blocks)))


def named_arch(name: str, cfg: ModelConfig) -> Arch | None:
    """The named design, or None when ``name`` names none (it is then a list of block specs)."""
    if name == "baseline":
        return Arch.baseline(cfg.n_layer, cfg.n_head)
    if name == "par":
        return par(cfg.n_layer, cfg.n_head)
    if name.startswith("sandwich:"):
        try:
            k = int(name.split(":", 1)[1])
        except ValueError:
            raise PlanerError(f"sandwich:K needs an integer K, got '{name}'") from None
        return sandwich(cfg.n_layer, cfg.n_head, k)
    return None


def iso_space(space: list[str], n_experts: int) -> list[str]:
    """``space`` with every MoE option replaced by ``ffl:xE`` (E its expert count), each option once."""
    out: list[str] = []
    for text in space:
        spec = BlockSpec.parse(text)
        if spec.kind == "moe":
            spec = BlockSpec("ffl", width=spec.experts or n_experts)
        if str(spec) not in out:
            out.append(str(spec))
    return out


def iso_config(cfg: Config) -> Config:
    """``cfg`` searching its iso-parameter space (``iso_space``): a copy."""
    space = iso_space(cfg.search.space, cfg.model.n_experts)
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, space=space))


RIVAL_TOLERANCE = 0.05  # a rival matches the found model when its latency is within this fraction of it


@dataclass(frozen=True)
class Rival:
    """A model sized to a found model's latency: its arch (always 2 x n_layer blocks, unused ones ``skip``), the
    model config it changes (``{}`` at the baseline's width), its latency over the found model's, whether that is
    within ``RIVAL_TOLERANCE``, how it was sized (``table`` or ``measured``), and what a pruned rival measured on
    the calibration sample to choose its blocks (``{}`` for the dense rivals)."""

    name: str
    arch: Arch
    model: dict
    ratio: float
    within: bool
    sized_by: str
    measured: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        note = "" if self.within else f"no size on this axis lands within {RIVAL_TOLERANCE:.0%}; the closest"
        return {**dataclasses.asdict(self), "arch": self.arch.specs(), "note": note}


def dense(n_layer: int, heads: int, layers: int) -> Arch:
    """``attn:heads ffl`` for ``layers`` layers, then ``skip`` up to 2 x n_layer blocks (a skip costs nothing)."""
    layer = (BlockSpec("attn", heads=heads), BlockSpec("ffl"))
    return Arch(layer * layers + (BlockSpec("skip"),) * (2 * (n_layer - layers)))


def closest(name: str, candidates: list[tuple[Arch, dict, float]], sized_by: str) -> Rival:
    """The candidate (arch, model changes, latency ratio) nearest a ratio of 1; the first of equals."""
    arch, model, ratio = min(candidates, key=lambda c: abs(c[2] - 1.0))
    return Rival(name, arch, model, ratio, abs(ratio - 1.0) <= RIVAL_TOLERANCE, sized_by)


def depth_rival(found_ms: float, table: LatencyTable, cfg: ModelConfig) -> Rival:
    """``dense-depth``: the baseline's layers, fewer of them; more layers first among equals."""
    archs = [dense(cfg.n_layer, cfg.n_head, k) for k in range(cfg.n_layer, 0, -1)]
    return closest("dense-depth", [(a, {}, table.estimate(a) / found_ms) for a in archs], "table")


def heads_rival(found_ms: float, table: LatencyTable, cfg: ModelConfig) -> Rival:
    """``dense-heads``: the same number of heads h < n_head in every attention block (any ``attn:h`` the table
    holds), all layers kept when some h alone lands within the tolerance, fewer layers too when none does. The
    baseline's own heads are left out: with fewer layers they are ``dense-depth``, a rival already trained."""
    heads = sorted(
        {BlockSpec.parse(s).heads for s in table.blocks if s.startswith("attn:")} - {cfg.n_head}, reverse=True
    )
    full = [(a, {}, table.estimate(a) / found_ms) for a in (dense(cfg.n_layer, h, cfg.n_layer) for h in heads)]
    rival = closest("dense-heads", full, "table")
    if rival.within:
        return rival
    archs = [dense(cfg.n_layer, h, k) for k in range(cfg.n_layer, 0, -1) for h in heads]
    return closest("dense-heads", [(a, {}, table.estimate(a) / found_ms) for a in archs], "table")


def narrower(cfg: ModelConfig, d_model: int) -> dict:
    """The model changes of a ``d_model``-wide version of ``cfg``: d_inner in proportion, the same heads."""
    return {"d_model": d_model, "d_inner": max(1, round(cfg.d_inner * d_model / cfg.d_model))}


def buildable(cfg: ModelConfig, d_model: int) -> bool:
    """Whether the backbone allows ``cfg`` at ``d_model`` (rotary positions, for one, need an even head size)."""
    try:
        validate_backbone(dataclasses.replace(cfg, **narrower(cfg, d_model)))
    except PlanerError:
        return False
    return True


def measured_ms(cfg: Config) -> Callable[[dict], dict[str, float]]:
    """Median milliseconds of models timed side by side, as ``latency.measure_models`` times them."""
    lc = cfg.latency

    def measure(models: dict) -> dict[str, float]:
        device, dtype = latency_device(lc), DTYPES[lc.dtype]
        models = {name: m.to(device=device, dtype=dtype) for name, m in models.items()}
        return {name: s["median"] for name, s in measure_models(models, lc.batch_size, lc).items()}

    return measure


def width_rival(found: Arch, cfg: Config, measure: Callable[[dict], dict[str, float]] | None = None) -> Rival:
    """``dense-width``: the baseline at a narrower d_model (a multiple of n_head, and even for the sinusoids; one the
    backbone can build), d_inner in proportion; at most 16 widths from d_model / 4 up, evenly spaced.

    The table holds blocks at the baseline's width only. Rather than profile a table at every candidate width (a
    profile per width, and tables taken minutes apart, which drift by up to 30% on a shared CPU), every
    candidate is timed end to end in the same rounds as the found model itself (random weights, the latency
    config's batch, threads and repeats): one measurement, and the ratio compares like with like. ``measure``
    replaces that timing (tests): models by name -> milliseconds.
    """
    m = cfg.model
    step = math.lcm(m.n_head, 2)
    widths = [w for w in range(step * max(1, m.d_model // (4 * step)), m.d_model, step) if buildable(m, w)]
    widths = widths[:: max(1, math.ceil(len(widths) / 16))]
    if not widths:
        raise PlanerError(
            f"d_model {m.d_model} has no narrower width that {m.n_head} heads divide and the backbone builds"
        )
    with private_rng(torch.device("cpu")):
        models = {"found": build_model(m, found)}
        for w in widths:
            models[f"d{w}"] = build_model(
                dataclasses.replace(m, **narrower(m, w)), dense(m.n_layer, m.n_head, m.n_layer)
            )
    ms = (measure or measured_ms(cfg))(models)
    candidates = [(models[f"d{w}"].arch, narrower(m, w), ms[f"d{w}"] / ms["found"]) for w in reversed(widths)]
    return closest("dense-width", candidates, "measured")


@dataclass(frozen=True)
class Calibration:
    """What the pruned rivals measure: the trained baseline (its arch is where they start, its blocks what they
    keep) and the calibration sample (``importance.calibration_sample``)."""

    model: nn.Module
    sample: Sample


def without(arch: Arch, positions: list[int]) -> Arch:
    """``arch`` with the blocks at ``positions`` replaced by ``skip``."""
    return Arch(tuple(BlockSpec("skip") if p in positions else b for p, b in enumerate(arch)))


def drop_layers_rival(found_ms: float, table: LatencyTable, calibration: Calibration) -> Rival:
    """``drop-layers`` (ShortGPT): the baseline without its k layers of least block influence (both of a layer's
    positions ``skip``), k sized to the latency, at least one layer kept; fewer dropped first among equals.

    Its record holds every layer's block influence and the order they are dropped in (least influence first, the
    lower layer first among equals)."""
    influence = block_influence(calibration.model, calibration.sample)
    order = sorted(range(len(influence)), key=lambda i: (influence[i], i))
    base = calibration.model.arch
    archs = [without(base, [p for i in order[:k] for p in (2 * i, 2 * i + 1)]) for k in range(len(order))]
    rival = closest("drop-layers", [(a, {}, table.estimate(a) / found_ms) for a in archs], "table")
    return dataclasses.replace(rival, measured={"block_influence": influence, "drop_order": order})


def drop_sublayers_rival(found_ms: float, table: LatencyTable, calibration: Calibration) -> Rival:
    """``drop-sublayers`` (FinerCut): the baseline without the first blocks of its greedy removal order
    (``pruning.removal_order``), as many as bring the table's estimate closest to the found model's. The order
    runs until the estimate reaches the found model's, so the last two prefixes hold the closest; fewer removals
    first among equals.

    Its record holds every removal: the position, its block, the output change after it (1 - mean cosine of the
    final hidden state against the baseline's) and the latency ratio after it; ``taken``: how many the rival has."""
    model, base = calibration.model, calibration.model.arch
    order = removal_order(model, calibration.sample, lambda removed: table.estimate(without(base, removed)) <= found_ms)
    archs = [without(base, [r.position for r in order[:k]]) for k in range(len(order) + 1)]
    ratios = [table.estimate(a) / found_ms for a in archs]
    rival = closest("drop-sublayers", [(a, {}, r) for a, r in zip(archs, ratios)], "table")
    removals = [
        {"position": r.position, "block": str(base.blocks[r.position]), "change": r.change, "ratio": ratio}
        for r, ratio in zip(order, ratios[1:])
    ]
    return dataclasses.replace(rival, measured={"removals": removals, "taken": archs.index(rival.arch)})


def uniform_width_rival(found_ms: float, table: LatencyTable, cfg: ModelConfig) -> Rival:
    """``uniform-width`` (Minitron's width pruning): every layer kept, every feed-forward block narrowed alike to
    one width the table holds and every attention block keeping the same heads, the pair whose estimate is
    nearest the found model's; the most heads, then the widest, first among equals. Phase 2 starts it from the
    baseline's most important units and heads, as it starts the found model."""
    ffl = [BlockSpec.parse(s) for s in table.blocks if s.startswith("ffl")]
    widths = sorted({spec.neurons for spec in ffl if 0 < spec.neurons < cfg.d_inner}, reverse=True)
    if not widths:
        raise PlanerError(
            "the uniform-width rival narrows feed-forward blocks to widths the latency table holds: add ffl:N "
            "options to search.space"
        )
    heads = sorted({BlockSpec.parse(s).heads for s in table.blocks if s.startswith("attn:")}, reverse=True)
    layers = [(BlockSpec("attn", heads=h), BlockSpec("ffl", neurons=n)) for h in heads for n in widths]
    archs = [Arch(layer * cfg.n_layer) for layer in layers]
    return closest("uniform-width", [(a, {}, table.estimate(a) / found_ms) for a in archs], "table")


DENSE_RIVALS = ("dense-depth", "dense-heads", "dense-width")
PRUNE_RIVALS = ("drop-layers", "drop-sublayers")
WIDTH_RIVALS = ("uniform-width",)  # asked for by name: the search space must offer narrowed feed-forward blocks
RIVALS = (*DENSE_RIVALS, *PRUNE_RIVALS, *WIDTH_RIVALS)
RIVAL_GROUPS = {"dense": DENSE_RIVALS, "prune": PRUNE_RIVALS}  # the names that ask for a group of rivals


def rivals(
    found: Arch,
    table: LatencyTable,
    cfg: Config,
    names: tuple[str, ...] = DENSE_RIVALS,
    measure: Callable | None = None,
    calibration: Calibration | None = None,
) -> list[Rival]:
    """The rivals ``names`` of a found arch, each sized to its latency (see their sizers); the pruned ones
    (``PRUNE_RIVALS``) measure the baseline on ``calibration``."""
    found_ms = table.estimate(found)
    if calibration is None and set(names) & set(PRUNE_RIVALS):
        raise PlanerError(f"the rivals {', '.join(PRUNE_RIVALS)} need the trained baseline and a calibration sample")
    sizers = {
        "dense-depth": lambda: depth_rival(found_ms, table, cfg.model),
        "dense-heads": lambda: heads_rival(found_ms, table, cfg.model),
        "dense-width": lambda: width_rival(found, cfg, measure),
        "drop-layers": lambda: drop_layers_rival(found_ms, table, calibration),
        "drop-sublayers": lambda: drop_sublayers_rival(found_ms, table, calibration),
        "uniform-width": lambda: uniform_width_rival(found_ms, table, cfg.model),
    }
    return [sizers[name]() for name in names]
