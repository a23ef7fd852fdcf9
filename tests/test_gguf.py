"""GGUF in: tiny Llamas built by transformers, written as llama.cpp's converter would (q and k rows permuted, some
tensors quantized, a byte-level BPE in the metadata) with the gguf package's writer, then imported; offline."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from planer.cli import main

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from gguf import GGMLQuantizationType as Q  # noqa: E402

V = 300  # the tokenizer's size: <|endoftext|>, the 256 bytes and 43 merges
TEXT = "ROMEO: But soft, what light through yonder window breaks? 1234 <|endoftext|> thee"
# Hugging Face name pieces -> llama.cpp's (its tensor_mapping.py), written out here rather than taken from planer
GGUF_NAMES = [
    ("model.layers.", "blk."),
    ("model.embed_tokens", "token_embd"),
    ("model.norm", "output_norm"),
    ("lm_head", "output"),
    ("input_layernorm", "attn_norm"),
    ("post_attention_layernorm", "ffn_norm"),
    ("self_attn.q_proj", "attn_q"),
    ("self_attn.k_proj", "attn_k"),
    ("self_attn.v_proj", "attn_v"),
    ("self_attn.o_proj", "attn_output"),
    ("mlp.gate_proj", "ffn_gate"),
    ("mlp.up_proj", "ffn_up"),
    ("mlp.down_proj", "ffn_down"),
]
# A mix of what real files hold: the embedding in Q8_0 (as SmolLM2's), the rest in float and 4-bit block types
QUANTIZED = {
    "token_embd.weight": Q.Q8_0,
    "blk.0.ffn_up.weight": Q.Q4_1,
    "blk.0.ffn_gate.weight": Q.BF16,
    "blk.1.attn_v.weight": Q.F16,
    "blk.1.ffn_down.weight": Q.Q4_0,
}


def gguf_name(hf: str) -> str:
    for a, b in GGUF_NAMES:
        hf = hf.replace(a, b)
    return hf


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf.py ``LlamaModel.permute`` (n_head already the key/value heads for k)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE as GPT-2's (the 'gpt2' tokenizer GGUF stores), trained to V tokens on Shakespeare."""
    from conftest import ROOT
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=V,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([(ROOT / "data" / "tinyshakespeare.txt").read_text()[:20000]], trainer)
    assert tok.get_vocab_size() == V
    return tok


def llama(tied: bool):
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,  # d_head 8: the converter's permutation is not its own inverse (it is at d_head 4)
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=None,
        eos_token_id=None,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def metadata(bpe, arch: str = "llama") -> dict:
    """What llama.cpp's converter writes for the tiny Llama and its tokenizer."""
    vocab = bpe.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = json.loads(bpe.to_str())["model"]["merges"]
    return {
        f"{arch}.block_count": 2,
        f"{arch}.context_length": 64,
        f"{arch}.embedding_length": 32,
        f"{arch}.feed_forward_length": 64,
        f"{arch}.attention.head_count": 4,
        f"{arch}.attention.head_count_kv": 2,
        f"{arch}.rope.freq_base": 500.0,
        f"{arch}.rope.dimension_count": 8,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5,
        f"{arch}.vocab_size": V,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [3 if t == "<|endoftext|>" else 1 for t in tokens],
        "tokenizer.ggml.merges": [m if isinstance(m, str) else " ".join(m) for m in merges],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 0,
    }


def gguf_tensors(model, types: dict) -> dict[str, tuple[np.ndarray, object]]:
    """The model's tensors under llama.cpp's names, q and k rows permuted, each as (data, ggml type)."""
    cfg, tensors = model.config, {}
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        w = value.numpy().astype(np.float32)
        if ".q_proj." in name or ".k_proj." in name:
            w = permute(w, cfg.num_attention_heads if ".q_proj." in name else cfg.num_key_value_heads)
        kind = types.get(gguf_name(name), Q.F32)
        tensors[gguf_name(name)] = (w if kind == Q.F32 else gguf.quants.quantize(w, kind), kind)
    return tensors


def write_gguf(path, meta: dict, tensors: dict, arch: str = "llama") -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    adders = [(bool, writer.add_bool), (int, writer.add_uint32), (float, writer.add_float32), (str, writer.add_string)]
    for key, value in meta.items():
        add = next((f for t, f in adders if isinstance(value, t)), writer.add_array)
        add(key, value)
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=None if data.dtype != np.uint8 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def rounded(model, types: dict):
    """The model with every tensor ``types`` quantizes replaced by what the file holds, dequantized."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            kind = types.get(gguf_name(name))
            if kind is not None:
                values = gguf.quants.dequantize(gguf.quants.quantize(p.numpy(), kind), kind)
                p.copy_(torch.from_numpy(values.reshape(p.shape)))
    return model


@pytest.fixture(scope="module")
def imported(tmp_path_factory, bpe):
    """For tied and untied output: the transformers model (holding the file's values), the GGUF and its import."""
    root, made = tmp_path_factory.mktemp("gguf"), {}
    for tied in (True, False):
        model = llama(tied)
        path, out = root / f"tied{tied}.gguf", root / f"tied{tied}"
        write_gguf(path, metadata(bpe), gguf_tensors(model, QUANTIZED))
        assert main(["import", "--gguf", str(path), "--out", str(out)]) == 0
        made[tied] = (rounded(model, QUANTIZED), path, out)
    return made


@pytest.mark.parametrize("tied", [True, False])
def test_imported_logits_equal_transformers(imported, tied):
    """Equal logits prove the q/k permutation undone: rotary pairs in the wrong rows change every attention score."""
    import planer

    hf, _, out = imported[tied]
    model, vocab = planer.load(out)
    m = json.loads((out / "config.json").read_text())["config"]["model"]
    assert (m["n_layer"], m["d_model"], m["n_head"], m["n_kv_head"], m["d_inner"]) == (2, 32, 4, 2, 64)
    assert (m["vocab_size"], m["n_positions"], m["rope_theta"], m["tie_embeddings"]) == (V, 64, 500.0, tied)
    assert m["norm_eps"] == pytest.approx(1e-5) and model.arch.short() == "a4fa4f" and len(vocab) == V
    assert (model.head is None) == tied
    idx = torch.randint(0, V, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], hf(idx).logits, rtol=0, atol=1e-5)


