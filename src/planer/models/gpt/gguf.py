"""GGUF files in: a Llama as llama.cpp keeps it (weights, often quantized, and tokenizer in one file) -> a planer
checkpoint.

A GGUF holds what a Hugging Face folder splits into config.json, safetensors and tokenizer.json: metadata under
llama.cpp's key names (``llama.block_count``, ``tokenizer.ggml.tokens``...) and tensors under its names
(``blk.N.attn_q.weight``...), each in a ggml type: F32, F16, BF16 or a block quantization such as Q8_0, Q4_1, Q4_K
or Q6_K. The ``gguf`` package reads the file (memory-mapped; nothing is unpickled) and dequantizes every tensor to
float32, the precision planer trains and searches in. The tensors are then renamed to their Hugging Face names and
go through hf.py's ``to_planer``, so both importers share one Llama layout. Two things llama.cpp's converter
(convert_hf_to_gguf.py) changed on the way in are undone:

- the rows of attn_q and attn_k (``LlamaModel.permute``): every head's rotary pairs moved from the rotate-half
  layout (dimension i pairs with i + d_head/2, Hugging Face's and planer's) to the interleaved one llama.cpp's
  kernel rotates (i pairs with i + 1); ``rotate_half_rows`` puts them back.
- the tokenizer, kept as metadata (tokens, merges, token types): ``gguf_tokenizer`` rebuilds the byte-level BPE
  ``tokenizer.json`` it describes, splitting text as llama.cpp does for the file's pre-tokenizer name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from planer.errors import PlanerError
from planer.io.checkpoint import atomic_write_text, save_checkpoint
from planer.io.data import TokenizerVocab
from planer.models.gpt.hf import (
    Layout,
    check_new_out,
    hf_shapes,
    import_summary,
    imported_model,
    require,
)

ARCHITECTURE = "llama"
# A layer's GGUF tensors, blk.N.NAME.weight, and their Hugging Face names, model.layers.N.NAME.weight
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
HF_NAMES = {hf: name for name, hf in LAYER_NAMES.items()}
TOP_NAMES = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
TOP_NAMES["lm_head.weight"] = "output.weight"  # absent where tied: llama.cpp then reads the embedding
CONTROL, USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
# tokenizer.ggml.pre values planer can split text for (llama.cpp's llama-vocab.cpp names them)
PRE_TOKENIZERS = ("gpt-2", "smollm")


def read_gguf(path: Path) -> tuple[dict, dict]:
    """The file's metadata (key -> value) and its tensors by name (memory-mapped, still in their ggml types)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise PlanerError("a GGUF file needs the 'gguf' package (pip install 'planer[gguf]')") from None
    if not path.is_file():
        raise PlanerError(f"GGUF file not found: {path}")
    try:  # the reader fails in numpy or struct terms where a file ends early or holds nonsense
        reader = GGUFReader(path)
        meta = {key: field.contents() for key, field in reader.fields.items() if not key.startswith("GGUF.")}
    except (ValueError, KeyError, IndexError, TypeError, OverflowError, OSError) as e:
        why = (str(e) or type(e).__name__).splitlines()[0]
        raise PlanerError(f"{path} is not a readable GGUF file (truncated or corrupt): {why}") from None
    return meta, {t.name: t for t in reader.tensors}


def _number(meta: dict, key: str, path: Path, default=None, kind: type = int):
    value = meta.get(key, default)
    if value is None:
        raise PlanerError(f"{path}: a {ARCHITECTURE} GGUF needs the metadata key {key}")
    if isinstance(value, bool) or not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
        raise PlanerError(f"{path}: metadata {key} is {str(value)[:60]}, not a single {kind.__name__}")
    return kind(value)


