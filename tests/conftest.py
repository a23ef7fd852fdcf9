"""Shared fixtures: tiny configs and corpora that train in seconds."""

import dataclasses
from pathlib import Path

import pytest
import torch

from planer.config import ModelConfig, load_config

ROOT = Path(__file__).resolve().parents[1]

# The settings of a model that trains in seconds: every tiny config of the tests starts here, and a test changes
# only what it needs to (see tiny_overrides). Its corpus (data.path) comes with the test.
TINY = (
    "model.d_model=32",
    "model.n_head=4",
    "model.d_inner=64",
    "model.n_layer=2",
    "model.tgt_len=16",
    "model.mem_len=16",
    "model.dropout=0.0",
    "train.steps=300",
    "train.batch_size=8",
    "train.lr=0.05",
    "train.warmup=10",
    "train.eval_every=150",
    "train.eval_batches=4",
    "eval.batch_size=4",
    "latency.repeats=3",
    "latency.warmup=1",
)
# A one-layer model trained for 30 steps: for tests of what the command line does around a checkpoint, not of how
# good the checkpoint is.
QUICK = ("model.n_layer=1", "train.steps=30", "train.eval_every=30", "train.batch_size=4", "train.eval_batches=2",
         "train.warmup=5")  # fmt: skip
# A whole `planer run` in seconds: a short Gumbel search, 40 training steps, latencies at batch 2.
TINY_RUN = ("search.method=gumbel", "search.epochs=3", "search.steps_per_epoch=8", "search.freeze_fraction=0.3",
            "train.steps=40", "train.eval_every=40", "latency.batch_size=2")  # fmt: skip
# The Llama backbone on any tiny config (grouped-query attention, no memory)
LLAMA_SETTINGS = ["model.backbone=gpt", "model.flavour=llama", "model.n_kv_head=2", "model.mem_len=0"]


def tiny_overrides(*variants: str, text: Path | None = None) -> list[str]:
    """The config overrides of the tiny model, ``variants`` on top (the later of two settings of a key wins), and
    ``data.path`` when ``text`` is given (for fixtures of other scopes too)."""
    return [*([f"data.path={text}"] if text is not None else []), *TINY, *variants]


def cli_sets(overrides) -> list[str]:
    """Config overrides as the command line takes them: ``--set KEY=VALUE`` each."""
    return [arg for item in overrides for arg in ("--set", item)]


def tiny_model(**values) -> ModelConfig:
    """The tiny model's config without data, for tests of the modules themselves: segments and memory of 8 tokens,
    4 experts and a vocabulary of 40, unless ``values`` say otherwise."""
    model = load_config(None, list(TINY)).model
    return dataclasses.replace(model, **(dict(tgt_len=8, mem_len=8, n_experts=4, vocab_size=40) | values))


def tiny_gpt(flavour: str = "gpt2", **values) -> ModelConfig:
    """``tiny_model`` on the gpt backbone, with no memory and segments of 16 (llama: 2 key/value heads, untied)."""
    gpt = dict(backbone="gpt", flavour=flavour, d_inner=48, tgt_len=16, mem_len=0, moe_dropout=0.0, vocab_size=50)
    if flavour == "llama":
        gpt |= dict(n_kv_head=2, tie_embeddings=False)
    return tiny_model(**(gpt | values))


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)
    yield


@pytest.fixture
def tiny_text(tmp_path) -> Path:
    """A small char corpus with real structure (an excerpt of the shipped Shakespeare)."""
    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:60000]
    path = tmp_path / "tiny.txt"
    path.write_text(text)
    return path


@pytest.fixture
def tiny_cfg(tiny_text):
    def make(*overrides):
        return load_config(None, tiny_overrides(*overrides, text=tiny_text))

    return make


@pytest.fixture
def trained_tiny(tiny_cfg):
    """A 2-layer baseline trained for a second or two (Adam, in order, with memory), and its corpus: enough for
    its heads and blocks to matter, as measuring importance and inheriting weights need."""
    from planer.io.data import Segments, load_corpus
    from planer.models.arch import Arch
    from planer.models.language_model import token_nll
    from planer.models.txl.model import TransformerXL

    cfg = tiny_cfg("model.n_experts=4")
    corpus = load_corpus(cfg.data)
    cfg.model.vocab_size = len(corpus.vocab)
    torch.manual_seed(0)
    model = TransformerXL(cfg.model, Arch.baseline(cfg.model.n_layer, cfg.model.n_head))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    segments, mems = Segments(corpus.train, 8, cfg.model.tgt_len), None
    for k in range(150):
        x, y = segments[k]
        logits, mems = model(x, mems)
        opt.zero_grad()
        token_nll(logits, y).mean().backward()
        opt.step()
    return model.eval(), corpus


HAND_MS = {"skip": 0.0, "attn:1": 1.0, "attn:2": 1.5, "attn:4": 2.0, "ffl": 0.6, "moe:top1": 1.2, "moe:top2": 1.5,
           "ffl:x8": 4.0}  # fmt: skip


def hand_table(cfg, ms: dict[str, float] = HAND_MS, fixed: float = 0.5):
    """A latency table with chosen entries that holds for ``cfg``: tests must not depend on measured timings."""
    from planer.latency.table import LatencyTable, fingerprint

    stats = {spec: {"median": v, "p10": v, "p90": v} for spec, v in ms.items()}
    return LatencyTable(fingerprint(cfg), {"median": fixed, "p10": fixed, "p90": fixed}, stats, {})
