"""A Llama whose layers differ, in DeciLM / Nemotron-NAS form, as transformers runs it offline.

Why it exists: ``planer export --hf OUT --format decilm`` writes a found Llama-flavour model as
``DeciLMForCausalLM`` (config.json's ``block_configs``, Llama's tensor names), the layout vLLM and TensorRT-LLM
serve and llama.cpp's converter reads. DeciLM's own modeling code lives beside NVIDIA's models, not in
transformers, so the export carries this file for ``AutoModelForCausalLM.from_pretrained(OUT,
trust_remote_code=True)``. It is a thin layer on modeling_planer.py (copied beside it): the same rotary
attention over transformers' ``DynamicCache`` and the same decoding state, under Llama's separate projections.
For inference only (no dropout, no loss, unpadded batches); written against transformers 5.25.

config.json's ``block_configs`` has one entry per layer, ``{"attention": {...}, "ffn": {...}}``:

    attention  no_op true: no attention (and no input_layernorm); else every one of ``num_attention_heads``
               query heads over num_attention_heads / n_heads_in_group key/value heads
    ffn        no_op true: no MLP (and no post_attention_layernorm); else a SwiGLU MLP of
               intermediate_size(ffn_mult) hidden units

The cache has one layer per attention (numbered over attention layers only, as in modeling_planer.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .modeling_planer import attend, cache_and_positions, to_heads


def intermediate_size(ffn_mult: float, hidden: int) -> int:
    """The MLP width vLLM and llama.cpp derive from ``ffn_mult``: 2/3 of ffn_mult * hidden, rounded up to 256."""
    width = int(2 * ffn_mult * hidden / 3)
    return -(-width // 256) * 256


class Fields(dict):
    """A dict whose keys read as attributes too: config.json and llama.cpp's converter index block_configs'
    entries (``entry["ffn"]["ffn_mult"]``), vLLM reads NVIDIA's config objects (``entry.ffn.ffn_mult``)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


class DeciLMConfig(PreTrainedConfig):
    """Llama's settings and ``block_configs`` (see the module's notes)."""

    model_type = "nemotron-nas"
    block_configs: list | None = None
    vocab_size: int = 0
    hidden_size: int = 0
    num_attention_heads: int = 0
    head_dim: int = 0
    num_hidden_layers: int = 0
    max_position_embeddings: int = 0
    rms_norm_eps: float = 1e-5
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        self.block_configs = [Fields({k: Fields(v) for k, v in b.items()}) for b in self.block_configs or []]
        super().__post_init__(**kwargs)


class DeciLMAttention(nn.Module):
    """All query heads over ``kv`` key/value heads, Llama's q/k/v/o projections; cache layer ``index``."""

    def __init__(self, config: DeciLMConfig, kv: int, index: int):
        super().__init__()
        d, Dh = config.hidden_size, config.head_dim
        self.d_head, self.index, self.theta = Dh, index, config.rope_parameters["rope_theta"]
        self.q_proj = nn.Linear(d, config.num_attention_heads * Dh, bias=False)
        self.k_proj = nn.Linear(d, kv * Dh, bias=False)
        self.v_proj = nn.Linear(d, kv * Dh, bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * Dh, d, bias=False)

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        q, k, v = (to_heads(p(h), self.d_head) for p in (self.q_proj, self.k_proj, self.v_proj))
        return self.o_proj(attend(q, k, v, positions, cache, self.index, self.theta))


class DeciLMMLP(nn.Module):
    """Llama's SwiGLU MLP of ``hidden`` units."""

    def __init__(self, config: DeciLMConfig, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, hidden, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, config.hidden_size, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(h)) * self.up_proj(h))


class DeciLMDecoderLayer(nn.Module):
    """One ``block_configs`` entry: attention then MLP, each pre-norm and residual, each absent where no_op."""

    def __init__(self, config: DeciLMConfig, entry: Fields, index: int):
        super().__init__()
        attention, ffn, d, eps = entry.attention, entry.ffn, config.hidden_size, config.rms_norm_eps
        self.self_attn = self.mlp = None
        if not attention.no_op:
            self.input_layernorm = nn.RMSNorm(d, eps=eps)
            self.self_attn = DeciLMAttention(config, config.num_attention_heads // attention.n_heads_in_group, index)
        if not ffn.no_op:
            self.post_attention_layernorm = nn.RMSNorm(d, eps=eps)
            self.mlp = DeciLMMLP(config, intermediate_size(ffn.ffn_mult, d))

    def forward(self, h: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        if self.self_attn is not None:
            h = h + self.self_attn(self.input_layernorm(h), positions, cache)
        if self.mlp is not None:
            h = h + self.mlp(self.post_attention_layernorm(h))
        return h


class DeciLMModel(nn.Module):
    """Llama's ``model.``: the embedding, the layers and the final norm."""

    def __init__(self, config: DeciLMConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        attention = [not b.attention.no_op for b in config.block_configs]
        self.layers = nn.ModuleList(
            DeciLMDecoderLayer(config, b, sum(attention[:i])) for i, b in enumerate(config.block_configs)
        )
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class DeciLMForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = DeciLMConfig
    base_model_prefix = "model"

    def __init__(self, config: DeciLMConfig):
        super().__init__(config)
        self.model = DeciLMModel(config)
        tied = config.tie_word_embeddings
        self.lm_head = None if tied else nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        cache: DynamicCache | None = None,
        use_cache: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Logits (B, T, vocab) of the ids (B, T), which follow the positions ``cache`` holds (and join them)."""
        cache, positions = cache_and_positions(self.config, input_ids, attention_mask, cache, use_cache)
        h = self.model.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.model.layers:
            h = layer(h, positions, cache)
        h = self.model.norm(h)
        logits = F.linear(h, (self.model.embed_tokens if self.lm_head is None else self.lm_head).weight)
        return CausalLMOutputWithPast(logits=logits, cache=cache)