def gguf_layout(meta: dict, tensors: dict, path: Path) -> tuple[Layout, dict]:
    """The model's sizes from llama.cpp's metadata keys, and the ModelConfig values only they know."""
    arch = meta.get("general.architecture")
    if arch != ARCHITECTURE:
        raise PlanerError(f"{path}: unsupported GGUF architecture {arch!r} (planer imports {ARCHITECTURE})")

    def n(key: str, default=None, kind: type = int):
        return _number(meta, f"{ARCHITECTURE}.{key}", path, default, kind)

    d, heads = n("embedding_length"), n("attention.head_count")
    kv = n("attention.head_count_kv", heads)
    d_head = n("attention.key_length", d // heads if heads > 0 else 0)
    require(n("expert_count", 0) == 0, "Llama with mixture-of-experts layers")
    require(meta.get(f"{ARCHITECTURE}.rope.scaling.type", "none") == "none", "Llama with scaled rotary positions")
    require(n("rope.dimension_count", d_head) == d_head, "Llama with rotary positions on part of each head")
    require(n("attention.value_length", d_head) == d_head, "Llama with values of another size than keys")
    require(heads > 0 and kv > 0 and heads % kv == 0, f"{heads} query heads over {kv} key/value heads")
    require(heads * d_head == d, f"key_length {d_head} x {heads} heads != embedding_length {d}")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = n("vocab_size", len(tokens) if isinstance(tokens, list) else None)
    tied = "output.weight" not in tensors  # llama.cpp leaves the output layer out when it is the embedding
    layout = Layout(
        ARCHITECTURE, n("block_count"), d, heads, kv, d_head, n("feed_forward_length"), vocab, n("context_length"), tied
    )
    extra = {
        "norm_eps": n("attention.layer_norm_rms_epsilon", kind=float),
        "rope_theta": n("rope.freq_base", 10000.0, float),
        "dropout": 0.0,
        "dropatt": 0.0,
    }
    return layout, extra


def gguf_name(hf: str) -> str:
    """llama.cpp's name of a Llama tensor's Hugging Face name (model.layers.N.self_attn.q_proj.weight ->
    blk.N.attn_q.weight)."""
    if hf in TOP_NAMES:
        return TOP_NAMES[hf]
    _, _, layer, rest = hf.split(".", 3)
    return f"blk.{layer}.{HF_NAMES[rest.removesuffix('.weight')]}.weight"


def gguf_names(layout: Layout) -> dict[str, str]:
    """Every Hugging Face tensor of the layout and the GGUF tensor that holds it."""
    return {hf: gguf_name(hf) for hf in hf_shapes(layout)}


def rotate_half_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q or k projection (rows: heads x d_head) with llama.cpp's ``LlamaModel.permute`` undone.

    The converter writes ``w.reshape(heads, 2, d_head // 2, -1).swapaxes(1, 2)``: row (h, half, i) of the
    rotate-half layout lands at (h, i, half), so pairs are interleaved. Reading the rows as (heads, d_head // 2, 2)
    and swapping the same two axes back is its inverse.
    """
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, -1).transpose(1, 2).reshape(weight.shape)


def interleaved_rows(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """A q or k projection in llama.cpp's interleaved rotary order: the converter's ``LlamaModel.permute``, which
    ``rotate_half_rows`` undoes (an export redoes it)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def dequantize(tensor, path: Path) -> torch.Tensor:
    """One tensor in float32, in the (out, in) order of ``nn.Linear`` (ggml lists dimensions innermost first)."""
    from gguf.quants import dequantize as values_of

    try:
        values = values_of(tensor.data, tensor.tensor_type)
    except NotImplementedError:
        raise PlanerError(
            f"{path}: tensor {tensor.name} is stored as {tensor.tensor_type.name}, which the gguf package cannot "
            "dequantize (F32, F16, BF16 and block types such as Q8_0, Q4_1, Q4_K, Q6_K can be)"
        ) from None
    return torch.from_numpy(np.array(values, dtype=np.float32))


def hf_tensors(tensors: dict, layout: Layout, path: Path) -> dict[str, torch.Tensor]:
    """The file's tensors in float32 under their Hugging Face names, q and k in the rotate-half layout; every name
    and shape is checked against the metadata before anything is dequantized."""
    names, shapes = gguf_names(layout), hf_shapes(layout)
    for hf, name in names.items():
        if name not in tensors:
            raise PlanerError(f"{path}: tensor {name} is missing")
        shape = tuple(reversed(tensors[name].shape.tolist()))
        if shape != shapes[hf]:
            raise PlanerError(f"{path}: {name} has shape {shape}, the file's metadata implies {shapes[hf]}")
    extra = sorted(set(tensors) - set(names.values()))
    require("rope_freqs.weight" not in extra, "Llama with scaled rotary positions (tensor rope_freqs.weight)")
    if extra:
        raise PlanerError(f"{path}: tensor {extra[0]} has no place in a {ARCHITECTURE} model of this file's metadata")
    heads = {"attn_q": layout.heads, "attn_k": layout.kv}  # the permuted projections and their head counts
    weights = {}
    for hf, name in names.items():
        weight, kind = dequantize(tensors[name], path), name.split(".")[-2]
        weights[hf] = rotate_half_rows(weight, heads[kind]) if kind in heads else weight
    return weights


def pre_tokenizer(pre: str):
    """How text is cut into words, then into byte symbols, before the merges apply: GPT-2's split regex, after
    SmolLM's files first make every digit a word of its own (llama.cpp's llama-vocab.cpp splits "smollm" text on
    digits first; transformers' GGUF loader leaves that step out)."""
    from tokenizers import pre_tokenizers

    words = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), words])
    return words


