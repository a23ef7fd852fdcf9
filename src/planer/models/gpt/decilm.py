"""``planer export --hf OUT --format decilm``: a found Llama whose layers differ, as ``DeciLMForCausalLM``.

DeciLM / Nemotron-NAS is the layout serving engines read per-layer different Llamas in: config.json's
``block_configs`` gives each layer an attention part and an FFN part, either one ``no_op``; the tensors keep
Llama's names, a no_op part's left out. Layer i is planer's blocks 2i (attention) and 2i + 1 (MLP).

The facts below come from reading the public loaders (their code is not copied here):

- vLLM, ``vllm/model_executor/models/nemotron_nas.py`` (``DeciLMDecoderLayer``, ``_ffn_mult_to_intermediate_size``,
  ``_find_multiple``): the fields ``block_configs[i].attention.no_op`` and ``.n_heads_in_group`` (every layer has
  all ``num_attention_heads`` query heads, over num_attention_heads // n_heads_in_group key/value heads),
  ``.ffn.no_op`` and ``.ffn_mult``; the MLP width int(2 * ffn_mult * hidden_size / 3) rounded up to a multiple of
  256; ``hidden_act`` from config.json; no ``input_layernorm`` or attention tensors for a no_op attention, no
  ``post_attention_layernorm`` or MLP tensors for a no_op FFN; Llama's names (q/k/v/o_proj, gate/up/down_proj).
- llama.cpp, ``convert_hf_to_gguf.py``'s ``DeciModel`` (in llama-cpp-python 0.3.36's vendor/llama.cpp it lives in
  ``conversion/deci.py``): the same width formula; the entries read as dicts, ``attention.replace_with_linear``
  where ``n_heads_in_group`` is null (false: an attention-free layer), and ``ffn.ffn_mult`` null for an FFN-free
  layer (its feed_forward_length 0: a no_op FFN with an ffn_mult would be read as an MLP of that width).

So a model fits when every layer's attention is ``skip`` or keeps all n_head query heads (``attn:n_head`` or
``attn:n_head/kvK``), and every MLP is ``skip`` or ``ffl`` of a width some ffn_mult gives (multiples of 256).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from planer.config import ModelConfig
from planer.errors import PlanerError
from planer.io.checkpoint import load_checkpoint
from planer.models.arch import Arch, BlockSpec
from planer.models.gpt.hf import (
    LAYER_PREFIX,
    REMOTE,
    check_out,
    common_config,
    layer_links,
    require_attention,
    to_hf,
    top_links,
    write_folder,
)
from planer.models.gpt.model import kv_heads

CLASS = "DeciLMForCausalLM"
CODE = Path(__file__).with_name("modeling_decilm.py")  # the export's modeling file, a thin layer on REMOTE's code
MULTIPLE = 256  # the loaders round an MLP width up to this


def intermediate_size(ffn_mult: float, hidden: int) -> int:
    """The MLP width the loaders derive from ``ffn_mult`` (modeling_decilm.py, which travels alone, has its own)."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // MULTIPLE) * MULTIPLE


def ffn_mult(width: int, hidden: int) -> float | None:
    """The ffn_mult the loaders read as ``width`` hidden units (1.5 * width / hidden, checked through their
    rounding), or None where none does: only multiples of 256 come out."""
    mult = 1.5 * width / hidden
    return mult if intermediate_size(mult, hidden) == width else None


def layers(arch: Arch) -> list[tuple[BlockSpec, BlockSpec]]:
    """The arch's (attention, MLP) pairs, one per DeciLM layer."""
    return list(zip(arch.blocks[0::2], arch.blocks[1::2]))


def block_misfit(cfg: ModelConfig, position: int, spec: BlockSpec) -> str | None:
    """Why block ``position`` has no place in a DeciLM layer (even positions are a layer's attention, odd ones
    its MLP), or None where it fits."""
    where = f"block {position} ({spec})"
    if spec.kind == "skip":
        return None
    if position % 2 == 0:
        if spec.kind != "attn":
            return f"{where} stands where a layer's attention goes; DeciLM layers are attention then MLP"
        if spec.heads != cfg.n_head:
            return f"{where} keeps {spec.heads} of {cfg.n_head} query heads; DeciLM keeps all of them"
        return None
    if spec.kind == "moe":
        return f"{where} is a mixture of experts; DeciLM's MLPs are dense"
    if spec.kind != "ffl":
        return f"{where} stands where a layer's MLP goes; DeciLM layers are attention then MLP"
    width = spec.hidden(cfg.d_inner)
    if ffn_mult(width, cfg.d_model) is None:
        return f"{where} has {width} hidden units; DeciLM's MLP widths (from ffn_mult) are multiples of {MULTIPLE}"
    return None


