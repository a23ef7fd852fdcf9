"""``planer run``: the whole method into one run directory, resumable stage by stage.

Baseline training (or an imported baseline), the latency table at the batch the user deploys at, then for every
target a search and a retraining of the found arch with the phase-2 recipe, the same for the iso-parameter space
and for every further seed, the matched-latency rivals of every found model (dense ones shrunk by hand, and the
trained baseline with the blocks two pruning methods drop), the fixed designs (Sandwich over a few K, PAR),
evaluation of every model on valid and test, end-to-end latency against the baseline, and the report. A stage
whose output is complete is skipped, and an unfinished training or search continues from its newest resume state,
so an interrupted run continues where it stopped.

Every model directory gets a manifest, ``run.json`` (a ``Manifest``: design, target, seed, arch, the search it came
from, its recipe): the report reads those and never parses a directory name. The knapsack's measured option losses
are kept in the run directory (``option-losses.json``), so a second target or seed only solves the knapsack again.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from planer.config import Config, phase2_steps, saved_config_matches, steps_for_tokens, with_vocab_size
from planer.errors import PlanerError
from planer.evaluation.evaluate import evaluate_run, score_split
from planer.evaluation.importance import calibration_sample
from planer.evaluation.pruning import skipping
from planer.io.checkpoint import (
    CONFIG,
    WEIGHTS,
    atomic_write_text,
    load_checkpoint,
    load_meta,
    read_json_object,
    with_checkpoint_model,
)
from planer.io.data import check_same_vocab, load_corpus
from planer.io.records import Manifest, SearchRecord, TrainingSummary
from planer.latency.table import LatencyTable, at_batch, bench, load_or_profile
from planer.models.arch import Arch, BlockSpec
from planer.report.markdown import write_report
from planer.search.designs import (
    PRUNE_RIVALS,
    RIVAL_GROUPS,
    RIVALS,
    WIDTH_RIVALS,
    Calibration,
    Rival,
    iso_config,
    named_arch,
    rivals,
    sandwich_sweep,
)
from planer.search.methods import SEARCHERS, SearchJob, check_search, limit_table_path
from planer.search.option_cache import CACHE_FILE
from planer.training.distributed import resolve_device
from planer.training.loop import RunOptions
from planer.training.train import Recipe, phase2_recipe, train

BENCH_BATCHES = (1, 8, 64)
DESIGNS = (*RIVAL_GROUPS, *RIVALS, "sandwich", "par", "iso")


def narrows_feed_forward(space: list[str]) -> bool:
    """Whether a search space offers narrowed feed-forward blocks (``ffl:N``), which the uniform-width rival needs."""
    return any(BlockSpec.parse(s).neurons for s in space)


@dataclass(frozen=True)
class Plan:
    """What a run holds besides its config: targets, comparisons, repeats and where latency matters."""

    targets: tuple[float, ...] = (0.5,)
    designs: tuple[str, ...] = ()  # rival groups (dense, prune) or rivals (dense-depth, ...), sandwich, par, iso
    methods: tuple[str, ...] = ()  # search methods besides the config's, each compared with the same rivals
    seeds: int = 1
    batches: tuple[int, ...] = BENCH_BATCHES  # the end-to-end benchmark's batch sizes
    baseline: Path | None = None  # a trained (or imported) baseline to use instead of training one

    def rivals(self, space: list[str]) -> tuple[str, ...]:
        """The rivals to train: those named, and every one of a group named (``dense``, ``prune``). A search
        ``space`` that offers narrowed feed-forward blocks adds the uniform-width rival to ``dense``: a found model
        that narrows them is judged against the same widths applied alike."""
        asked = {r for d in self.designs for r in RIVAL_GROUPS.get(d, (d,))}
        if "dense" in self.designs and narrows_feed_forward(space):
            asked.update(WIDTH_RIVALS)
        return tuple(r for r in RIVALS if r in asked)

    def check(self, cfg: Config, out: Path) -> None:
        """Refuse a plan that cannot run, before any work: its targets and search methods (with ``cfg``, the
        baseline to be trained in ``out``), seeds, batch sizes and Sandwich's K."""
        for method in dict.fromkeys((cfg.search.method, *self.methods)):
            check_search(method, cfg, self.targets, out / "baseline")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise PlanerError(f"--seeds must be a positive integer, got {self.seeds}")
        if not self.batches or any(b <= 0 for b in self.batches):
            raise PlanerError(f"batch sizes must be positive integers, got {list(self.batches)}")
        for d in self.designs:
            if d.startswith("sandwich:"):
                named_arch(d, cfg.model)  # a bad K stops the run before any work
        if "uniform-width" in self.designs and not narrows_feed_forward(cfg.search.space):
            raise PlanerError("the uniform-width rival needs narrowed feed-forward options (ffl:N) in search.space")


