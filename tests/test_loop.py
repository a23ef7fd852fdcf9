"""The shared loop against plain reference loops written out here: same seed, bit-identical results.

The references restate the algorithms with nothing but the model, the optimiser and the segment stream, so a change
to the loop's machinery (setup order, random streams, resets, losses) that alters what is computed fails here.
"""

import dataclasses
import json
import math
import random

import pytest
import torch
from conftest import hand_table
from safetensors.torch import load_file

from planer.io.checkpoint import load_checkpoint
from planer.io.data import Segments, load_corpus
from planer.models.arch import Arch
from planer.models.language_model import token_nll
from planer.models.txl.model import TransformerXL
from planer.search.gumbel import GumbelSearch, latency_loss, search
from planer.search.supernet import SuperNet
from planer.training.loop import Loop, RunOptions
from planer.training.optim import Lamb, lr_at
from planer.training.step import distill_loss
from planer.training.train import Recipe, train


def lamb_step(opt, params, step: int, tc, loss) -> None:
    for group in opt.param_groups:
        group["lr"] = lr_at(step, tc.lr, tc.warmup, tc.steps, tc.eta_min)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, tc.clip)
    opt.step()


def test_training_equals_a_plain_reference_loop(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=30", "train.eval_every=30", "train.ckpt_every=0", "model.n_layer=1",
                   "model.dropout=0.1")  # fmt: skip
    arch = Arch.parse("attn:2 moe:top1")
    train(cfg, tmp_path / "run", arch, options=RunOptions(quiet=True))

    tc, corpus = cfg.train, load_corpus(cfg.data)
    segments = Segments(corpus.train, tc.batch_size, cfg.model.tgt_len)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    model = TransformerXL(dataclasses.replace(cfg.model, vocab_size=len(corpus.vocab)), arch)
    torch.manual_seed(tc.seed)
    params = list(model.parameters())
    opt = Lamb(params, lr=tc.lr, weight_decay=tc.weight_decay)
    mems, losses = None, []
    for step in range(tc.steps):
        k = step % len(segments)
        mems = None if k == 0 else mems
        x, y = segments[k]
        model.train()
        logits, mems = model(x, mems)
        ce = token_nll(logits, y).mean()
        lamb_step(opt, params, step, tc, ce + tc.balance_coef * model.aux_loss())
        losses.append(ce.item())

    trained = load_checkpoint(tmp_path / "run")[0].state_dict()
    assert all(torch.equal(trained[k], v) for k, v in model.state_dict().items())
    logged = [
        json.loads(l)["loss"] for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in l
    ]
    assert logged == [sum(losses[i : i + 10]) / 10 for i in range(0, tc.steps, 10)]


def search_cfg(tiny_cfg, tmp_path):
    cfg = tiny_cfg("search.epochs=3", "search.steps_per_epoch=6", "search.freeze_fraction=0.3",
                   "search.arch_fraction=0.5", "model.n_layer=1", "model.dropout=0.1", "train.ckpt_every=0")  # fmt: skip
    cfg.search.space = ["skip", "attn:1", "attn:4", "ffl"]
    cfg.model.vocab_size = len(load_corpus(cfg.data).vocab)
    table = hand_table(cfg)
    table.save(tmp_path / "lut.json")
    return cfg, table


