"""The knapsack search: choose blocks by what each costs the trained baseline alone, without training a supernet.

Every option of the search space is swapped alone into the trained baseline at every position, started from the
baseline block there (``planer.training.inherit.transfer``: attention keeps its most important heads, MoE experts are
upcycled from the feed-forward block, a wider FFL is copies of it), and its loss increase over the baseline is
measured on a fixed sample of training segments. An option that cannot start from the block at its position (a
feed-forward block where the baseline has attention) is left out there, unless local distillation is on: then it
starts from random weights (or inherited ones) and first learns, for a few steps, to reproduce the baseline
block's output at that position (mean squared error on training segments, as Puzzle builds its block library).

The architecture is then the combination, one option per position, with the smallest sum of increases whose
latency-table estimate is at most ``target`` x the baseline's: a multiple-choice knapsack, solved exactly. On the
default config this pick (53 s) beat the Gumbel search (9.5 min) and, retrained, the matched-latency dense rival.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from planer.errors import PlanerError
from planer.evaluation.importance import (
    Ranking,
    Recorded,
    Sample,
    rank_heads,
    rank_units,
    record_blocks,
    replaying,
    sample_loss,
)
from planer.io.records import Estimate, KnapsackDetails, LimitEstimate, Position, Record, SearchRecord
from planer.latency.table import LatencyTable
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_block
from planer.training.inherit import transfer, unit_order


@dataclass(frozen=True)
class Budget:
    """A second latency budget the pick must also keep: ``costs[p][i]`` is option i at position p at another batch
    size (its own latency table), ``budget`` what the blocks may cost there together."""

    costs: list[list[float]]
    budget: float


@dataclass(frozen=True)
class LatencyLimit:
    """The pick's estimate at another batch size (``table`` is profiled there) stays within ``target`` x the
    baseline's there: a user who deploys at batch 8 but also serves batch 1 wants it fast at both."""

    batch: int
    target: float
    table: LatencyTable

    def estimate(self, arch: Arch, baseline: Arch) -> LimitEstimate:
        estimate = Estimate.of(self.table, arch, self.table.estimate(baseline), self.target)
        return LimitEstimate(batch=self.batch, estimate=estimate)

    def budget(self, options: list[str], baseline: Arch) -> tuple[list[float], float]:
        """Every option's latency at this batch, and what the blocks may cost there together."""
        table = self.table
        return [table.latency(o) for o in options], self.target * table.estimate(baseline) - table.fixed_ms


@dataclass(frozen=True)
class LocalDistill:
    """Train each option ``steps`` Adam steps (``lr``) to reproduce the baseline block's output at its position,
    on the segments of ``sample`` (better other segments than the ones losses are measured on)."""

    sample: Sample
    steps: int = 50
    lr: float = 1e-3


def capture_io(model: nn.Module, sample: Sample) -> list[list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]]:
    """Per position, (input, memory, output) of the model's block for every segment of ``sample``, in order.

    The memory is what an attention option at that position would hold (the hidden states that entered the
    position in earlier segments), whether or not the baseline block there keeps one.
    """
    io = []
    for calls in record_blocks(model, sample)[1]:
        mem, rows = None, []
        for x, y in calls:
            rows.append((x, mem, y))
            if sample.mem_len:
                mem = (x if mem is None else torch.cat([mem, x], dim=1))[:, -sample.mem_len :]
        io.append(rows)
    return io


