"""Latency: one measurement routine, the block lookup table (Eq. 2 of the paper), and end-to-end benchmarks.

Everything here times the same thing, the call of ``latency.workload`` (latency/workload.py: a segment with full
memories, a prompt's prefill, or one decoded token after a cached context), in eval mode under
``torch.inference_mode()``, at a fixed thread count. Candidates are timed in rounds,
each round calling every candidate once in a fresh random order, so load from other processes and clock drift
fall on all of them alike; the medians of the rounds are what we report.

The table holds two kinds of entry. The fixed part is the model without blocks (embedding, positions, final norm
and output layer), timed whole under the workload. A block's entry is a chain of ``n_layer`` copies of the block
(each with weights of its own, as a model's layers have) run on hidden states of the workload's shape, each copy
reading what the model's forward would hand it (its layer of a key/value cache filled to the workload's context,
or its full memory), divided by ``n_layer``. So a block is never the difference of two timings that hold the
fixed part, which for a large vocabulary (SmolLM2: a 49,152-way output layer, 10x the cost of a block at decode)
buries the block in the noise of the output layer. And a block is priced as a model runs it: timed alone, a
block's weights are still in the cache from its last call and it runs 3x faster than in a model; timed alone after
a call that flushed the cache, it runs slower than in a model, whose next layer's weights stream in while the
last computes (SmolLM2 decode, 2 threads: an MLP 0.29 ms warm alone, 1.14 ms cold alone, 0.95 ms in a chain of
30; the table from chains of 30 matched the whole baseline within 1%). An architecture's estimate is then the
fixed part plus the sum of its blocks' entries, and the same sum weighted by the architecture probabilities
during the search. A chain of one kind of block does not express that a block after an identical one runs a
little faster on a CPU (warm code paths): a table of independent entries cannot.

Precision is the weights' own: models are cast to ``latency.dtype`` as they would be deployed, not autocast.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import random
import time
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from planer.config import Config, LatencyConfig, validate, with_vocab_size
from planer.errors import PlanerError
from planer.io.checkpoint import atomic_write_text, load_checkpoint
from planer.latency.workload import cached_and_new, chain_call, workload_call
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import backbone, build_block, build_model
from planer.training.distributed import resolve_device

TABLE_FORMAT = 1
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
FIXED = "fixed"  # the model without blocks; never a block spec, so it cannot clash with one


# ---------------------------------------------------------------------------------------------------------------
# Measurement


def latency_device(lc: LatencyConfig) -> torch.device:
    device = resolve_device(lc.device)
    if device.type == "cpu" and lc.dtype == "fp16":
        raise PlanerError("latency.dtype fp16 needs a CUDA device; use fp32 or bf16 on CPU")
    return device


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"cpu: {line.split(':', 1)[1].strip()}"
    except OSError:
        pass
    return f"cpu: {platform.processor() or platform.machine()}"


@contextmanager
def private_rng(device: torch.device, seed: int = 0):
    """Seeded random weights that leave the caller's generators where they were (a search stays reproducible)."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextmanager
def measuring(models: Iterable[torch.nn.Module], threads: int):
    """Eval mode, no autograd, a fixed thread count; every module's mode and the thread count restored after."""
    models = list(models)
    modes = [(m, m.training) for model in models for m in model.modules()]
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for model in models:
            model.eval()
        with torch.inference_mode():
            yield
    finally:
        for module, training in modes:
            module.train(training)
        torch.set_num_threads(saved_threads)


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """Milliseconds of one call: CUDA events around a synchronised call on GPU, the wall clock on CPU."""
    if device.type == "cuda":

        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)

        return timed

    def timed(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    return timed


def time_interleaved(
    fns: dict[str, Callable[[], object]],
    warmup: int,
    repeats: int,
    device: torch.device,
    seed: int = 0,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-round milliseconds of every callable: ``warmup`` untimed rounds, then ``repeats`` timed ones.

    Every round calls each candidate once, in a new random order, so that slow drift and bursts of load from
    other processes hit all candidates alike, and no candidate always runs after the same neighbour's caches.
    ``progress`` labels a progress bar over the rounds on stderr (a profile takes about a minute); None, the
    default, times silently, as benchmarks and tests want.
    """
    timed, order, rng = _timer(device), list(fns), random.Random(seed)
    samples = {name: [] for name in fns}
    rounds = tqdm(range(warmup + repeats), desc=progress, unit="round", leave=False, disable=progress is None)
    for r in rounds:
        rng.shuffle(order)
        for name in order:
            ms = timed(fns[name])
            if r >= warmup:
                samples[name].append(ms)
    return {name: np.asarray(ms) for name, ms in samples.items()}


def summarize(ms: np.ndarray) -> dict:
    return {
        "median": round(float(np.median(ms)), 6),
        "p10": round(float(np.percentile(ms, 10)), 6),
        "p90": round(float(np.percentile(ms, 90)), 6),
    }


def sample_models(
    models: dict[str, torch.nn.Module],
    batch: int,
    lc: LatencyConfig,
    device: torch.device,
    progress: str | None = None,
) -> dict[str, np.ndarray]:
    """Per-round milliseconds of each model's call under ``lc.workload``, all models interleaved in the same
    rounds (``progress``: see time_interleaved)."""
    with measuring(models.values(), lc.threads):
        fns = {name: workload_call(model, batch, lc, device) for name, model in models.items()}
        return time_interleaved(fns, lc.warmup, lc.repeats, device, progress=progress)


def measure_models(models: dict[str, torch.nn.Module], batch: int, lc: LatencyConfig) -> dict[str, dict]:
    """End-to-end median, p10 and p90 (ms) of each model, measured side by side; weights are never touched."""
    samples = sample_models(models, batch, lc, latency_device(lc))
    return {name: summarize(ms) for name, ms in samples.items()}


# ---------------------------------------------------------------------------------------------------------------
# The lookup table


def profiled_specs(cfg: Config) -> list[str]:
    """The search space, the iso-parameter FFL and the baseline's blocks, each once."""
    m = cfg.model
    specs = [*cfg.search.space, f"ffl:x{m.n_experts}", *Arch.baseline(1, m.n_head).specs()]
    return list(dict.fromkeys(str(BlockSpec.parse(s)) for s in specs))


def environment(lc: LatencyConfig) -> dict:
    device = latency_device(lc)
    return {"device": device_name(device), "torch": torch.__version__, "dtype": lc.dtype, "threads": lc.threads}


BLOCKS_REVISION = 2  # raised when a block's forward changes what it costs: a table of another revision is stale


def fingerprint(cfg: Config) -> dict:
    """Everything a block's latency depends on; a table holds only where all of it is the same."""
    m, lc = cfg.model, cfg.latency
    return {
        **environment(lc),
        "blocks": BLOCKS_REVISION,
        "batch": lc.batch_size,
        "tgt_len": m.tgt_len,
        "mem_len": m.mem_len,
        "d_model": m.d_model,
        "d_head": m.d_head,
        "d_inner": m.d_inner,
        "n_experts": m.n_experts,
        "vocab_size": m.vocab_size,
        **backbone(m).fingerprint(m),
        **workload_fingerprint(lc),
    }


def tokens_per_call(cfg: Config) -> int:
    """The new tokens one timed call reads per sequence: a segment, the prompt, or the one decoded token."""
    return cached_and_new(cfg.latency, cfg.model.tgt_len)[1]


def workload_fingerprint(lc: LatencyConfig) -> dict:
    """The workload and its size; nothing for the segment workload, so tables from before workloads still hold."""
    if lc.workload == "segment":
        return {}
    return {"workload": lc.workload, "tokens": lc.prompt if lc.workload == "prefill" else lc.context}


def at_batch(cfg: Config, batch: int) -> Config:
    """``cfg`` with its latency table at ``batch``: the tables of ``search.limits`` are profiled so."""
    return dataclasses.replace(cfg, latency=dataclasses.replace(cfg.latency, batch_size=batch))


def known_vocab_size(cfg: Config) -> Config:
    """``cfg`` with its model.vocab_size known, from the data when the config leaves it at 0."""
    if cfg.model.vocab_size:
        return cfg
    from planer.io.data import load_corpus

    return with_vocab_size(cfg, len(load_corpus(cfg.data).vocab))


def probe_models(cfg: Config, specs: list[str]) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The model without blocks, and one model holding ``n_layer`` copies of each spec's block in turn (called one
    chain at a time, see ``probe_calls``); random weights, on the latency device in the latency precision."""
    lc, chain = cfg.latency, cfg.model.n_layer
    device = latency_device(lc)
    with private_rng(device):
        fixed = build_model(cfg.model, blocks=[])
        blocks = [build_block(BlockSpec.parse(spec), cfg.model) for spec in specs for _ in range(chain)]
        held = build_model(cfg.model, blocks=blocks)
    return tuple(model.to(device=device, dtype=DTYPES[lc.dtype]) for model in (fixed, held))


def probe_calls(cfg: Config, specs: list[str], fixed: torch.nn.Module, blocks: torch.nn.Module) -> dict[str, Callable]:
    """The calls the table times: the model without blocks whole (FIXED), and each spec's chain of blocks."""
    lc, chain = cfg.latency, cfg.model.n_layer
    device = latency_device(lc)
    calls = {FIXED: workload_call(fixed, lc.batch_size, lc, device)}
    for i, spec in enumerate(specs):
        calls[spec] = chain_call(blocks, range(i * chain, (i + 1) * chain), lc.batch_size, lc, device)
    return calls


def table_from_samples(cfg: Config, samples: dict[str, np.ndarray], seconds: float) -> LatencyTable:
    """The table of the rounds that timed the probes (FIXED: the model without blocks; every other key a block's
    chain of ``n_layer``)."""
    blocks = {spec: summarize(ms / cfg.model.n_layer) for spec, ms in samples.items() if spec != FIXED}
    settings = {
        "warmup": cfg.latency.warmup,
        "repeats": cfg.latency.repeats,
        "probes": "chains of n_layer blocks on hidden states",
        "seconds": round(seconds, 1),
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    return LatencyTable(fingerprint(cfg), summarize(samples[FIXED]), blocks, settings)


def profile(cfg: Config, progress: bool = False) -> LatencyTable:
    """Measure the fixed part and every block that ``cfg`` may need, all probes interleaved in the same rounds.

    ``progress`` shows a bar over the timing rounds on stderr.
    """
    cfg = known_vocab_size(cfg)
    started = time.perf_counter()
    specs = profiled_specs(cfg)
    lc = cfg.latency
    fixed, blocks = probe_models(cfg, specs)
    label = f"profiling {len(specs)} blocks" if progress else None
    with measuring([fixed, blocks], lc.threads):
        calls = probe_calls(cfg, specs, fixed, blocks)
        samples = time_interleaved(calls, lc.warmup, lc.repeats, latency_device(lc), progress=label)
    return table_from_samples(cfg, samples, time.perf_counter() - started)


def _checksum(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _check_stats(value, where: str) -> dict:
    if (
        not isinstance(value, dict)
        or set(value) != {"median", "p10", "p90"}
        or not all(isinstance(v, (int, float)) and 0.0 <= v < float("inf") for v in value.values())
    ):
        raise PlanerError(f"{where}: expected median, p10 and p90 in ms")
    return value


def _table_spec(spec: str, path: Path) -> str:
    try:
        return str(BlockSpec.parse(spec))
    except PlanerError:
        raise PlanerError(f"latency table {path} holds an unknown block '{spec}'; profile again with --force") from None


@dataclasses.dataclass
class LatencyTable:
    fingerprint: dict
    fixed: dict  # median, p10, p90 (ms) of the model without blocks: embedding and output layer
    blocks: dict[str, dict]  # spec -> median, p10, p90 (ms) that the block adds to a model
    settings: dict
    reused: bool = False  # loaded from an existing file rather than profiled now

    def to_dict(self) -> dict:
        body = {
            "format": TABLE_FORMAT,
            "unit": "ms",
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "fixed": self.fixed,
            "blocks": self.blocks,
        }
        return {**body, "checksum": _checksum(body)}

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(self.to_dict(), indent=1) + "\n")

    @staticmethod
    def load(path: str | Path) -> LatencyTable:
        """Read a table; a file that was edited by hand or damaged is refused, since its numbers cannot be trusted."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except OSError as e:
            raise PlanerError(f"cannot read latency table {path}: {e.strerror}") from None
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise PlanerError(f"latency table {path} is not valid JSON; profile again with --force") from None
        if not isinstance(data, dict) or data.get("format") != TABLE_FORMAT:
            raise PlanerError(f"latency table {path} is not a planer latency table (format {TABLE_FORMAT})")
        body = {k: v for k, v in data.items() if k != "checksum"}
        if data.get("checksum") != _checksum(body):
            raise PlanerError(
                f"latency table {path} was edited or is corrupt (checksum mismatch); profile again with --force"
            )
        try:
            blocks = {
                _table_spec(spec, path): _check_stats(stats, f"{path}: block {spec}")
                for spec, stats in data["blocks"].items()
            }
            table = LatencyTable(
                dict(data["fingerprint"]), _check_stats(data["fixed"], f"{path}: fixed"), blocks, dict(data["settings"])
            )
        except (KeyError, TypeError, AttributeError, ValueError):
            raise PlanerError(f"latency table {path} is malformed; profile again with --force") from None
        return table

    def check(self, cfg: Config, where: str = "the latency table") -> None:
        """Refuse a table measured for another device, precision, thread count or shape, or lacking blocks."""
        wanted = fingerprint(cfg)
        diff = [k for k in sorted(wanted.keys() | self.fingerprint.keys()) if wanted.get(k) != self.fingerprint.get(k)]
        if diff:
            held = ", ".join(f"{k}={self.fingerprint.get(k)!r}" for k in diff)
            need = ", ".join(f"{k}={wanted.get(k)!r}" for k in diff)
            raise PlanerError(f"{where} was profiled for {held}, but this run needs {need}; profile again with --force")
        missing = [s for s in profiled_specs(cfg) if s not in self.blocks]
        if missing:
            raise PlanerError(f"{where} lacks the blocks {', '.join(missing)}; profile again with --force")

    @property
    def fixed_ms(self) -> float:
        return self.fixed["median"]

    def latency(self, spec: str | BlockSpec) -> float:
        key = str(BlockSpec.parse(spec) if isinstance(spec, str) else spec)
        if key not in self.blocks:
            raise PlanerError(
                f"block '{key}' is not in the latency table (it holds {', '.join(self.blocks)}); "
                "profile again with this search space"
            )
        return self.blocks[key]["median"]

    def estimate(self, arch: Arch | Iterable[str | BlockSpec]) -> float:
        """Estimated end-to-end latency (ms) of an architecture: the fixed part plus its blocks' entries."""
        return self.fixed_ms + sum(self.latency(b) for b in arch)

    def baseline(self, cfg: Config) -> float:
        return self.estimate(Arch.baseline(cfg.model.n_layer, cfg.model.n_head))

    def expected(self, probs: torch.Tensor, options: list[str]) -> torch.Tensor:
        """Eq. 2: fixed part + sum over positions b and options i of P_bi * Lat_i, differentiable in ``probs``.

        ``probs`` is (n_positions, n_options), row b the probabilities over ``options`` at position b.
        """
        if probs.dim() != 2 or probs.size(1) != len(options):
            raise ValueError(f"probs of shape {tuple(probs.shape)} do not match {len(options)} options")
        lat = probs.new_tensor([self.latency(o) for o in options])
        return (probs * lat).sum() + self.fixed_ms


def load_or_profile(cfg: Config, path: str | Path, force: bool = False, progress: bool = False) -> LatencyTable:
    """The table at ``path`` if it holds for ``cfg``; otherwise (or with ``force``) profile and write it there.

    An existing table for another fingerprint is refused rather than silently replaced: it may be the only
    record of another device's profile. ``progress``: a bar while profiling (see profile).
    """
    path = Path(path)
    cfg = known_vocab_size(cfg)
    if path.exists() and not force:
        table = LatencyTable.load(path)
        table.check(cfg, where=str(path))
        table.reused = True
        return table
    table = profile(cfg, progress)
    table.save(path)
    return table


def profile_dir(
    cfg: Config, out_dir: str | Path, force: bool = False, progress: bool = False
) -> tuple[LatencyTable, Path]:
    """``planer profile``: DIR/lut.json for ``cfg``, reused when one that holds is already there."""
    path = Path(out_dir) / "lut.json"
    if Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise PlanerError(f"output path {out_dir} exists and is not a directory")
    return load_or_profile(cfg, path, force, progress), path


# ---------------------------------------------------------------------------------------------------------------
# End to end


def _bench_settings(cfg: Config, device: str | None, threads: int | None, repeats: int | None) -> LatencyConfig:
    given = {"device": device, "threads": threads, "repeats": repeats}
    cfg = copy.deepcopy(cfg)
    cfg.latency = dataclasses.replace(cfg.latency, **{k: v for k, v in given.items() if v is not None})
    validate(cfg)
    return cfg.latency


def check_comparable(base: Config, cfg: Config, base_name: str, name: str) -> None:
    """Refuse to time side by side two models whose inputs differ in size: their latencies would not compare."""
    for key in ("vocab_size", "tgt_len", "mem_len"):
        if getattr(base.model, key) != getattr(cfg.model, key):
            raise PlanerError(
                f"{base_name} has model.{key}={getattr(base.model, key)}, "
                f"but {name} has {getattr(cfg.model, key)}; their latencies do not compare"
            )


def bench(
    run_dir: str | Path,
    baseline_dir: str | Path | None = None,
    batches: Iterable[int] = (1, 8, 64),
    device: str | None = None,
    threads: int | None = None,
    repeats: int | None = None,
) -> dict:
    """End-to-end latency of a checkpoint and a baseline at several batch sizes; writes RUN/bench.json.

    Both models run in the same rounds (A B, B A, ...), so the speed-up is a ratio taken under the same
    conditions. Without ``baseline_dir`` the baseline is the run config's baseline architecture with random
    weights, which times the same as a trained one.
    """
    run_dir = Path(run_dir)
    batches = list(batches)
    if not batches or any(not isinstance(b, int) or b <= 0 for b in batches):
        raise PlanerError(f"batch sizes must be positive integers, got {batches}")
    model, cfg, _ = load_checkpoint(run_dir)
    lc = _bench_settings(cfg, device, threads, repeats)
    if baseline_dir is not None:
        base, base_cfg, _ = load_checkpoint(baseline_dir)
        check_comparable(base_cfg, cfg, f"baseline {baseline_dir}", str(run_dir))
        source = str(baseline_dir)
    else:
        with private_rng(torch.device("cpu")):
            base = build_model(cfg.model, Arch.baseline(cfg.model.n_layer, cfg.model.n_head))
        source = "baseline architecture, random weights"
    dev, dtype = latency_device(lc), DTYPES[lc.dtype]
    models = {"model": model.to(device=dev, dtype=dtype), "baseline": base.to(device=dev, dtype=dtype)}
    rows = []
    for batch in batches:
        stats = measure_models(models, batch, lc)
        rows.append(
            {
                "batch": batch,
                "model": stats["model"],
                "baseline": stats["baseline"],
                "speedup": round(stats["baseline"]["median"] / stats["model"]["median"], 4),
            }
        )
    result = {
        "run": str(run_dir),
        "arch": model.arch.specs(),
        "baseline": source,
        "baseline_arch": base.arch.specs(),
        "environment": environment(lc),
        "tgt_len": cfg.model.tgt_len,
        "mem_len": cfg.model.mem_len,
        "workload": lc.workload,
        "tokens_per_call": tokens_per_call(cfg),
        "settings": {"warmup": lc.warmup, "repeats": lc.repeats},
        "unit": "ms",
        "batches": rows,
    }
    atomic_write_text(run_dir / "bench.json", json.dumps(result, indent=1) + "\n")
    return result