def test_search_equals_a_plain_reference_loop(tiny_cfg, tmp_path):
    cfg, table = search_cfg(tiny_cfg, tmp_path)
    target = 0.9
    search(cfg, tmp_path / "s", target, lut_path=tmp_path / "lut.json", options=RunOptions(quiet=True))

    tc, sc = cfg.train, cfg.search
    segments = Segments(load_corpus(cfg.data).train, tc.batch_size, cfg.model.tgt_len)
    random.seed(tc.seed)
    torch.manual_seed(tc.seed)
    gumbel = torch.Generator().manual_seed(tc.seed)
    net = SuperNet(cfg.model, sc.space, 2)
    net.use_generator(gumbel)
    torch.manual_seed(tc.seed)
    weights = net.weights()
    opt = Lamb(weights, lr=tc.lr, weight_decay=tc.weight_decay)
    alpha_opt = torch.optim.Adam(net.alphas(), lr=sc.alpha_lr)
    wtc = dataclasses.replace(tc, steps=sc.epochs * sc.steps_per_epoch)
    rng, tau, position, mems, steps = random.Random(tc.seed), sc.tau0, 0, None, 0
    baseline_ms = table.baseline(cfg)
    for epoch in range(sc.epochs):
        net.set_mode("hard")
        epoch_start = position
        for _ in range(sc.steps_per_epoch):
            k = position % len(segments)
            mems = None if k == 0 else mems
            net.sample(tau)
            net.train()
            x, y = segments[k]
            logits, mems = net(x, mems)
            lamb_step(opt, weights, steps, wtc, token_nll(logits, y).mean())
            position, steps = position + 1, steps + 1
        if epoch >= 1:  # freeze_fraction 0.3 of 3 epochs: the first is frozen
            start = epoch_start + rng.randrange(sc.steps_per_epoch - 3 + 1)
            net.set_mode("soft", tau)
            for p in weights:
                p.requires_grad_(False)
            arch_mems = None
            for i in range(3):
                k = (start + i) % len(segments)
                arch_mems = None if k == 0 else arch_mems
                x, y = segments[k]
                logits, arch_mems = net(x, arch_mems)
                ce = token_nll(logits, y).mean()
                sampled = table.expected(net.sampled_probs(), net.space)
                lat, _ = latency_loss(sampled, baseline_ms, target, table.estimate(net.derive()))
                alpha_opt.zero_grad(set_to_none=True)
                (ce + lat).backward()
                alpha_opt.step()
            for p in weights:
                p.requires_grad_(True)
            net.set_mode("hard")
            tau *= sc.tau_decay

    saved = load_file(str(tmp_path / "s" / "supernet.safetensors"))
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    found = json.loads((tmp_path / "s" / "arch.json").read_text())
    assert found["arch"] == net.derive().specs() and found["meets_target"]
    records = [json.loads(l) for l in (tmp_path / "s" / "search.jsonl").read_text().splitlines()]
    assert len(records) == 3 and records[-1]["alpha"] == net.alpha_matrix().tolist()


def test_architecture_steps_reset_memory_at_the_stream_end(tiny_cfg, tmp_path):
    cfg, table = search_cfg(tiny_cfg, tmp_path)
    phase1 = GumbelSearch(Loop(cfg, tmp_path / "s", RunOptions(quiet=True), done="arch.json"), table, 0.9, None)
    seen = []
    forward = phase1.net.forward

    def spy(x, mems=None):
        seen.append(mems is None)
        return forward(x, mems)

    phase1.net.forward = spy
    last = len(phase1.loop.segments) - 1
    phase1.arch_epoch(last - 1, 4)  # segments last-1, last, 0, 1
    assert seen == [True, False, True, False]


def test_distillation_loss_equals_a_hand_computation():
    student = torch.tensor([[[1.0, 0.0, -1.0]]])
    teacher = torch.tensor([[[0.0, 2.0, 0.0]]])
    ce = torch.tensor(0.7)
    w, t = 0.25, 2.0
    soft = [math.exp(v / t) for v in (0.0, 2.0, 0.0)]
    p = [v / sum(soft) for v in soft]
    s = [math.exp(v / t) for v in (1.0, 0.0, -1.0)]
    q = [v / sum(s) for v in s]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    assert distill_loss(student, teacher, ce, w, t).item() == pytest.approx((1 - w) * 0.7 + w * t * t * kl, rel=1e-6)


def test_distilled_training_differs_from_plain_and_follows_the_teacher(tiny_cfg, tmp_path):
    cfg = tiny_cfg("train.steps=40", "train.eval_every=40", "model.n_layer=1", "distill.weight=1.0")
    options = RunOptions(quiet=True)
    train(cfg, tmp_path / "teacher", Arch.parse("attn:4 ffl"), options=options)
    plain = train(cfg, tmp_path / "plain", Arch.parse("attn:1 ffl"), options=options)
    taught = train(cfg, tmp_path / "taught", Arch.parse("attn:1 ffl"), Recipe(teacher=tmp_path / "teacher"), options)
    assert taught.recipe["teacher"] == str(tmp_path / "teacher") and plain.recipe["teacher"] is None
    assert taught.best_valid_loss != plain.best_valid_loss


def test_the_loop_resolves_a_copy_of_the_config(tiny_cfg, tmp_path):
    """The vocabulary size is part of the config a run resolves and saves, not written into the caller's."""
    cfg = tiny_cfg()
    loop = Loop(cfg, tmp_path / "run", RunOptions(quiet=True), done="summary.json")
    assert cfg.model.vocab_size == 0 and loop.cfg.model.vocab_size == len(loop.corpus.vocab) > 0
    assert loop.cfg == dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=len(loop.corpus.vocab)))
