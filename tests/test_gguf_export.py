"""``planer export --gguf``, offline and without llama.cpp: tiny Llamas written as GGUF and read back with the gguf
package, the rows put back from llama.cpp's rotary order with planer's importer's own function, into a planer model
of the per-layer sizes the file states; its logits must be the exported model's. A uniform model is a plain
``llama`` file that ``planer import --gguf`` reads back whole."""

import pytest
import torch
from test_gguf import bpe, imported  # noqa: F401 (fixtures)

from planer.cli import main
from planer.config import Config
from planer.io.checkpoint import load_checkpoint, save_checkpoint
from planer.io.data import TokenizerVocab
from planer.models.arch import Arch
from planer.models.backbone import build_model
from planer.models.gpt.gguf import dequantize, read_gguf, rotate_half_rows

gguf = pytest.importorskip("gguf")

V = 300  # test_gguf's tokenizer
SIZES = dict(d_model=64, n_head=4, n_kv_head=2, d_inner=96, vocab_size=V, n_positions=32)
# grouped kv (4 over 2), a skipped attention whose MLP joins the attention before it (layer 1), 1 shared kv head,
# 2 query heads, a narrower MLP, an attention followed by another (a zero feed-forward, layer 3), an MLP alone
MIXED = "attn:4 ffl attn:4/kv1 skip skip ffl attn:2 ffl:64 attn:4 skip attn:4 ffl skip ffl"
LAYERS = {"attention.head_count": [4, 4, 2, 4, 4, 0], "attention.head_count_kv": [2, 1, 1, 2, 2, 0]}
LAYERS["feed_forward_length"] = [96, 96, 64, 32, 96, 96]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, bpe):  # noqa: F811 (the fixture)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    bpe.save(str(path))
    return TokenizerVocab(path)


def found_model(folder, arch: str, tokenizer, flavour: str = "llama"):
    """A tiny random planer model of ``arch`` saved in ``folder`` with ``tokenizer``, weights spread wide."""
    from conftest import tiny_gpt

    cfg = Config(model=tiny_gpt(flavour, **SIZES))
    torch.manual_seed(0)
    model = build_model(cfg.model, Arch.parse(arch)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.5)
    folder.mkdir()
    save_checkpoint(folder, model, cfg, tokenizer)
    return model


def export(run, out, capsys, *extra: str) -> str:
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--gguf", str(out), *extra]) == 0
    return capsys.readouterr().out


def per_layer(meta: dict, arch: str, key: str) -> list[int]:
    value = meta[f"{arch}.{key}"]
    return value if isinstance(value, list) else [value] * meta[f"{arch}.block_count"]


def read_back(path, cfg) -> torch.nn.Module:
    """A planer model of the layers the GGUF file states (attention of its heads or none, MLP of its width or
    none), filled from its tensors dequantized, q and k rows back in the rotate-half order."""
    meta, tensors = read_gguf(path)
    name = meta["general.architecture"]
    heads, kv, widths = (per_layer(meta, name, k) for k in LAYERS)
    specs = []
    for h, k, w in zip(heads, kv, widths):
        specs += [f"attn:{h}/kv{k}" if h else "skip", f"ffl:{w}" if w else "skip"]
    model = build_model(cfg.model, Arch.parse(" ".join(specs))).eval()

    def t(n: str) -> torch.Tensor:
        return dequantize(tensors[n], path)

    state = {"embed.weight": t("token_embd.weight"), "norm.weight": t("output_norm.weight")}
    if "output.weight" in tensors:  # else tied: the embedding is the output layer
        state["head.weight"] = t("output.weight")
    for i, (h, k, w) in enumerate(zip(heads, kv, widths)):
        b = f"blk.{i}."
        if h:
            q, kk = rotate_half_rows(t(b + "attn_q.weight"), h), rotate_half_rows(t(b + "attn_k.weight"), k)
            state[f"blocks.{2 * i}.norm.weight"] = t(b + "attn_norm.weight")
            state[f"blocks.{2 * i}.qkv.weight"] = torch.cat([q, kk, t(b + "attn_v.weight")])
            state[f"blocks.{2 * i}.out.weight"] = t(b + "attn_output.weight")
        if w:
            state[f"blocks.{2 * i + 1}.norm.weight"] = t(b + "ffn_norm.weight")
            state[f"blocks.{2 * i + 1}.up.weight"] = torch.cat([t(b + "ffn_gate.weight"), t(b + "ffn_up.weight")])
            state[f"blocks.{2 * i + 1}.down.weight"] = t(b + "ffn_down.weight")
    model.load_state_dict(state)
    return model


def logits(model, idx) -> torch.Tensor:
    with torch.no_grad():
        return model(idx)[0]


def test_mixed_model_is_deci_with_its_layers_and_logits(tmp_path, tokenizer, capsys):
    """Per-layer head counts, key/value heads and widths as deci arrays; the file's model computes planer's."""
    model = found_model(tmp_path / "found", MIXED, tokenizer)
    said = export(tmp_path / "found", tmp_path / "m.gguf", capsys)
    assert "llama.cpp deci, 6 layers (1 with a zero feed-forward" in said
    meta, tensors = read_gguf(tmp_path / "m.gguf")
    assert meta["general.architecture"] == "deci" and meta["deci.block_count"] == 6
    assert {k: meta[f"deci.{k}"] for k in LAYERS} == LAYERS
    assert meta["deci.attention.key_length"] == meta["deci.rope.dimension_count"] == 16
    assert "blk.5.attn_q.weight" not in tensors and "blk.5.ffn_up.weight" in tensors
    assert tuple(tensors["blk.2.attn_q.weight"].shape) == (64, 32)  # ggml order: 2 heads of 16 rows
    _, cfg, _ = load_checkpoint(tmp_path / "found")
    idx = torch.randint(0, V, (2, 20))
    torch.testing.assert_close(logits(read_back(tmp_path / "m.gguf", cfg), idx), logits(model, idx))
    assert meta["tokenizer.ggml.tokens"] == tokenizer.symbols and meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.eos_token_id"] == 0 and not meta["tokenizer.ggml.add_bos_token"]


