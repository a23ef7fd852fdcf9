"""``planer export --onnx`` of gpt models: the graph, fed its own presents as pasts, gives planer's logits.

Written apart from the exporter's own check: the graph is fed by the names and shapes the README documents
(``input_ids``, then ``past_key_B`` / ``past_value_B`` per attention block B, of length 0 for the prefill), and
its logits over a prefill of 7 tokens, 8 one-token decode steps and a chunk of 3 are compared with planer's full
forward of the whole sequence and with planer's own ``KVCache`` decoding, at two batch sizes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import tiny_gpt

from planer.cli import main
from planer.config import Config
from planer.io.checkpoint import save_checkpoint
from planer.io.data import Vocab
from planer.io.onnx import logit_gap
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.models.gpt.cache import KVCache

ort = pytest.importorskip("onnxruntime")

CALLS = [7, 1, 1, 1, 1, 1, 1, 1, 1, 3]  # a prefill, eight decode steps, a chunk after them
# llama: 4 query heads over 2 key/value heads; gpt2: 4 heads. MLPs of 48 units.
ARCHS = {
    "llama": "skip ffl:24 attn:2 ffl attn:4/kv1 skip attn:4 ffl",  # skipped attention, fewer heads, kv1, narrow MLP
    "gpt2": "attn:2 skip attn:4 ffl:24",  # fewer heads, skipped MLP
    "llama-moe": "attn:4 moe:top2 attn:2/kv1 moe:top1",
}


def saved(tmp_path, flavour: str, arch: str):
    """A random planer model of ``arch`` saved in ``tmp_path/run``, its weights spread from the initialisation's."""
    vocab = Vocab.build(list("abcdefghijklmnopqrstuvwxyz .,"), "char")
    cfg = Config(model=tiny_gpt(flavour, vocab_size=len(vocab), n_positions=32))
    torch.manual_seed(0)
    model = build_model(cfg.model, Arch.parse(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    (tmp_path / "run").mkdir(parents=True)
    save_checkpoint(tmp_path / "run", model, cfg, vocab)
    return tmp_path / "run", model


def export(run, out, capsys, *extra: str) -> tuple[int, str, str]:
    """``planer export --onnx``'s exit status, stdout and stderr."""
    capsys.readouterr()
    status = main(["export", "--run", str(run), "--onnx", str(out), *extra])
    printed = capsys.readouterr()
    return status, printed.out, printed.err


def check_inputs(sess, model) -> None:
    """The graph's inputs are the documented ones, each past of its block's key/value heads and a dynamic length."""
    inputs = sess.get_inputs()
    blocks = [b for b, block in enumerate(model.blocks) if block.n_head]
    assert [i.name for i in inputs] == ["input_ids", *(f"past_{k}_{b}" for b in blocks for k in ("key", "value"))]
    for i in inputs[1:]:
        block = model.blocks[int(i.name.rsplit("_", 1)[1])]
        assert i.shape[1:] == [block.kv, "past", block.d_head]


def onnx_calls(sess, ids: torch.Tensor) -> np.ndarray:
    """onnxruntime's logits for ``ids`` fed in CALLS, every call after the first fed the last one's presents."""
    pasts = {i.name: np.zeros((ids.shape[0], i.shape[1], 0, i.shape[3]), np.float32) for i in sess.get_inputs()[1:]}
    pieces = []
    for chunk in torch.split(ids, CALLS, dim=1):
        logits, *presents = sess.run(None, {"input_ids": chunk.numpy(), **pasts})
        assert all(p.shape[2] == chunk.shape[1] + past.shape[2] for p, past in zip(presents, pasts.values()))
        pieces.append(logits)
        pasts = dict(zip(pasts, presents))  # outputs come in the order of the past inputs
    return np.concatenate(pieces, axis=1)


def planer_calls(model, ids: torch.Tensor) -> np.ndarray:
    """planer's logits for ``ids`` fed in CALLS through its own key/value cache."""
    cache = KVCache(model, ids.shape[0], ids.shape[1])
    with torch.no_grad():
        return torch.cat([model(chunk, cache)[0] for chunk in torch.split(ids, CALLS, dim=1)], dim=1).numpy()


@pytest.mark.parametrize("name", list(ARCHS))
def test_onnx_decoding_equals_planer(tmp_path, capsys, name):
    run, model = saved(tmp_path, name.split("-")[0], ARCHS[name])
    out = tmp_path / "deploy" / "model.onnx"
    status, printed, _ = export(run, out, capsys)
    assert status == 0 and f"wrote {out}" in printed and "present_value_" in printed and "input_ids" in printed
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    check_inputs(sess, model)
    gen = torch.Generator().manual_seed(1)
    for batch in (1, 3):  # neither is the trace's batch: a dynamic axis
        ids = torch.randint(0, model.cfg.vocab_size, (batch, sum(CALLS)), generator=gen)
        theirs = onnx_calls(sess, ids)
        with torch.no_grad():
            assert np.abs(theirs - model(ids)[0].numpy()).max() <= 1e-4
        assert np.abs(theirs - planer_calls(model, ids)).max() <= 1e-4
    assert list(out.parent.iterdir()) == [out]  # no temporary file left


def test_export_refuses_an_existing_file_or_a_folder(tmp_path, capsys):
    run, _ = saved(tmp_path, "gpt2", ARCHS["gpt2"])
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    status, _, err = export(run, out, capsys)
    assert status == 2 and "pass --force" in err and out.read_text() == "keep me"
    assert export(run, out, capsys, "--force")[0] == 0 and out.read_bytes().startswith(b"\x08")
    status, _, err = export(run, tmp_path, capsys, "--force")
    assert status == 2 and "--onnx takes a file name" in err


def test_a_failed_check_or_a_model_without_attention_writes_nothing(tmp_path, capsys, monkeypatch):
    run, _ = saved(tmp_path / "a", "llama", "skip ffl skip ffl:24")
    status, _, err = export(run, tmp_path / "none.onnx", capsys)
    assert status == 2 and err.count("\n") == 1 and "without attention" in err
    run, _ = saved(tmp_path / "b", "llama", ARCHS["llama"])
    monkeypatch.setattr("planer.models.gpt.onnx.parity", lambda model, path: 1.0)
    status, _, err = export(run, tmp_path / "out" / "model.onnx", capsys)
    assert status == 2 and err.count("\n") == 1 and "differ from planer's by 1.00e+00" in err
    assert list((tmp_path / "out").iterdir()) == [] and not (tmp_path / "none.onnx").exists()


def test_the_logit_check_is_relative_to_the_logits_scale_above_one():
    ours = torch.tensor([[0.5, -0.25], [0.125, 0.0]])
    assert logit_gap(ours.numpy() + 1e-3, ours) == pytest.approx(1e-3, rel=1e-3)  # small logits: the absolute gap
    ours = ours * 80  # a real model's scale: rounding grows with it
    assert logit_gap(ours.numpy() + 4e-3, ours) == pytest.approx(1e-4, rel=1e-3)