def check_fits(cfg: ModelConfig, arch: Arch) -> None:
    """A one-line PlanerError naming the first thing DeciLM cannot hold; nothing when the model fits."""
    if cfg.flavour != "llama":
        raise PlanerError(f"cannot write DeciLM: a {cfg.flavour} model is no Llama (RMSNorm, rotary, SwiGLU)")
    if len(arch) % 2:
        raise PlanerError(f"cannot write DeciLM: {len(arch)} blocks are not attention/MLP pairs, one per layer")
    require_attention(arch)
    for position, spec in enumerate(arch):
        reason = block_misfit(cfg, position, spec)
        if reason:
            raise PlanerError(f"cannot write DeciLM: {reason}")


def kv_of(cfg: ModelConfig, spec: BlockSpec) -> int:
    """The key/value heads of an attention block, as the built block has them."""
    return spec.kv or kv_heads(cfg, spec.heads)


@dataclass(frozen=True)
class LayerSizes:
    """One Llama layer of a per-layer different model, as DeciLM's block_configs and llama.cpp's ``deci`` GGUF
    both describe it: 0 for a part the layer does not have."""

    heads: int  # query heads
    kv: int  # key/value heads
    width: int  # MLP hidden units


def layer_sizes(cfg: ModelConfig, attn: BlockSpec, mlp: BlockSpec) -> LayerSizes:
    """The sizes of the layer made of the blocks ``attn`` (attn or skip) and ``mlp`` (ffl or skip)."""
    has_attn, has_mlp = attn.kind == "attn", mlp.kind == "ffl"
    return LayerSizes(
        attn.heads if has_attn else 0, kv_of(cfg, attn) if has_attn else 0, mlp.hidden(cfg.d_inner) if has_mlp else 0
    )


def layer_entry(cfg: ModelConfig, sizes: LayerSizes) -> dict:
    """One ``block_configs`` entry, with the fields both loaders read (a no_op part's sizes null)."""
    attention = {"no_op": not sizes.heads, "replace_with_linear": False, "n_heads_in_group": None}
    if sizes.heads:
        attention["n_heads_in_group"] = cfg.n_head // sizes.kv
    ffn = {"no_op": not sizes.width, "replace_with_linear": False, "ffn_mult": None}
    if sizes.width:
        ffn["ffn_mult"] = ffn_mult(sizes.width, cfg.d_model)
    return {"attention": attention, "ffn": ffn}


def decilm_config(cfg: ModelConfig, arch: Arch) -> dict:
    """config.json: Llama's settings, ``block_configs``, and ``auto_map`` naming modeling_decilm.py."""
    entries = [layer_entry(cfg, layer_sizes(cfg, a, f)) for a, f in layers(arch)]
    return common_config(CLASS, "nemotron-nas", cfg) | {
        "auto_map": {"AutoConfig": f"{CODE.stem}.DeciLMConfig", "AutoModelForCausalLM": f"{CODE.stem}.{CLASS}"},
        "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.n_head,
        "head_dim": cfg.d_head,
        "num_hidden_layers": len(entries),
        "max_position_embeddings": cfg.context,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,  # older readers; transformers 5, vLLM and llama.cpp read rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": cfg.tie_embeddings,
        "block_configs": entries,
    }


def layer_rows(cfg: ModelConfig, layer: int, sizes: LayerSizes) -> dict[str, int]:
    """The rows of the Llama tensors a layer's fused planer tensors split into: qkv's [q, k, v], up's [gate, up]."""
    h, rows = LAYER_PREFIX["llama"].format(layer), {}
    if sizes.heads:
        kv = sizes.kv * cfg.d_head
        rows |= {h + "self_attn.q_proj.weight": sizes.heads * cfg.d_head}
        rows |= {h + "self_attn.k_proj.weight": kv, h + "self_attn.v_proj.weight": kv}
    if sizes.width:
        rows |= {h + "mlp.gate_proj.weight": sizes.width, h + "mlp.up_proj.weight": sizes.width}
    return rows


def llama_tensors(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: Arch) -> dict[str, torch.Tensor]:
    """Llama-named tensors from planer's state dict of a model in layers (hf.py's table), none for a skipped
    block: what DeciLM's folder and llama.cpp's GGUF both hold."""
    linked, rows = top_links("llama", cfg.tie_embeddings), {}
    for i, (attn, mlp) in enumerate(layers(arch)):
        linked += layer_links("llama", i, tuple(b for b, s in enumerate((attn, mlp)) if s.kind != "skip"))
        rows |= layer_rows(cfg, i, layer_sizes(cfg, attn, mlp))
    return to_hf(state, linked, rows)


def export_decilm(run_dir: str | Path, out: str | Path, force: bool = False) -> dict:
    """A DeciLM folder from a planer checkpoint: config.json, model.safetensors, modeling_decilm.py (with the
    modeling_planer.py it builds on) and the tokenizer files; a one-line PlanerError, and nothing written, where
    the model does not fit. Returns the folder's path, its model class and that it needs remote code."""
    out = Path(out)
    model, cfg, vocab = load_checkpoint(run_dir)
    check_fits(cfg.model, model.arch)
    check_out(out, force)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    tensors = llama_tensors(state, cfg.model, model.arch)
    write_folder(out, tensors, decilm_config(cfg.model, model.arch), [REMOTE, CODE], vocab)
    return {"path": out, "architecture": CLASS, "remote_code": True}
