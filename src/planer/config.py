"""Configuration: one dataclass per concern, loaded from YAML, overridden with ``--set section.key=value``.

Every value is checked when the config is built, so a typo or a bad size stops the run before any work is done
with one clear line, instead of failing half an hour later.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from planer.errors import PlanerError
from planer.models.arch import BlockSpec

WORKLOADS = ("segment", "prefill", "decode")  # latency.workload (see latency/workload.py)
DEFAULT_SPACE = ["skip", "attn:1", "attn:2", "attn:4", "attn:8", "ffl", "moe:top1", "moe:top2"]


# Marks a field that names a file or folder: relative values in a config file are read from that file's folder,
# on the command line and in the defaults from the current folder, and the resolved config holds them absolute.
PATH = {"path": True}


@dataclass
class DataConfig:
    path: str = field(default="data/tinyshakespeare.txt", metadata=PATH)  # split 90/5/5, unless train/valid/test
    level: str = "char"  # char | word; ignored with a tokenizer
    tokenizer: str = field(default="", metadata=PATH)  # a folder with a Hugging Face tokenizer.json (replaces level)
    min_count: int = 1  # symbols seen fewer times in the training split are <unk> (planer's own vocabulary only)
    train: str = field(default="", metadata=PATH)
    valid: str = field(default="", metadata=PATH)
    test: str = field(default="", metadata=PATH)


@dataclass
class ModelConfig:
    backbone: str = "txl"  # txl (Transformer-XL, the paper's) | gpt (decoder-only, see models/gpt/model.py)
    flavour: str = "gpt2"  # gpt backbone: gpt2 | llama
    d_model: int = 128
    n_head: int = 8  # heads of the baseline attention; d_head = d_model / n_head for every attention block
    d_inner: int = 512
    n_layer: int = 4
    tgt_len: int = 64
    mem_len: int = 64
    dropout: float = 0.1
    dropatt: float = 0.0
    moe_dropout: float = 0.2  # expert dropout of MoE blocks
    n_experts: int = 8
    init_std: float = 0.02
    vocab_size: int = 0  # set from the data
    n_kv_head: int = 0  # gpt llama: key/value heads of the baseline attention (grouped-query); 0 means n_head
    n_positions: int = 0  # gpt: the longest context (gpt2: learned positions); 0 means tgt_len
    rope_theta: float = 10000.0  # gpt llama: base of the rotary frequencies
    norm_eps: float = 1e-5  # gpt: LayerNorm / RMSNorm epsilon
    tie_embeddings: bool = True  # gpt: the output layer is the token embedding (gpt2 always ties)

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_head

    @property
    def context(self) -> int:
        """The most tokens one forward may read without memory."""
        return self.n_positions or self.tgt_len


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 0.004
    warmup: int = 100
    eta_min: float = 0.0
    weight_decay: float = 0.0
    clip: float = 0.25
    balance_coef: float = 0.01  # load-balancing loss of MoE blocks
    eval_every: int = 200
    eval_batches: int = 0  # validation segments per evaluation during training; 0 means the whole split
    ckpt_every: int = 200  # steps between full states for --resume (search: weight steps); 0 turns them off
    seed: int = 1111
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "fp32"  # fp32 | bf16 | fp16 (autocast, CUDA only)


@dataclass
class EvalConfig:
    batch_size: int = 16
    tgt_len: int = 0  # 0: the model's tgt_len (gpt: the window, 0 means model.context)
    mem_len: int = 0  # 0: the model's mem_len
    stride: int = 0  # gpt: tokens the sliding window advances by; 0 means half the window (see evaluation/evaluate.py)


@dataclass
class SearchConfig:
    space: list[str] = field(default_factory=lambda: list(DEFAULT_SPACE))
    epochs: int = 10
    steps_per_epoch: int = 100
    arch_fraction: float = 0.2  # share of an epoch's segments used for architecture steps
    freeze_fraction: float = 0.1  # share of epochs with frozen architecture weights
    tau0: float = 5.0
    tau_decay: float = 0.6
    alpha_lr: float = 0.01
    balance: bool = False  # add the MoE balance loss to the search's losses too (the paper: phase 2 only)
    method: str = "knapsack"  # knapsack (options swapped into the trained baseline) | gumbel (the paper's supernet)
    distill_blocks: bool = False  # knapsack: distil each option locally before measuring it (Puzzle-style)
    rerank: int = 0  # knapsack: train this many picks (the pick, then top layers cut) briefly, keep the best; 0 off
    rerank_steps: int = 150  # knapsack: phase-2 steps of each reranked pick
    rerank_per_shape: int = 1  # knapsack: reranked picks of each shape (the best, then the runner-ups)
    limits: dict[int, float] = field(default_factory=dict)  # knapsack: {B: F}, also within F of the baseline at batch B
    # knapsack and head ranking: the calibration sample, this many segments (model.tgt_len tokens each) of every one of
    # eval.batch_size streams over the training split
    sample_segments: int = 8


@dataclass
class Phase2Config:
    """The recipe ``planer run`` trains every searched model, design and rival with: the same for all of them."""

    teacher: bool = True  # distil from the trained baseline (distill.weight, distill.temperature)
    init: str = "baseline"  # baseline: start from its ranked heads, FFL and experts where the arch allows | scratch
    steps: int = 0  # weight steps; 0: train.steps, the baseline's budget
    tokens: int = 0  # the budget in training tokens instead (train.batch_size x model.tgt_len a step, rounded up)
    block_tokens: int = 0  # of the budget, the tokens that first train each changed block alone (training/blockwise.py)


@dataclass
class DistillConfig:
    """How a training with a teacher (``planer train --teacher``) blends its losses."""

    weight: float = 0.5  # w in (1 - w) * CE + w * T^2 * KL(teacher || student)
    temperature: float = 1.0  # T, softening both distributions


@dataclass
class LatencyConfig:
    batch_size: int = 8
    warmup: int = 10  # untimed rounds
    repeats: int = 200  # timed rounds; each times every candidate once, interleaved (see latency/table.py)
    threads: int = 1  # one thread: repeatable on a shared CPU, and what the table's fingerprint records
    device: str = "cpu"
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    workload: str = "segment"  # segment | prefill | decode: what one timed call does (see latency/workload.py)
    prompt: int = 256  # prefill: the prompt's tokens
    context: int = 256  # decode: positions cached before the timed new token (gpt; a Transformer-XL's is mem_len)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    phase2: Phase2Config = field(default_factory=Phase2Config)
    latency: LatencyConfig = field(default_factory=LatencyConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _coerce(value, hint, where: str):
    """Check one value against its field's type; ints are accepted for floats and digit strings for a mapping's
    int keys (config.json has them so: JSON keys are strings), nothing else is converted."""
    origin = typing.get_origin(hint)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise PlanerError(f"config {where}: expected a list, got {value!r}")
        return [_coerce(v, item, where) for v in value]
    if origin is dict:
        key_hint, value_hint = typing.get_args(hint)
        if not isinstance(value, dict):
            raise PlanerError(f"config {where}: expected a mapping, got {value!r}")
        keys = [int(k) if key_hint is int and isinstance(k, str) and k.isdigit() else k for k in value]
        return {_coerce(k, key_hint, where): _coerce(v, value_hint, where) for k, v in zip(keys, value.values())}
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise PlanerError(f"config {where}: expected {hint.__name__}, got {value!r}")
    if hint is float and not math.isfinite(value):  # .nan passes every range check below; .inf is no size either
        raise PlanerError(f"config {where}: expected a finite number, got {value!r}")
    return value


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise PlanerError(f"config {where or 'file'}: expected a mapping, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise PlanerError(f"unknown config key '{path}' (known: {', '.join(sorted(names))})")
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            kwargs[key] = _build(hint, value, path)
        else:
            kwargs[key] = _coerce(value, hint, path)
    return cls(**kwargs)


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: YAML 1.1 reads ``3e-4`` and ``1e5`` as strings, users mean numbers."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_Loader)


def parse_override(item: str) -> tuple[list[str], object]:
    """``section.key=value`` as its keys and its value read as YAML (the CLI checks every ``--set`` with it)."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise PlanerError(f"--set expects section.key=value, got '{item}'; write --set {item}=VALUE, no spaces")
    try:
        return key.split("."), _yaml(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise PlanerError(f"--set {item}: the value is not valid YAML: {str(e).splitlines()[0]}") from None


def _field(keys: tuple) -> dataclasses.Field | None:
    """The Config field that a key path such as ``("data", "path")`` names, None for an unknown one."""
    cls, found = Config, None
    for key in keys:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        found = next((f for f in dataclasses.fields(cls) if f.name == key), None)
        if found is None:
            return None
        cls = typing.get_type_hints(cls)[key]
    return found


def _absolute_paths(values: dict, base: Path, keys: tuple = ()) -> dict:
    """``values`` with every relative path (a field marked PATH) made absolute from ``base``, in place.

    Absolute paths make a saved config mean the same files wherever it is read, so a run resumed from another
    folder still matches the config it was made with.
    """
    for key, value in values.items():
        where = (*keys, key)
        if isinstance(value, dict):
            _absolute_paths(value, base, where)
        elif isinstance(value, str) and value and (f := _field(where)) is not None and f.metadata.get("path"):
            values[key] = os.path.abspath(base / Path(value).expanduser())
    return values


def _read_config(path: Path) -> dict:
    try:
        loaded = _yaml(path.read_text())
    except OSError as e:
        raise PlanerError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise PlanerError(f"config {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    except yaml.YAMLError as e:
        raise PlanerError(f"config {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if loaded is not None and not isinstance(loaded, dict):
        raise PlanerError(f"config {path}: expected a mapping of sections")
    return loaded or {}


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then each ``section.key=value`` override, then validation.

    Relative paths in the file are read from the file's folder; those of overrides and defaults from the current
    folder. The config returned holds them absolute.
    """
    values: dict = {}
    if path is not None:
        path = Path(path)
        values = _absolute_paths(_read_config(path), path.parent)
    for item in overrides or []:
        keys, value = parse_override(item)
        node = values
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise PlanerError(f"--set {item}: '{k}' is not a section")
        node[keys[-1]] = value
    cfg = _build(Config, values, "")
    cfg = _build(Config, _absolute_paths(cfg.to_dict(), Path.cwd()), "")
    validate(cfg)
    return cfg


def saved_config_matches(path: Path, cfg: Config) -> bool:
    """Whether the config a run directory saved (``config.yaml``) is ``cfg``; a damaged one is refused.

    Relative paths in it (written by planer before configs held absolute ones) are read from the current folder,
    as planer then read them. A key added to planer since it was saved reads as its default, which is what that
    run computed with, so a run continues after an upgrade; one it holds that planer no longer knows does not match.
    """
    try:
        saved = _yaml(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise PlanerError(f"{path} is damaged; use another --out or --force") from None
    if not isinstance(saved, dict):
        return False
    try:
        return config_from_dict(_absolute_paths(saved, Path.cwd())).to_dict() == cfg.to_dict()
    except PlanerError:
        return False


def describe(cfg: Config) -> list[tuple[str, str, object, object]]:
    """Every key of the config as (``section.key``, type, default, value in ``cfg``): what ``planer config`` shows."""
    defaults, rows = Config(), []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = hints[f.name].__name__ if isinstance(hints[f.name], type) else str(hints[f.name])
            default, value = (getattr(getattr(c, section.name), f.name) for c in (defaults, cfg))
            rows.append((f"{section.name}.{f.name}", kind, default, value))
    return rows


def phase2_steps(cfg: Config) -> int:
    """The weight steps every phase-2 model trains: ``phase2.tokens`` in whole steps, else ``phase2.steps``, else
    the baseline's ``train.steps``."""
    if cfg.phase2.tokens:
        return steps_for_tokens(cfg, cfg.phase2.tokens)
    return cfg.phase2.steps or cfg.train.steps


def steps_for_tokens(cfg: Config, tokens: int) -> int:
    """The whole training steps (``train.batch_size`` x ``model.tgt_len`` tokens each) that hold ``tokens``."""
    return -(-tokens // (cfg.train.batch_size * cfg.model.tgt_len))


def with_vocab_size(cfg: Config, size: int) -> Config:
    """``cfg`` resolved for a vocabulary of ``size`` symbols (``model.vocab_size``, which the data decides): a copy,
    so that the caller's config stays as it was given."""
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=size))


def config_from_dict(values: dict) -> Config:
    cfg = _build(Config, values, "")
    validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Every check of a config, section by section; the order is kept, as the first check a config fails is the
    one line its user sees."""
    _validate_sizes(cfg)
    _validate_model(cfg.model)
    validate_workload(cfg.latency)
    _validate_data(cfg)
    _validate_devices(cfg)
    _validate_search_schedule(cfg.search)
    _validate_phase2(cfg)
    _validate_search_picks(cfg)
    _validate_distill(cfg)
    _validate_space(cfg)


def _positive(cfg: Config, section: str, names: list[str]) -> None:
    values = getattr(cfg, section)
    for name in names:
        if getattr(values, name) <= 0:
            raise PlanerError(f"config {section}.{name} must be positive, got {getattr(values, name)}")


def _non_negative(cfg: Config, section: str, names: list[str]) -> None:
    values = getattr(cfg, section)
    for name in names:
        if getattr(values, name) < 0:
            raise PlanerError(f"config {section}.{name} must not be negative, got {getattr(values, name)}")


def _validate_sizes(cfg: Config) -> None:
    """The sizes, rates and counts of the model, training, evaluation, search and latency sections."""
    _positive(cfg, "model", ["d_model", "n_head", "d_inner", "n_layer", "tgt_len", "n_experts", "init_std"])
    _non_negative(cfg, "model", ["mem_len", "vocab_size", "n_kv_head", "n_positions"])
    _positive(cfg, "model", ["rope_theta", "norm_eps"])
    _positive(cfg, "train", ["steps", "batch_size", "lr", "eval_every"])
    _non_negative(cfg, "train", ["warmup", "eta_min", "weight_decay", "clip", "balance_coef", "eval_batches",
                                 "ckpt_every"])  # fmt: skip
    _positive(cfg, "eval", ["batch_size"])
    _non_negative(cfg, "eval", ["tgt_len", "mem_len", "stride"])
    _positive(cfg, "search", ["epochs", "steps_per_epoch", "arch_fraction", "tau0", "tau_decay", "alpha_lr"])
    _positive(cfg, "latency", ["batch_size", "repeats", "threads"])
    _non_negative(cfg, "latency", ["warmup"])


def _validate_model(m: ModelConfig) -> None:
    for name in ("dropout", "dropatt", "moe_dropout"):
        if not 0.0 <= getattr(m, name) < 1.0:
            raise PlanerError(f"config model.{name} must be in [0, 1), got {getattr(m, name)}")
    if m.d_model % m.n_head:
        raise PlanerError(f"config model.n_head ({m.n_head}) must divide model.d_model ({m.d_model})")
    validate_backbone(m)
    if m.n_experts < 2:
        raise PlanerError(f"config model.n_experts must be at least 2, got {m.n_experts}")


def _validate_data(cfg: Config) -> None:
    _positive(cfg, "data", ["min_count"])
    if cfg.data.tokenizer and cfg.data.min_count != 1:
        raise PlanerError("config data.min_count cuts planer's own vocabulary; a tokenizer's vocabulary is the model's")
    if cfg.data.level not in ("char", "word"):
        raise PlanerError(f"config data.level must be 'char' or 'word', got '{cfg.data.level}'")


def _validate_devices(cfg: Config) -> None:
    """Where and in which precision training runs and latency is measured."""
    t, lat = cfg.train, cfg.latency
    if t.device not in ("auto", "cpu", "cuda"):
        raise PlanerError(f"config train.device must be auto, cpu or cuda, got '{t.device}'")
    if t.precision not in ("fp32", "bf16", "fp16"):
        raise PlanerError(f"config train.precision must be fp32, bf16 or fp16, got '{t.precision}'")
    if lat.dtype not in ("fp32", "bf16", "fp16"):
        raise PlanerError(f"config latency.dtype must be fp32, bf16 or fp16, got '{lat.dtype}'")
    if lat.device not in ("auto", "cpu", "cuda"):
        raise PlanerError(f"config latency.device must be auto, cpu or cuda, got '{lat.device}'")


def _validate_search_schedule(s: SearchConfig) -> None:
    """The Gumbel search's fractions and temperature decay."""
    if not 0.0 < s.arch_fraction <= 1.0:
        raise PlanerError(f"config search.arch_fraction must be in (0, 1], got {s.arch_fraction}")
    if not 0.0 <= s.freeze_fraction < 1.0:
        raise PlanerError(f"config search.freeze_fraction must be in [0, 1), got {s.freeze_fraction}")
    if s.tau_decay > 1.0:
        raise PlanerError(f"config search.tau_decay must be in (0, 1], got {s.tau_decay}")


def _validate_phase2(cfg: Config) -> None:
    if cfg.phase2.init not in ("scratch", "baseline"):
        raise PlanerError(f"config phase2.init must be scratch or baseline, got '{cfg.phase2.init}'")
    _non_negative(cfg, "phase2", ["steps", "tokens", "block_tokens"])
    if cfg.phase2.steps and cfg.phase2.tokens:
        raise PlanerError("config phase2.steps and phase2.tokens both set a budget: set one of them")
    if cfg.phase2.block_tokens and cfg.phase2.block_tokens >= (cfg.phase2.tokens or math.inf):
        raise PlanerError(
            f"config phase2.block_tokens ({cfg.phase2.block_tokens}) must be less than the budget phase2.tokens "
            f"({cfg.phase2.tokens}): the whole model trains on the rest"
        )


def _validate_search_picks(cfg: Config) -> None:
    """The knapsack's reranking and its limits at other batch sizes (the method is checked with the search)."""
    s = cfg.search
    _non_negative(cfg, "search", ["rerank"])
    _positive(cfg, "search", ["rerank_steps", "rerank_per_shape", "sample_segments"])
    for batch, fraction in s.limits.items():
        if batch <= 0 or not 0.0 < fraction <= 1.0:
            raise PlanerError(
                f"config search.limits: each is batch: fraction, a positive batch size and a fraction of the "
                f"baseline's latency in (0, 1], got {batch}: {fraction}"
            )


def _validate_distill(cfg: Config) -> None:
    if not 0.0 <= cfg.distill.weight <= 1.0:
        raise PlanerError(f"config distill.weight must be in [0, 1], got {cfg.distill.weight}")
    _positive(cfg, "distill", ["temperature"])


def _validate_space(cfg: Config) -> None:
    """The search space: at least one option, and no MoE option routing to more experts than it has."""
    s, m = cfg.search, cfg.model
    if not s.space:
        raise PlanerError("config search.space must list at least one block option")
    for spec in s.space:
        b = BlockSpec.parse(spec)
        if b.kind == "moe" and b.top_k > (b.experts or m.n_experts):
            raise PlanerError(f"search space option '{spec}': top_k exceeds the number of experts ({m.n_experts})")


def validate_workload(lat: LatencyConfig) -> None:
    if lat.workload not in WORKLOADS:
        raise PlanerError(f"config latency.workload must be {', '.join(WORKLOADS)}, got '{lat.workload}'")
    for key in ("prompt", "context"):
        if not isinstance(getattr(lat, key), int) or getattr(lat, key) < 1:
            raise PlanerError(f"config latency.{key} must be a positive number of tokens, got {getattr(lat, key)}")


def validate_backbone(m: ModelConfig) -> None:
    """The family's own checks (models/backbone.py), after the one every family shares."""
    from planer.models.backbone import backbone  # the families build on this module: asked for when needed

    family = backbone(m)
    if m.n_kv_head and m.n_head % m.n_kv_head:
        raise PlanerError(f"config model.n_kv_head ({m.n_kv_head}) must divide model.n_head ({m.n_head})")
    family.check(m)