def test_quantized_tensors_are_dequantized(imported):
    import planer

    _, path, out = imported[True]
    model, _ = planer.load(out)
    embedding = next(t for t in gguf.GGUFReader(path).tensors if t.name == "token_embd.weight")
    assert embedding.tensor_type == Q.Q8_0
    expected = torch.from_numpy(gguf.quants.dequantize(embedding.data, Q.Q8_0))
    assert torch.equal(model.embed.weight.detach(), expected)
    torch.testing.assert_close(model.embed.weight.detach(), llama(True).model.embed_tokens.weight, rtol=0, atol=2e-3)


def test_tokenizer_is_the_files_bpe(imported, bpe, capsys):
    from planer.io.data import TokenizerVocab

    _, _, out = imported[False]
    vocab = TokenizerVocab(out)
    ids = vocab.tokenize(TEXT)
    assert ids == bpe.encode(TEXT).ids and 0 in ids  # <|endoftext|> stays one (special) token
    assert vocab.decode(ids) == TEXT
    assert main(["generate", "--run", str(out), "--prompt", "ROMEO:", "--tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("ROMEO:")


def test_pre_tokenizers_split_as_their_models_do(bpe):
    from planer.models.gpt.gguf import gguf_tokenizer

    words = {}
    for pre in ("gpt-2", "smollm"):
        tok = gguf_tokenizer(metadata(bpe) | {"tokenizer.ggml.pre": pre}, Path("x.gguf"))
        words[pre] = [w for w, _ in tok.pre_tokenizer.pre_tokenize_str("in 12345")]
    assert words == {"gpt-2": ["in", "Ġ12345"], "smollm": ["in", "Ġ", "1", "2", "3", "4", "5"]}


def hostile_files(bpe):
    """(name, metadata, tensors, architecture, what the error says) of files planer must refuse."""
    good, tensors = metadata(bpe), gguf_tensors(llama(True), {})
    qwen = {k.replace("llama.", "qwen2."): v for k, v in good.items()}
    f64 = tensors | {"blk.0.attn_norm.weight": (tensors["blk.0.attn_norm.weight"][0].astype(np.float64), Q.F64)}
    missing = {k: v for k, v in tensors.items() if k != "blk.1.ffn_up.weight"}
    rope = tensors | {"rope_freqs.weight": (np.ones(4, dtype=np.float32), Q.F32)}
    return [
        ("architecture", qwen, tensors, "qwen2", "unsupported GGUF architecture 'qwen2'"),
        ("type", good, f64, "llama", "blk.0.attn_norm.weight is stored as F64"),
        ("missing", good, missing, "llama", "tensor blk.1.ffn_up.weight is missing"),
        ("shape", good | {"llama.feed_forward_length": 48}, tensors, "llama", "the file's metadata implies"),
        ("rope", good, rope, "llama", "scaled rotary positions"),
        ("heads", good | {"llama.attention.head_count_kv": 3}, tensors, "llama", "4 query heads over 3"),
        ("sentencepiece", good | {"tokenizer.ggml.model": "llama"}, tensors, "llama", "unsupported tokenizer 'llama'"),
        ("pre", good | {"tokenizer.ggml.pre": "llama-bpe"}, tensors, "llama", "unsupported pre-tokenizer 'llama-bpe'"),
        ("vocab", good | {"llama.vocab_size": V + 1}, tensors, "llama", f"but the model's vocabulary has {V + 1}"),
    ]


def refused(args, fragment, out, capsys) -> None:
    capsys.readouterr()
    assert main(args + ["--out", str(out)]) == 2, fragment
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1 and err.startswith("planer: error:"), err
    assert not out.exists(), fragment


def test_bad_files_are_refused_with_one_line(bpe, imported, tmp_path, capsys):
    for name, meta, tensors, arch, fragment in hostile_files(bpe):
        write_gguf(tmp_path / f"{name}.gguf", meta, tensors, arch)
        refused(["import", "--gguf", str(tmp_path / f"{name}.gguf")], fragment, tmp_path / name, capsys)
    data = imported[True][1].read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 100, 3):
        (tmp_path / "cut.gguf").write_bytes(data[:cut])
        refused(["import", "--gguf", str(tmp_path / "cut.gguf")], "truncated or corrupt", tmp_path / "cut", capsys)
    (tmp_path / "other.gguf").write_bytes(b"\x80\x04 not a GGUF at all")
    refused(["import", "--gguf", str(tmp_path / "other.gguf")], "GGUF magic invalid", tmp_path / "other", capsys)
    refused(["import", "--gguf", str(tmp_path / "nowhere.gguf")], "GGUF file not found", tmp_path / "no", capsys)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert main(["import", "--gguf", str(imported[True][1]), "--out", str(tmp_path / "full")]) == 2
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["x"]
