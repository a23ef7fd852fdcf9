"""The knapsack search: an exact multiple-choice knapsack, the budget respected, options measured in the baseline."""

import dataclasses
import itertools
import json
import math
import random

import pytest

from planer.errors import PlanerError
from planer.evaluation.importance import Sample, head_increases, sample_loss
from planer.latency.table import LatencyTable
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_model
from planer.search.knapsack import (
    Budget,
    Fill,
    KnapsackSettings,
    LatencyLimit,
    LocalDistill,
    cheapest,
    cut_picks,
    knapsack_search,
    measure,
    option_block,
    pick,
    select,
    swapped_loss,
)
from planer.search.option_cache import cached_measure

BLOCKS = {"skip": 0.0, "attn:1": 1.0, "attn:2": 1.6, "attn:4": 2.5, "ffl": 0.8, "moe:top1": 1.5, "moe:top2": 1.9}


def table(blocks=BLOCKS, fixed=0.5):
    def stats(v):
        return {"median": v, "p10": v, "p90": v}

    return LatencyTable({}, stats(fixed), {k: stats(v) for k, v in blocks.items()}, {})


def brute_force(costs, losses, lo, hi, limits=()):
    best = None
    for combo in itertools.product(*(range(len(c)) for c in costs)):
        cost = sum(costs[p][i] for p, i in enumerate(combo))
        loss = sum(losses[p][i] for p, i in enumerate(combo))
        kept = all(sum(b.costs[p][i] for p, i in enumerate(combo)) <= b.budget for b in limits)
        if lo <= cost <= hi and kept and (best is None or loss < best[2]):
            best = (list(combo), cost, loss)
    return best


def test_knapsack_equals_brute_force():
    rng = random.Random(0)
    for _ in range(60):
        sizes = [rng.randint(1, 5) for _ in range(rng.randint(1, 6))]
        costs = [[round(rng.uniform(0, 3), 3) for _ in range(k)] for k in sizes]
        losses = [[rng.uniform(-0.1, 1.0) for _ in range(k)] for k in sizes]
        total = sum(max(c) for c in costs)
        hi = rng.uniform(0.2, 1.0) * total
        lo = rng.choice([float("-inf"), 0.9 * hi])
        got, expected = cheapest(costs, losses, lo, hi), brute_force(costs, losses, lo, hi)
        if expected is None:
            assert got is None
        else:
            assert got is not None and lo <= got[1] <= hi
            assert got[2] == pytest.approx(expected[2], abs=1e-12)
            assert got[1] == pytest.approx(sum(costs[p][i] for p, i in enumerate(got[0])))


def test_knapsack_with_limits_at_other_batches_equals_brute_force():
    """A second and third budget (another batch's costs, ordered differently from the first's) are kept exactly:
    the optimum under all of them, None when they exclude everything."""
    rng = random.Random(2)
    excluded = 0
    for _ in range(80):
        sizes = [rng.randint(1, 4) for _ in range(rng.randint(1, 6))]
        costs = [[round(rng.uniform(0, 3), 3) for _ in range(k)] for k in sizes]
        losses = [[rng.uniform(-0.1, 1.0) for _ in range(k)] for k in sizes]
        hi = rng.uniform(0.4, 1.0) * sum(max(c) for c in costs)
        limits = []
        for _ in range(rng.randint(1, 2)):
            other = [[round(rng.uniform(0, 3), 3) for _ in range(k)] for k in sizes]
            limits.append(Budget(other, rng.uniform(0.2, 1.0) * sum(max(c) for c in other)))
        got, expected = (
            cheapest(costs, losses, -math.inf, hi, limits),
            brute_force(costs, losses, -math.inf, hi, limits),
        )
        if expected is None:
            excluded += got is None and cheapest(costs, losses, -math.inf, hi) is not None
            assert got is None
        else:
            assert got is not None and got[2] == pytest.approx(expected[2], abs=1e-12)
            assert all(sum(b.costs[p][i] for p, i in enumerate(got[0])) <= b.budget for b in limits)
    assert excluded  # some limits rule out every pick the first budget allows


