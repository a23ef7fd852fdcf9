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
from tqdm import tqdm

from planer import distributed
from planer import resume as resume_lib
from planer.arch import Arch
from planer.checkpoint import load_checkpoint, save_weights
from planer.config import Config, check_target
from planer.data import Corpus, Segments, load_corpus
from planer.distributed import Env
from planer.errors import PlanerError
from planer.latency import LatencyTable, load_or_profile
from planer.model import token_nll
from planer.supernet import SuperNet, warm_start
from planer.train import (
    WeightTrainer,
    autocast,
    open_log,
    open_out_dir,
    restore_rank_state,
    save_training_state,
    seed_everything,
)

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


def search(
    cfg: Config,
    out_dir: str | Path,
    target: float,
    lut_path: str | Path | None = None,
    force: bool = False,
    corpus: Corpus | None = None,
    quiet: bool = False,
    init_from: str | Path | None = None,
    resume: bool = False,
) -> Arch:
    """Run phase 1 and write ``search.jsonl``, ``arch.json`` and the trained ``supernet.safetensors`` into
    ``out_dir``; returns the found arch.

    ``init_from``: a trained baseline checkpoint to start the supernet's options from (see ``warm_start``).
    ``resume``: continue from the newest state in ``out_dir/resume`` (written every ``train.ckpt_every`` weight
    steps). Under torchrun every rank draws the same paths and the same Gumbel noise, from one generator seeded
    alike, and the gradients of weights and alpha are summed over ranks.
    """
    check_target(target)
    sc = cfg.search
    corpus = corpus or load_corpus(cfg.data)
    cfg.model.vocab_size = len(corpus.vocab)
    env, device = distributed.setup(cfg.train.device)
    segments = Segments(corpus.train, cfg.train.batch_size, cfg.model.tgt_len, rank=env.rank, world=env.world)
    out_dir, state = open_out_dir(out_dir, cfg, force, resume, env, done="arch.json")
    lut_path = Path(lut_path or out_dir / "lut.json")
    table = load_or_profile(cfg, lut_path) if env.main else None  # rank 0 profiles when there is no table yet
    distributed.barrier(env)
    if table is None:
        table = load_or_profile(cfg, lut_path)
    baseline_ms = table.baseline(cfg)
    seed_everything(cfg.train.seed)
    gumbel = torch.Generator().manual_seed(cfg.train.seed)

    positions = 2 * cfg.model.n_layer
    net = SuperNet(cfg.model, sc.space, positions)
    if init_from is not None:
        baseline, _, vocab = load_checkpoint(init_from)
        if vocab.symbols != corpus.vocab.symbols:
            raise PlanerError(f"{init_from} was trained on another vocabulary than this config's data")
        warm_start(net, baseline)
    net.to(device)
    net.use_generator(gumbel)
    distributed.broadcast_module(net, env)
    torch.manual_seed(cfg.train.seed + env.rank)  # dropout masks differ between ranks
    weight_cfg = dataclasses.replace(cfg.train, steps=sc.epochs * sc.steps_per_epoch)
    weights = WeightTrainer(net.weights(), weight_cfg, device, env, segments.share)
    alpha_opt = torch.optim.Adam(net.alphas(), lr=sc.alpha_lr)
    frozen_epochs = math.ceil(sc.freeze_fraction * sc.epochs)
    arch_steps = max(1, round(sc.arch_fraction * sc.steps_per_epoch))
    rng = random.Random(cfg.train.seed)

    at = {"epoch": 0, "in_epoch": 0, "position": 0, "epoch_start": 0, "tau": sc.tau0, "ce_sum": 0.0, "log_bytes": 0}
    mems = None
    if state is not None:
        tensors, meta = state
        resume_lib.load_module(net, tensors, "net", out_dir)
        weights.load_state(tensors, meta["optimizer"])
        resume_lib.load_optimizer(alpha_opt, tensors, meta["alpha_optimizer"], "alpha_optim")
        gumbel.set_state(tensors["gumbel"])
        resume_lib.restore_python_rng(meta["arch_rng"], rng)
        mems = restore_rank_state(tensors, meta, env, device, cfg.train.batch_size)
        at = meta["progress"]
    log = open_log(out_dir / "search.jsonl", at["log_bytes"], env)

    def save(progress: dict) -> None:
        log.flush()
        tensors, alpha_meta = resume_lib.optimizer_state(alpha_opt, "alpha_optim")
        save_training_state(
            out_dir,
            env,
            device,
            cfg.train.batch_size,
            {"net": net},
            weights,
            mems,
            None,
            {
                "progress": {**progress, "log_bytes": log.tell()},
                "alpha_optimizer": alpha_meta,
                "arch_rng": resume_lib.python_rng(rng),
            },
            extra={**tensors, "gumbel": gumbel.get_state()},
        )

    tau, position = at["tau"], at["position"]
    bar = tqdm(
        range(at["epoch"], sc.epochs),
        desc=f"search t={target:g}",
        disable=quiet or not env.main,
        dynamic_ncols=True,
        initial=at["epoch"],
        total=sc.epochs,
    )
    try:
        for epoch in bar:
            net.set_mode("hard")
            resumed = epoch == at["epoch"] and at["in_epoch"] > 0
            epoch_start, ce_sum = (at["epoch_start"], at["ce_sum"]) if resumed else (position, 0.0)
            tic = time.perf_counter()
            for i in range(at["in_epoch"] if resumed else 0, sc.steps_per_epoch):
                k = position % len(segments)
                if k == 0:
                    mems = None
                net.sample(tau)
                net.train()
                x, y = (t.to(device) for t in segments[k])
                ce, mems = weights.step(net, x, y, mems)
                ce_sum += ce
                position += 1
                if cfg.train.ckpt_every and weights.step_count % cfg.train.ckpt_every == 0:
                    save(
                        {
                            "epoch": epoch,
                            "in_epoch": i + 1,
                            "position": position,
                            "epoch_start": epoch_start,
                            "tau": tau,
                            "ce_sum": ce_sum,
                        }
                    )
            record = {
                "epoch": epoch + 1,
                "tau": tau,
                "weight_ce": ce_sum / sc.steps_per_epoch,
                "weight_step_ms": 1000 * (time.perf_counter() - tic) / sc.steps_per_epoch,
            }
            if epoch >= frozen_epochs:
                start = epoch_start + rng.randrange(max(1, sc.steps_per_epoch - arch_steps + 1))
                record.update(
                    arch_epoch(
                        net,
                        alpha_opt,
                        segments,
                        start,
                        arch_steps,
                        tau,
                        table,
                        baseline_ms,
                        target,
                        cfg,
                        device,
                        env=env,
                        share=segments.share,
                    )
                )
                tau *= sc.tau_decay
            record.update(architecture_state(net, table, baseline_ms, target))
            log.write(json.dumps(record) + "\n")
            bar.set_postfix(ce=f"{record['weight_ce']:.3f}", lat=f"{record['ratio_to_target']:.2f}xT")
        if table.estimate(net.derive()) > baseline_ms * target:
            # The last architecture step can tip the argmax over the target with no step left to pull it back; a
            # few epochs' worth of steps, stopping as soon as the target is met, bring it back.
            start = rng.randrange(len(segments))
            fix = arch_epoch(
                net,
                alpha_opt,
                segments,
                start,
                CORRECTION_EPOCHS * arch_steps,
                tau,
                table,
                baseline_ms,
                target,
                cfg,
                device,
                until_met=True,
                env=env,
                share=segments.share,
            )
            log.write(
                json.dumps(
                    {
                        "epoch": sc.epochs,
                        "tau": tau,
                        "correction": True,
                        **fix,
                        **architecture_state(net, table, baseline_ms, target),
                    }
                )
                + "\n"
            )
    finally:
        log.close()

    found = net.derive()
    estimated = table.estimate(found)
    if env.main:
        found.save(
            out_dir / "arch.json",
            target=target,
            estimated_ms=estimated,
            baseline_ms=baseline_ms,
            estimated_ratio=estimated / baseline_ms,
            meets_target=estimated <= baseline_ms * target,
            space=net.space,
            init_from=str(init_from) if init_from is not None else None,
        )
        save_weights(out_dir / "supernet.safetensors", net)
        resume_lib.clear_states(out_dir)
    distributed.barrier(env)
    return found