def _strings(value) -> bool:
    return isinstance(value, list) and all(isinstance(s, str) for s in value)


def gguf_tokenizer(meta: dict, path: Path):
    """The byte-level BPE tokenizer the metadata describes, as a ``tokenizers.Tokenizer``: the tokens in id order,
    the merges by rank, the control tokens (and bos, eos) special, the user-defined ones added whole."""
    try:
        from tokenizers import AddedToken, Tokenizer, decoders, models
    except ImportError:
        raise PlanerError("a GGUF file needs the 'tokenizers' package (pip install 'planer[gguf]')") from None
    kind, pre = meta.get("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre")
    if kind != "gpt2":
        raise PlanerError(f"{path}: unsupported tokenizer {kind!r} (planer reads GGUF's byte-level BPE, 'gpt2')")
    if pre not in PRE_TOKENIZERS:
        raise PlanerError(f"{path}: unsupported pre-tokenizer {pre!r} (planer knows {', '.join(PRE_TOKENIZERS)})")
    tokens, merges = meta.get("tokenizer.ggml.tokens"), meta.get("tokenizer.ggml.merges", [])
    types = meta.get("tokenizer.ggml.token_type", [])
    pairs = _strings(merges) and all(m.count(" ") == 1 for m in merges)
    if not (_strings(tokens) and pairs and isinstance(types, list)):
        raise PlanerError(f"{path}: tokenizer.ggml.tokens, merges ('a b') and token_type must be lists")
    try:
        bpe = models.BPE({t: i for i, t in enumerate(tokens)}, [tuple(m.split(" ")) for m in merges], fuse_unk=False)
    except Exception as e:  # the library raises plain Exceptions, e.g. for a merge of tokens not in the vocabulary
        raise PlanerError(f"{path}: its tokenizer metadata is inconsistent: {str(e).splitlines()[0]}") from None
    tokenizer = Tokenizer(bpe)
    tokenizer.pre_tokenizer, tokenizer.decoder = pre_tokenizer(pre), decoders.ByteLevel()
    special = {i for i, k in enumerate(types) if k == CONTROL}
    special |= {meta[k] for k in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id") if k in meta}
    if not all(isinstance(i, int) and 0 <= i < len(tokens) for i in special):
        raise PlanerError(f"{path}: its bos, eos or control token ids are not ids of tokenizer.ggml.tokens")
    user = [tokens[i] for i, k in enumerate(types[: len(tokens)]) if k == USER_DEFINED]
    tokenizer.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False) for i in sorted(special)])
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])
    return tokenizer


def import_gguf(path: str | Path, out: str | Path) -> dict:
    """A planer checkpoint in ``out`` from a Llama GGUF file; nothing is written unless all of it fits.

    Returns the checkpoint's path, flavour, compact arch and parameter count, as ``import_hf`` does.
    """
    path, out = Path(path), Path(out)
    check_new_out(out)
    meta, tensors = read_gguf(path)
    layout, extra = gguf_layout(meta, tensors, path)
    tokenizer = gguf_tokenizer(meta, path)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size != layout.vocab:
        raise PlanerError(f"{path}: its tokenizer has {size} tokens, but the model's vocabulary has {layout.vocab}")
    model, cfg = imported_model(layout, extra, hf_tensors(tensors, layout, path), path, out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / TokenizerVocab.FILE, tokenizer.to_str())
    save_checkpoint(out, model, cfg, TokenizerVocab(out), source=str(path.resolve()))
    return import_summary(out, layout, model)
