"""Hugging Face folders in and out: ``GPT2LMHeadModel`` and ``LlamaForCausalLM`` <-> planer checkpoints.

Only JSON and safetensors are read, from a local folder: nothing is unpickled and nothing is downloaded, so a
folder with only ``pytorch_model.bin`` is refused. Every tensor's shape is checked against what config.json
implies before anything is written. Layer i of a Hugging Face model is blocks 2i (attention) and 2i + 1 (MLP)
of planer's baseline arch; weight layouts differ only in packing (facts from transformers' modeling files):

- GPT-2 keeps its projections as ``Conv1D``, weight (in, out): transposed here. ``c_attn`` is [q, k, v] along
  its outputs, as planer's fused ``qkv``.
- Llama keeps q, k, v and gate, up as separate ``nn.Linear``: concatenated here into ``qkv`` and ``up``. Its
  rotary positions are in the rotate-half layout already (gpt.rotate), so no permutation is needed.

Export is the same table read the other way, for models uniform enough for the format: ``attn:H ffl:xM``
repeated, the same H and M in every layer (H = n_head for GPT-2, whose head size is fixed by it), where layers
skipped whole (both blocks ``skip``) are left out. Any other model (skipped or narrowed blocks layer by layer,
mixed heads, MoE, a reordered design) is written with planer's own modeling file, modeling_planer.py, which
builds it block by block from config.json; its tensors keep planer's names.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from planer.config import Config, ModelConfig, validate
from planer.errors import PlanerError
from planer.io.checkpoint import WEIGHTS, copy_tokenizer, load_checkpoint, save_checkpoint
from planer.io.data import TokenizerVocab
from planer.models.arch import Arch, BlockSpec
from planer.models.backbone import build_model
from planer.models.gpt.model import MLP, Attention, kv_heads
from planer.models.moe import MoEFeedForward

INDEX = "model.safetensors.index.json"
PREFIX = {"gpt2": "transformer.", "llama": "model."}
ARCHITECTURE = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM"}
IGNORED = (".attn.bias", ".attn.masked_bias", ".rotary_emb.inv_freq")  # buffers older versions saved
REMOTE = Path(__file__).with_name("modeling_planer.py")  # the modeling file of an export no plain class holds
CLASS = "PlanerForCausalLM"  # its model class
TRAIN_LEN = 128  # model.tgt_len of an import: planer's training segments, at most the model's context


@dataclass(frozen=True)
class Layout:
    """The sizes both formats share; one per model, every layer alike."""

    flavour: str
    layers: int
    d_model: int
    heads: int
    kv: int
    d_head: int
    d_inner: int
    vocab: int
    positions: int
    tied: bool


@dataclass(frozen=True)
class Link:
    """One planer tensor and the Hugging Face tensors it is made of: concatenated along dim 0, or one transposed."""

    planer: str
    hf: tuple[str, ...]
    transpose: bool = False


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanerError(f"{path.parent} is not a Hugging Face model folder: {path.name} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise PlanerError(f"{path} is unreadable or not JSON") from None
    if not isinstance(data, dict):
        raise PlanerError(f"{path}: expected a JSON object")
    return data


def require(ok: bool, what: str) -> None:
    if not ok:
        raise PlanerError(f"unsupported model: {what}")


def _gpt2_layout(hf: dict) -> tuple[Layout, dict]:
    require(hf.get("activation_function", "gelu_new") in ("gelu_new", "gelu_pytorch_tanh"), "GPT-2 needs gelu_new")
    require(hf.get("scale_attn_weights", True), "GPT-2 without scale_attn_weights")
    require(not hf.get("scale_attn_by_inverse_layer_idx", False), "GPT-2 with scale_attn_by_inverse_layer_idx")
    require(not hf.get("add_cross_attention", False), "GPT-2 with cross-attention")
    require(hf.get("tie_word_embeddings", True), "GPT-2 with an untied output layer")
    d, heads = hf["n_embd"], hf["n_head"]
    require(d % heads == 0, f"n_head {heads} does not divide n_embd {d}")
    inner = hf.get("n_inner") or 4 * d
    layout = Layout(
        "gpt2", hf["n_layer"], d, heads, heads, d // heads, inner, hf["vocab_size"], hf["n_positions"], True
    )
    extra = {
        "norm_eps": float(hf.get("layer_norm_epsilon", 1e-5)),
        "dropout": float(hf.get("resid_pdrop", 0.1)),
        "dropatt": float(hf.get("attn_pdrop", 0.1)),
    }
    return layout, extra


def _rope_theta(hf: dict) -> float:
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    require(rope.get("rope_type", rope.get("type", "default")) == "default", "Llama with scaled rotary positions")
    return float(rope.get("rope_theta", hf.get("rope_theta", 10000.0)))


def _llama_layout(hf: dict) -> tuple[Layout, dict]:
    require(hf.get("hidden_act", "silu") == "silu", "Llama needs hidden_act silu")
    require(not hf.get("attention_bias", False) and not hf.get("mlp_bias", False), "Llama with biases")
    d, heads = hf["hidden_size"], hf["num_attention_heads"]
    kv = hf.get("num_key_value_heads") or heads
    d_head = hf.get("head_dim") or d // heads
    require(heads % kv == 0, f"{heads} query heads over {kv} key/value heads")
    require(heads * d_head == d, f"head_dim {d_head} x {heads} heads != hidden_size {d}")
    layout = Layout(
        "llama",
        hf["num_hidden_layers"],
        d,
        heads,
        kv,
        d_head,
        hf["intermediate_size"],
        hf["vocab_size"],
        hf["max_position_embeddings"],
        bool(hf.get("tie_word_embeddings", False)),
    )
    extra = {
        "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
        "rope_theta": _rope_theta(hf),
        "dropout": 0.0,
        "dropatt": float(hf.get("attention_dropout", 0.0)),
    }
    return layout, extra


def read_layout(hf: dict, path: Path) -> tuple[Layout, dict]:
    """The model's sizes and the ModelConfig values only config.json knows (norm epsilon, dropout, rotary base)."""
    kind = hf.get("model_type")
    if kind not in PREFIX:
        raise PlanerError(f"{path}: unsupported model_type {kind!r} (planer imports gpt2 and llama)")
    try:
        return (_gpt2_layout if kind == "gpt2" else _llama_layout)(hf)
    except (KeyError, TypeError, ZeroDivisionError) as e:
        raise PlanerError(f"{path}: a {kind} config.json needs a valid {e}") from None


