"""Block-wise distillation: which blocks learn alone, that they learn the teacher block's job, and how its steps
share the training's budget."""

import dataclasses
import json

import pytest
import torch
from conftest import LLAMA_SETTINGS

from planer.io.checkpoint import load_checkpoint
from planer.io.data import Segments, load_corpus
from planer.models.arch import Arch
from planer.training.blockwise import block_loss, changed_blocks, distil_blocks
from planer.training.inherit import inherit
from planer.training.loop import RunOptions
from planer.training.step import Teacher
from planer.training.train import Recipe, train

QUIET = RunOptions(quiet=True)


def test_only_blocks_with_weights_that_differ_from_the_source_are_changed():
    source = Arch.parse("attn:4 ffl attn:4 ffl attn:4 ffl")
    assert changed_blocks(Arch.parse("attn:2 ffl skip ffl attn:4 skip"), source) == [0]
    assert changed_blocks(Arch.parse("skip skip attn:4 ffl ffl attn:1"), source) == [4, 5]
    assert changed_blocks(source, source) == []


def test_the_block_loss_is_relative_to_the_teachers_change():
    x = torch.zeros(1, 2, 3)
    target = torch.ones(1, 2, 3)
    assert block_loss(x, target, x).item() == pytest.approx(1.0)  # doing nothing costs the whole change
    assert block_loss(target, target, x).item() == 0.0
    assert block_loss(x + 0.5, 10 * target, 10 * x).item() == pytest.approx(block_loss(x + 0.05, target, x).item())


@pytest.fixture
def teacher_dir(tiny_cfg, tmp_path):
    cfg = tiny_cfg(*LLAMA_SETTINGS, "train.steps=60", "train.eval_every=60", "model.n_layer=2")
    train(cfg, tmp_path / "teacher", Arch.parse("attn:4 ffl attn:4 ffl"), options=QUIET)
    return cfg, tmp_path / "teacher"


def test_distillation_trains_only_the_changed_blocks_towards_the_teachers(teacher_dir):
    cfg, path = teacher_dir
    teacher = Teacher(path, cfg.distill)
    arch = Arch.parse("attn:2 ffl skip ffl")
    model = inherit(teacher.model, arch, {0: [(h, 0.0) for h in range(4)]}, teacher.model.cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    corpus = load_corpus(cfg.data)
    segments = ((s.x, s.reset) for s in Segments(corpus.train, 8, cfg.model.tgt_len).walk(0, 40))
    tc = dataclasses.replace(cfg.train, steps=40)
    record = distil_blocks(model, teacher, changed_blocks(arch, teacher.model.arch), segments, tc)
    assert record["positions"] == [0] and record["steps"] == 40
    assert record["last_loss"][0] < 0.5 * record["first_loss"][0]
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("blocks.0.") for k in moved)


def test_block_steps_come_out_of_the_budget_and_are_recorded(teacher_dir, tmp_path):
    cfg, path = teacher_dir
    cfg.train.steps, cfg.train.eval_every = 20, 10
    recipe = Recipe(teacher=path, init_from=path, block_steps=6)
    narrowed = train(cfg, tmp_path / "narrowed", Arch.parse("attn:2 ffl attn:4 ffl"), recipe, QUIET)
    assert (narrowed.steps, narrowed.block_distillation["steps"]) == (20, 6)
    assert narrowed.tokens == 20 * cfg.train.batch_size * cfg.model.tgt_len
    assert narrowed.recipe["block_steps"] == 6
    steps = [json.loads(line)["step"] for line in (tmp_path / "narrowed" / "metrics.jsonl").open()]
    assert max(steps) == 14  # the whole model trained the rest
    # an arch that only skips blocks has nothing to distil alone: the whole budget trains the whole model
    skipped = train(cfg, tmp_path / "skipped", Arch.parse("skip ffl attn:4 ffl"), recipe, QUIET)
    assert skipped.steps == 20 and skipped.block_distillation is None
    model, _, _ = load_checkpoint(tmp_path / "narrowed")
    assert model.arch == Arch.parse("attn:2 ffl attn:4 ffl")
