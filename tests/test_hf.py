"""Hugging Face in and out: tiny random GPT-2 and Llama (grouped-query) models built by transformers, offline."""

import json
import shutil

import pytest
import torch

from planer.cli import main
from planer.io.data import DataConfig, TokenizerVocab, load_corpus

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

V = 120  # the tokenizer's size, and so the models' vocabulary


def make_tokenizer(path, text: str, size: int) -> None:
    """A character BPE with Metaspace pre-tokenization (spaces survive decoding), trained to ``size`` tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator([text], trainers.BpeTrainer(vocab_size=size, special_tokens=["<unk>"], show_progress=False))
    assert tok.get_vocab_size() == size
    tok.save(str(path))


def hf_model(flavour: str):
    torch.manual_seed(0)
    if flavour == "gpt2":
        cfg = transformers.GPT2Config(
            vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=None, eos_token_id=None
        )
        return transformers.GPT2LMHeadModel(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention: two query heads per key/value head
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def corpus_text():
    from conftest import ROOT

    return (ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, corpus_text):
    """For each flavour: the transformers model, its saved folder, and that folder imported into planer."""
    root = tmp_path_factory.mktemp("hf")
    make_tokenizer(root / "tokenizer.json", corpus_text, V)
    made = {}
    for flavour in ("gpt2", "llama"):
        model = hf_model(flavour)
        folder = root / flavour
        model.save_pretrained(folder)
        shutil.copy(root / "tokenizer.json", folder / "tokenizer.json")
        assert main(["import", "--hf", str(folder), "--out", str(root / f"{flavour}-planer")]) == 0
        made[flavour] = (model, folder, root / f"{flavour}-planer")
    return made


def logits_close(hf, planer_model, idx):
    with torch.no_grad():
        torch.testing.assert_close(planer_model(idx)[0], hf(idx).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_imported_logits_equal_transformers(folders, flavour):
    import planer

    hf, _, out = folders[flavour]
    model, vocab = planer.load(out)
    assert isinstance(vocab, TokenizerVocab) and len(vocab) == V
    logits_close(hf, model, torch.randint(0, V, (2, 24)))
    meta = json.loads((out / "config.json").read_text())
    assert meta["vocab"] == {"level": "tokenizer", "size": V} and (out / "tokenizer.json").is_file()
    assert meta["config"]["model"]["n_kv_head"] == (2 if flavour == "llama" else 4)


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_greedy_generate_equals_transformers(folders, flavour, capsys):
    hf, _, out = folders[flavour]
    prompt = [5, 17, 3, 40]
    with torch.no_grad():
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    capsys.readouterr()
    args = ["generate", "--run", str(out), "--prompt-ids", "5 17 3 40", "--ids", "--temperature", "0"]
    assert main(args + ["--tokens", "12"]) == 0
    assert capsys.readouterr().out.split() == [str(t) for t in expected[0, 4:].tolist()]


def test_text_prompt_and_evaluation_use_the_tokenizer(folders, tmp_path, capsys, corpus_text):
    from planer.evaluation.evaluate import evaluate_run

    _, _, out = folders["llama"]
    assert main(["generate", "--run", str(out), "--prompt", "ROMEO: ", "--tokens", "5", "--seed", "1"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")
    text = tmp_path / "t.txt"
    text.write_text(corpus_text[:3000])
    result = evaluate_run(out, text_file=text)
    assert result["unk"] == 0 and result["bpc"] is None and 1.0 < result["ppl"] < 2 * V


def test_data_tokenizer_tokenizes_the_corpus(folders, corpus_text, tmp_path):
    _, folder, _ = folders["gpt2"]
    path = tmp_path / "c.txt"
    path.write_text(corpus_text)
    corpus = load_corpus(DataConfig(path=str(path), tokenizer=str(folder)))
    ids = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json")).encode(corpus_text).ids
    assert isinstance(corpus.vocab, TokenizerVocab)
    assert torch.cat([corpus.train, corpus.valid, corpus.test]).tolist() == ids


def test_sharded_safetensors_import(folders, tmp_path):
    import planer

    hf, folder, _ = folders["llama"]
    sharded = tmp_path / "sharded"
    hf.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file() and not (sharded / "model.safetensors").exists()
    shutil.copy(folder / "tokenizer.json", sharded)
    assert main(["import", "--hf", str(sharded), "--out", str(tmp_path / "out")]) == 0
    logits_close(hf, planer.load(tmp_path / "out")[0], torch.randint(0, V, (1, 20)))


@pytest.mark.parametrize("flavour", ["gpt2", "llama"])
def test_export_loads_back_into_transformers(folders, flavour, tmp_path):
    hf, _, out = folders[flavour]
    assert main(["export", "--run", str(out), "--hf", str(tmp_path / "exported")]) == 0
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    idx = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(again(idx).logits, hf(idx).logits, rtol=0, atol=1e-4)
    assert (tmp_path / "exported" / "tokenizer.json").is_file()


@pytest.mark.parametrize(
    "arch, heads, kv, inner",
    [("attn:2 ffl:x2 attn:2 ffl:x2", 2, 1, 2), ("attn:4/kv1 ffl:24 attn:4/kv1 ffl:24", 4, 1, None)],
    ids=["fewer-heads-wider", "shared-kv-narrower"],
)
def test_export_of_a_uniform_reduced_model(folders, tmp_path, arch, heads, kv, inner):
    """A uniform found model with fewer heads, key/value heads or hidden units than the baseline: Llama states
    its head size, key/value heads and MLP width, so it exports."""
    import planer
    from planer.io.checkpoint import load_checkpoint, save_checkpoint
    from planer.models.arch import Arch
    from planer.models.backbone import build_model

    _, _, out = folders["llama"]
    _, cfg, vocab = load_checkpoint(out)
    torch.manual_seed(0)
    model = build_model(cfg.model, Arch.parse(arch))
    (tmp_path / "found").mkdir()
    save_checkpoint(tmp_path / "found", model, cfg, vocab)
    assert main(["export", "--run", str(tmp_path / "found"), "--hf", str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (hf.config.num_attention_heads, hf.config.num_key_value_heads) == (heads, kv)
    assert hf.config.intermediate_size == (cfg.model.d_inner * inner if inner else 24)
    logits_close(hf, planer.load(tmp_path / "found")[0], torch.randint(0, V, (1, 20)))


def test_export_refuses_what_the_format_cannot_hold(folders, tmp_path, tiny_cfg, capsys):
    from planer.io.checkpoint import load_checkpoint, save_checkpoint
    from planer.io.data import Vocab
    from planer.models.arch import Arch
    from planer.models.backbone import build_model

    _, _, out = folders["gpt2"]
    _, cfg, vocab = load_checkpoint(out)
    cases = {"no-attention": (cfg, "skip ffl skip ffl", "no attention block")}
    for name, (c, arch, _) in cases.items():
        (tmp_path / name).mkdir()
        save_checkpoint(tmp_path / name, build_model(c.model, Arch.parse(arch)), c, vocab)
    txl = tiny_cfg()
    txl.model.vocab_size = 3
    (tmp_path / "txl").mkdir()
    save_checkpoint(
        tmp_path / "txl", build_model(txl.model, Arch.parse("attn:4 ffl")), txl, Vocab(["<unk>", "a", "b"], "char")
    )
    cases["txl"] = (txl, "", "Transformer-XL")
    for name, (_, _, fragment) in cases.items():
        capsys.readouterr()
        assert main(["export", "--run", str(tmp_path / name), "--hf", str(tmp_path / f"{name}-hf")]) == 2
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, err
        assert not (tmp_path / f"{name}-hf").exists()


def hostile_cases(folder, tmp_path, corpus_text):
    """(name, how to damage a copy of ``folder``, what the error says)."""

    def drop(name):
        return lambda d: (d / name).unlink()

    def edit_config(**changes):
        def apply(d):
            cfg = json.loads((d / "config.json").read_text())
            (d / "config.json").write_text(json.dumps(cfg | changes))

        return apply

    def pickle_only(d):
        (d / "model.safetensors").unlink()
        (d / "pytorch_model.bin").write_bytes(b"\x80\x04 not really a pickle")

    def other_tokenizer(d):
        make_tokenizer(d / "tokenizer.json", corpus_text, 100)

    return [
        ("no-config", drop("config.json"), "config.json is missing"),
        ("no-weights", drop("model.safetensors"), "model.safetensors is missing"),
        ("no-tokenizer", drop("tokenizer.json"), "tokenizer not found"),
        ("pickle", pickle_only, "pytorch_model.bin, a pickle"),
        ("model-type", edit_config(model_type="bert"), "unsupported model_type 'bert'"),
        ("shapes", edit_config(n_inner=64), "config.json implies"),
        ("vocab", other_tokenizer, "has 100 tokens, but the model's vocabulary has 120"),
        ("activation", edit_config(activation_function="relu"), "unsupported model"),
    ]


def test_hostile_folders_are_refused_with_one_line(folders, tmp_path, capsys, corpus_text):
    _, folder, _ = folders["gpt2"]
    for name, damage, fragment in hostile_cases(folder, tmp_path, corpus_text):
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        damage(bad)
        capsys.readouterr()
        assert main(["import", "--hf", str(bad), "--out", str(tmp_path / f"{name}-out")]) == 2, name
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and err.startswith("planer: error:"), (name, err)
        assert not (tmp_path / f"{name}-out").exists(), name
    assert main(["import", "--hf", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_llama_shapes_planer_cannot_hold_are_refused(folders, tmp_path, capsys):
    """A head size that does not split hidden_size (Qwen3-style) would import with a wrong head count; refuse it."""
    _, folder, _ = folders["llama"]
    hf = json.loads((folder / "config.json").read_text())
    cases = [
        ("head-dim", {"head_dim": 2 * hf["hidden_size"] // hf["num_attention_heads"]}, "head_dim"),
        ("kv-heads", {"num_key_value_heads": hf["num_attention_heads"] - 1}, "key/value heads"),
    ]
    for name, changes, fragment in cases:
        bad = tmp_path / name
        shutil.copytree(folder, bad)
        (bad / "config.json").write_text(json.dumps(hf | changes))
        capsys.readouterr()
        assert main(["import", "--hf", str(bad), "--out", str(tmp_path / f"{name}-out")]) == 2, name
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1 and "unsupported model" in err, (name, err)
        assert not (tmp_path / f"{name}-out").exists(), name