def model_config(layout: Layout, extra: dict) -> ModelConfig:
    """planer's ModelConfig for a layout: n_head is d_model / d_head, n_kv_head keeps the grouping of kv_heads."""
    n_head = layout.d_model // layout.d_head
    n_kv_head = layout.kv * n_head // layout.heads
    cfg = ModelConfig(
        backbone="gpt",
        flavour=layout.flavour,
        d_model=layout.d_model,
        n_head=n_head,
        n_kv_head=n_kv_head,
        d_inner=layout.d_inner,
        n_layer=layout.layers,
        tgt_len=min(TRAIN_LEN, layout.positions),
        mem_len=0,
        vocab_size=layout.vocab,
        n_positions=layout.positions,
        tie_embeddings=layout.tied,
        **extra,
    )
    if (layout.kv * n_head) % layout.heads or kv_heads(cfg, layout.heads) != layout.kv:
        raise PlanerError(f"unsupported model: {layout.heads} query heads over {layout.kv} key/value heads")
    return cfg


# One layer: (block: 0 attention, 1 MLP; planer tensor; the Hugging Face tensors under the layer's prefix; transposed)
LAYER = {
    "gpt2": [
        (0, "norm.weight", ("ln_1.weight",), False),
        (0, "norm.bias", ("ln_1.bias",), False),
        (0, "qkv.weight", ("attn.c_attn.weight",), True),
        (0, "qkv.bias", ("attn.c_attn.bias",), False),
        (0, "out.weight", ("attn.c_proj.weight",), True),
        (0, "out.bias", ("attn.c_proj.bias",), False),
        (1, "norm.weight", ("ln_2.weight",), False),
        (1, "norm.bias", ("ln_2.bias",), False),
        (1, "up.weight", ("mlp.c_fc.weight",), True),
        (1, "up.bias", ("mlp.c_fc.bias",), False),
        (1, "down.weight", ("mlp.c_proj.weight",), True),
        (1, "down.bias", ("mlp.c_proj.bias",), False),
    ],
    "llama": [
        (0, "norm.weight", ("input_layernorm.weight",), False),
        (0, "qkv.weight", tuple(f"self_attn.{p}_proj.weight" for p in "qkv"), False),
        (0, "out.weight", ("self_attn.o_proj.weight",), False),
        (1, "norm.weight", ("post_attention_layernorm.weight",), False),
        (1, "up.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), False),
        (1, "down.weight", ("mlp.down_proj.weight",), False),
    ],
}
LAYER_PREFIX = {"gpt2": "transformer.h.{}.", "llama": "model.layers.{}."}


def top_links(flavour: str, tied: bool) -> list[Link]:
    """The planer tensors outside the blocks (embeddings, final norm, output layer unless tied) and their names."""
    p = PREFIX[flavour]
    if flavour == "gpt2":
        top = [Link("embed.weight", (p + "wte.weight",)), Link("pos.weight", (p + "wpe.weight",))]
        return top + [Link("norm.weight", (p + "ln_f.weight",)), Link("norm.bias", (p + "ln_f.bias",))]
    top = [Link("embed.weight", (p + "embed_tokens.weight",)), Link("norm.weight", (p + "norm.weight",))]
    return top + ([] if tied else [Link("head.weight", ("lm_head.weight",))])


def layer_links(flavour: str, layer: int, kinds: tuple[int, ...] = (0, 1)) -> list[Link]:
    """The tensors of Hugging Face layer ``layer``, planer's blocks 2 * layer (attention, kind 0) and 2 * layer + 1
    (MLP, kind 1), of the ``kinds`` it holds (DeciLM leaves out a skipped block's)."""
    h = LAYER_PREFIX[flavour].format(layer)
    return [
        Link(f"blocks.{2 * layer + b}.{p}", tuple(h + n for n in names), t)
        for b, p, names, t in LAYER[flavour]
        if b in kinds
    ]


def links(layout: Layout) -> list[Link]:
    """Every planer tensor of the baseline arch and where it lives in the Hugging Face state dict."""
    top = top_links(layout.flavour, layout.tied)
    for i in range(layout.layers):
        top += layer_links(layout.flavour, i)
    return top


def hf_shapes(layout: Layout) -> dict[str, tuple[int, ...]]:
    """The shape of every Hugging Face tensor a layout implies."""
    d, q, kv, inner = layout.d_model, layout.heads * layout.d_head, layout.kv * layout.d_head, layout.d_inner
    if layout.flavour == "gpt2":
        p = PREFIX["gpt2"]
        shapes = {p + "wte.weight": (layout.vocab, d), p + "wpe.weight": (layout.positions, d)}
        shapes |= {p + "ln_f.weight": (d,), p + "ln_f.bias": (d,)}
        per_layer = {"ln_1.weight": (d,), "ln_1.bias": (d,), "ln_2.weight": (d,), "ln_2.bias": (d,)}
        per_layer |= {"attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,)}
        per_layer |= {"attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,)}
        per_layer |= {"mlp.c_fc.weight": (d, inner), "mlp.c_fc.bias": (inner,)}
        per_layer |= {"mlp.c_proj.weight": (inner, d), "mlp.c_proj.bias": (d,)}
    else:
        shapes = {"model.embed_tokens.weight": (layout.vocab, d), "model.norm.weight": (d,)}
        if not layout.tied:
            shapes["lm_head.weight"] = (layout.vocab, d)
        per_layer = {"input_layernorm.weight": (d,), "post_attention_layernorm.weight": (d,)}
        per_layer |= {"self_attn.q_proj.weight": (q, d), "self_attn.k_proj.weight": (kv, d)}
        per_layer |= {"self_attn.v_proj.weight": (kv, d), "self_attn.o_proj.weight": (d, q)}
        per_layer |= {"mlp.gate_proj.weight": (inner, d), "mlp.up_proj.weight": (inner, d)}
        per_layer |= {"mlp.down_proj.weight": (d, inner)}
    for i in range(layout.layers):
        shapes |= {LAYER_PREFIX[layout.flavour].format(i) + name: shape for name, shape in per_layer.items()}
    return shapes


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards its index names; a pickle is refused, never opened."""
    if (folder / WEIGHTS).is_file():
        files = [folder / WEIGHTS]
    elif (folder / INDEX).is_file():
        weight_map = read_json(folder / INDEX).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(n, str) for n in weight_map.values()):
            raise PlanerError(f"{folder / INDEX}: expected a 'weight_map' of tensor names to shard files")
        names = sorted(set(weight_map.values()))
        if any(Path(n).name != n for n in names):
            raise PlanerError(f"{folder / INDEX}: shard names must be plain file names in the folder")
        files = [folder / n for n in names]
    elif (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
        raise PlanerError(
            f"{folder} holds only pytorch_model.bin, a pickle, which planer never opens: "
            "save the model as safetensors (save_pretrained's default) and import that"
        )
    else:
        raise PlanerError(f"{folder} is not a Hugging Face model folder: {WEIGHTS} is missing")
    tensors = {}
    for path in files:
        if not path.is_file():
            raise PlanerError(f"{folder}: shard {path.name} named in {INDEX} is missing")
        try:
            tensors |= load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise PlanerError(f"{path} is corrupt: {str(e).splitlines()[0]}") from None
    return tensors


def to_planer(tensors: dict[str, torch.Tensor], layout: Layout, folder: Path) -> dict[str, torch.Tensor]:
    """planer's state dict from a Hugging Face one, every shape checked against the layout first."""
    prefix = PREFIX[layout.flavour]
    if not any(k.startswith(prefix) for k in tensors):  # the base model saved alone (the original gpt2 files)
        tensors = {k if k.startswith("lm_head.") else prefix + k: v for k, v in tensors.items()}
    shapes = hf_shapes(layout)
    for name, shape in shapes.items():
        if name not in tensors:
            raise PlanerError(f"{folder}: tensor {name} is missing")
        if tuple(tensors[name].shape) != shape:
            raise PlanerError(f"{folder}: {name} has shape {tuple(tensors[name].shape)}, config.json implies {shape}")
    known = set(shapes) | ({"lm_head.weight"} if layout.tied else set())
    extra = sorted(k for k in tensors if k not in known and not k.endswith(IGNORED))
    if extra:
        raise PlanerError(f"{folder}: tensor {extra[0]} has no place in a {layout.flavour} model of this config.json")
    state = {}
    for link in links(layout):
        parts = [tensors[n].float() for n in link.hf]
        state[link.planer] = parts[0].t().contiguous() if link.transpose else torch.cat(parts)
    return state


def baseline_arch(layout: Layout) -> Arch:
    return Arch((BlockSpec("attn", heads=layout.heads), BlockSpec("ffl")) * layout.layers)


def check_new_out(out: Path) -> None:
    """An import writes into a new or empty folder only, so it never mixes with another model's files."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PlanerError(f"{out} exists and is not an empty folder; choose another --out")


def imported_model(layout: Layout, extra: dict, tensors: dict[str, torch.Tensor], source: Path, out: Path):
    """The baseline model of a layout filled from Hugging Face-named tensors, and the Config saved with it
    (its data.tokenizer the checkpoint folder ``out``, where the tokenizer.json goes)."""
    cfg = Config(model=model_config(layout, extra))
    cfg.data.tokenizer = str(out.resolve())
    validate(cfg)
    model = build_model(cfg.model, baseline_arch(layout))
    model.load_state_dict(to_planer(tensors, layout, source))
    return model, cfg


def import_summary(out: Path, layout: Layout, model) -> dict:
    return {"path": str(out), "flavour": layout.flavour, "arch": model.arch.short(), "params": model.num_params()}


def import_hf(folder: str | Path, out: str | Path) -> dict:
    """A planer checkpoint in ``out`` from a local Hugging Face folder; nothing is written unless all of it fits.

    Returns the checkpoint's path, flavour, compact arch and parameter count.
    """
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise PlanerError(f"Hugging Face folder not found: {folder}")
    check_new_out(out)
    layout, extra = read_layout(read_json(folder / "config.json"), folder / "config.json")
    vocab = TokenizerVocab(folder)
    if len(vocab) != layout.vocab:
        raise PlanerError(f"{vocab.path} has {len(vocab)} tokens, but the model's vocabulary has {layout.vocab}")
    model, cfg = imported_model(layout, extra, read_weights(folder), folder, out)
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, cfg, vocab, source=str(folder.resolve()))
    return import_summary(out, layout, model)


def kept_layers(arch: Arch) -> list[int] | None:
    """The layers (blocks 2i and 2i + 1) a plain export keeps: all but those whose two blocks are skipped. None
    when the arch is not in layers (an odd number of blocks) or some kept layer is not ``attn:H`` then ``ffl``."""
    if len(arch) % 2:
        return None
    pairs = list(zip(arch.blocks[0::2], arch.blocks[1::2]))
    kept = [i for i, (a, f) in enumerate(pairs) if (a.kind, f.kind) != ("skip", "skip")]
    if not all(pairs[i][0].kind == "attn" and pairs[i][1].kind == "ffl" for i in kept):
        return None
    return kept


def plain_layout(cfg: ModelConfig, arch: Arch) -> tuple[Layout, list[int]] | None:
    """The Llama or GPT-2 layout of a model and the layers it keeps, or None where that format cannot hold it.

    The format makes every layer alike: the kept layers must have the same query and key/value heads and MLP
    width, GPT-2 all n_head heads (its head size is n_embd / n_head), Llama a number of heads dividing d_model (as
    an import reads it back). Layers skipped whole are simply left out.
    """
    kept = kept_layers(arch)
    if not kept:
        return None
    pairs = [(arch.blocks[2 * i], arch.blocks[2 * i + 1]) for i in kept]
    heads = {(a.heads, a.kv or kv_heads(cfg, a.heads)) for a, _ in pairs}
    widths = {f.hidden(cfg.d_inner) for _, f in pairs}
    if len(heads) > 1 or len(widths) > 1:
        return None
    ((H, KV),), (width,) = heads, widths
    if (cfg.flavour == "gpt2" and H != cfg.n_head) or cfg.d_model % H:
        return None
    layout = Layout(
        cfg.flavour, len(kept), cfg.d_model, H, KV, cfg.d_head, width, cfg.vocab_size, cfg.context, cfg.tie_embeddings
    )
    return layout, kept


def export_form(cfg: ModelConfig, arch: Arch) -> str:
    """How a model exports: "plain" where ``plain_layout`` holds it, else "remote code"; a PlanerError for a model
    with no attention block (``require_attention``)."""
    require_attention(arch)
    return "plain" if plain_layout(cfg, arch) else "remote code"


def require_attention(arch: Arch) -> None:
    """A PlanerError for a model with no attention block: transformers reads a cache's length from one's keys."""
    if not any(b.kind == "attn" for b in arch):
        raise PlanerError(f"cannot export {arch.short()}: it has no attention block, so no cache for transformers")


def common_config(architecture: str, model_type: str, cfg: ModelConfig) -> dict:
    """What config.json says of any model planer writes: its class, float32 weights, no special tokens."""
    return {
        "architectures": [architecture],
        "model_type": model_type,
        "dtype": "float32",
        "vocab_size": cfg.vocab_size,
        "initializer_range": cfg.init_std,
        "bos_token_id": None,
        "eos_token_id": None,
    }


def hf_config(layout: Layout, cfg: ModelConfig) -> dict:
    """config.json for ``transformers``; only what differs from its defaults or what it needs to build the model."""
    common = common_config(ARCHITECTURE[layout.flavour], layout.flavour, cfg)
    if layout.flavour == "gpt2":
        return common | {
            "n_embd": layout.d_model,
            "n_head": layout.heads,
            "n_layer": layout.layers,
            "n_inner": layout.d_inner,
            "n_positions": layout.positions,
            "activation_function": "gelu_new",
            "layer_norm_epsilon": cfg.norm_eps,
            "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout,
            "attn_pdrop": cfg.dropatt,
            "tie_word_embeddings": True,
        }
    return common | {
        "hidden_size": layout.d_model,
        "num_attention_heads": layout.heads,
        "num_key_value_heads": layout.kv,
        "head_dim": layout.d_head,
        "num_hidden_layers": layout.layers,
        "intermediate_size": layout.d_inner,
        "max_position_embeddings": layout.positions,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.dropatt,
        "tie_word_embeddings": layout.tied,
    }


def to_hf(state: dict[str, torch.Tensor], linked: list[Link], rows: dict[str, int]) -> dict[str, torch.Tensor]:
    """The Hugging Face tensors of ``linked``: each planer tensor transposed, or split along dim 0 into its parts
    of ``rows`` rows each (Hugging Face name -> rows; needed only for tensors of several parts)."""
    tensors = {}
    for link in linked:
        value = state[link.planer].detach().cpu()
        if link.transpose:
            tensors[link.hf[0]] = value.t().contiguous()
        elif len(link.hf) == 1:
            tensors[link.hf[0]] = value.contiguous()
        else:
            parts = value.split([rows[n] for n in link.hf])
            tensors |= {n: p.contiguous() for n, p in zip(link.hf, parts)}
    return tensors


def kept_state(state: dict[str, torch.Tensor], kept: list[int]) -> dict[str, torch.Tensor]:
    """planer's state dict with the kept layers' blocks numbered as the plain format's layers 0, 1, ... (a skipped
    block has no tensors, so every block tensor is a kept layer's)."""
    return renumbered(state, {2 * i + b: 2 * j + b for j, i in enumerate(kept) for b in (0, 1)})


def renumbered(state: dict[str, torch.Tensor], block: dict[int, int]) -> dict[str, torch.Tensor]:
    """planer's state dict with block ``i``'s tensors named as block ``block[i]``'s (every block with tensors is
    in ``block``)."""
    renamed = {}
    for name, value in state.items():
        if name.startswith("blocks."):
            _, index, rest = name.split(".", 2)
            name = f"blocks.{block[int(index)]}.{rest}"
        renamed[name] = value
    return renamed


def block_record(block: nn.Module) -> dict:
    """One entry of the remote-code config's ``blocks`` (see modeling_planer.py), read off the built block."""
    if isinstance(block, Attention):
        return {"kind": "attn", "heads": block.heads, "kv": block.kv}
    if isinstance(block, MLP):
        return {"kind": "mlp", "hidden": block.down.in_features}
    if isinstance(block, MoEFeedForward):
        return {"kind": "moe", "experts": block.n_experts, "top_k": block.top_k, "hidden": block.w2.size(-1)}
    return {"kind": "skip"}


def remote_config(model: nn.Module, cfg: ModelConfig) -> dict:
    """config.json for planer's own modeling file: every block's sizes and the flavour's settings."""
    blocks = [block_record(b) for b in model.blocks]
    config = common_config(CLASS, "planer", cfg) | {
        "auto_map": {"AutoConfig": f"{REMOTE.stem}.PlanerConfig", "AutoModelForCausalLM": f"{REMOTE.stem}.{CLASS}"},
        "flavour": cfg.flavour,
        "blocks": blocks,
        "num_hidden_layers": sum(b["kind"] == "attn" for b in blocks),  # the cache's layers
        "hidden_size": cfg.d_model,
        "head_dim": cfg.d_head,
        "max_position_embeddings": cfg.context,
        "norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
    }
    return config | ({"rope_theta": cfg.rope_theta} if cfg.flavour == "llama" else {})


def export_hf(run_dir: str | Path, out: str | Path, force: bool = False) -> dict:
    """A Hugging Face folder (config.json, model.safetensors, tokenizer.json if any) from a planer checkpoint.

    A plain ``LlamaForCausalLM`` or ``GPT2LMHeadModel`` where the format holds the model (``plain_layout``), else
    planer's own modeling file beside planer's tensors as they are, which transformers loads with
    ``trust_remote_code=True``. Returns the folder's path, its model class and whether it needs remote code.
    """
    out = Path(out)
    model, cfg, vocab = load_checkpoint(run_dir)
    if cfg.model.backbone != "gpt":
        raise PlanerError(f"cannot export {run_dir}: a Transformer-XL has no Hugging Face format (use backbone gpt)")
    remote = export_form(cfg.model, model.arch) != "plain"
    check_out(out, force)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if remote:
        tensors, config = state, remote_config(model, cfg.model)
    else:
        layout, kept = plain_layout(cfg.model, model.arch)
        rows = {name: shape[0] for name, shape in hf_shapes(layout).items()}
        tensors, config = to_hf(kept_state(state, kept), links(layout), rows), hf_config(layout, cfg.model)
    write_folder(out, tensors, config, [REMOTE] if remote else [], vocab)
    return {"path": out, "architecture": config["architectures"][0], "remote_code": remote}


def check_out(out: Path, force: bool) -> None:
    """An export writes into a new or empty folder, or over an old one with ``force``; checked before any work."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not force)):
        raise PlanerError(f"{out} exists and is not an empty folder; choose another --hf or add --force")


def write_folder(out: Path, tensors: dict[str, torch.Tensor], config: dict, code: list[Path], vocab) -> None:
    """The Hugging Face folder: model.safetensors, config.json, the modeling files ``code`` the config names, and
    the checkpoint's tokenizer files where it has a tokenizer (not a character vocabulary)."""
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for path in code:
        shutil.copyfile(path, out / path.name)
    if isinstance(vocab, TokenizerVocab):
        copy_tokenizer(vocab, out)
