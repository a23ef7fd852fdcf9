"""Training of a fixed architecture: the baseline, a named design, a rival, or the arch the search found (phase 2).

Segments are served in order with memory carried across them, as Transformer-XL trains. The checkpoint kept is
the best on validation, since small corpora overfit long before the schedule ends. Phase 2 may learn from the
trained baseline: its logits (distillation, ``Recipe.teacher``).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from planer.config import Config, Phase2Config
from planer.errors import PlanerError
from planer.evaluation.importance import calibration_sample, rank_heads, rank_units, record_blocks
from planer.io.checkpoint import SUPERNET, atomic_write_text, load_checkpoint, load_weights, read_json_object
from planer.io.data import Corpus, Vocab, check_same_vocab
from planer.io.records import SearchRecord, TrainingSummary
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.search.supernet import SuperNet
from planer.training.blockwise import BLOCKS_FILE, changed_blocks, distil_blocks
from planer.training.inherit import can_inherit, from_supernet, hidden_units, inherit
from planer.training.loop import Fit, Loop, Progress, RunOptions
from planer.training.step import Teacher, WeightTrainer


@dataclass(frozen=True)
class Recipe:
    """What a training learns from besides its data; the distillation's weight and temperature are in the config."""

    teacher: Path | None = None  # a trained model to distil from
    init_from: Path | None = None  # a trained model (ranked heads, FFL, experts) or a search folder (its supernet)
    block_steps: int = 0  # of the training's steps, those that first train each changed block alone (blockwise.py)

    def to_dict(self) -> dict:
        paths = {
            k: None if v is None else str(v) for k, v in (("teacher", self.teacher), ("init_from", self.init_from))
        }
        return paths | ({"block_steps": self.block_steps} if self.block_steps else {})


def phase2_recipe(
    p2: Phase2Config,
    baseline: Path,
    arch: Arch,
    search: Path | None = None,
    same_width: bool = True,
    block_steps: int = 0,
) -> Recipe:
    """Phase 2's recipe for ``arch``: the baseline as teacher, and its weights where the arch can take them (not a
    model of another width, nor an arch with a block its position's baseline block cannot start, such as a
    feed-forward block where the baseline has attention); where it cannot, the options its ``search``'s supernet
    trained (a Gumbel search's, itself warm-started from the baseline). ``block_steps`` of the training's steps
    go to block-wise distillation where the baseline's weights start the arch."""
    init = None
    if p2.init == "baseline" and same_width:
        if can_inherit(load_checkpoint(baseline)[0], arch):
            init = baseline
        elif search is not None and (search / SUPERNET).exists():
            init = search
    teacher = baseline if p2.teacher else None
    return Recipe(teacher, init, block_steps if teacher is not None and init == baseline else 0)


def inherited_weights(source: Path, cfg: Config, arch: Arch, corpus: Corpus) -> dict[str, torch.Tensor]:
    """The weights ``arch`` starts from: a search folder's supernet options, or a trained model's blocks with
    each attention block's most important heads (ranked on a sample of training segments)."""
    if (source / SUPERNET).exists():
        found = SearchRecord.read(source)
        net = SuperNet(cfg.model, found.space if found and found.space else cfg.search.space, len(arch))
        load_weights(net, source / SUPERNET)
        return from_supernet(net, arch, cfg.model).state_dict()
    model, _, vocab = load_checkpoint(source)
    check_same_vocab(vocab, corpus.vocab, str(source))
    # only blocks that keep fewer heads or hidden units than their source's need a ranking: all are kept in order
    pairs = list(enumerate(zip(arch, model.blocks)))
    heads = {p for p, (spec, src) in pairs if spec.kind == "attn" and spec.heads < src.n_head}
    units = {p for p, (spec, src) in pairs if spec.kind == "ffl" and spec.hidden(cfg.model.d_inner) < hidden_units(src)}
    if not heads and not units:
        return inherit(model, arch, {}, cfg.model).state_dict()
    sample = calibration_sample(cfg, corpus.train)
    recorded = record_blocks(model, sample)
    ranking = rank_heads(model, sample, recorded, positions=heads) | rank_units(model, recorded[1], units)
    return inherit(model, arch, ranking, cfg.model).state_dict()