@dataclass(frozen=True)
class RunResult:
    """What ``run_pipeline`` did: the run directory (its report is ``path/report.md``) and every stage with its
    status (``ran``, or ``done before, skipped``), in the order the run went."""

    path: Path
    stages: tuple[tuple[str, str], ...]


def target_name(target: float) -> str:
    return f"t{target:.2f}"


def parse_designs(text: str) -> tuple[str, ...]:
    """``dense,prune,sandwich,par,iso`` (or single rivals, ``dense-depth``) and explicit ``sandwich:K``; an empty
    string means PLANER alone."""
    designs = tuple(d.strip() for d in text.split(",") if d.strip())
    for d in designs:
        if d not in DESIGNS and not d.startswith("sandwich:"):
            raise PlanerError(f"unknown design '{d}': expected {', '.join(DESIGNS)} or sandwich:K")
    return designs


class Pipeline:
    """The stages of one run directory, each skipped when its output is complete."""

    def __init__(self, cfg: Config, out: Path, plan: Plan, force: bool):
        """``self.cfg`` is ``cfg`` resolved for the corpus, what every stage runs with; ``cfg`` is left alone."""
        self.out, self.plan, self.force = out, plan, force
        self.corpus = load_corpus(cfg.data)
        self.cfg = with_vocab_size(cfg, len(self.corpus.vocab))
        self.models: list[Path] = []
        self.stages: list[tuple[str, str]] = []

    def stage(self, name: str, done: Path, work) -> None:
        """Run ``work`` unless ``done`` exists (or with --force); the run's summary says which it was."""
        if self.force or not done.exists():
            print(f"planer run: {name}", flush=True)
            work()
            self.stages.append((name, "ran"))
        else:
            self.stages.append((name, "done before, skipped"))

    def options(self) -> RunOptions:
        return RunOptions(force=True, resume=not self.force, corpus=self.corpus)

    def trained(self, name: str, arch: Arch, cfg: Config, recipe: Recipe, manifest: Manifest) -> Path:
        """Train ``arch`` into ``name`` (unless done) and write its ``manifest``, completed with what it trained."""
        path = self.out / name
        self.stage(f"train {name}", path / TrainingSummary.FILE, lambda: train(cfg, path, arch, recipe, self.options()))
        dataclasses.replace(manifest, arch=arch.specs(), seed=cfg.train.seed, recipe=recipe.to_dict()).save(path)
        self.models.append(path)
        return path

    def recipe(self, arch: Arch, model: dict | None = None, search: Path | None = None) -> Recipe:
        """Phase 2's recipe for ``arch`` (``model``: a rival's changes to the config, such as another width)."""
        block_steps = steps_for_tokens(self.cfg, self.cfg.phase2.block_tokens)
        return phase2_recipe(
            self.cfg.phase2, self.baseline, arch, search, same_width=not model, block_steps=block_steps
        )

    def phase2_cfg(self, seed: int, model: dict | None = None) -> Config:
        """The config phase-2 models train with: the phase-2 budget, ``seed``, and ``model`` changes (a rival's)."""
        cfg = self.cfg
        return dataclasses.replace(
            cfg,
            model=dataclasses.replace(cfg.model, **(model or {})),
            train=dataclasses.replace(cfg.train, seed=seed, steps=phase2_steps(cfg)),
        )

    def baseline_stage(self) -> Path:
        path = self.out / "baseline"
        if self.plan.baseline is not None:
            self.stage(
                "copy the given baseline",
                path / "summary.json",
                lambda: adopt_baseline(self.plan.baseline, path, self.cfg),
            )
        else:
            arch = Arch.baseline(self.cfg.model.n_layer, self.cfg.model.n_head)
            self.stage(
                "train baseline", path / "summary.json", lambda: train(self.cfg, path, arch, options=self.options())
            )
        model_arch = load_checkpoint(path)[0].arch
        Manifest(design="baseline", arch=model_arch.specs(), seed=self.cfg.train.seed).save(path)
        self.models.append(path)
        self.baseline = path
        return path

    def searched(self, design: str, cfg: Config, target: float, seed: int) -> tuple[Path, Arch]:
        """Search ``target`` (the config's method) and retrain the found arch; returns the model and its arch."""
        name = f"{design}-{target_name(target)}" + (f"-s{seed + 1}" if seed else "")
        found = self.out / ("search-" + name.removeprefix("planer-"))
        lut = self.out / "lut.json"
        run_cfg = self.phase2_cfg(cfg.train.seed + seed)
        run_cfg = dataclasses.replace(run_cfg, search=cfg.search)
        job = SearchJob(run_cfg, found, target, lut, self.baseline, self.options(), self.out / CACHE_FILE)
        method = cfg.search.method
        self.stage(f"search {name} ({method})", found / SearchRecord.FILE, lambda: SEARCHERS[method].run(job))
        arch = SearchRecord.read(found).found
        manifest = Manifest(design=design, target=target, repeat=seed + 1, search=found.name, method=method)
        return self.trained(name, arch, run_cfg, self.recipe(arch, search=found), manifest), arch

    def rival_stage(self, found: Path, arch: Arch, target: float, seed: int) -> None:
        """The rivals of one found model, sized to its estimate, trained with its recipe and seed."""
        sized = self.out / found.name / "rivals.json"
        known = {} if self.force or not sized.exists() else {r["name"]: r for r in json.loads(sized.read_text())}
        missing = tuple(name for name in self.plan.rivals(self.cfg.search.space) if name not in known)
        if missing:  # a resumed run that asks for more rivals sizes only the new ones
            table = LatencyTable.load(self.out / "lut.json")
            calibration = self.calibration() if set(missing) & set(PRUNE_RIVALS) else None
            for name in missing:  # each timed: FinerCut's greedy order alone can take longer than a training
                tic = time.perf_counter()
                rival = rivals(arch, table, self.cfg, (name,), calibration=calibration)[0]
                known[name] = self.sizing(rival, calibration) | {"seconds": round(time.perf_counter() - tic, 1)}
            atomic_write_text(sized, json.dumps(list(known.values()), indent=1) + "\n")
        for rival in (known[name] for name in self.plan.rivals(self.cfg.search.space)):
            name = f"{rival['name']}-{target_name(target)}" + (f"-s{seed + 1}" if seed else "")
            rival_arch = Arch.parse(" ".join(rival["arch"]))
            cfg = self.phase2_cfg(self.cfg.train.seed + seed, rival["model"])
            recipe = self.recipe(rival_arch, rival["model"])
            design = "prune" if rival["name"] in PRUNE_RIVALS else "dense"
            manifest = Manifest(design=design, rival=rival["name"], target=target, repeat=seed + 1,
                                rival_of=found.name, sizing=rival)  # fmt: skip
            self.trained(name, rival_arch, cfg, recipe, manifest)

    def calibration(self) -> Calibration:
        """The trained baseline, on the training device, and the calibration sample the pruned rivals measure it on
        (the knapsack's: ``search.sample_segments`` segments of the training split)."""
        model = load_checkpoint(self.baseline, resolve_device(self.cfg.train.device))[0]
        return Calibration(model, calibration_sample(self.cfg, self.corpus.train))

    def sizing(self, rival: Rival, calibration: Calibration | None) -> dict:
        """A rival's entry of rivals.json; a pruned rival's with its score on valid and test before phase 2
        (``before_training``: the baseline's weights with its blocks skipped, untrained)."""
        if rival.name not in PRUNE_RIVALS:
            return rival.to_dict()
        model, skipped = calibration.model, [p for p, block in enumerate(rival.arch) if block.kind == "skip"]
        with skipping(model, skipped):
            scores = {split: score_split(model, self.cfg, self.corpus, split) for split in ("valid", "test")}
        return rival.to_dict() | {"before_training": scores}

    def fixed_designs(self) -> None:
        designs, n_layer = self.plan.designs, self.cfg.model.n_layer
        ks = sorted({int(d.split(":")[1]) for d in designs if d.startswith("sandwich:")}
                    | (set(sandwich_sweep(n_layer)) if "sandwich" in designs else set()))  # fmt: skip
        names = [(f"sandwich-k{k}", f"sandwich:{k}", "sandwich") for k in ks]
        names += [("par", "par", "par")] if "par" in designs else []
        runs = []
        for name, spec, design in names:
            arch = named_arch(spec, self.cfg.model)
            cfg = self.phase2_cfg(self.cfg.train.seed)
            runs.append(self.trained(name, arch, cfg, self.recipe(arch), Manifest(design=design)))
        if ks:
            _choose_sandwich(self.out, runs[: len(ks)])

    def measure(self) -> None:
        """Every model on valid and test; every model but the baseline timed beside it."""
        for model in self.models:
            scored = read_json_object(model / "eval.json")
            for split in ("valid", "test"):
                if self.force or split not in scored:
                    evaluate_run(model, split)
            if model != self.baseline:
                self.stage(
                    f"bench {model.name}", model / "bench.json", lambda: bench(model, self.baseline, self.plan.batches)
                )


