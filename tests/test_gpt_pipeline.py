"""Every stage over the gpt backbone: the supernet, warm start, inheritance of grouped-query heads, the knapsack
search and a whole tiny ``planer run`` from an imported Hugging Face Llama."""

import dataclasses
import json

import pytest
import torch
from conftest import LLAMA_SETTINGS, ROOT, tiny_gpt, tiny_model, tiny_overrides

from planer.cli import main
from planer.config import ModelConfig
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.models.gpt.model import kept_groups
from planer.search.supernet import SuperNet, warm_start
from planer.training.inherit import can_inherit, from_supernet, inherit

SPACE = ["skip", "attn:1", "attn:2", "attn:4", "ffl", "ffl:x2", "moe:top1", "moe:top2"]


def trained_like(cfg: ModelConfig, arch: Arch) -> torch.nn.Module:
    """A model whose every tensor is random, norms and biases too, so that a copy missing any of them shows."""
    torch.manual_seed(0)
    model = build_model(cfg, arch).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_one_hot_supernet_equals_the_standalone_gpt(flavour):
    cfg = tiny_gpt(flavour, n_layer=3)
    arch = Arch.parse("attn:2 moe:top1 skip ffl:x2 attn:4 moe:top2")
    torch.manual_seed(0)
    net = SuperNet(cfg, SPACE, len(arch)).eval()
    choices = [SPACE.index(str(b)) for b in arch]
    for block, i in zip(net.blocks, choices):
        block.alpha.data[i] = 10.0
    assert net.derive() == arch
    model = from_supernet(net, arch).eval()
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        expected = model(x)[0]
        for mode in ("argmax", "hard"):
            net.set_mode(mode)
            for block, i in zip(net.blocks, choices):
                block.choice = i
            assert torch.equal(net(x)[0], expected)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_inheriting_every_head_reproduces_the_gpt_source_exactly(flavour):
    cfg = tiny_gpt(flavour)
    source = trained_like(cfg, Arch.baseline(2, 4))
    ranking = {0: [(2, 0.3), (0, 0.2), (3, 0.1), (1, 0.0)], 2: [(1, 0.5), (3, 0.4), (0, 0.2), (2, 0.1)]}
    torch.manual_seed(1)
    copy = inherit(source, source.arch, ranking).eval()
    x = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.equal(copy(x)[0], source(x)[0])
        net = SuperNet(cfg, SPACE, 4).eval()
        assert warm_start(net, source, ranking) == 2 * 3 + 2 * 4  # attn:1/2/4; ffl, ffl:x2 and two MoE
        net.set_mode("hard")
        for block, spec in zip(net.blocks, source.arch):
            block.choice = SPACE.index(str(spec))
        assert torch.equal(net(x)[0], source(x)[0])
        for block, spec in zip(net.blocks, source.arch):
            if spec.kind == "ffl":
                block.choice = SPACE.index("ffl:x2")  # widened: the same function
        torch.testing.assert_close(net(x)[0], source(x)[0], atol=1e-5, rtol=1e-5)
        for block, spec in zip(net.blocks, source.arch):
            if spec.kind == "ffl":
                block.choice = SPACE.index("moe:top2")  # upcycled, top-2 gates sum to 1: the same function
        torch.testing.assert_close(net(x)[0], source(x)[0], atol=1e-5, rtol=1e-5)


def test_llama_with_grouped_query_attention_keeps_whole_groups():
    """8 query heads over 2 key/value heads (groups {0..3}, {4..7}): attn:4 has 1 key/value head, so it keeps the
    group whose best 4 heads matter most, and computes the source with the other group's heads silenced."""
    cfg = tiny_gpt("llama", d_model=64, n_head=8, n_kv_head=2)
    source = trained_like(cfg, Arch.baseline(2, 8))
    order = [(0, 0.9), (5, 0.5), (6, 0.4), (7, 0.4), (4, 0.3), (1, 0.0), (2, 0.0), (3, 0.0)]
    assert kept_groups(order, 8, 2, 4, 1) == ([4, 5, 6, 7], [1])  # 1.6 beats 0.9
    assert kept_groups(order, 8, 2, 1, 1) == ([0], [0])
    assert kept_groups(order, 8, 2, 8, 2) == (list(range(8)), [0, 1])
    assert kept_groups(order, 8, 4, 6, 1) is None  # 6 heads on one key/value head: no group holds them
    model = inherit(source, Arch.parse("attn:4 ffl attn:8 ffl"), {0: order}).eval()
    h = torch.randn(2, 10, 64)
    full = source.blocks[0]
    with torch.no_grad():
        got = model.blocks[0](h)
        full.out.weight[:, : 4 * 8] = 0.0  # heads 0..3 write nothing
        torch.testing.assert_close(got, full(h), atol=1e-5, rtol=1e-5)


def test_can_inherit_follows_the_backbone():
    llama = trained_like(tiny_gpt("llama"), Arch.baseline(2, 4))
    assert can_inherit(llama, Arch.parse("attn:1 moe:top1 skip ffl:x2"))
    assert not can_inherit(llama, Arch.parse("ffl ffl attn:4 ffl"))  # an FFL where the source has attention
    txl = tiny_model(d_inner=48, tgt_len=16, vocab_size=50)
    assert not can_inherit(llama, llama.arch, txl)  # another backbone


