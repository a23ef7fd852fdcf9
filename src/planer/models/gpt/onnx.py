"""Export of a gpt model (llama or gpt2 flavour, any arch) to ONNX with its key/value cache as explicit tensors.

A graph holds no state, so the cache goes in and out, one key and one value tensor per attention block B (its
position in the arch, from 0), of that block's own key/value heads K_B:

    inputs   input_ids        int64 (batch, new)                    the tokens after the cached ones
             past_key_B       float (batch, K_B, past, d_head)       for every attention block B
             past_value_B     float (batch, K_B, past, d_head)
    outputs  logits           float (batch, new, vocab)
             present_key_B    float (batch, K_B, past + new, d_head) the next call's past_key_B
             present_value_B  float (batch, K_B, past + new, d_head)

Batch, new and past lengths are dynamic: a prefill takes pasts of length 0, every later call (one token, or a
chunk of several) the presents the last returned. Positions (rotary or learned) start at ``past``, and each new
token sees every past one and the new ones up to itself. ``past + new`` must stay within the model's
``n_positions``.

The graph is ``GPT.forward`` itself, traced with a cache (``GraphCache``) whose layers concatenate the past with
the new keys and values instead of writing into a preallocated buffer: every block computes with its own modules
and planer's ``cached_attention``. The trace example has a past of 2 and 3 new tokens, so that the trace keeps
``cached_attention``'s general path (a mask of positions), which holds for every past and new length; its
shortcuts for one new token or an empty past are the same numbers up to float rounding. Rotary tables are
computed in the graph for the positions it reads (they are not stored for the whole context: see
``Attention._rotary``). How the graph is traced and when the file is kept: io/onnx.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from planer.errors import PlanerError
from planer.io.checkpoint import load_checkpoint
from planer.io.onnx import (
    annotate,
    check_target,
    logit_gap,
    require_onnx,
    session,
    trace,
    traceable_copy,
    write_checked,
)
from planer.models.gpt.cache import KVCache
from planer.models.gpt.model import GPT

# The parity check's calls: a prefill, eight one-token decode steps, then a chunk of three after them
STEPS = (7, 1, 1, 1, 1, 1, 1, 1, 1, 3)


class GraphLayer:
    """One attention block's cache inside the graph: its past keys and values, and past + new once it has run."""

    def __init__(self, cache: GraphCache, k: torch.Tensor, v: torch.Tensor):
        self.cache, self.k, self.v = cache, k, v  # (B, K, past, Dh) each

    @property
    def start(self) -> int:
        return self.cache.length

    def extend(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The past followed by the new positions' keys and values (B, K, T, Dh): (B, K, past + T, Dh) each."""
        self.k, self.v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        return self.k, self.v


class GraphCache(KVCache):
    """A ``KVCache`` whose layers are the graph's past tensors: what ``GPT.forward`` reads and extends.

    Not preallocated: the caller owns the cache between calls, so it has no capacity to check.
    """

    def __init__(self, model: GPT, pasts: tuple[torch.Tensor, ...]):
        self.length = pasts[0].size(2)  # the same for every block
        self.layers = [None] * len(model.blocks)
        for n, block in enumerate(attention_blocks(model)):
            self.layers[block] = GraphLayer(self, pasts[2 * n], pasts[2 * n + 1])

    def check_room(self, new: int) -> None:
        """Nothing to check: the cache grows with every call (the caller keeps within the model's positions)."""

    def presents(self) -> list[torch.Tensor]:
        return [t for layer in self.layers if layer is not None for t in (layer.k, layer.v)]


class DecodeGraph(nn.Module):
    """``GPT.forward`` with its cache spelled as flat past and present tensors: what a graph can take and return."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model
        for block in model.blocks:
            if block.n_head:
                block.tables = None  # else the trace would store the tables of an earlier call as constants

    def forward(self, input_ids: torch.Tensor, *pasts: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = GraphCache(self.model, pasts)
        logits, _ = self.model(input_ids, cache)
        return (logits, *cache.presents())


def attention_blocks(model: GPT) -> list[int]:
    """The positions of the blocks that keep keys and values."""
    return [i for i, block in enumerate(model.blocks) if block.n_head]


def io_names(model: GPT) -> tuple[list[str], list[str]]:
    """The graph's inputs and outputs: the ids and the logits, then each attention block's key and value."""
    cached = [f"{kind}_{b}" for b in attention_blocks(model) for kind in ("key", "value")]
    return ["input_ids", *(f"past_{n}" for n in cached)], ["logits", *(f"present_{n}" for n in cached)]


def empty_pasts(model: GPT, batch: int, length: int = 0) -> list[torch.Tensor]:
    """Zero keys and values of ``length`` positions for every attention block, in the graph's input order."""
    like = model.embed.weight
    blocks = [model.blocks[b] for b in attention_blocks(model)]
    return [like.new_zeros(batch, b.kv, length, b.d_head) for b in blocks for _ in range(2)]


def write_onnx(model: GPT, path: Path) -> None:
    """Trace ``model`` (a copy) into an ONNX file at ``path``, batch, new and past lengths dynamic."""
    graph = DecodeGraph(traceable_copy(model)).eval()
    inputs, outputs = io_names(model)
    idx = torch.zeros(2, 3, dtype=torch.long, device=model.embed.weight.device)
    axes = {"input_ids": {0: "batch", 1: "new"}, "logits": {0: "batch", 1: "new"}}
    axes |= {name: {0: "batch", 2: "past"} for name in inputs[1:]}
    axes |= {name: {0: "batch", 2: "past_plus_new"} for name in outputs[1:]}
    trace(graph, (idx, *empty_pasts(model, 2, 2)), path, (inputs, outputs), axes)
    annotate(path, metadata(model))


def metadata(model: GPT) -> dict[str, str]:
    """What a user of the graph needs to know to feed it."""
    cfg = model.cfg
    return {
        "planer.arch": " ".join(model.arch.specs()),
        "planer.flavour": cfg.flavour,
        "planer.attention_blocks": json.dumps(attention_blocks(model)),
        "planer.n_positions": str(cfg.context),
        "planer.vocab_size": str(cfg.vocab_size),
    }


def steps(context: int) -> list[int]:
    """The parity check's calls that fit in ``context`` positions."""
    kept, total = [], 0
    for n in STEPS:
        if total + n <= context:
            kept.append(n)
            total += n
    return kept


def parity(model: GPT, path: str | Path, batch: int = 2, seed: int = 0) -> float:
    """The largest difference between planer's logits with its ``KVCache`` and onnxruntime's with the graph's
    presents fed back as pasts, over a prefill, eight decode steps and a chunk (as many as the context holds)."""
    gen = torch.Generator().manual_seed(seed)
    sess, (inputs, _) = session(path), io_names(model)
    lengths, device = steps(model.cfg.context), model.embed.weight.device
    cache = KVCache(model.eval(), batch, sum(lengths))
    pasts, worst = {n: t.cpu().numpy() for n, t in zip(inputs[1:], empty_pasts(model, batch))}, 0.0
    with torch.no_grad():
        for n in lengths:
            idx = torch.randint(0, model.cfg.vocab_size, (batch, n), generator=gen)
            logits, _ = model(idx.to(device), cache)
            out = sess.run(None, {"input_ids": idx.numpy(), **pasts})
            worst = max(worst, logit_gap(out[0], logits))
            pasts = dict(zip(inputs[1:], out[1:]))
    return worst


def export_onnx(run_dir: str | Path, out: str | Path, force: bool = False, tolerance: float = 1e-4) -> dict:
    """``planer export --onnx``: the checkpoint in ``run_dir`` as an ONNX file at ``out``, kept once onnxruntime's
    logits match planer's within ``tolerance`` over a prefill, eight decode steps and a chunk."""
    out = Path(out)
    require_onnx()
    model, _, _ = load_checkpoint(run_dir)
    if not attention_blocks(model):
        raise PlanerError("a model without attention has no key/value cache; its ONNX export needs one")
    check_target(out, force)
    diff = write_checked(out, lambda tmp: write_onnx(model, tmp), lambda tmp: parity(model, tmp), tolerance,
                         "a prefill, eight decode steps and a chunk")  # fmt: skip
    inputs, outputs = io_names(model)
    return {"path": str(out), "arch": model.arch.short(), "inputs": inputs, "outputs": outputs, "max_diff": diff}