def test_uniform_import_is_plain_llama_with_its_tokenizer(tmp_path, imported, capsys):  # noqa: F811 (fixture)
    """An imported GGUF Llama goes back out as plain llama (scalar sizes) with its source's tokenizer keys, and
    ``planer import --gguf`` reads it back with the same logits."""
    _, source, checkpoint = imported[False]
    assert "llama.cpp llama, 2 layers" in export(checkpoint, tmp_path / "u.gguf", capsys)
    meta, _ = read_gguf(tmp_path / "u.gguf")
    original, _ = read_gguf(source)
    assert meta["llama.attention.head_count"] == 4 and meta["llama.feed_forward_length"] == 64
    assert {k: v for k, v in meta.items() if k.startswith("tokenizer.")} == {
        k: v for k, v in original.items() if k.startswith("tokenizer.")
    }
    assert main(["import", "--gguf", str(tmp_path / "u.gguf"), "--out", str(tmp_path / "back")]) == 0
    before, after = load_checkpoint(checkpoint)[0], load_checkpoint(tmp_path / "back")[0]
    idx = torch.randint(0, V, (1, 12))
    torch.testing.assert_close(logits(after, idx), logits(before, idx))


def test_whole_skipped_layers_and_merges_give_plain_llama(tmp_path, tokenizer, capsys):
    """Skipped layers are left out and an attention meets the MLP after a skip: every layer alike is llama."""
    found_model(tmp_path / "found", "attn:4 skip skip ffl skip skip attn:4 ffl", tokenizer)
    assert "llama.cpp llama, 2 layers, f32" in export(tmp_path / "found", tmp_path / "p.gguf", capsys)


@pytest.mark.parametrize(("kind", "tolerance"), [("f16", 0.02), ("q8_0", 0.02), ("q5_1", 0.1), ("q4_1", 0.2)])
def test_types_are_the_converters(tmp_path, tokenizer, capsys, kind, tolerance):
    """Matrices in the type asked for (rows of 32s only, else f16; a 4- or 5-bit file's embedding q8_0), norms in
    f32, the file type stated, values close."""
    from gguf import GGMLQuantizationType as Q

    found_model(tmp_path / "found", "attn:4 ffl:48 attn:2 ffl", tokenizer)
    export(tmp_path / "found", tmp_path / "t.gguf", capsys, "--gguf-type", kind)
    meta, tensors = read_gguf(tmp_path / "t.gguf")
    assert meta["general.file_type"] == {"f16": 1, "q8_0": 7, "q5_1": 9, "q4_1": 3}[kind]
    assert tensors["blk.0.attn_norm.weight"].tensor_type == Q.F32
    assert tensors["blk.0.attn_q.weight"].tensor_type == Q[kind.upper()]
    assert tensors["blk.0.ffn_down.weight"].tensor_type == Q.F16  # rows of 48 values
    assert tensors["token_embd.weight"].tensor_type == (Q.F16 if kind == "f16" else Q.Q8_0)
    exact = read_back_f32(tmp_path, tokenizer, capsys)
    for name, tensor in tensors.items():
        torch.testing.assert_close(dequantize(tensor, tmp_path), exact[name], atol=tolerance, rtol=tolerance)


def test_an_unknown_type_is_one_line(tmp_path, tokenizer, capsys):
    found_model(tmp_path / "found", "attn:4 ffl", tokenizer)
    capsys.readouterr()
    assert (
        main(["export", "--run", str(tmp_path / "found"), "--gguf", str(tmp_path / "x.gguf"), "--gguf-type", "q3"]) == 2
    )
    err = capsys.readouterr().err.strip()
    assert "--gguf-type must be one of f32, f16, q8_0" in err and "\n" not in err and not (tmp_path / "x.gguf").exists()


def read_back_f32(tmp_path, tokenizer, capsys) -> dict[str, torch.Tensor]:
    export(tmp_path / "found", tmp_path / "f32.gguf", capsys)
    _, tensors = read_gguf(tmp_path / "f32.gguf")
    return {name: dequantize(t, tmp_path) for name, t in tensors.items()}


@pytest.mark.parametrize(
    ("arch", "flavour", "says"),
    [
        ("attn:4 ffl skip moe:top1", "llama", "block 3 (moe:top1) is a mixture of experts"),
        ("skip ffl attn:4 ffl", "llama", "block 1 (ffl) comes before any attention"),
        ("attn:4 ffl", "gpt2", "a gpt2 model is no Llama"),
    ],
)
def test_refusals_are_one_line_and_write_nothing(tmp_path, tokenizer, capsys, arch, flavour, says):
    found_model(tmp_path / "found", arch, tokenizer, flavour)
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path / "found"), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert says in err and "\n" not in err and not (tmp_path / "x.gguf").exists()


def test_char_vocabulary_is_refused(tmp_path, capsys):
    from conftest import tiny_gpt

    from planer.io.data import Vocab

    cfg = Config(model=tiny_gpt("llama", **(SIZES | {"vocab_size": 3})))
    save_checkpoint(tmp_path, build_model(cfg.model, Arch.parse("attn:4 ffl")), cfg, Vocab(["<unk>", "a", "b"], "char"))
    capsys.readouterr()
    assert main(["export", "--run", str(tmp_path), "--gguf", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "llama.cpp needs a tokenizer it can read" in err and not (tmp_path / "x.gguf").exists()