def architecture_state(net: SuperNet, table: LatencyTable, baseline_ms: float, target: float) -> dict:
    """Alpha, its probabilities, their expected latency, and the arch the search would return now."""
    probs = torch.softmax(net.alpha_matrix(), dim=-1)
    expected = float(table.expected(probs, net.space))
    found = net.derive()
    return {
        "alpha": net.alpha_matrix().tolist(),
        "probs": probs.tolist(),
        "estimated_ms": expected,
        "ratio_to_target": expected / (baseline_ms * target),
        "arch": found.specs(),
        "arch_estimated_ms": table.estimate(found),
    }


def arch_epoch(
    net: SuperNet,
    opt: torch.optim.Optimizer,
    segments: Segments,
    start: int,
    steps: int,
    tau: float,
    table: LatencyTable,
    baseline_ms: float,
    target: float,
    cfg: Config,
    device,
    until_met: bool = False,
    env: Env = Env(),
    share: float = 1.0,
) -> dict:
    """Soft-sampled steps on alpha alone over a contiguous run of segments (memory carried, weights frozen).

    With ``until_met`` the steps stop as soon as the arch the search would return meets the target. Under data
    parallelism each rank's loss counts by its ``share`` of the batch and alpha's gradients are summed.
    """
    net.set_mode("soft", tau)
    weights = net.weights()
    for p in weights:
        p.requires_grad_(False)
    mems, ce_sum, betas = None, 0.0, []
    try:
        for i in range(steps):
            k = (start + i) % len(segments)
            x, y = (t.to(device) for t in segments[k])
            with autocast(device, cfg.train.precision):
                logits, mems = net(x, mems)
                ce = token_nll(logits, y).mean()
            lat_loss, beta = latency_loss(
                table.expected(net.sampled_probs(), net.space), baseline_ms, target, table.estimate(net.derive())
            )
            opt.zero_grad(set_to_none=True)
            ((ce + lat_loss) * share).backward()
            distributed.average_grads(net.alphas(), env)
            opt.step()
            ce_sum += distributed.all_sum(ce.item() * share, env, device)
            betas.append(beta)
            if until_met and table.estimate(net.derive()) <= baseline_ms * target:
                break
    finally:
        for p in weights:
            p.requires_grad_(True)
        net.set_mode("hard")
    return {"arch_ce": ce_sum / len(betas), "beta": sum(betas) / len(betas)}
