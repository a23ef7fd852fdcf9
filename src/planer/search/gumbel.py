"""Phase 1: train the supernet's weights and architecture weights in turn (paper §2.2, Appendix B).

Each epoch runs weight steps over the epoch's training segments with hard sampling (one path per step), then
architecture steps on a random contiguous 20% of those segments with soft sampling. Alpha stays frozen for the
first 10% of epochs so every option gets trained before it is judged; the temperature then anneals. The
architecture loss adds the latency loss of Eq. 3 only while the estimate is above the target.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import time
from pathlib import Path

import torch

from planer.config import Config
from planer.errors import PlanerError
from planer.evaluation.importance import calibration_sample, rank_units, record_blocks
from planer.io.checkpoint import SUPERNET, load_checkpoint, save_weights
from planer.io.data import check_same_vocab
from planer.io.records import Estimate, GumbelDetails, SearchRecord
from planer.latency.table import LatencyTable, at_batch, load_or_profile
from planer.models.arch import Arch, BlockSpec
from planer.models.language_model import token_nll
from planer.search.knapsack import Fill, cheapest
from planer.search.supernet import SuperNet, warm_start
from planer.training import distributed
from planer.training import resume as resume_lib
from planer.training.loop import Loop, RunOptions
from planer.training.step import autocast

CORRECTION_EPOCHS = 10  # at most this many architecture epochs of steps after the last epoch, to meet the target


def latency_loss(
    sampled_ms: torch.Tensor, baseline_ms: float, target: float, current_ms: float
) -> tuple[torch.Tensor, float]:
    """Eq. 3: Lat / (Lat_baseline * target), switched on (beta = 1) only while the architecture is over target.

    The gradient flows through the latency of the Gumbel-softmax sample, as in the paper. The switch looks at the
    architecture the search would return now (``current_ms``, the estimate of the argmax arch) rather than at the
    noisy sample: switched on the sample, the loss keeps firing on samples above the target long after the
    architecture is below it, and the result drifts far under the target (to 0.65 of it in the tests).
    """
    beta = 1.0 if current_ms > baseline_ms * target else 0.0
    return beta * sampled_ms / (baseline_ms * target), beta


@dataclasses.dataclass
class SearchProgress:
    """Where a search stands; saved in every resume state."""

    tau: float
    epoch: int = 0
    in_epoch: int = 0  # weight steps done in the current epoch
    position: int = 0  # segments served to weight steps so far
    epoch_start: int = 0  # position at the start of the current epoch
    ce_sum: float = 0.0  # the current epoch's weight-step cross-entropy so far
    log_bytes: int = 0
    seconds: float = 0.0  # wall time so far, over every session of a resumed search


def load_table(loop: Loop, lut_path: str | Path | None, batch: int | None = None) -> LatencyTable:
    """The run's latency table (at ``batch``, default the config's); rank 0 profiles it when there is none yet, the
    other ranks then read it."""
    path = Path(lut_path or loop.out_dir / "lut.json")
    cfg = loop.cfg if batch is None else at_batch(loop.cfg, batch)
    table = load_or_profile(cfg, path) if loop.env.main else None
    distributed.barrier(loop.env)
    return table if table is not None else load_or_profile(cfg, path)


def search(
    cfg: Config,
    out_dir: str | Path,
    target: float,
    lut_path: str | Path | None = None,
    init_from: str | Path | None = None,
    options: RunOptions = RunOptions(),
) -> Arch:
    """Run phase 1 and write ``search.jsonl``, ``arch.json`` and the trained ``supernet.safetensors`` into
    ``out_dir``; returns the found arch.

    ``init_from``: a trained baseline checkpoint to start the supernet's options from (see ``warm_start``).
    With ``options.resume`` the search continues from the newest state in ``out_dir/resume`` (written every
    ``train.ckpt_every`` weight steps). Under torchrun every rank draws the same paths and the same Gumbel noise,
    from one generator seeded alike, and the gradients of weights and alpha are summed over ranks.
    """
    loop = Loop(cfg, out_dir, options, done=SearchRecord.FILE)
    with loop.setting_up():
        table = load_table(loop, lut_path)
        check_reachable(table, loop.cfg, target)
        phase1 = GumbelSearch(loop, table, target, init_from)
    return phase1.run()


def check_reachable(table: LatencyTable, cfg: Config, target: float, what: str = "target") -> None:
    """Refuse a target that no architecture of the search space meets: each position's cheapest option, plus the
    fixed cost of embedding and softmax, is as fast as the space gets."""
    smallest = table.fixed_ms + 2 * cfg.model.n_layer * min(table.latency(o) for o in cfg.search.space)
    ratio = smallest / table.baseline(cfg)
    if target < ratio:
        raise PlanerError(
            f"{what} {target:g} cannot be met: the fastest architecture of this search space is {ratio:.3f} of the "
            f"baseline's latency (embedding and softmax alone {table.fixed_ms / table.baseline(cfg):.3f}); "
            f"choose a target of at least {ratio:.3f}"
        )


class GumbelSearch:
    """The supernet, its two optimisers and the schedule of weight and architecture epochs."""

    def __init__(self, loop: Loop, table: LatencyTable, target: float, init_from: str | Path | None):
        cfg, sc = loop.cfg, loop.cfg.search
        self.loop, self.table, self.target, self.init_from = loop, table, target, init_from
        self.baseline_ms = table.baseline(cfg)
        self.gumbel = torch.Generator().manual_seed(cfg.train.seed)
        self.net = SuperNet(cfg.model, sc.space, 2 * cfg.model.n_layer)
        if init_from is not None:
            baseline, _, vocab = load_checkpoint(init_from)
            check_same_vocab(vocab, loop.corpus.vocab, str(init_from))
            ranking = {}
            if any(BlockSpec.parse(option).neurons for option in sc.space):  # narrowed feed-forward options
                recorded = record_blocks(baseline, calibration_sample(cfg, loop.corpus.train))
                ranking = rank_units(baseline, recorded[1])
            warm_start(self.net, baseline, ranking)
        self.net.use_generator(self.gumbel)
        loop.place(self.net)
        weight_cfg = dataclasses.replace(cfg.train, steps=sc.epochs * sc.steps_per_epoch)
        self.weights = loop.trainer(self.net.weights(), weight_cfg, cfg.train.balance_coef if sc.balance else 0.0)
        self.alpha_opt = torch.optim.Adam(self.net.alphas(), lr=sc.alpha_lr)
        self.arch_steps = max(1, round(sc.arch_fraction * sc.steps_per_epoch))
        self.rng = random.Random(cfg.train.seed)
        self.at, self.mems = SearchProgress(tau=sc.tau0), None
        if loop.state is not None:
            tensors, meta, self.mems = loop.restore({"net": self.net}, self.weights)
            resume_lib.load_optimizer(self.alpha_opt, tensors, meta["alpha_optimizer"], "alpha_optim")
            self.gumbel.set_state(tensors["gumbel"])
            resume_lib.restore_python_rng(meta["arch_rng"], self.rng)
            self.at = SearchProgress(**meta["progress"])

    def run(self) -> Arch:
        loop, sc = self.loop, self.loop.cfg.search
        frozen_epochs = math.ceil(sc.freeze_fraction * sc.epochs)
        self.started = time.perf_counter() - self.at.seconds
        self.log = loop.open_log("search.jsonl", self.at.log_bytes)
        bar = loop.bar(f"search t={self.target:g}", self.at.epoch, sc.epochs)
        try:
            for epoch in range(self.at.epoch, sc.epochs):
                record = self.weight_epoch(epoch)
                if epoch >= frozen_epochs:
                    start = self.at.epoch_start + self.rng.randrange(max(1, sc.steps_per_epoch - self.arch_steps + 1))
                    record.update(self.arch_epoch(start, self.arch_steps))
                    self.at.tau *= sc.tau_decay
                record.update(self.state())
                self.log.write(json.dumps(record) + "\n")
                bar.update()
                bar.set_postfix(ce=f"{record['weight_ce']:.3f}", lat=f"{record['ratio_to_target']:.2f}xT")
            if self.over_target():
                self.correct()
        finally:
            self.log.close()
        return self.finish()

    def weight_epoch(self, epoch: int) -> dict:
        """Hard-sampled weight steps over the epoch's segments, with a resume state every ``train.ckpt_every``."""
        at, sc, tc = self.at, self.loop.cfg.search, self.loop.cfg.train
        resumed = epoch == at.epoch and at.in_epoch > 0
        if not resumed:
            at.epoch, at.in_epoch, at.epoch_start, at.ce_sum = epoch, 0, at.position, 0.0
        self.net.set_mode("hard")
        tic = time.perf_counter()
        for seg in self.loop.segments.walk(at.position, sc.steps_per_epoch - at.in_epoch):
            if seg.reset:
                self.mems = None
            self.net.sample(at.tau)
            self.net.train()
            x, y = seg.x.to(self.loop.device), seg.y.to(self.loop.device)
            ce, self.mems = self.weights.step(self.net, x, y, self.mems, seg.reset)
            at.ce_sum += ce
            at.position, at.in_epoch = seg.position + 1, at.in_epoch + 1
            if tc.ckpt_every and self.weights.step_count % tc.ckpt_every == 0:
                self.save()
        at.in_epoch = 0
        return {"epoch": epoch + 1, "tau": at.tau, "weight_ce": at.ce_sum / sc.steps_per_epoch,
                "weight_step_ms": 1000 * (time.perf_counter() - tic) / sc.steps_per_epoch}  # fmt: skip

    def save(self) -> None:
        self.log.flush()
        tensors, alpha_meta = resume_lib.optimizer_state(self.alpha_opt, "alpha_optim")
        meta = {"progress": {**dataclasses.asdict(self.at), "log_bytes": self.log.tell(),
                             "seconds": time.perf_counter() - self.started},
                "alpha_optimizer": alpha_meta, "arch_rng": resume_lib.python_rng(self.rng)}  # fmt: skip
        self.loop.save_state(
            {"net": self.net}, self.weights, self.mems, meta, {**tensors, "gumbel": self.gumbel.get_state()}
        )

    def arch_epoch(self, start: int, steps: int, until_met: bool = False, bar=None) -> dict:
        """Soft-sampled steps on alpha alone over a contiguous run of segments (memory carried, weights frozen).

        With ``until_met`` the steps stop as soon as the arch the search would return meets the target. Under data
        parallelism each rank's loss counts by its share of the batch and alpha's gradients are summed.
        """
        loop, net = self.loop, self.net
        net.set_mode("soft", self.at.tau)
        weights = net.weights()
        for p in weights:
            p.requires_grad_(False)
        mems, ce_sum, betas = None, 0.0, []
        try:
            for seg in loop.segments.walk(start, steps):
                if seg.reset:
                    mems = None
                ce, mems, beta = self.arch_step(seg, mems)
                ce_sum += ce
                betas.append(beta)
                if bar is not None:
                    bar.update()
                if until_met and not self.over_target():
                    break
        finally:
            for p in weights:
                p.requires_grad_(True)
            net.set_mode("hard")
        return {"arch_ce": ce_sum / len(betas), "beta": sum(betas) / len(betas)}

    def arch_step(self, seg, mems) -> tuple[float, list, float]:
        """One step of alpha on CE + the latency loss; returns the CE (over all ranks), the memories and beta."""
        loop, net, table = self.loop, self.net, self.table
        x, y = seg.x.to(loop.device), seg.y.to(loop.device)
        with autocast(loop.device, loop.cfg.train.precision):
            logits, mems = net(x, mems)
            ce = token_nll(logits, y).mean()
        sampled = table.expected(net.sampled_probs(), net.space)
        lat_loss, beta = latency_loss(sampled, self.baseline_ms, self.target, table.estimate(net.derive()))
        loss = ce + lat_loss
        if loop.cfg.search.balance:
            loss = loss + loop.cfg.train.balance_coef * net.aux_loss()
        self.alpha_opt.zero_grad(set_to_none=True)
        (loss * loop.segments.share).backward()
        distributed.average_grads(net.alphas(), loop.env)
        self.alpha_opt.step()
        return distributed.all_sum(ce.item() * loop.segments.share, loop.env, loop.device), mems, beta

    def over_target(self) -> bool:
        return self.table.estimate(self.net.derive()) > self.baseline_ms * self.target

    def correct(self) -> None:
        """Architecture steps after the last epoch, until the found arch meets the target (at most a few epochs').

        The last architecture step can tip the argmax over the target with no step left to pull it back.
        """
        steps = CORRECTION_EPOCHS * self.arch_steps
        start = self.rng.randrange(len(self.loop.segments))
        bar = self.loop.bar("correcting to meet the target", 0, steps)
        try:
            fix = self.arch_epoch(start, steps, until_met=True, bar=bar)
        finally:
            bar.close()
        record = {"epoch": self.loop.cfg.search.epochs, "tau": self.at.tau, "correction": True, **fix, **self.state()}
        self.log.write(json.dumps(record) + "\n")

    def fill_up(self, found: Arch) -> tuple[Arch, dict | None]:
        """The arch to return: the argmax, or, where it leaves more than ``Fill.low`` of the latency budget unused,
        the most probable arch (the largest sum of log-probabilities, solved exactly with the table's latencies)
        whose estimate lies in [Fill.low, 1] x the target; with what it replaced (None: the argmax itself).

        The latency loss only pushes down, so the argmax often ends well under the target (0.45 for 0.50 on the
        default config) and a tenth of the budget buys nothing. The search's own probabilities rank the dearer
        options, so the fill spends the rest where the search was least sure of a cheaper choice.
        """
        budget = self.baseline_ms * self.target
        if self.table.estimate(found) >= Fill.low * budget:
            return found, None
        space = [BlockSpec.parse(o) for o in self.net.space]
        costs = [[self.table.latency(o) for o in space]] * len(found)
        log_probs = torch.log_softmax(self.net.alpha_matrix().detach().double(), dim=-1)
        surprise = (-log_probs).tolist()  # per position and option: what choosing it costs in probability
        fixed = self.table.fixed_ms
        picked = cheapest(costs, surprise, Fill.low * budget - fixed, budget - fixed)
        if picked is None:
            return found, None
        filled = Arch(tuple(space[i] for i in picked[0]))
        ratio = Estimate.of(self.table, found, self.baseline_ms, self.target).estimated_ratio
        return filled, {"arch": found.specs(), "estimated_ratio": ratio}

    def state(self) -> dict:
        """Alpha, its probabilities, their expected latency, and the arch the search would return now."""
        net, table = self.net, self.table
        probs = torch.softmax(net.alpha_matrix(), dim=-1)
        expected = float(table.expected(probs, net.space))
        found = net.derive()
        return {"alpha": net.alpha_matrix().tolist(), "probs": probs.tolist(), "estimated_ms": expected,
                "ratio_to_target": expected / (self.baseline_ms * self.target), "arch": found.specs(),
                "arch_estimated_ms": table.estimate(found)}  # fmt: skip

    def finish(self) -> Arch:
        """Write arch.json and the supernet's weights (rank 0); returns the found arch."""
        out, (found, unfilled) = self.loop.out_dir, self.fill_up(self.net.derive())
        record = SearchRecord(
            arch=found.specs(),
            method="gumbel",
            estimate=Estimate.of(self.table, found, self.baseline_ms, self.target),
            window=Fill().window(self.target),
            details=GumbelDetails(unfilled=unfilled),
            space=self.net.space,
            init_from=str(self.init_from) if self.init_from is not None else None,
            seconds=round(time.perf_counter() - self.started, 1),
        )

        def write() -> None:
            record.save(out)
            save_weights(out / SUPERNET, self.net)

        self.loop.finish(write)
        return found
