"""Hostile input for the ``planer`` command line: every bad config, data file, checkpoint, latency table or
architecture file ends with one clear line and exit code 2.

Why: a run that dies with a traceback half an hour in, or that overwrites the results of an earlier run, costs far
more than the minute it takes to say what is wrong. So every case below asserts, for one broken input:

- exit code 2 (what ``planer.cli.main`` returns for a ``PlanerError``),
- stderr is exactly one line, starting with ``planer: error:`` and holding a fragment that only the right message
  has (any error is not enough: a config error must not be reported as a missing data file),
- no ``Traceback`` anywhere and nothing on stdout,
- no file of an earlier run changed: a module fixture trains one tiny run and profiles one tiny latency table
  first, and after every case the bytes, mtimes and listing of both directories are what they were. Some cases
  aim their output straight at those directories and must be refused; the others write into a fresh tmp dir.

Checkpoints must load without unpickling anything: ``torch.load`` and ``pickle.load(s)`` are booby-trapped for the
whole module, and one case hides a pickle (whose unpickling would create a file) behind ``model.safetensors``.

The cases run in-process through ``planer.cli.main`` for speed; a few also run as a real ``python -m planer``
process to prove the process-level behaviour (exit status, stderr, warnings).
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import QUICK, cli_sets, tiny_overrides
from safetensors.torch import load_file, save_file

from planer.cli import main

SETS = cli_sets(tiny_overrides(*QUICK, "latency.batch_size=2"))
TEXT = "To be, or not to be, that is the question:\n" * 400
OTHER_TEXT = "Now is the winter of our discontent, made glorious summer by this sun of York.\n" * 300


@dataclass(frozen=True)
class World:
    """What exists before the cases run: a config, its corpus, a finished run and a latency table."""

    root: Path
    config: Path  # data.path only; everything else comes from SETS
    run: Path  # an earlier `planer train` run
    lut: Path  # an earlier `planer profile` directory holding lut.json


def snapshot(*dirs: Path) -> dict:
    """sha256 and mtime of every file, and the mtime of every directory, under ``dirs``."""
    state = {}
    for top in dirs:
        for path in sorted([top, *top.rglob("*")]):
            st = path.stat()
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
            state[str(path)] = (digest, st.st_mtime_ns)
    return state


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("hostile")
    (root / "text.txt").write_text(TEXT)
    config = root / "c.yaml"
    config.write_text(f"data:\n  path: {root / 'text.txt'}\n")
    w = World(root, config, root / "run", root / "lut")
    assert main(["train", "--config", str(config), "--out", str(w.run), *SETS]) == 0
    assert main(["profile", "--config", str(config), "--out", str(w.lut), *SETS]) == 0
    return w


@pytest.fixture(scope="module")
def before(world) -> dict:
    return snapshot(world.run, world.lut)


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    """Anything that unpickles during a case fails the test, whatever the code does with the exception."""

    def refuse(*args, **kwargs):
        raise AssertionError("something was unpickled")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# -- builders of broken input: each takes the World and a fresh tmp dir and returns the argv of one case --------


def write(path: Path, content: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content.encode() if isinstance(content, str) else content)
    return path


def cfg_args(w: World, *extra: str) -> list:
    return ["--config", w.config, *SETS, *extra]


def train(*extra: str):
    return lambda w, t: ["train", *cfg_args(w, *extra), "--out", t / "out"]


def train_with_config(text: str | bytes):
    """``train`` with a config file of its own (data.path given with --set, so only the file is at fault)."""
    return lambda w, t: [
        "train",
        "--config",
        write(t / "bad.yaml", text),
        *SETS,
        "--set",
        f"data.path={w.root / 'text.txt'}",
        "--out",
        t / "out",
    ]


def train_on_data(content: str | bytes, *extra: str):
    return lambda w, t: [
        "train",
        *cfg_args(w, "--set", f"data.path={write(t / 'data.txt', content)}", *extra),
        "--out",
        t / "out",
    ]


def train_with_arch(text: str | bytes):
    return lambda w, t: ["train", *cfg_args(w, "--arch", write(t / "arch.json", text)), "--out", t / "out"]


def random_bytes(n: int) -> bytes:
    data = bytearray(random.Random(0).randbytes(n))
    data[10] = 0  # a NUL for certain
    return bytes(data)


def broken_checkpoint(edit):
    """``evaluate`` of a copy of the earlier run whose files ``edit(dir)`` has damaged."""

    def build(w, t):
        ckpt = t / "ckpt"
        ckpt.mkdir()
        for name in ("config.json", "model.safetensors"):
            shutil.copy(w.run / name, ckpt / name)
        edit(ckpt)
        return ["evaluate", "--run", ckpt]

    return build


def edit_meta(change):
    def edit(ckpt):
        meta = json.loads((ckpt / "config.json").read_text())
        change(meta)
        (ckpt / "config.json").write_text(json.dumps(meta))

    return edit


def edit_tensors(change):
    def edit(ckpt):
        tensors = load_file(str(ckpt / "model.safetensors"))
        change(tensors)
        save_file(tensors, str(ckpt / "model.safetensors"))

    return edit


def truncate(name: str, keep: float = 0.5):
    def edit(ckpt):
        data = (ckpt / name).read_bytes()
        (ckpt / name).write_bytes(data[: int(len(data) * keep)])

    return edit


class Trap:
    """Unpickling this creates the file ``path``: proof that something was unpickled."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def pickle_as_safetensors(ckpt: Path) -> None:
    torch.save({"embed.weight": torch.zeros(3), "trap": Trap(ckpt / "UNPICKLED")}, ckpt / "model.safetensors")