def test_select_fills_the_budget_only_within_the_tolerance():
    costs = [[1.0, 2.0], [1.0, 2.0]]
    losses = [[0.0, 0.001], [0.0, 0.5]]  # the dearer option at position 0 barely costs loss, at position 1 a lot
    choice, info = select(costs, losses, budget=3.0, floor=2.85, tolerance=0.005)
    assert choice == [1, 0] and info["in_window"] and info["unfilled"]["choice"] == [0, 0]
    choice, info = select(costs, losses, budget=4.0, floor=3.8, tolerance=0.005)
    assert choice == [0, 0] and not info["in_window"] and info["window_pick"]["choice"] == [1, 1]
    with pytest.raises(PlanerError, match="fits"):
        select(costs, losses, budget=1.5, floor=0.0, tolerance=0.0)


def test_cut_picks_are_the_best_archs_with_their_top_layers_cut():
    """Candidate k is the minimum-loss arch under the budget whose last k layers are skips (brute force over the
    rest), and the archs differ; without skip in the space there is nothing to cut."""
    options = ["skip", "attn:1", "attn:4", "ffl"]
    latency = [0.0, 1.0, 2.5, 0.8]
    rng = random.Random(1)
    increases = [[rng.uniform(0.3, 1.0), rng.uniform(0.0, 0.2), 0.0, None] if p % 2 == 0
                 else [rng.uniform(0.3, 1.0), None, None, 0.0] for p in range(6)]  # fmt: skip

    def solver(budget):
        return lambda rows, exclude: pick(options, latency, rows, budget, float("-inf"), 0.0, exclude=exclude)[0]

    picks = cut_picks(increases, 0, 3, solver(5.0))
    assert [cut for cut, _ in picks] == [0, 1, 2] and len({a for _, a in picks}) == 3
    for cut, arch in picks:
        specs = [str(s) for s in arch]
        assert specs[len(specs) - 2 * cut :] == ["skip"] * (2 * cut)
        free = [[i for i, inc in enumerate(row) if inc is not None] for row in increases[: 6 - 2 * cut]]
        best = min(
            (c for c in itertools.product(*free) if sum(latency[i] for i in c) <= 5.0),
            key=lambda c: sum(increases[p][i] for p, i in enumerate(c)),
        )
        assert specs[: 6 - 2 * cut] == [options[i] for i in best]
    tight = cut_picks(increases, 0, 3, solver(2.0))
    assert [cut for cut, _ in tight] == [0, 2]  # the pick already skips its top layer: cutting it is the pick again
    assert [str(s) for s in tight[0][1]][-2:] == ["skip", "skip"]
    assert cut_picks(increases, None, 3, solver(5.0)) == []
    # with runner-ups: each shape's best picks in order of their sums, the best first, none twice
    ranked = cut_picks(increases, 0, 2, solver(5.0), per_shape=3)
    assert [cut for cut, _ in ranked] == [0, 0, 0, 1, 1, 1] and len({a for _, a in ranked}) == 6
    assert [a for _, a in ranked][::3] == [a for _, a in picks[:2]]
    for cut in (0, 1):
        free = [[i for i, inc in enumerate(row) if inc is not None] for row in increases[: 6 - 2 * cut]]
        sums = sorted(
            sum(increases[p][i] for p, i in enumerate(c))
            for c in itertools.product(*free)
            if sum(latency[i] for i in c) <= 5.0
        )
        shape = [a for c, a in ranked if c == cut]
        got = [sum(increases[p][options.index(str(s))] for p, s in enumerate(a) if p < 6 - 2 * cut) for a in shape]
        assert got == pytest.approx(sums[:3])


@pytest.fixture
def sample(trained_tiny):
    _, corpus = trained_tiny
    return Sample(corpus.train, batch_size=8, tgt_len=16, mem_len=16, segments=4)


