"""The report's rows: one ``ModelRow`` per trained model of a run directory, read back from the files its stages
wrote (``collect``), which the tables, the verdict and the figures all read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from planer.config import config_from_dict
from planer.errors import PlanerError
from planer.io.checkpoint import load_meta, read_json_object
from planer.io.records import Manifest, SearchRecord, TrainingSummary, arch_of
from planer.latency.table import LatencyTable
from planer.models.arch import Arch
from planer.models.backbone import backbone
from planer.report.samples import SAMPLE_FILE
from planer.search.designs import RIVALS

DESIGN_ORDER = ("baseline", "planer", *RIVALS, "iso", "sandwich", "par")


@dataclass(frozen=True, kw_only=True)
class ModelRow:
    """One trained model as the report sees it."""

    name: str  # its folder's
    path: Path
    design: str  # baseline, planer, planer-METHOD, a rival's name (dense-depth, ...), iso, sandwich, par, other
    arch: Arch
    target: float | None = None  # the latency target it was searched (or, a rival, sized) for
    seed: int = 1  # which repeat
    search: str | None = None  # the folder of the search it came from
    chosen: bool = False  # the Sandwich K chosen on the valid split
    params: int = 0
    summary: TrainingSummary | None = None
    found: SearchRecord | None = None  # its search's arch.json
    estimated_ratio: float | None = None  # the latency table's estimate, a fraction of the baseline's
    eval: dict = field(default_factory=dict)  # eval.json: scores per split
    bench: dict = field(default_factory=dict)  # bench.json: measured latency beside the baseline
    sample: dict = field(default_factory=dict)  # sample.json: its text after the report's prompt
    export: str = ""  # the command that exports it
    before_training: dict = field(default_factory=dict)  # a pruned rival's scores per split before phase 2
    sizing_seconds: float | None = None  # a rival's: choosing its blocks (and scoring them untrained), if recorded

    @property
    def meets_target(self) -> bool:
        """False only where its search said its estimate is over the target."""
        return self.found is None or self.found.estimate.meets_target is not False

    @property
    def by_batch(self) -> dict[int, dict]:
        """bench.json's measurements by batch size (none where it was not benchmarked)."""
        return {b["batch"]: b for b in self.bench.get("batches", [])}

    @property
    def method(self) -> str:
        """Its search's method (one that did not record it was the Gumbel search's)."""
        return self.found.method if self.found is not None else "gumbel"


def _estimator(lut: dict, baseline: Arch | None):
    """The latency table's estimate of an arch as a fraction of the baseline's (None where the table cannot say)."""
    try:
        table = LatencyTable(lut["fingerprint"], lut["fixed"], lut["blocks"], lut.get("settings", {}))
    except KeyError:
        table = None

    def estimate(arch: Arch) -> float | None:
        if table is None or baseline is None:
            return None
        try:
            return table.estimate(arch) / table.estimate(baseline)
        except PlanerError:  # a block the table does not hold
            return None

    return estimate


def model_dirs(run_dir: Path) -> list[Path]:
    """The trained models in ``run_dir``: every folder holding a finished training (``summary.json``)."""
    if not run_dir.is_dir():
        raise PlanerError(f"{run_dir} is not a folder")
    if (run_dir / TrainingSummary.FILE).exists():
        raise PlanerError(f"{run_dir} is one model's folder; report on the folder that holds it (and its baseline)")
    dirs = sorted(p for p in run_dir.iterdir() if p.is_dir() and (p / TrainingSummary.FILE).exists())
    if not dirs:
        raise PlanerError(f"{run_dir} holds no trained planer model (no folder with a summary.json): nothing to report")
    return dirs


def describe(d: Path) -> Manifest:
    """A model's manifest (``run.json``, written by ``planer run``); a model trained by hand has none, and is the
    baseline when its arch is its config's baseline arch."""
    manifest = Manifest.read(d)
    if manifest is not None:
        return manifest
    meta = load_meta(d)
    n_layer, n_head = meta["config"]["model"]["n_layer"], meta["config"]["model"]["n_head"]
    return Manifest(design="baseline" if meta.get("arch") == Arch.baseline(n_layer, n_head).specs() else "other")


def export_hint(model_dir: Path, arch: Arch) -> str:
    """How the model leaves planer, in its backbone's words (``Backbone.export_hint``)."""
    cfg = config_from_dict(load_meta(model_dir)["config"]).model
    return backbone(cfg).export_hint(model_dir, cfg, arch)


def collect(run_dir: Path) -> list[ModelRow]:
    """One row per trained model in the folder: the baseline, then PLANER, the rivals, iso, Sandwich and PAR."""
    chosen = read_json_object(run_dir / "sandwich.json").get("chosen")
    summaries = {d: TrainingSummary.read(d) for d in model_dirs(run_dir)}  # a damaged one is refused before writing
    described = {d: describe(d) for d in summaries}
    base = next((summaries[d].arch for d, m in described.items() if m.name == "baseline"), None)
    estimate = _estimator(read_json_object(run_dir / "lut.json"), arch_of(base) if base else None)
    rows = []
    for d, manifest in described.items():
        summary, arch = summaries[d], arch_of(summaries[d].arch)
        found = SearchRecord.read(run_dir / manifest.search) if manifest.search else None
        target = manifest.target if manifest.target is not None else found.estimate.target if found else None
        ratio = found.estimate.estimated_ratio if found else None
        rows.append(ModelRow(name=d.name, path=d, design=manifest.name, arch=arch, target=target,
                             seed=manifest.repeat or 1, search=manifest.search, chosen=d.name == chosen,
                             params=summary.params, summary=summary, found=found, estimated_ratio=ratio or estimate(arch),
                             eval=read_json_object(d / "eval.json"), bench=read_json_object(d / "bench.json"),
                             sample=read_json_object(d / SAMPLE_FILE), export=export_hint(d, arch),
                             before_training=(manifest.sizing or {}).get("before_training", {}),
                             sizing_seconds=(manifest.sizing or {}).get("seconds")))  # fmt: skip
    order = {d: i for i, d in enumerate(DESIGN_ORDER)}
    rank = lambda d: order["planer"] + 0.5 if is_found(d) and d != "planer" else order.get(d, len(order))  # noqa: E731
    rows.sort(key=lambda r: (rank(r.design), r.target or 0.0, r.seed, r.name))
    return rows


def bench_batches(rows: list[ModelRow]) -> list[int]:
    """Every batch size a model of ``rows`` was benchmarked at."""
    return sorted({b for r in rows for b in r.by_batch})


def is_found(design: str) -> bool:
    """A searched design: ``planer`` (the run's search method) or ``planer-METHOD`` (another one, same rivals)."""
    return design == "planer" or design.startswith("planer-")
