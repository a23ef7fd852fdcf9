"""``planer export --hf`` of any gpt architecture, offline, on tiny random models: a plain ``LlamaForCausalLM`` or
``GPT2LMHeadModel`` where the format holds the model, planer's own modeling code (trust_remote_code) otherwise,
each checked against planer's logits and greedy decoding."""

import json
import shutil

import pytest
import torch
from conftest import ROOT, tiny_gpt

from planer.cli import main
from planer.config import Config
from planer.evaluation.generate import generate
from planer.io.checkpoint import save_checkpoint
from planer.io.data import TokenizerVocab
from planer.models.arch import Arch
from planer.models.backbone import build_model

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

V = 60  # the tokenizer's size, and so the models' vocabulary
PROMPT = [5, 17, 3, 40]

# Each mixes a skipped attention, a skipped MLP, fewer query heads, a shared key/value head and a narrower MLP
# (the baselines: 4 query heads, over 2 key/value heads for Llama, 4 for GPT-2; MLPs of 48 units).
MIXED = {
    "llama": "attn:4 ffl skip ffl:24 attn:2 skip attn:4/kv1 ffl",
    "gpt2": "skip ffl:24 attn:2 ffl attn:4/kv1 skip attn:4 ffl",  # the first block is no attention: cache layer 0
}
MOE = {"llama": "attn:4 moe:top2 attn:2/kv1 moe:top1", "gpt2": "attn:4 moe:top1 skip moe:top2:e2"}
WHOLE_LAYERS_SKIPPED = {"llama": "attn:4/kv1 ffl:24 skip skip attn:4/kv1 ffl:24", "gpt2": "skip skip attn:4 ffl"}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory) -> TokenizerVocab:
    from test_hf import make_tokenizer

    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    make_tokenizer(path, (ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000], V)
    return TokenizerVocab(path)


def found_model(folder, flavour: str, arch: str, tokenizer: TokenizerVocab, **sizes):
    """A tiny random planer model of ``arch`` (and model ``sizes`` other than the tiny ones) saved in ``folder``
    with the tokenizer, its weights spread far enough from the initialisation's that greedy decoding does not
    repeat one token."""
    cfg = Config(model=tiny_gpt(flavour, vocab_size=V, n_positions=32, **sizes))
    torch.manual_seed(0)
    model = build_model(cfg.model, Arch.parse(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    folder.mkdir()
    save_checkpoint(folder, model, cfg, tokenizer)
    return model


def export(run, out, capsys, *extra: str) -> str:
    """``planer export --hf``'s exit status checked, and what it printed."""
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--hf", str(out), *extra]) == 0
    return capsys.readouterr().out


def moved(folder, tmp_path):
    """The exported folder copied elsewhere and the original removed: it must need nothing but itself."""
    target = tmp_path / "elsewhere" / "model"
    shutil.copytree(folder, target)
    shutil.rmtree(folder)
    return target


def logits_close(hf, model, idx) -> None:
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx)[0], rtol=0, atol=1e-4)


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
@pytest.mark.parametrize("arches", [MIXED, MOE], ids=["mixed", "moe"])
def test_remote_code_equals_planer(tmp_path, tokenizer, capsys, flavour, arches):
    """A model no plain class holds loads from its folder alone with trust_remote_code, gives planer's logits, and
    decodes greedily as planer does, through transformers' own DynamicCache."""
    model = found_model(tmp_path / "found", flavour, arches[flavour], tokenizer)
    assert "PlanerForCausalLM, with planer's modeling code" in export(tmp_path / "found", tmp_path / "hf", capsys)
    folder = moved(tmp_path / "hf", tmp_path)
    shutil.rmtree(tmp_path / "found")
    assert {p.name for p in folder.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "modeling_planer.py",
        "tokenizer.json",
    }
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, local_files_only=True)
    hf.eval()
    attention = [b for b in json.loads((folder / "config.json").read_text())["blocks"] if b["kind"] == "attn"]
    assert hf.config.num_hidden_layers == len(attention)
    logits_close(hf, model, torch.randint(0, V, (2, 20)))
    with torch.no_grad():
        out = hf(torch.tensor([PROMPT]), use_cache=True)
        assert isinstance(out.cache, transformers.DynamicCache) and out.cache.get_seq_length() == len(PROMPT)
        expected = generate(model, PROMPT, 16, temperature=0)
        got = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=False)[0, len(PROMPT) :].tolist()
    assert got == expected and len(set(expected)) > 2


@pytest.mark.parametrize("flavour", ["llama", "gpt2"])
def test_whole_layers_skipped_export_plain(tmp_path, tokenizer, capsys, flavour):
    """Layers whose attention and MLP are both skipped are left out: a plain folder of the kept layers."""
    model = found_model(tmp_path / "found", flavour, WHOLE_LAYERS_SKIPPED[flavour], tokenizer)
    printed = export(tmp_path / "found", tmp_path / "hf", capsys)
    architecture = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[flavour]
    assert f"{architecture}, plain" in printed
    folder = moved(tmp_path / "hf", tmp_path)
    assert not (folder / "modeling_planer.py").exists()
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()
    assert type(hf).__name__ == architecture and hf.config.num_hidden_layers == (2 if flavour == "llama" else 1)
    if flavour == "llama":
        assert (hf.config.num_key_value_heads, hf.config.intermediate_size) == (1, 24)
    logits_close(hf, model, torch.randint(0, V, (2, 20)))


def test_refusals_are_one_line_and_write_nothing(tmp_path, tokenizer, capsys):
    """A model without attention has no cache for transformers to read; a non-empty OUT needs --force."""
    found_model(tmp_path / "no-attn", "llama", "skip ffl skip ffl:24", tokenizer)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "no-attn"), "--hf", str(tmp_path / "no-attn-hf")]) == 2
    err = capsys.readouterr().err
    assert "no attention block" in err and err.count("\n") == 1 and not (tmp_path / "no-attn-hf").exists()

    found_model(tmp_path / "found", "gpt2", MIXED["gpt2"], tokenizer)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("mine")
    assert main(["export", "--run", str(tmp_path / "found"), "--hf", str(tmp_path / "taken")]) == 2
    err = capsys.readouterr().err
    assert "add --force" in err and err.count("\n") == 1 and not (tmp_path / "taken" / "config.json").exists()
    export(tmp_path / "found", tmp_path / "taken", capsys, "--force")
    assert (tmp_path / "taken" / "modeling_planer.py").is_file()
