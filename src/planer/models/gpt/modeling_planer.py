"""A model planer found, as transformers runs it: ``planer export --hf`` copies this file beside config.json.

Why it exists: a found model mixes, block by block, skipped blocks, attention with fewer query or key/value heads,
narrower feed-forward blocks and mixtures of experts. ``LlamaForCausalLM`` and ``GPT2LMHeadModel`` make every layer
alike, so they cannot hold it; this file builds it block by block, keeps planer's own tensor names (the export
writes planer's state dict as it is), and plugs into transformers as any causal LM does:
``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``, ``generate`` with transformers' own
``DynamicCache``. It needs torch and transformers only (written against transformers 5.25, whose models take the
cache as ``cache``, no longer ``past_key_values``) and is for inference: no dropout, no loss, no padding.

config.json's ``blocks`` lists the blocks in order, each one of

    {"kind": "skip"}                                  nothing
    {"kind": "attn", "heads": H, "kv": K}             causal self-attention, H query heads of ``head_dim`` over K
                                                      key/value heads: query head i reads key/value head i // (H / K)
    {"kind": "mlp", "hidden": N}                      feed-forward of N hidden units
    {"kind": "moe", "experts": E, "top_k": k, "hidden": N}
                                                      E feed-forward experts of N units behind a linear router; each
                                                      token takes its top-k, weighted by their router probabilities
                                                      (renormalised to sum to 1 when k > 1)

Every block is pre-norm, ``x + f(norm(x))``, and ``flavour`` says the rest:

    gpt2   LayerNorm, learned positions, GELU (tanh), biases, the output layer tied to the embedding
    llama  RMSNorm, rotary positions (rotate-half, ``rope_theta``), SwiGLU, no biases, output tied or its own

The attention's ``qkv`` projection is fused, [q (H * head_dim), k (K * head_dim), v (K * head_dim)] along its
outputs, and a SwiGLU ``up`` stacks the gate's rows, then the up projection's.

The cache has one layer per attention block, numbered over attention blocks only (``num_hidden_layers`` counts
them): transformers reads the cache's length from its layer 0, which must therefore be an attention block's.
A sequence holds at most ``max_position_embeddings`` positions (planer's own decoder slides its window beyond them).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache, GenerationMixin, PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast


class PlanerConfig(PreTrainedConfig):
    """The sizes of every block (``blocks``, see the module's notes) and the flavour's settings."""

    model_type = "planer"
    flavour: str = "llama"
    blocks: list | None = None
    vocab_size: int = 0
    hidden_size: int = 0
    head_dim: int = 0
    max_position_embeddings: int = 0
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = True
    num_hidden_layers: int = 0  # the attention blocks: the cache's layers
    use_cache: bool = True


def make_norm(config: PlanerConfig) -> nn.Module:
    if config.flavour == "llama":
        return nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps)


def activate(a: torch.Tensor, flavour: str) -> torch.Tensor:
    """GELU (tanh) of the hidden units, or SwiGLU: ``a`` holds the gate's units then the up projection's."""
    if flavour == "gpt2":
        return F.gelu(a, approximate="tanh")
    gate, up = a.chunk(2, dim=-1)
    return F.silu(gate) * up


def rotate(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotary positions, rotate-half layout: dimension i turns with i + head_dim / 2; x is (B, heads, T, Dh)."""
    d = x.size(-1)
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=x.device) / d)  # (Dh / 2,)
    angles = positions.float()[:, None] * inv_freq[None, :]  # (T, Dh / 2)
    angles = torch.cat([angles, angles], dim=-1)  # (T, Dh)
    first, second = x.chunk(2, dim=-1)
    return x * angles.cos().to(x.dtype) + torch.cat([-second, first], dim=-1) * angles.sin().to(x.dtype)


class Skip(nn.Module):
    """A block the search left out: the input passes unchanged (and keeps no cache layer)."""

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        return x


class Attention(nn.Module):
    """Causal self-attention of ``heads`` query heads over ``kv`` key/value heads; cache layer ``index``."""

    def __init__(self, config: PlanerConfig, heads: int, kv: int, index: int):
        super().__init__()
        self.heads, self.kv, self.d_head, self.index = heads, kv, config.head_dim, index
        self.theta = config.rope_theta if config.flavour == "llama" else None  # rotary positions, llama only
        bias = config.flavour == "gpt2"
        self.norm = make_norm(config)
        self.qkv = nn.Linear(config.hidden_size, (heads + 2 * kv) * self.d_head, bias=bias)
        self.out = nn.Linear(heads * self.d_head, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        H, K, Dh = self.heads, self.kv, self.d_head
        q, k, v = (to_heads(t, Dh) for t in self.qkv(self.norm(x)).split([H * Dh, K * Dh, K * Dh], dim=-1))
        return x + self.out(attend(q, k, v, positions, cache, self.index, self.theta))


def to_heads(x: torch.Tensor, d_head: int) -> torch.Tensor:
    """(B, T, heads * d_head) -> (B, heads, T, d_head)."""
    B, T, _ = x.shape
    return x.view(B, T, -1, d_head).transpose(1, 2)


def attend(q, k, v, positions: torch.Tensor, cache: DynamicCache | None, index: int, theta: float | None):
    """Causal attention of the new positions over every position so far, merged back to (B, T, H * Dh).

    q is (B, H, T, Dh), k and v (B, K, T, Dh): query head i reads key/value head i // (H / K). Rotary positions
    (``theta``, None for none) turn q and k first; k and v join cache layer ``index``. Shared with
    modeling_decilm.py, whose projections are Llama's separate ones.
    """
    if theta is not None:
        q, k = rotate(q, positions, theta), rotate(k, positions, theta)
    if cache is not None:
        k, v = cache.update(k, v, index)  # every position's so far, (B, K, L, Dh) each
    seen = torch.arange(k.size(2), device=q.device) <= positions[:, None]  # (T, L): causal over the cache
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=seen, enable_gqa=k.size(1) != q.size(1))  # (B, H, T, Dh)
    B, H, T, Dh = y.shape
    return y.transpose(1, 2).reshape(B, T, H * Dh)


