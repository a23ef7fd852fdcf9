"""The files the stages hand each other, as typed records: each one's only writer is ``save`` and its only reader
``read``.

A record is a dataclass whose fields are its file's keys. ``save`` writes every field but an ``optional`` one that
is None (a key the stage leaves out, such as the Gumbel search's ``unfilled`` when it kept its argmax), and leaves a
file that already holds the same text alone, so a resumed run does not touch finished folders. ``read`` takes the
keys it knows and ignores others (a later version's), and a key added since the first version has a default, so
the files of earlier versions still read; a file without a key every version wrote is refused as damaged.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

from planer.errors import PlanerError
from planer.io.checkpoint import atomic_write_text, read_json_object
from planer.models.arch import Arch, BlockSpec

if TYPE_CHECKING:
    from planer.latency.table import LatencyTable


def optional() -> dataclasses.Field:
    """A key the file leaves out while it is None."""
    return field(default=None, metadata={"optional": True})


def nested(kind: type, omitted: bool = False, **kw) -> dataclasses.Field:
    """A record (or a list of records) of type ``kind`` under this key; ``omitted``: an optional one, None."""
    if omitted:
        return field(default=None, metadata={"record": kind, "optional": True})
    return field(metadata={"record": kind}, **kw)


def flat(kind: type | Callable[[dict], type], **kw) -> dataclasses.Field:
    """A record whose keys sit among this record's own; ``kind`` may choose its type from the file's keys."""
    return field(metadata={"record": kind, "flat": True}, **kw)


class Record:
    """The writer and reader every record shares; ``FILE`` and ``INDENT`` say where and how a stage writes it."""

    FILE: ClassVar[str] = ""
    INDENT: ClassVar[int] = 2

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.metadata.get("flat"):
                out.update(value.to_dict())
            elif value is not None or not f.metadata.get("optional"):
                out[f.name] = _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict, where: str):
        values = {}
        for f in dataclasses.fields(cls):
            kind = f.metadata.get("record")
            if f.metadata.get("flat"):
                values[f.name] = (kind if isinstance(kind, type) else kind(data)).from_dict(data, where)
            elif f.name in data:
                values[f.name] = _typed(data[f.name], kind, where)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise PlanerError(f"{where} is damaged (it lacks '{f.name}'); move it away and run the stage again")
        return cls(**values)

    def save(self, folder: Path) -> None:
        path = Path(folder) / self.FILE
        text = json.dumps(self.to_dict(), indent=self.INDENT) + "\n"
        if not path.exists() or path.read_text() != text:
            atomic_write_text(path, text)

    @classmethod
    def read(cls, folder: Path):
        """The record in ``folder``, None where the stage has not written it."""
        path = Path(folder) / cls.FILE
        return cls.from_dict(read_json_object(path), str(path)) if path.exists() else None


def _plain(value):
    if isinstance(value, Record):
        return value.to_dict()
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def _typed(value, kind: type | None, where: str):
    if kind is None or value is None:
        return value
    if isinstance(value, list):
        return [kind.from_dict(v, where) for v in value]
    return kind.from_dict(value, where)


def arch_of(specs: list[str]) -> Arch:
    return Arch(tuple(BlockSpec.parse(s) for s in specs))


@dataclass(frozen=True, kw_only=True)
class TrainingSummary(Record):
    """``summary.json``: a finished training (or a baseline copied in, ``adopted_from``); it marks the folder done."""

    FILE: ClassVar[str] = "summary.json"

    best_valid_loss: float | None = optional()
    seconds: float | None = optional()
    steps: int | None = optional()
    tokens: int | None = optional()  # the training tokens of those steps (train.batch_size x model.tgt_len each)
    ms_per_step: float | None = optional()
    expert_load_max: list[float] | None = optional()  # MoE blocks only: each block's busiest expert's share
    expert_load_min: list[float] | None = optional()
    params: int
    arch: list[str]
    recipe: dict | None = optional()
    block_distillation: dict | None = optional()  # blocks.json of a training that first distilled changed blocks
    adopted_from: str | None = optional()


@dataclass(frozen=True, kw_only=True)
class Manifest(Record):
    """``run.json``: what a model of ``planer run`` is (its design, the target and search it came from, a rival's
    sizing, its seed and recipe), so that the report never parses a folder's name."""

    FILE: ClassVar[str] = "run.json"
    INDENT: ClassVar[int] = 1

    design: str  # baseline, planer, planer-METHOD, iso, dense or prune (a rival of that group), sandwich, par
    rival: str | None = optional()  # dense-depth, dense-heads, dense-width, drop-layers or drop-sublayers
    target: float | None = optional()
    repeat: int | None = optional()  # the seed's number, 1 for the first
    rival_of: str | None = optional()
    sizing: dict | None = optional()  # the rival's entry of rivals.json
    search: str | None = optional()  # the search folder the arch came from
    method: str | None = optional()
    arch: list[str] | None = optional()
    seed: int | None = optional()
    recipe: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The design the report groups it under: a rival by its own name."""
        return self.rival or self.design


@dataclass(frozen=True, kw_only=True)
class Estimate(Record):
    """The latency table's estimate of an architecture against ``target`` x the baseline's."""

    target: float
    baseline_ms: float
    estimated_ms: float
    estimated_ratio: float
    meets_target: bool | None = optional()  # None: a search of the first version, which did not say

    @staticmethod
    def of(table: LatencyTable, arch: Arch, baseline_ms: float, target: float) -> Estimate:
        """The one place an estimate is computed, for every search and every limit."""
        estimated = table.estimate(arch)
        return Estimate(target=target, baseline_ms=baseline_ms, estimated_ms=estimated,
                        estimated_ratio=estimated / baseline_ms, meets_target=estimated <= target * baseline_ms)  # fmt: skip


@dataclass(frozen=True, kw_only=True)
class LimitEstimate(Record):
    """The estimate at another batch size (``search.limits``), from the latency table profiled there."""

    batch: int
    estimate: Estimate = flat(Estimate)


@dataclass(frozen=True, kw_only=True)
class Position(Record):
    """What the knapsack measured at one position: every option's latency and loss increase swapped in alone
    (None: it cannot start from the baseline block there), and the option chosen."""

    options: list[str]
    latency_ms: list[float]
    increase: list[float | None]
    chosen: str

    @property
    def chosen_increase(self) -> float:
        return self.increase[self.options.index(self.chosen)]


@dataclass(frozen=True, kw_only=True)
class RerankScore(Record):
    """One knapsack candidate after a short phase-2 training."""

    arch: list[str]
    valid_loss: float
    steps: int
    seconds: float | None = optional()


@dataclass(frozen=True, kw_only=True)
class GumbelDetails(Record):
    """What only the Gumbel search records: the argmax it replaced to fill the latency window."""

    unfilled: dict | None = optional()  # arch, estimated_ratio


@dataclass(frozen=True, kw_only=True)
class KnapsackDetails(Record):
    """What only the knapsack records: its solver's pick, every option's measured loss, its candidates.

    ``in_window``, ``blocks_ms`` and ``predicted_increase`` are the solver's for its pick; for a reranked arch,
    what the measured increases and the table say of it.
    """

    limits: list[LimitEstimate] = nested(LimitEstimate, default_factory=list)
    in_window: bool
    blocks_ms: float
    predicted_increase: float
    unfilled: dict | None = optional()  # the minimum-loss pick below the window, when the window's replaced it
    window_pick: dict | None = optional()  # the window's pick, when it would have cost too much loss
    baseline_loss: float
    positions: list[Position] = nested(Position)
    heads: dict  # block position -> [head, loss increase], most important first
    distill: dict | None = None  # local distillation's steps and lr
    candidates: list[dict] = field(default_factory=list)  # for the rerank: arch, layers_cut, estimated ratios
    rerank: list[RerankScore] | None = nested(RerankScore, omitted=True)
    knapsack_pick: dict | None = optional()  # arch, predicted_increase: the solver's own pick, when reranked


def _details(data: dict) -> type:
    return KnapsackDetails if data.get("method") == "knapsack" else GumbelDetails


@dataclass(frozen=True, kw_only=True)
class SearchRecord(Record):
    """``arch.json``: the architecture a search found, its estimate, and what its method knew of it."""

    FILE: ClassVar[str] = "arch.json"

    arch: list[str]
    method: str = "gumbel"  # a search of the first versions, which did not say, was the Gumbel search
    estimate: Estimate = flat(Estimate)
    window: list[float] | None = optional()  # [low, 1] x the target, where the estimate should land
    details: GumbelDetails | KnapsackDetails = flat(_details)
    space: list[str] | None = optional()
    init_from: str | None = None
    seconds: float | None = optional()

    @property
    def found(self) -> Arch:
        return arch_of(self.arch)

    @property
    def knapsack(self) -> KnapsackDetails | None:
        return self.details if isinstance(self.details, KnapsackDetails) else None