def check_baseline(source: Path, corpus) -> None:
    """Refuse a given baseline whose vocabulary is not the run's ``corpus``'s (its model section is the run's
    already, see ``with_checkpoint_model``), before any work."""
    vocab = load_checkpoint(source)[2]
    check_same_vocab(vocab, corpus.vocab, f"--baseline {source}")


def adopt_baseline(source: Path, path: Path, cfg: Config) -> None:
    """Copy a trained or imported checkpoint in as the run's baseline: its weights and tokenizer, its config.json
    with the run's model, data and eval sections, and a summary marking it done.

    The run's model section is the checkpoint's architecture (``with_checkpoint_model``) with the run's segment
    length and what only training reads, so that the baseline is scored like every other model of the run. The
    data sections are the run's because an imported model knows no data, and every model of the run must be
    scored on the same splits.
    """
    model = load_checkpoint(source)[0]
    meta = load_meta(source)
    meta["config"] |= {k: dataclasses.asdict(getattr(cfg, k)) for k in ("model", "data", "eval")}
    path.mkdir(parents=True, exist_ok=True)
    for name in (WEIGHTS, "tokenizer.json"):
        if (source / name).exists():
            shutil.copy2(source / name, path / name)
    atomic_write_text(path / CONFIG, json.dumps(meta, indent=1) + "\n")
    TrainingSummary(params=model.num_params(), arch=model.arch.specs(), adopted_from=str(source)).save(path)