def llama_run_cfg(root, *overrides):
    """A run config on a small corpus with no model section or tokenizer: ``--baseline`` (the imported tiny Llama
    of test_hf) brings both."""
    from planer.config import load_config

    run = ["model.n_experts=4", "train.steps=4", "train.eval_every=4", "train.batch_size=4", "train.eval_batches=1",
           "latency.batch_size=2", "search.method=knapsack", "phase2.init=baseline",
           "search.space=[skip, attn:1, attn:2, attn:4, ffl]"]  # fmt: skip
    return load_config(None, tiny_overrides(*run, *overrides, text=root / "tiny.txt"))


@pytest.fixture
def imported_llama(tmp_path):
    """A tiny random transformers Llama with grouped-query attention, saved and imported with ``planer import``."""
    pytest.importorskip("transformers")
    from test_hf import hf_model, make_tokenizer

    from planer.cli import main

    text = (ROOT / "data" / "tinyshakespeare.txt").read_text()[:12000]
    (tmp_path / "tiny.txt").write_text(text)
    hf_model("llama").save_pretrained(tmp_path / "hf")
    make_tokenizer(tmp_path / "hf" / "tokenizer.json", text, 120)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "imported")]) == 0
    return tmp_path / "imported"


@pytest.mark.slow
def test_planer_run_from_an_imported_llama(imported_llama, tmp_path):
    from planer.pipeline import Plan, run_pipeline

    cfg = llama_run_cfg(tmp_path)
    plan = Plan(targets=(0.6,), designs=("dense",), batches=(2,), baseline=imported_llama)
    out = run_pipeline(cfg, tmp_path / "run", plan).path
    report = (out / "report.md").read_text()
    assert "| baseline |" in report and "| planer-t0.60 |" in report and "| dense-depth-t0.60 |" in report
    assert json.loads((out / "search-t0.60" / "arch.json").read_text())["method"] == "knapsack"
    manifest = json.loads((out / "planer-t0.60" / "run.json").read_text())
    assert manifest["recipe"] == {"teacher": str(out / "baseline"), "init_from": str(out / "baseline")}
    scored = {name: json.loads((out / name / "eval.json").read_text())["test"] for name in ("baseline", "planer-t0.60")}
    assert scored["baseline"]["tokens"] == scored["planer-t0.60"]["tokens"]  # every model on the run's own splits


def test_an_imported_model_brings_its_model_section_and_tokenizer(imported_llama, tmp_path):
    """The run's config is the import's model, tokenizer and positions, with the config's segments and dropout."""
    from planer.io.checkpoint import load_meta, with_checkpoint_model

    cfg = with_checkpoint_model(llama_run_cfg(tmp_path, "model.dropout=0.2"), imported_llama)
    own = load_meta(imported_llama)["config"]["model"]
    assert cfg.data.tokenizer == str(imported_llama)
    assert dataclasses.asdict(cfg.model) == own | {"tgt_len": 16, "dropout": 0.2, "n_experts": 4}


@pytest.mark.parametrize("command", ["search", "run"])
def test_segments_longer_than_the_imported_positions_are_one_line(imported_llama, tmp_path, capsys, command):
    config = tmp_path / "c.yaml"
    config.write_text(f"data:\n  path: {tmp_path / 'tiny.txt'}\n")
    flag = "--init-from" if command == "search" else "--baseline"
    argv = [command, "--config", str(config), "--out", str(tmp_path / "out"), flag, str(imported_llama)]
    argv += ["--set", "model.tgt_len=65", *(["--target", "0.5"] if command == "search" else [])]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model.tgt_len (65) exceeds model.n_positions (64)" in err
    assert not (tmp_path / "out").exists()


def test_the_shipped_gpt_config_builds_a_llama_with_grouped_queries():
    from planer.config import load_config

    cfg = load_config(ROOT / "configs" / "shakespeare-gpt.yaml")
    m = cfg.model
    assert (m.backbone, m.flavour, m.n_kv_head, m.mem_len, cfg.search.method) == ("gpt", "llama", 2, 0, "knapsack")
    m.vocab_size = 65
    block = build_model(m, Arch.baseline(m.n_layer, m.n_head)).blocks[0]
    assert (block.n_head, block.kv) == (8, 2)


def test_the_report_names_the_export_each_model_allows(tiny_cfg, tmp_path):
    """A gpt model whose layers are alike goes out as a plain Hugging Face folder, a mixed one with planer's
    modeling code, one without attention says why it cannot, and a Transformer-XL goes to ONNX: the report's
    commands must work for the model they name."""
    from planer.io.checkpoint import save_checkpoint
    from planer.io.data import load_corpus
    from planer.report.rows import export_hint

    def hint(name: str, arch: str, *overrides: str) -> str:
        cfg = tiny_cfg(*overrides)
        corpus = load_corpus(cfg.data)
        cfg.model.vocab_size = len(corpus.vocab)
        (tmp_path / name).mkdir()
        save_checkpoint(tmp_path / name, build_model(cfg.model, Arch.parse(arch)), cfg, corpus.vocab)
        return export_hint(tmp_path / name, Arch.parse(arch))

    uniform = hint("uniform", "attn:2 ffl attn:2 ffl", *LLAMA_SETTINGS)
    assert "--hf OUT" in uniform and "trust_remote_code" not in uniform
    assert "--gguf OUT` as GGUF" in uniform and "--onnx OUT.onnx" in uniform
    mixed = hint("mixed", "attn:2 ffl skip ffl", *LLAMA_SETTINGS)
    assert "trust_remote_code=True" in mixed and "no DeciLM form (cannot write DeciLM: block 0 (attn:2)" in mixed
    assert "no attention block" in hint("no-attention", "skip ffl skip ffl", *LLAMA_SETTINGS)
    assert "--onnx model.onnx" in hint("txl", "attn:2 ffl skip ffl")