def test_knapsack_search_respects_the_budget_and_records_every_option(trained_tiny, sample):
    model, _ = trained_tiny
    lut = table()
    arch, record = knapsack_search(model, list(BLOCKS), lut, 0.5, sample)
    assert len(arch) == 4 and record.estimate.meets_target
    assert lut.estimate(arch) == record.estimate.estimated_ms <= 0.5 * lut.estimate(model.arch)
    rows = record.knapsack.positions
    assert [r.chosen for r in rows] == arch.specs()
    assert rows[0].increase[list(BLOCKS).index("ffl")] is None  # ffl where the baseline has attention: not inheritable
    assert rows[0].increase[list(BLOCKS).index("attn:4")] == 0.0  # the baseline's own block
    assert rows[1].increase[list(BLOCKS).index("attn:1")] is None
    # the pick is the best sum of measured increases among all that fit, and is deterministic
    fits = [
        combo
        for combo in itertools.product(*([s for s, inc in zip(r.options, r.increase) if inc is not None] for r in rows))
        if lut.estimate(combo) <= 0.5 * lut.estimate(model.arch)
    ]
    increase = {(p, s): inc for p, r in enumerate(rows) for s, inc in zip(r.options, r.increase)}
    best = min(sum(increase[p, s] for p, s in enumerate(combo)) for combo in fits)
    found = record.knapsack  # the window may take up to the tolerance more than the best
    unfilled = found.unfilled["predicted_increase"] if found.unfilled else found.predicted_increase
    assert unfilled == pytest.approx(best, abs=1e-9)
    assert found.predicted_increase <= best + Fill().tolerance
    assert knapsack_search(model, list(BLOCKS), lut, 0.5, sample)[0] == arch
    with pytest.raises(PlanerError, match="fits"):
        knapsack_search(model, list(BLOCKS), lut, 0.05, sample)


def test_a_limit_at_another_batch_changes_the_pick_and_is_recorded(trained_tiny, sample):
    """At "batch 1" attention is dear and the feed-forward block cheap (per-block costs differ by batch): a limit
    there makes the pick keep both budgets, and the record states the estimate against each."""
    model, _ = trained_tiny
    lut = table()
    at_one = table({**BLOCKS, "attn:1": 2.0, "attn:2": 2.2, "attn:4": 2.6, "ffl": 0.3}, fixed=0.2)
    free, _ = knapsack_search(model, list(BLOCKS), lut, 0.6, sample)
    baseline_one = at_one.estimate(model.arch)
    tight = at_one.estimate(free) / baseline_one - 0.02
    limited = KnapsackSettings(limits=[LatencyLimit(1, tight, at_one)])
    arch, record = knapsack_search(model, list(BLOCKS), lut, 0.6, sample, limited)
    assert arch != free and record.estimate.meets_target
    assert at_one.estimate(arch) <= tight * baseline_one
    (limit,) = record.knapsack.limits
    assert limit.batch == 1 and limit.estimate.meets_target and limit.estimate.estimated_ratio <= tight
    with pytest.raises(PlanerError, match="limits"):
        knapsack_search(model, list(BLOCKS), lut, 0.6, sample, KnapsackSettings(limits=[LatencyLimit(1, 0.02, at_one)]))


def test_local_distillation_measures_every_option(trained_tiny, sample):
    model, corpus = trained_tiny
    distill = LocalDistill(Sample(corpus.train[20000:], 8, 16, 16, 2), steps=10)
    arch, record = knapsack_search(
        model, ["skip", "attn:1", "attn:4", "ffl"], table(), 0.6, sample, KnapsackSettings(fill=Fill(0.9)), distill
    )
    assert all(inc is not None for r in record.knapsack.positions for inc in r.increase)
    assert record.knapsack.distill == {"steps": 10, "lr": 1e-3} and record.estimate.meets_target