def rechecksum(data: dict) -> dict:
    from planer.latency.table import _checksum

    body = {k: v for k, v in data.items() if k != "checksum"}
    return {**body, "checksum": _checksum(body)}


def broken_lut(change, resign: bool = True, command: str = "profile"):
    """``profile`` (or ``search --lut``) with a copy of the earlier lut.json that ``change(data)`` edited.

    ``resign``: recompute the checksum, as a table written by another planer (or a careful forger) would carry.
    """

    def build(w, t):
        data = json.loads((w.lut / "lut.json").read_text())
        change(data)
        (t / "lut").mkdir()
        write(t / "lut" / "lut.json", json.dumps(rechecksum(data) if resign else data, indent=1))
        if command == "search":
            return ["search", *cfg_args(w), "--out", t / "out", "--target", "0.5", "--lut", t / "lut" / "lut.json",
                    "--method", "gumbel"]  # fmt: skip
        return ["profile", *cfg_args(w), "--out", t / "lut"]

    return build


def truncated_lut(w, t):
    text = (w.lut / "lut.json").read_text()
    write(t / "lut.json", text[: len(text) // 2])
    return [
        "search",
        *cfg_args(w),
        "--out",
        t / "out",
        "--target",
        "0.5",
        "--lut",
        t / "lut.json",
        "--method",
        "gumbel",
    ]


def set_median(data):
    data["blocks"]["ffl"]["median"] *= 0.5


def set_device(data):
    data["fingerprint"]["device"] = "cuda: NVIDIA A100-SXM4-80GB"


def bad_stats(data):
    data["blocks"]["ffl"]["median"] = -1.0


def drop_block(data):
    del data["blocks"]["ffl"]


def add_unknown_block(data):
    data["blocks"]["conv:3"] = dict(data["blocks"]["ffl"])


def drop_tensor(tensors):
    del tensors[sorted(tensors)[-1]]


def widen_model(meta):
    meta["config"]["model"]["d_model"] = 64


def drop_symbol(meta):
    meta["vocab"]["symbols"].pop()


def unknown_arch_block(meta):
    meta["arch"][0] = "mamba:2"


def bad_n_head(meta):
    meta["config"]["model"]["n_head"] = 3


def byte_level(meta):
    meta["vocab"]["level"] = "byte"


def other_tgt_len(ckpt: Path) -> None:
    """A checkpoint that loads (tgt_len shapes no tensor) but is timed on other segments than the earlier run."""
    edit_meta(lambda meta: meta["config"]["model"].update(tgt_len=8))(ckpt)


def bench_against(edit):
    def build(w, t):
        baseline = broken_checkpoint(edit)(w, t)[-1]
        return ["bench", "--run", w.run, "--baseline", baseline, "--batch", "1", "--repeats", "1"]

    return build


LATIN1 = "To be, or not to be: café crème\n".encode("latin-1") * 50
PNG = b"\x89PNG\r\n\x1a\n" + random_bytes(200)

CASES = [
    # -- configs: wrong types, unknown keys, bad sizes, bad targets, bad search spaces ------------------------
    pytest.param(train_with_config("- model\n- train\n"), "expected a mapping of sections", id="config-yaml-is-a-list"),
    pytest.param(train_with_config("model: [d_model: 3\n"), "is not valid YAML", id="config-invalid-yaml"),
    pytest.param(
        train_with_config("model: !!python/object/apply:os.system ['touch PWNED']\n"),
        "is not valid YAML",
        id="config-python-tag",
    ),
    pytest.param(train_with_config(b"# caf\xe9\nmodel:\n  d_model: 32\n"), "is not UTF-8", id="config-not-utf8"),
    pytest.param(
        train_with_config("search: 5\n"), "config search: expected a mapping", id="config-section-not-mapping"
    ),
    pytest.param(
        train("--set", "model.d_model=abc"), "config model.d_model: expected int, got 'abc'", id="config-string-for-int"
    ),
    pytest.param(
        train("--set", "model.n_layer=1.5"), "config model.n_layer: expected int, got 1.5", id="config-float-for-int"
    ),
    pytest.param(
        train("--set", "model.dropout=true"),
        "config model.dropout: expected float, got True",
        id="config-bool-for-float",
    ),
    pytest.param(
        train("--set", "train.lr=.nan"), "config train.lr: expected a finite number, got nan", id="config-nan-for-float"
    ),
    pytest.param(train("--set", "optimizer.lr=0.1"), "unknown config key 'optimizer'", id="config-unknown-section"),
    pytest.param(train("--set", "model.n_heads=4"), "unknown config key 'model.n_heads'", id="config-unknown-key"),
    pytest.param(train("--set", "model"), "--set expects section.key=value", id="config-set-without-value"),
    pytest.param(train("--set", "model.d_model=0"), "model.d_model must be positive, got 0", id="config-zero-d_model"),
    pytest.param(
        train("--set", "model.tgt_len=-16"), "model.tgt_len must be positive, got -16", id="config-negative-tgt_len"
    ),
    pytest.param(
        train("--set", "train.batch_size=0"), "train.batch_size must be positive, got 0", id="config-zero-batch_size"
    ),
    pytest.param(
        train("--set", "model.mem_len=-1"), "model.mem_len must not be negative", id="config-negative-mem_len"
    ),
    pytest.param(
        train("--set", "phase2.steps=10", "--set", "phase2.tokens=5000"),
        "config phase2.steps and phase2.tokens both set a budget: set one of them",
        id="config-two-phase2-budgets",
    ),
    pytest.param(
        train("--set", "phase2.tokens=5000", "--set", "phase2.block_tokens=5000"),
        "config phase2.block_tokens (5000) must be less than the budget phase2.tokens (5000)",
        id="config-block-tokens-whole-budget",
    ),
    pytest.param(
        train("--block-tokens", "640"),
        "--block-tokens distils blocks from a teacher: give --teacher too",
        id="block-tokens-without-teacher",
    ),
    pytest.param(
        train("--set", "search.sample_segments=0"),
        "search.sample_segments must be positive, got 0",
        id="config-empty-calibration-sample",
    ),  # fmt: skip
    pytest.param(
        train("--set", "model.dropout=1.0"), "model.dropout must be in [0, 1), got 1.0", id="config-dropout-one"
    ),
    pytest.param(train("--set", "search.target=0.5"), "unknown config key 'search.target'", id="config-target-key"),
    pytest.param(train("--set", "distill.weight=1.5"), "distill.weight must be in [0, 1]", id="config-distill-weight"),
    pytest.param(
        train("--set", "distill.temperature=0"), "distill.temperature must be positive", id="config-distill-t"
    ),
    pytest.param(
        train("--set", "model.n_head=3"),
        "model.n_head (3) must divide model.d_model (32)",
        id="config-n_head-not-dividing-d_model",
    ),
    pytest.param(
        train("--set", "model.n_experts=2", "--set", "search.space=[skip, moe:top3]"),
        "unknown block 'moe:top3'",
        id="config-top_k-above-experts",
    ),
    pytest.param(
        train("--set", "search.space=[skip, attn:4, conv]"), "unknown block 'conv'", id="config-unknown-block-in-space"
    ),
    pytest.param(
        train("--set", "search.space=attn:4"), "config search.space: expected a list", id="config-space-not-a-list"
    ),
    pytest.param(train("--set", "train.device=tpu"), "train.device must be auto, cpu or cuda", id="config-bad-device"),
    # -- data: empty, binary, not UTF-8, one line, shorter than a segment, not a file -------------------------
    pytest.param(train_on_data(""), "is empty", id="data-empty"),
    pytest.param(train_on_data(random_bytes(4096)), "is not UTF-8 text", id="data-binary-random"),
    pytest.param(
        train_on_data(TEXT.encode().replace(b"q", b"\x00")), "looks binary (it contains NUL bytes)", id="data-nul-bytes"
    ),
    pytest.param(train_on_data(LATIN1), f"bad byte at offset {LATIN1.index(0xE9)}", id="data-latin1"),
    pytest.param(
        train_on_data("to be or not to be\n", "--set", "data.level=word"),
        "the validation split has 0 tokens",
        id="data-one-line",
    ),
    pytest.param(train_on_data(TEXT[:70]), "fewer than one segment", id="data-shorter-than-a-segment"),
    pytest.param(
        lambda w, t: ["train", *cfg_args(w, "--set", f"data.path={t}"), "--out", t / "out"],
        "cannot read data file",
        id="data-is-a-directory",
    ),
    pytest.param(
        lambda w, t: ["evaluate", "--run", w.run, "--text", write(t / "image.png", PNG)],
        "is not UTF-8 text (bad byte at offset 0)",
        id="evaluate-text-binary",
    ),
    pytest.param(
        lambda w, t: ["evaluate", "--run", w.run, "--text", write(t / "one.txt", "T")],
        "has 1 tokens, too few to score",
        id="evaluate-text-one-char",
    ),
    pytest.param(
        lambda w, t: ["evaluate", "--run", w.run, "--device", "tpu"],
        "unknown device 'tpu'",
        id="evaluate-unknown-device",
    ),
    # -- checkpoints: damaged weights, a config that does not match them, a pickle in disguise ----------------
    pytest.param(
        broken_checkpoint(truncate("model.safetensors")),
        "model.safetensors is corrupt",
        id="ckpt-truncated-safetensors",
    ),
    pytest.param(
        broken_checkpoint(lambda c: write(c / "model.safetensors", random_bytes(4096))),
        "model.safetensors is corrupt",
        id="ckpt-garbage-safetensors",
    ),
    pytest.param(
        broken_checkpoint(pickle_as_safetensors), "model.safetensors is corrupt", id="ckpt-pickle-as-safetensors"
    ),
    pytest.param(
        broken_checkpoint(lambda c: (c / "model.safetensors").unlink()),
        "model.safetensors is missing",
        id="ckpt-weights-missing",
    ),
    pytest.param(broken_checkpoint(truncate("config.json")), "is unreadable or not JSON", id="ckpt-config-not-json"),
    pytest.param(
        broken_checkpoint(edit_meta(widen_model)),
        "has shape (32,), expected (64,)",
        id="ckpt-config-does-not-match-tensors",
    ),
    pytest.param(
        broken_checkpoint(edit_tensors(drop_tensor)), "does not match its config: missing", id="ckpt-missing-tensor"
    ),
    pytest.param(broken_checkpoint(edit_meta(drop_symbol)), "vocabulary size", id="ckpt-vocab-does-not-match"),
    pytest.param(
        broken_checkpoint(edit_meta(unknown_arch_block)),
        "config.json: unknown block 'mamba:2'",
        id="ckpt-unknown-block-in-arch",
    ),
    pytest.param(
        broken_checkpoint(edit_meta(bad_n_head)),
        "config.json: config model.n_head (3) must divide",
        id="ckpt-config-invalid",
    ),
    pytest.param(
        broken_checkpoint(edit_meta(byte_level)), "unknown vocabulary level 'byte'", id="ckpt-vocab-level-unknown"
    ),
    pytest.param(
        broken_checkpoint(lambda c: write(c / "eval.json", '{"valid": {"loss": 1.')),
        "eval.json is damaged",
        id="ckpt-eval-json-damaged",
    ),
    pytest.param(bench_against(other_tgt_len), "their latencies do not compare", id="bench-baseline-other-tgt_len"),
    # -- latency tables: edited, from another device, damaged, or for another config ---------------------------
    pytest.param(broken_lut(set_median, resign=False), "checksum mismatch", id="lut-edited-by-hand"),
    pytest.param(broken_lut(set_device), "device='cuda: NVIDIA A100-SXM4-80GB'", id="lut-from-another-device"),
    pytest.param(
        broken_lut(set_device, command="search"),
        "device='cuda: NVIDIA A100-SXM4-80GB'",
        id="search-lut-from-another-device",
    ),
    pytest.param(truncated_lut, "is not valid JSON", id="lut-truncated"),
    pytest.param(broken_lut(bad_stats), "block ffl: expected median, p10 and p90 in ms", id="lut-negative-median"),
    pytest.param(broken_lut(drop_block), "lacks the blocks ffl", id="lut-missing-block"),
    pytest.param(broken_lut(add_unknown_block), "holds an unknown block 'conv:3'", id="lut-unknown-block"),
    # -- architecture files ------------------------------------------------------------------------------------
    pytest.param(train_with_arch('{"arch": ["attn:4", "mamba"]}'), "unknown block 'mamba'", id="arch-unknown-block"),
    pytest.param(
        train_with_arch('{"arch": ["attn:4", "ffl", "ffl"]}'),
        "has 3 blocks, but model.n_layer=1 means 2",
        id="arch-wrong-length",
    ),
    pytest.param(
        train_with_arch('{"arch": "attn:4 ffl"}'), "expected a JSON object with an 'arch' list", id="arch-not-a-list"
    ),
    pytest.param(train_with_arch('{"arch": []}'), "the architecture is empty", id="arch-empty"),
    pytest.param(train_with_arch(b'{"arch": ["attn:4", "ffl"]} \xff'), "is not UTF-8", id="arch-not-utf8"),
    pytest.param(train("--arch", "sandwich:5"), "sandwich:K needs 0 <= K <= n_layer (1), got 5", id="arch-sandwich-k"),
    # -- phase 2's sources and the search method ----------------------------------------------------------------
    pytest.param(
        lambda w, t: [
            "train",
            *cfg_args(w, "--set", f"data.path={write(t / 'other.txt', OTHER_TEXT)}"),
            "--teacher",
            w.run,
            "--out",
            t / "out",
        ],  # fmt: skip
        "was trained on another vocabulary",
        id="train-teacher-other-vocab",
    ),
    pytest.param(train("--init-from", "/nonexistent/model"), "config.json is missing", id="train-init-from-missing"),
    pytest.param(
        lambda w, t: ["search", *cfg_args(w), "--out", t / "out", "--target", "0.5", "--method", "knapsack"],
        "give --init-from DIR",
        id="search-knapsack-without-baseline",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--baseline", t / "nope"],
        "config.json is missing",
        id="run-baseline-missing",
    ),
    pytest.param(
        lambda w, t: [
            "search",
            *cfg_args(w, "--limits", "1:0.5", "--method", "gumbel"),
            "--out",
            t / "out",
            "--target",
            "0.5",
        ],
        "only the knapsack search keeps limits",
        id="search-gumbel-with-limits",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--limits", "1=0.5"],
        "--limits expects BATCH:FRACTION pairs",
        id="run-limits-malformed",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--limits", "1:1.5"],
        "a fraction of the baseline's latency in (0, 1], got 1: 1.5",
        id="run-limit-out-of-range",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--limits", "1:0.5", "--method", "knapsack,gumbel"],
        "only the knapsack search keeps limits at other batch sizes; drop gumbel",
        id="run-limits-with-gumbel",
    ),
    # -- output aimed at the earlier run, and bad command-line values ------------------------------------------
    pytest.param(
        lambda w, t: ["train", *cfg_args(w), "--out", w.run], "is not empty; pass --force", id="train-into-earlier-run"
    ),
    pytest.param(
        lambda w, t: ["search", *cfg_args(w), "--out", w.run, "--target", "0.5", "--method", "gumbel"],
        "is not empty; pass --force",
        id="search-into-earlier-run",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w, "--set", "model.d_inner=128"), "--out", w.run],
        "holds a trained model, not a planer run directory",
        id="run-into-earlier-run",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", w.run],
        "holds a trained model, not a planer run directory",
        id="run-into-earlier-run-same-config",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", write(t / "r" / "config.yaml", "model: [\n").parent],
        "config.yaml is damaged",
        id="run-config-yaml-damaged",
    ),
    pytest.param(
        lambda w, t: ["train", *cfg_args(w), "--out", write(t / "r" / "config.yaml", b"\xff\xfe").parent, "--resume"],
        "config.yaml is damaged",
        id="resume-config-yaml-damaged",
    ),
    pytest.param(
        lambda w, t: ["profile", *cfg_args(w, "--set", "model.d_inner=128"), "--out", w.lut],
        "was profiled for d_inner=64",
        id="profile-over-earlier-lut",
    ),
    pytest.param(
        lambda w, t: ["profile", *cfg_args(w), "--out", write(t / "file", "x")],
        "is not a directory",
        id="profile-out-is-a-file",
    ),
    pytest.param(
        lambda w, t: ["profile", *cfg_args(w, "--set", "latency.dtype=fp16"), "--out", t / "lut"],
        "fp16 needs a CUDA device",
        id="profile-fp16-on-cpu",
    ),
    pytest.param(
        lambda w, t: ["bench", "--run", w.run, "--batch", "0"],
        "batch sizes must be positive integers",
        id="bench-batch-zero",
    ),
    pytest.param(
        lambda w, t: ["bench", "--run", w.run, "--threads", "0"],
        "latency.threads must be positive",
        id="bench-threads-zero",
    ),
    pytest.param(
        lambda w, t: ["search", *cfg_args(w), "--out", t / "out", "--target", "0"],
        "in (0, 1], got 0.0",
        id="search-target-zero",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--targets", "2"],
        "in (0, 1], got 2.0",
        id="run-targets-two",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--targets", "half"],
        "--targets expects comma-separated numbers",
        id="run-targets-not-numbers",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--designs", "foo"],
        "unknown design 'foo'",
        id="run-designs-foo",
    ),
    pytest.param(
        lambda w, t: ["run", *cfg_args(w), "--out", t / "out", "--seeds", "0"],
        "--seeds must be a positive integer, got 0",
        id="run-seeds-zero",
    ),
    pytest.param(lambda w, t: ["report", "--run", w.run], "is one model's folder", id="report-on-a-train-run"),
    pytest.param(
        lambda w, t: ["report", "--run", write(t / "r" / "baseline" / "summary.json", "{").parents[1]],
        "summary.json is damaged",
        id="report-summary-damaged",
    ),
    pytest.param(
        lambda w, t: ["search", *cfg_args(w), "--out", t / "out", "--target", "half"],
        "planer search: argument --target: invalid float value: 'half'",
        id="argument-not-a-number",
    ),
    pytest.param(
        lambda w, t: ["evaluate", "--run", w.run, "--split", "dev"],
        "argument --split: invalid choice: 'dev'",
        id="argument-invalid-choice",
    ),
    pytest.param(
        lambda w, t: ["train", "--out", t / "out"],
        "the following arguments are required: --config",
        id="argument-missing",
    ),
]

IN_A_PROCESS = [
    "config-yaml-is-a-list",
    "data-binary-random",
    "ckpt-pickle-as-safetensors",
    "lut-edited-by-hand",
    "argument-not-a-number",
]


def assert_refused(code: int, out: str, err: str, fragment: str) -> None:
    assert "Traceback" not in out + err, err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("planer: error:"), err
    assert fragment in lines[0], lines[0]
    assert out == "", out


def assert_untouched(w: World, before: dict, tmp: Path) -> None:
    assert snapshot(w.run, w.lut) == before, "a file of the earlier run changed"
    assert not list(tmp.rglob("UNPICKLED")), "model.safetensors was unpickled"


@pytest.mark.parametrize("build, fragment", CASES)
def test_refused_in_process(world, before, tmp_path, capsys, build, fragment):
    argv = [str(a) for a in build(world, tmp_path)]
    capsys.readouterr()
    code = main(argv)
    out, err = capsys.readouterr()
    assert_refused(code, out, err, fragment)
    assert_untouched(world, before, tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("build, fragment", [c for c in CASES if c.id in IN_A_PROCESS])
def test_refused_by_the_process(world, before, tmp_path, build, fragment):
    argv = [str(a) for a in build(world, tmp_path)]
    result = subprocess.run([sys.executable, "-m", "planer", *argv], capture_output=True, text=True, cwd=tmp_path)
    assert_refused(result.returncode, result.stdout, result.stderr, fragment)
    assert_untouched(world, before, tmp_path)


def test_cases_are_distinct():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 25
    assert set(IN_A_PROCESS) <= set(ids)


@pytest.mark.parametrize("case", ["train-teacher-other-vocab", "train-init-from-missing"])
def test_a_refused_training_leaves_no_output_folder(world, tmp_path, case):
    build = next(c.values[0] for c in CASES if c.id == case)
    assert main([str(a) for a in build(world, tmp_path)]) == 2
    assert not (tmp_path / "out").exists()