def distill_block(block: nn.Module, io: list[tuple], distill: LocalDistill) -> None:
    """Fit ``block`` to the recorded outputs (MSE), in eval mode so that no dropout makes the result random."""
    params = [p for p in block.parameters() if p.requires_grad]
    if not params:
        return
    opt = torch.optim.Adam(params, lr=distill.lr)
    block.eval()
    with torch.enable_grad():
        for step in range(distill.steps):
            x, mem, y = io[step % len(io)]
            loss = F.mse_loss(block(x, mem), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def option_block(spec: BlockSpec, baseline: nn.Module, position: int, ranking: Ranking, random_ok: bool):
    """The block ``spec`` started from the baseline's block at ``position``; None when it cannot start from it
    and random weights are not wanted. Random weights come from a seed of their own: the result is repeatable."""
    src, src_spec = baseline.blocks[position], baseline.arch.blocks[position]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(position)
        block = build_block(spec, baseline.cfg)
    block = block.to(device=baseline.embed.weight.device, dtype=baseline.embed.weight.dtype)
    if spec.kind == "skip" or transfer(block, spec, src, src_spec, unit_order(ranking, position, src)) or random_ok:
        return block
    return None


def swapped_loss(model: nn.Module, position: int, block: nn.Module, sample: Sample) -> float:
    """The sample loss of ``model`` with ``block`` in place of its block at ``position`` (put back after)."""
    saved = model.blocks[position]
    model.blocks[position] = block
    try:
        return sample_loss(model, sample)
    finally:
        model.blocks[position] = saved


def option_increases(
    baseline: nn.Module,
    space: list[str],
    sample: Sample,
    ranking: Ranking,
    distill: LocalDistill | None = None,
    recorded: tuple[float, Recorded] | None = None,
    bar: tqdm | None = None,
) -> tuple[float, list[list[float | None]]]:
    """The baseline's sample loss, and per position the loss increase of each option of ``space`` swapped in
    alone (None for one that cannot start from the baseline block there). The baseline's own block costs 0.

    ``recorded``: ``record_blocks`` of the baseline on the sample, when the caller has it (the blocks before a
    position are replayed from it, not run); ``bar`` advances by one per option and position."""
    options = [BlockSpec.parse(s) for s in space]
    base, blocks = recorded or record_blocks(baseline, sample)
    io = capture_io(baseline, distill.sample) if distill else None
    rows = []
    for position, src_spec in enumerate(baseline.arch):
        row: list[float | None] = []
        with replaying(baseline, position, blocks):
            for spec in options:
                row.append(
                    0.0
                    if spec == src_spec
                    else swap_increase(baseline, position, spec, sample, ranking, base, io, distill)
                )
                if bar is not None:
                    bar.update()
        rows.append(row)
    return base, rows


def swap_increase(
    baseline: nn.Module,
    position: int,
    spec: BlockSpec,
    sample: Sample,
    ranking: Ranking,
    base: float,
    io: list | None,
    distill: LocalDistill | None,
) -> float | None:
    """The loss increase of ``spec`` swapped alone into the baseline at ``position``, or None where it cannot start
    from the baseline block there (see ``option_block``)."""
    block = option_block(spec, baseline, position, ranking, random_ok=distill is not None)
    if block is None:
        return None
    if io is not None:
        distill_block(block, io[position], distill)
    return swapped_loss(baseline, position, block, sample) - base


def lower_hull(costs: list[float], losses: list[float]) -> list[tuple[float, float]]:
    """The lower convex hull of one position's (cost, loss) points, from the cheapest to the lowest-loss one."""
    hull: list[tuple[float, float]] = []
    for cost, loss in sorted(zip(costs, losses)):
        if hull and loss >= hull[-1][1]:
            continue  # dearer and no better: never on the hull
        while len(hull) >= 2:
            (c0, l0), (c1, l1) = hull[-2], hull[-1]
            if (c1 - c0) * (loss - l0) - (l1 - l0) * (cost - c0) > 0:
                break
            hull.pop()  # on or above the line from hull[-2] to this point
        hull.append((cost, loss))
    return hull


class Relaxation:
    """The linear relaxation of the knapsack over positions p.. (one fractional option allowed): a lower bound
    on their loss for any budget, exact for the relaxed problem (Sinha and Zoltners, 1979).

    Every position starts at its cheapest hull point; the hull's steps (more cost, less loss) of all positions,
    sorted by loss saved per unit of cost, are then bought greedily, the last one in part.
    """

    def __init__(self, costs: list[list[float]], losses: list[list[float]]):
        hulls = [lower_hull(c, l) for c, l in zip(costs, losses)]
        self.base: list[tuple[float, float]] = []
        self.steps: list[list[tuple[float, float]]] = []
        for p in range(len(hulls)):
            rest = hulls[p:]
            self.base.append((sum(h[0][0] for h in rest), sum(h[0][1] for h in rest)))
            steps = [(b[0] - a[0], b[1] - a[1]) for h in rest for a, b in zip(h, h[1:])]
            self.steps.append(sorted(steps, key=lambda s: s[1] / s[0]))
        self.base.append((0.0, 0.0))
        self.steps.append([])

    def bound(self, p: int, room: float) -> float:
        """The least loss positions p.. can have with at most ``room`` of cost (inf when they cannot fit)."""
        cost, loss = self.base[p]
        room -= cost
        if room < 0:
            return math.inf
        for dc, dl in self.steps[p]:
            if dc > room:
                return loss + dl * room / dc
            room -= dc
            loss += dl
        return loss


def cheapest(
    costs: list[list[float]],
    losses: list[list[float]],
    lo: float,
    hi: float,
    limits: Sequence[Budget] = (),
    exclude: Collection[tuple[int, ...]] = (),
) -> tuple[list[int], float, float] | None:
    """Exact multiple-choice knapsack: one option per position, ``lo <= sum of costs <= hi`` and every further
    limit's sum of costs at most its budget, the smallest sum of losses, none of the combinations in ``exclude``
    (which asks for the runner-ups). Returns (option index per position, total cost, total loss), or None when
    nothing fits.

    Branch and bound, depth first, options tried lowest loss first. A branch is cut when its loss plus a lower
    bound on the positions left cannot beat the best combination found (the linear relaxation under the budget
    left, see ``Relaxation``), or when no choice of the positions left brings its cost into [lo, hi] or a limit's
    cost under its budget. Nothing else is cut, so the result is the optimum: the relaxation ignores the limits,
    which can only lower the bound. A grid DP over discretised latency would round every block's cost, and could
    overrun the budget or miss the optimum by the accumulated rounding; here the table's own costs are added. The
    lower bound ``lo`` lets the same solver fill the budget (see ``select``). The relaxation is what keeps the
    paper's 24 and 32 positions fast: the bare sum of each position's least loss, blind to the budget, let the
    search run for minutes there.
    """
    n = len(costs)
    order = [sorted(range(len(c)), key=lambda i, p=p: (losses[p][i], costs[p][i])) for p, c in enumerate(costs)]
    max_cost = [0.0] * (n + 1)
    for p in range(n - 1, -1, -1):
        max_cost[p] = max_cost[p + 1] + max(costs[p])
    least = [[0.0] * (n + 1) for _ in limits]  # per limit: the least cost of positions p..
    for k, limit in enumerate(limits):
        for p in range(n - 1, -1, -1):
            least[k][p] = least[k][p + 1] + min(limit.costs[p])
    relaxed = Relaxation(costs, losses)
    slack = 1e-9 * (abs(hi) + 1.0)  # the bounds' sums round differently from a leaf's: never cut on that
    rooms = [limit.budget + 1e-9 * (abs(limit.budget) + 1.0) for limit in limits]
    best: list = [math.inf, None, 0.0]
    choice = [0] * n

    def fits(p: int, i: int, spent: list[float]) -> list[float] | None:
        """The limits' costs with option i at position p, or None when one can no longer stay in its budget."""
        after = [s + limit.costs[p][i] for s, limit in zip(spent, limits)]
        return after if all(a + least[k][p + 1] <= rooms[k] for k, a in enumerate(after)) else None

    def visit(p: int, cost: float, loss: float, spent: list[float]) -> None:
        if p == n:
            in_limits = all(s <= limit.budget for s, limit in zip(spent, limits))
            if lo <= cost <= hi and in_limits and loss < best[0] and tuple(choice) not in exclude:
                best[:] = [loss, list(choice), cost]
            return
        for i in order[p]:
            cost_i, loss_i = cost + costs[p][i], loss + losses[p][i]
            if cost_i + max_cost[p + 1] < lo - slack:
                continue
            after = fits(p, i, spent)
            if after is not None and loss_i + relaxed.bound(p + 1, hi - cost_i + slack) < best[0]:
                choice[p] = i
                visit(p + 1, cost_i, loss_i, after)

    visit(0, 0.0, 0.0, [0.0] * len(limits))
    return None if best[1] is None else (best[1], best[2], best[0])


def select(
    costs: list[list[float]],
    losses: list[list[float]],
    budget: float,
    floor: float,
    tolerance: float,
    limits: Sequence[Budget] = (),
    exclude: Collection[tuple[int, ...]] = (),
) -> tuple[list[int], dict]:
    """The minimum-loss combination but those in ``exclude`` whose blocks cost at most ``budget`` (and keep every
    one of ``limits``); when
    it costs less than ``floor``, the minimum-loss one costing [floor, budget] instead, if that predicts at most
    ``tolerance`` more loss. A limit at another batch can keep every pick out of the window: that is recorded.

    The minimum-loss pick normally spends the budget: a dearer option usually loses less. When it does not, the
    measured increases say the extra latency buys nothing; a few segments of an untrained swap can say that where
    training would disagree (within their noise), but not by much more: in a tiny test, forcing the window at any
    price swapped attention for untrained upcycled experts at ten times the predicted loss. So the window wins
    only within ``tolerance``, and the record keeps the other pick (``unfilled`` or ``window_pick``)
    and its predicted loss either way. Where no combination lands in the window at all, the record says so.
    """
    found = cheapest(costs, losses, -math.inf, budget, limits, exclude)
    if found is None:
        if exclude and cheapest(costs, losses, -math.inf, budget, limits) is not None:
            raise PlanerError("no other architecture of this search space fits")
        if cheapest(costs, losses, -math.inf, budget) is not None:
            raise PlanerError("no architecture of this search space keeps both the target and the limits at other "
                              "batch sizes (search.limits): loosen a limit or the target")  # fmt: skip
        raise PlanerError(
            f"no architecture of this search space fits: its blocks need {sum(min(c) for c in costs):.3f} ms, "
            f"the budget leaves {budget:.3f}"
        )
    choice, cost, loss = found
    info: dict = {"in_window": cost >= floor}
    if not info["in_window"]:
        filled = cheapest(costs, losses, floor, budget, limits, exclude)
        if filled is not None and filled[2] <= loss + tolerance:
            info.update(in_window=True, unfilled={"choice": choice, "blocks_ms": cost, "predicted_increase": loss})
            choice, cost, loss = filled
        elif filled is not None:
            info["window_pick"] = {"choice": filled[0], "blocks_ms": filled[1], "predicted_increase": filled[2]}
    return choice, {**info, "blocks_ms": cost, "predicted_increase": loss}


@dataclass(frozen=True)
class Fill:
    """The window the estimate should land in, [low x target, target], and how much more predicted loss
    (nats per token) a pick in it may cost than the minimum-loss pick below it (see ``select``)."""

    low: float = 0.95
    tolerance: float = 0.005

    def window(self, target: float) -> list[float]:
        """The window as arch.json records it, fractions of the baseline's latency."""
        return [self.low * target, target]


def pick(
    options: list[str],
    latency: list[float],
    increases: list[list[float | None]],
    budget: float,
    floor: float,
    tolerance: float,
    limits: Sequence[tuple[list[float], float]] = (),
    exclude: Collection[Arch] = (),
) -> tuple[Arch, dict]:
    """``select`` over the options measured at each position (an increase of None is no option there), its picks
    as architectures. ``limits``: (latency of every option at another batch size, budget there) pairs; ``exclude``:
    architectures not to pick."""
    kept = [[i for i, inc in enumerate(row) if inc is not None] for row in increases]
    costs = [[latency[i] for i in k] for k in kept]
    losses = [[row[i] for i in k] for row, k in zip(increases, kept)]
    held = [Budget([[other[i] for i in k] for k in kept], room) for other, room in limits]
    index = [{options[i]: j for j, i in enumerate(k)} for k in kept]
    banned = {tuple(ix[str(spec)] for ix, spec in zip(index, arch)) for arch in exclude
              if all(str(spec) in ix for ix, spec in zip(index, arch))}  # fmt: skip
    choice, info = select(costs, losses, budget, floor, tolerance, held, banned)

    def arch_of(picks: list[int]) -> Arch:
        return Arch(tuple(BlockSpec.parse(options[k[c]]) for k, c in zip(kept, picks)))

    for key in ("unfilled", "window_pick"):
        if key in info:
            other = info.pop(key)
            info[key] = {"arch": arch_of(other.pop("choice")).specs(), **other}
    return arch_of(choice), info


def cut_picks(
    increases: list[list[float | None]],
    skip: int | None,
    count: int,
    solve: Callable[[list, Collection[Arch]], Arch],
    per_shape: int = 1,
) -> list[tuple[int, Arch]]:
    """Picks of ``count`` shapes, for ``rerank``: ``solve`` (the knapsack over rows of increases, excluding some
    archs) with the last k layers cut, their blocks forced to option ``skip``, k = 0, 1, ... while a layer is left;
    of each shape its best ``per_shape`` picks (the runner-ups exclude every arch picked before).

    The increases are single swaps into the full baseline, and a short training disagrees with them most about
    cutting whole top layers: the top feed-forward block swapped out alone costs the default baseline 0.75 nats,
    yet a 3-layer model trained from the baseline's first layers is as accurate as it. Cutting them here puts
    such shapes in front of the training that judges them. Within a shape the sums of single swaps of the best
    picks are often within a few hundredths of a nat, less than they err by, so runner-ups are worth a training
    too. Returns (layers cut, arch) pairs, distinct archs; none without a ``skip`` option. A shape whose best pick
    is an earlier shape's (the pick already skips its top layer) is not counted. Every shape fits: cutting the
    pick's top layers costs no more than the pick.
    """
    if skip is None:
        return []
    picks: list[tuple[int, Arch]] = []
    shapes = 0
    for cut in range(len(increases) // 2):
        kept = len(increases) - 2 * cut
        rows = [row if p < kept else [inc if i == skip else None for i, inc in enumerate(row)]
                for p, row in enumerate(increases)]  # fmt: skip
        best = solve(rows, ())
        if any(best == other for _, other in picks):
            continue
        picks.append((cut, best))
        for _ in range(per_shape - 1):
            try:
                picks.append((cut, solve(rows, [a for _, a in picks])))
            except PlanerError:  # no other arch of this shape fits
                break
        shapes += 1
        if shapes == count:
            break
    return picks


@dataclass(frozen=True, kw_only=True)
class Measured(Record):
    """What swapping every option alone into the baseline measured on a sample: its loss, each option's increase
    per position (None: it cannot start from the baseline block there), the head ranking the attention options
    kept their heads by (``heads``, as arch.json writes it) and the local distillation's settings (``distill``).

    It depends on the baseline's weights, the search space and the samples alone, so a run that searches several
    targets or seeds measures once (``planer.search.option_cache``)."""

    options: list[str]
    baseline_loss: float
    increases: list[list[float | None]]
    heads: dict[str, list[list]]
    distill: dict | None


def measure(
    baseline: nn.Module, space: list[str], sample: Sample, distill: LocalDistill | None = None, progress: bool = False
) -> Measured:
    """Rank the baseline's heads on ``sample``, then measure every option of ``space`` swapped in alone; with
    ``progress``, a bar over the swaps (every head, then every option at every position) with its ETA."""
    options = [str(BlockSpec.parse(s)) for s in space]
    recorded = record_blocks(baseline, sample)
    swaps = sum(block.n_head for block in baseline.blocks) + len(baseline.blocks) * len(options)
    with tqdm(total=swaps, desc="knapsack: heads and options", unit="swap", disable=not progress, leave=False) as bar:
        ranking = rank_heads(baseline, sample, recorded, bar)
        if any(BlockSpec.parse(option).neurons for option in options):
            ranking |= rank_units(baseline, recorded[1])
        base, increases = option_increases(baseline, options, sample, ranking, distill, recorded, bar)
    return Measured(
        options=options,
        baseline_loss=base,
        increases=increases,
        heads={str(p): [[h, inc] for h, inc in order] for p, order in ranking.items()},
        distill=None if distill is None else {"steps": distill.steps, "lr": distill.lr},
    )


@dataclass(frozen=True)
class KnapsackSettings:
    """How the pick is made from the measured increases: ``fill`` is the window the estimate should land in (see
    ``select``); with ``candidates`` > 1 the record lists picks of as many shapes, ``per_shape`` of each
    (``cut_picks``), for a short training to choose among; every pick keeps ``limits`` too."""

    fill: Fill = Fill()
    candidates: int = 1
    per_shape: int = 1
    limits: Sequence[LatencyLimit] = ()


def knapsack_pick(
    measured: Measured, baseline: Arch, table: LatencyTable, target: float, settings: KnapsackSettings
) -> SearchRecord:
    """The architecture the knapsack picks for ``target`` x the baseline's estimate from what was ``measured``, as
    its record for arch.json: per position every option's latency and measured loss increase and the chosen one,
    the head ranking, the estimate against the target and against each limit, and the candidates to rerank."""
    options, limits, fill = measured.options, settings.limits, settings.fill
    latency = [table.latency(o) for o in options]
    baseline_ms = table.estimate(baseline)
    bounds = (target * baseline_ms - table.fixed_ms, fill.low * target * baseline_ms - table.fixed_ms)
    held = [lim.budget(options, baseline) for lim in limits]

    def solve(rows: list, exclude: Collection[Arch] = ()) -> tuple[Arch, dict]:
        return pick(options, latency, rows, *bounds, fill.tolerance, held, exclude)

    arch, info = solve(measured.increases)
    skip = options.index("skip") if "skip" in options else None
    cuts = cut_picks(measured.increases, skip, settings.candidates, lambda rows, ex: solve(rows, ex)[0],
                     settings.per_shape) if settings.candidates > 1 else []  # fmt: skip
    details = KnapsackDetails(
        limits=[lim.estimate(arch, baseline) for lim in limits],
        **info,
        baseline_loss=measured.baseline_loss,
        positions=[
            Position(options=options, latency_ms=latency, increase=row, chosen=str(spec))
            for row, spec in zip(measured.increases, arch)
        ],  # fmt: skip
        heads=measured.heads,
        distill=measured.distill,
        candidates=[
            {
                "arch": a.specs(),
                "layers_cut": cut,
                "estimated_ratio": Estimate.of(table, a, baseline_ms, target).estimated_ratio,
                "limits": [lim.estimate(a, baseline).estimate.estimated_ratio for lim in limits],
            }
            for cut, a in cuts
        ],  # fmt: skip
    )
    return SearchRecord(arch=arch.specs(), method="knapsack", estimate=Estimate.of(table, arch, baseline_ms, target),
                        window=fill.window(target), details=details)  # fmt: skip


def knapsack_search(
    baseline: nn.Module,
    space: list[str],
    table: LatencyTable,
    target: float,
    sample: Sample,
    settings: KnapsackSettings = KnapsackSettings(),
    distill: LocalDistill | None = None,
) -> tuple[Arch, SearchRecord]:
    """The architecture the knapsack picks for ``target`` x the baseline's estimate, and its record for arch.json:
    every option of ``space`` measured in the baseline on ``sample`` (``distill``: each option first fitted to
    the baseline block's output), then the pick (``knapsack_pick``)."""
    started = time.perf_counter()
    record = knapsack_pick(measure(baseline, space, sample, distill), baseline.arch, table, target, settings)
    return record.found, dataclasses.replace(record, seconds=round(time.perf_counter() - started, 1))