class MLP(nn.Module):
    """The feed-forward block of ``hidden`` units: GELU (gpt2), or SwiGLU (llama: ``up`` stacks gate, then up rows)."""

    def __init__(self, config: PlanerConfig, hidden: int):
        super().__init__()
        self.flavour, bias = config.flavour, config.flavour == "gpt2"
        self.norm = make_norm(config)
        self.up = nn.Linear(config.hidden_size, hidden * (2 if config.flavour == "llama" else 1), bias=bias)
        self.down = nn.Linear(hidden, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        return x + self.down(activate(self.up(self.norm(x)), self.flavour))


class MoE(nn.Module):
    """``experts`` feed-forward experts, stacked: ``w1`` (E, units, d), ``w2`` (E, d, hidden), biases for gpt2."""

    def __init__(self, config: PlanerConfig, experts: int, top_k: int, hidden: int):
        super().__init__()
        self.flavour, self.top_k, d = config.flavour, top_k, config.hidden_size
        units = hidden * (2 if config.flavour == "llama" else 1)
        self.norm = make_norm(config)
        self.router = nn.Linear(d, experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(experts, units, d))
        self.w2 = nn.Parameter(torch.empty(experts, d, hidden))
        self.b1 = nn.Parameter(torch.zeros(experts, units)) if config.flavour == "gpt2" else None
        self.b2 = nn.Parameter(torch.zeros(experts, d)) if config.flavour == "gpt2" else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: DynamicCache | None) -> torch.Tensor:
        h = self.norm(x)  # (B, T, d)
        probs = self.router(h).float().softmax(-1)  # (B, T, E)
        gate, choice = probs.topk(self.top_k, dim=-1)  # (B, T, k)
        gate = gate / gate.sum(-1, keepdim=True) if self.top_k > 1 else gate
        weights = torch.zeros_like(probs).scatter(-1, choice, gate).to(h.dtype)  # (B, T, E): 0 where not chosen
        y = torch.zeros_like(h)
        for e in range(self.w1.size(0)):  # every expert on every token: short, and enough for a small model
            b1, b2 = (None, None) if self.b1 is None else (self.b1[e], self.b2[e])
            a = activate(F.linear(h, self.w1[e], b1), self.flavour)
            y = y + weights[..., e : e + 1] * F.linear(a, self.w2[e], b2)
        return x + y


def build_blocks(config: PlanerConfig) -> nn.ModuleList:
    """One module per entry of ``config.blocks``, attention blocks numbered 0, 1, ... for the cache."""
    blocks, attention = [], 0
    for spec in config.blocks:
        if spec["kind"] == "attn":
            blocks.append(Attention(config, spec["heads"], spec["kv"], attention))
            attention += 1
        elif spec["kind"] == "mlp":
            blocks.append(MLP(config, spec["hidden"]))
        elif spec["kind"] == "moe":
            blocks.append(MoE(config, spec["experts"], spec["top_k"], spec["hidden"]))
        else:
            blocks.append(Skip())
    return nn.ModuleList(blocks)


def cache_and_positions(config: PreTrainedConfig, input_ids, attention_mask, cache, use_cache):
    """The cache the ids (B, T) join (a new one where none is given and the config uses one) and their positions
    (T,) after those it holds; shared with modeling_decilm.py. Unpadded batches only: no mask but all ones."""
    if attention_mask is not None and not bool(attention_mask.all()):
        raise ValueError("this model reads unpadded batches only: the attention mask must be all ones")
    if cache is None and (use_cache if use_cache is not None else config.use_cache):
        cache = DynamicCache(config=config)
    start = cache.get_seq_length() if cache is not None else 0
    return cache, torch.arange(start, start + input_ids.size(1), device=input_ids.device)


class PlanerForCausalLM(PreTrainedModel, GenerationMixin):
    config_class = PlanerConfig
    base_model_prefix = "planer"

    def __init__(self, config: PlanerConfig):
        super().__init__(config)
        d = config.hidden_size
        self.embed = nn.Embedding(config.vocab_size, d)
        self.pos = nn.Embedding(config.max_position_embeddings, d) if config.flavour == "gpt2" else None
        self.blocks = build_blocks(config)
        self.norm = make_norm(config)
        self.head = None if config.tie_word_embeddings else nn.Linear(d, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embed

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
        h = self.embed(input_ids)  # (B, T, d)
        if self.pos is not None:
            h = h + self.pos(positions)
        for block in self.blocks:
            h = block(h, positions, cache)
        h = self.norm(h)
        logits = F.linear(h, (self.embed if self.head is None else self.head).weight)  # (B, T, vocab)
        return CausalLMOutputWithPast(logits=logits, cache=cache)
