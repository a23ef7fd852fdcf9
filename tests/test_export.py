"""ONNX export: the exported graph, run in onnxruntime, gives planer's logits over consecutive segments with memory.

The parity check here is written independently of export.py's own: it feeds the graph by the names and shapes the
README documents (ids, then one memory per attention block, empty for the first segment) and compares the logits of
two consecutive segments, the second fed the first's memories, with the planer model's.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import tiny_overrides

from planer.cli import main
from planer.config import load_config
from planer.io.checkpoint import save_checkpoint
from planer.io.data import Vocab
from planer.models.arch import Arch
from planer.models.moe import MoEConfig, MoEFeedForward
from planer.models.txl.model import TransformerXL

ort = pytest.importorskip("onnxruntime")

BASELINE = "attn:4 ffl attn:4 ffl attn:4 ffl"
FOUND = "attn:2 moe:top1 skip moe:top2 attn:1 ffl"  # skip, fewer heads and both MoE kinds


def checkpoint(tmp_path, arch: str, mem_len: int = 12):
    """A saved model with random weights (biases too, so that every parameter shows in the logits)."""
    vocab = Vocab.build(list("abcdefghijklmnopqrstuvwxyz ."), "char")
    shape = ["model.n_layer=3", "model.tgt_len=12", f"model.mem_len={mem_len}", f"model.vocab_size={len(vocab)}"]
    cfg = load_config(None, tiny_overrides(*shape))
    torch.manual_seed(0)
    model = TransformerXL(cfg.model, Arch.parse(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    (tmp_path / "run").mkdir()
    save_checkpoint(tmp_path / "run", model, cfg, vocab)
    return tmp_path / "run", model


def onnx_segments(path, model: TransformerXL, segments: list[torch.Tensor]) -> list[np.ndarray]:
    """onnxruntime's logits for consecutive segments, each fed the memories the previous one returned."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    memory = [i for i, b in enumerate(model.blocks) if b.uses_memory]
    assert names == ["idx", *(f"mem.{i}" for i in memory)]
    mems = [np.zeros((segments[0].shape[0], 0, model.cfg.d_model), np.float32) for _ in memory]
    logits = []
    for idx in segments:
        out = sess.run(None, {"idx": idx.numpy(), **dict(zip(names[1:], mems))})
        logits.append(out[0])
        mems = out[1:]
    return logits


def planer_segments(model: TransformerXL, segments: list[torch.Tensor]) -> list[np.ndarray]:
    mems, logits = None, []
    with torch.no_grad():
        for idx in segments:
            out, mems = model(idx, mems)
            logits.append(out.numpy())
    return logits


@pytest.mark.parametrize("arch", [BASELINE, FOUND], ids=["baseline", "skip-few-heads-moe"])
def test_onnx_logits_match_over_two_segments(tmp_path, capsys, arch):
    run, model = checkpoint(tmp_path, arch)
    out = tmp_path / "deploy" / "model.onnx"
    assert main(["export", "--run", str(run), "--onnx", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    gen = torch.Generator().manual_seed(1)
    for batch, length in [(3, 12), (1, 7)]:  # another batch and a shorter segment than the trace's: dynamic axes
        segments = [torch.randint(0, model.cfg.vocab_size, (batch, length), generator=gen) for _ in range(2)]
        for ours, theirs in zip(planer_segments(model, segments), onnx_segments(out, model, segments)):
            assert np.abs(ours - theirs).max() < 1e-4
    assert list(out.parent.iterdir()) == [out]  # no temporary file left


def test_export_without_memory(tmp_path):
    run, model = checkpoint(tmp_path, "attn:2 ffl skip ffl attn:1 ffl", mem_len=0)
    out = tmp_path / "m.onnx"
    assert main(["export", "--run", str(run), "--onnx", str(out)]) == 0
    segments = [torch.randint(0, model.cfg.vocab_size, (2, 12)) for _ in range(2)]
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["idx"]
    for ours, idx in zip(planer_segments(model, segments), segments):
        assert np.abs(ours - sess.run(None, {"idx": idx.numpy()})[0]).max() < 1e-4


def test_export_refuses_an_existing_file(tmp_path, capsys):
    run, _ = checkpoint(tmp_path, BASELINE)
    out = tmp_path / "model.onnx"
    out.write_text("keep me")
    assert main(["export", "--run", str(run), "--onnx", str(out)]) == 2
    assert "pass --force" in capsys.readouterr().err and out.read_text() == "keep me"
    assert main(["export", "--run", str(run), "--onnx", str(out), "--force"]) == 0
    assert out.read_bytes().startswith(b"\x08")  # an ONNX protobuf now (field 1, ir_version)


@pytest.mark.parametrize("argv", [[], ["--onnx", "a.onnx", "--hf", "b"]], ids=["neither", "both"])
def test_export_takes_exactly_one_form(tmp_path, capsys, argv):
    assert main(["export", "--run", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--onnx" in err[0] and "--hf" in err[0]


@pytest.mark.parametrize("top_k", [1, 2])
def test_dense_moe_path_equals_the_grouped_one(top_k):
    """The path the export traces computes what training and inference compute, gradients included."""
    torch.manual_seed(0)
    grouped = MoEFeedForward(MoEConfig(32, 64, n_experts=4, top_k=top_k, dropout=0.0))
    dense = copy.deepcopy(grouped)
    dense.impl = "dense"
    x = torch.randn(2, 9, 32)
    for mode in (False, True):
        grouped.train(mode), dense.train(mode)
        a, b = grouped(x), dense(x)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
        torch.testing.assert_close(grouped.balance_loss, dense.balance_loss)
        assert torch.equal(grouped.expert_counts, dense.expert_counts)
    a.sum().backward(), b.sum().backward()
    for p, q in zip(grouped.parameters(), dense.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