def run_pipeline(cfg: Config, out: str | Path, plan: Plan = Plan(), force: bool = False) -> RunResult:
    """Every stage of ``plan`` into ``out``; returns the run directory (its report is ``out/report.md``) and what
    each stage did. With ``plan.baseline`` its checkpoint decides the model (``with_checkpoint_model``) for every
    stage. ``cfg`` is left as it was given."""
    out = Path(out)
    if plan.baseline is not None:
        cfg = with_checkpoint_model(cfg, plan.baseline)
    plan.check(cfg, out)
    run = Pipeline(cfg, out, plan, force)
    cfg = run.cfg
    if plan.baseline is not None:
        check_baseline(plan.baseline, run.corpus)
    _claim_run_dir(out, cfg, force)
    run.baseline_stage()
    lut = out / "lut.json"
    run.stage(f"profile blocks at batch {cfg.latency.batch_size}", lut, lambda: load_or_profile(cfg, lut, force=force))
    for batch in sorted(cfg.search.limits):
        path = limit_table_path(lut, batch)
        run.stage(f"profile blocks at batch {batch} (search.limits)", path,
                  lambda b=batch, p=path: load_or_profile(at_batch(cfg, b), p, force=force))  # fmt: skip
    searched = [("planer", cfg)]
    searched += [(f"planer-{m}", _with_method(cfg, m)) for m in plan.methods if m != cfg.search.method]
    if "iso" in plan.designs:
        searched.append(("iso", iso_config(cfg)))
    for seed in range(plan.seeds):
        for design, design_cfg in searched:
            for t in plan.targets:
                found, arch = run.searched(design, design_cfg, t, seed)
                if design == "planer" and plan.rivals(cfg.search.space):
                    run.rival_stage(found, arch, t, seed)
    run.fixed_designs()
    run.measure()
    write_report(out)
    return RunResult(out, tuple(run.stages))


def _with_method(cfg: Config, method: str) -> Config:
    return dataclasses.replace(cfg, search=dataclasses.replace(cfg.search, method=method))


def _choose_sandwich(out: Path, runs: list[Path]) -> None:
    """Record the sweep over K and the K with the lowest valid loss, the Sandwich design the report compares."""
    for run in runs:
        scored = read_json_object(run / "eval.json")
        if "valid" not in scored:
            evaluate_run(run, "valid")
    sweep = {run.name: read_json_object(run / "eval.json")["valid"]["loss"] for run in runs}
    chosen = min(sweep, key=sweep.get)
    atomic_write_text(out / "sandwich.json", json.dumps({"valid_loss": sweep, "chosen": chosen}, indent=1) + "\n")


def _claim_run_dir(out: Path, cfg: Config, force: bool) -> None:
    """A run directory belongs to one config: resuming with another would mix results, so it is refused."""
    resolved = out / "config.yaml"
    if (out / "model.safetensors").exists():
        raise PlanerError(f"{out} holds a trained model, not a planer run directory; use another --out")
    if resolved.exists() and not force:
        if not saved_config_matches(resolved, cfg):
            raise PlanerError(f"run directory {out} was made with a different config; use another --out or --force")
    else:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(resolved)