def test_the_measured_losses_are_kept_per_baseline_space_and_sample(trained_tiny, sample, tmp_path, monkeypatch):
    """A second search from the same checkpoint, space and sample reads what the first measured; any other
    checkpoint, space or sample measures again."""
    from planer.search import knapsack

    model, _ = trained_tiny
    (tmp_path / "model.safetensors").write_bytes(b"weights")  # the key digests the checkpoint's files
    (tmp_path / "config.json").write_text("{}")
    measured = []
    real = knapsack.option_increases
    monkeypatch.setattr(knapsack, "option_increases", lambda *a, **k: measured.append(1) or real(*a, **k))
    cache, space = tmp_path / "option-losses.json", ["skip", "attn:1", "ffl"]
    first = cached_measure(cache, tmp_path, model, space, sample, None)
    assert cached_measure(cache, tmp_path, model, space, sample, None) == first and len(measured) == 1
    assert first == knapsack.measure(model, space, sample)  # what the cache gives back is what was measured
    cached_measure(cache, tmp_path, model, ["skip", "ffl"], sample, None)
    cached_measure(cache, tmp_path, model, space, dataclasses.replace(sample, segments=2), None)
    (tmp_path / "model.safetensors").write_bytes(b"other weights")
    cached_measure(cache, tmp_path, model, space, sample, None)
    assert len(measured) == 5 and len(json.loads(cache.read_text())) == 4


def full_runs(model, measured, sample) -> tuple[list, dict]:
    """What ``measure`` reports, each number from a whole forward of the model as it is swapped."""
    base = sample_loss(model, sample)
    ranking = {int(p): [(h, inc) for h, inc in order] for p, order in measured.heads.items()}
    rows = []
    for position, src in enumerate(model.arch):
        row = []
        for spec in map(BlockSpec.parse, measured.options):
            block = None if spec == src else option_block(spec, model, position, ranking, random_ok=False)
            row.append(
                0.0 if spec == src else None if block is None else swapped_loss(model, position, block, sample) - base
            )
        rows.append(row)
    heads = {p: head_increases(model, p, sample, base) for p in ranking}
    return rows, heads


def llama_baseline(tiny_cfg):
    """A tiny random Llama (grouped key/value heads, no memory): its blocks matter without training."""
    import torch

    torch.manual_seed(0)
    cfg = tiny_cfg("model.backbone=gpt", "model.flavour=llama", "model.n_kv_head=2", "model.mem_len=0")
    return build_model(dataclasses.replace(cfg.model, vocab_size=65), Arch.baseline(2, cfg.model.n_head)).eval()


@pytest.mark.parametrize("family", ["txl", "llama"])
def test_replaying_the_blocks_before_a_position_measures_what_running_them_does(trained_tiny, tiny_cfg, family):
    """The measurement replays what entered each position instead of running the blocks before it again: every
    option's increase and every head's equal those of whole forwards of the swapped model, bit for bit."""
    model, corpus = trained_tiny
    if family == "llama":
        model = llama_baseline(tiny_cfg)
    sample = Sample(corpus.train, batch_size=4, tgt_len=16, mem_len=model.mem_len, segments=3)
    measured = measure(model, ["skip", "attn:1", "attn:2", "ffl", "moe:top1"], sample)
    rows, heads = full_runs(model, measured, sample)
    assert measured.baseline_loss == sample_loss(model, sample)
    assert measured.increases == rows and any(inc for row in rows for inc in row if inc)
    assert {int(p): sorted(inc for _, inc in order) for p, order in measured.heads.items()} == {
        p: sorted(incs) for p, incs in heads.items()
    }


def test_the_calibration_sample_is_sized_by_the_config(tiny_cfg):
    """search.sample_segments segments of eval.batch_size streams: what the knapsack and head ranking read."""
    import torch

    from planer.evaluation.importance import calibration_sample, record_blocks

    cfg = tiny_cfg("search.sample_segments=3", "eval.batch_size=2")
    sample = calibration_sample(cfg, torch.arange(4000) % 65)
    model = build_model(dataclasses.replace(cfg.model, vocab_size=65), Arch.parse("attn:4 ffl")).eval()
    _, recorded = record_blocks(model, sample)
    warm = 1  # the memory's warm-up call
    assert len(recorded[0]) == warm + 3 and recorded[0][-1][0].shape[:2] == (2, cfg.model.tgt_len)