def distil_changed_blocks(loop: Loop, model: torch.nn.Module, trainer: WeightTrainer, positions: list[int],
                          steps: int) -> None:  # fmt: skip
    """Block-wise distillation before the whole model trains, on the segments after those the whole model reads.

    Its record goes to ``blocks.json``, and its result is the whole training's first resume state, so that a
    resumed run starts the whole model from it instead of distilling again.
    """
    segments = ((seg.x.to(loop.device), seg.reset) for seg in loop.segments.walk(loop.cfg.train.steps, steps))
    bar = loop.bar(f"distil {len(positions)} changed blocks", 0, steps)
    try:
        tc = dataclasses.replace(loop.cfg.train, steps=steps)
        record = distil_blocks(model, trainer.teacher, positions, segments, tc, bar, trainer.share, loop.env)
    finally:
        bar.close()
    if loop.env.main:
        atomic_write_text(loop.out_dir / BLOCKS_FILE, json.dumps(record) + "\n")
    loop.save_state({"model": model}, trainer, None, {"progress": vars(Progress(window=[]))}, {})


def check_teacher(teacher: Teacher, vocab: Vocab, where: Path) -> None:
    """A teacher must predict the same symbols as the student, so that their distributions compare."""
    check_same_vocab(teacher.vocab, vocab, f"teacher {where}")


def train(
    cfg: Config, out_dir: str | Path, arch: Arch, recipe: Recipe = Recipe(), options: RunOptions = RunOptions()
) -> TrainingSummary:
    """Train ``arch`` and keep the best-on-valid checkpoint in ``out_dir``; returns its summary.json.

    Every ``train.ckpt_every`` steps a full state goes to ``out_dir/resume``; ``options.resume`` continues from
    the newest one (or starts afresh where there is none), and ends with the weights an uninterrupted run ends
    with. Started by torchrun, every rank trains on its share of each batch and rank 0 alone writes.
    """
    if len(arch) != 2 * cfg.model.n_layer:
        raise PlanerError(
            f"the architecture has {len(arch)} blocks, but model.n_layer={cfg.model.n_layer} means "
            f"{2 * cfg.model.n_layer}; give {2 * cfg.model.n_layer} blocks or set model.n_layer"
        )
    teacher = Teacher(recipe.teacher, cfg.distill) if recipe.teacher is not None else None
    changed = changed_blocks(arch, teacher.model.arch) if teacher is not None and recipe.block_steps else []
    block_steps = min(recipe.block_steps, cfg.train.steps - 1) if changed else 0
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, steps=cfg.train.steps - block_steps))
    loop = Loop(cfg, out_dir, options, done=TrainingSummary.FILE)
    cfg = loop.cfg
    model = build_model(cfg.model, arch)
    with loop.setting_up():
        if teacher is not None:
            check_teacher(teacher, loop.corpus.vocab, recipe.teacher)
        if recipe.init_from is not None:
            with torch.random.fork_rng(devices=[]):  # the start must not move the run's random stream
                model.load_state_dict(inherited_weights(recipe.init_from, cfg, arch, loop.corpus))
    loop.place(model)
    trainer = loop.trainer(model.parameters(), cfg.train, cfg.train.balance_coef)
    if teacher is not None:
        trainer.teacher = teacher.to(loop.device)
    if block_steps and loop.state is None:
        distil_changed_blocks(loop, model, trainer, changed, block_steps)
    fit = Fit(loop, model, trainer).run(f"train {arch.short()[:24]}")
    blocks = read_json_object(loop.out_dir / BLOCKS_FILE) if block_steps else {}
    if blocks:  # the totals count both stages
        tokens_per_step = cfg.train.batch_size * cfg.model.tgt_len
        fit |= {"steps": fit["steps"] + blocks["steps"], "tokens": fit["tokens"] + blocks["steps"] * tokens_per_step,
                "seconds": fit["seconds"] + blocks["seconds"]}  # fmt: skip
    summary = TrainingSummary(
        **fit, params=model.num_params(), arch=arch.specs(), recipe=recipe.to_dict(), block_distillation=blocks or None
    )
    loop.finish(lambda: summary.save(loop.out_dir))  # marks a finished run
    return summary
