"""Mixture-of-experts feed-forward block: a router, E experts of the FFL's shape, the Switch load-balancing loss.

The paper ran its experts one after another on masked subsets of the tokens, which made its MoE slow at small
batch. Here the assignments are sorted by expert once, so each expert reads one contiguous slice of a single
gathered matrix and writes one contiguous slice of the output, and the expert weights are stacked (E, out, in)
tensors. How the experts then run was measured (benchmarks/moe.py) rather than assumed:

- CUDA with bf16: ``torch._grouped_mm`` runs all experts in one kernel per layer.
- CPU fp32 inference: one oneDNN product per expert on weights reordered for oneDNN once ("prepacked") and cached.
  With a few dozen rows per expert a product otherwise spends as long repacking its weight as multiplying, and
  a batched ``bmm`` over rows padded to the busiest expert repacks every expert's weight at every call: it was
  slower everywhere except a few rows per expert on tiny weights.
- Training (and everything else): one product per expert on slices, in an autograd function whose backward writes
  each expert's weight gradient straight into the stacked gradient. Autograd through per-expert views would build
  one full-size gradient per expert and stack them; padded ``bmm`` was slower at every size measured.

``impl="sequential"`` keeps the paper's expert-after-expert loop as the reference for tests and benchmarks.
``impl="dense"`` runs every expert on every token and weights each output by the token's gate (zero for experts
it did not choose): E times the products, but no sort, count or shape that depends on the routing, so a graph
exporter can trace it (``planer export --onnx``, models/txl/onnx.py). It equals the other paths up to float rounding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from planer.models.blocks import Block


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False) -> torch.Tensor:
    """``F.linear`` (optionally followed by ReLU, fused) on a weight from ``PackedWeights``."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "relu" if relu else "none", [], "")


class PackedWeights:
    """oneDNN-reordered copies of weight matrices, for CPU fp32 inference; rebuilt whenever a weight changes.

    A weight counts as changed when its storage or its version counter (bumped by every in-place update through
    autograd-visible tensors, e.g. an optimizer step or ``load_state_dict``) differs from when it was packed. The
    cache keeps the packed tensors' sources alive, so a new weight can never reuse a packed one's address. Updates
    through ``.data`` bypass the version counter: owners clear the cache when they leave eval mode. Packed tensors
    cannot be copied or pickled, so copies of the owner start with an empty cache.
    """

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self.sources: list[torch.Tensor] = []
        self.versions: list[int] = []
        self.packed: list[list[torch.Tensor]] = []

    def get(self, *weights: torch.Tensor) -> list[list[torch.Tensor]]:
        """For each weight, an (out, in) matrix or an (E, out, in) stack of them, the list of its packed matrices."""
        fresh = len(weights) == len(self.sources) and all(
            w.data_ptr() == s.data_ptr() and w._version == v for w, s, v in zip(weights, self.sources, self.versions)
        )
        if not fresh:
            self.sources = [w.detach() for w in weights]
            self.versions = [w._version for w in weights]
            self.packed = [
                [torch.ops.mkldnn._reorder_linear_weight(m, None) for m in (w[None] if w.dim() == 2 else w)]
                for w in self.sources
            ]
        return self.packed

    def __deepcopy__(self, memo) -> PackedWeights:
        return PackedWeights()

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.clear()


def _expert_linear_backward(x, gy, w, gw, gb, gx, sizes) -> None:
    """Gradients of ``y[e] = x[e] @ w[e]^T + b[e]`` per expert slice, written into gw, gb and gx.

    Experts without tokens get zero weight and bias gradients; only they need zeroing.
    """
    for e, (xe, gye, gxe) in enumerate(zip(x.split(sizes), gy.split(sizes), gx.split(sizes))):
        if sizes[e]:
            torch.mm(gye.t(), xe, out=gw[e])
            torch.sum(gye, 0, out=gb[e])
            torch.mm(gye, w[e], out=gxe)
        else:
            gw[e].zero_()
            gb[e].zero_()


ACTIVATIONS = ("relu", "gelu", "swiglu")


def activate(a: torch.Tensor, name: str) -> torch.Tensor:
    """The nonlinearity of an expert (and of the gpt backbone's MLP, which experts are upcycled from).

    relu as Transformer-XL; gelu with the tanh approximation, as GPT-2; swiglu as Llama: ``a`` holds the gate
    projection's units, then the up projection's, and the result, half as wide, is silu(gate) * up.
    """
    if name == "relu":
        return F.relu(a)
    if name == "gelu":
        return F.gelu(a, approximate="tanh")
    gate, up = a.chunk(2, dim=-1)
    return F.silu(gate) * up


def _activate_backward(gh: torch.Tensor, a: torch.Tensor, name: str) -> torch.Tensor:
    """The gradient of ``activate(a, name)`` (gelu or swiglu) with respect to ``a``, given the output's ``gh``."""
    if name == "gelu":
        return torch.ops.aten.gelu_backward(gh, a, approximate="tanh")
    gate, up = a.chunk(2, dim=-1)
    return torch.cat([torch.ops.aten.silu_backward(gh * up, gate), gh * F.silu(gate)], dim=-1)


def _hidden(a: torch.Tensor, act: str, p: float) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The experts' hidden units after activation and dropout, and the dropout mask that backward needs.

    ReLU runs in place and needs no mask: after it, h > 0 exactly where a unit passed and dropout kept it. Other
    activations keep their pre-activations ``a`` (saved by the caller) and an explicit mask.
    """
    if act == "relu":
        h = a.relu_()
        if p > 0:
            F.dropout(h, p, training=True, inplace=True)
        return h, None
    h = activate(a, act)
    if p == 0:
        return h, None
    mask = torch.empty_like(h).bernoulli_(1.0 - p)
    return h.mul_(mask).mul_(1.0 / (1.0 - p)), mask


class _Experts(torch.autograd.Function):
    """All experts on expert-sorted rows: ``act(x W1[e]^T + b1[e])``, dropout, ``@ W2[e]^T + b2[e]``.

    ``sizes[e]`` consecutive rows of ``xs`` belong to expert e. The products run per expert on slices, writing into
    preallocated outputs and gradients (``out=``); everything elementwise runs once over all rows.
    """

    @staticmethod
    def forward(ctx, xs, sizes, p, act, w1, b1, w2, b2):
        a = xs.new_empty(xs.shape[0], w1.shape[1])
        for e, (xe, ae) in enumerate(zip(xs.split(sizes), a.split(sizes))):
            if sizes[e]:
                torch.addmm(b1[e], xe, w1[e].t(), out=ae)
        h, mask = _hidden(a, act, p)
        ys = xs.new_empty(xs.shape[0], w2.shape[1])
        for e, (he, ye) in enumerate(zip(h.split(sizes), ys.split(sizes))):
            if sizes[e]:
                torch.addmm(b2[e], he, w2[e].t(), out=ye)
        ctx.save_for_backward(xs, h, w1, w2, None if act == "relu" else a, mask)
        ctx.sizes, ctx.p, ctx.act = sizes, p, act
        return ys

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy):
        xs, h, w1, w2, a, mask = ctx.saved_tensors
        sizes, p = ctx.sizes, ctx.p
        gy = gy.contiguous()
        gw1, gw2 = torch.empty_like(w1), torch.empty_like(w2)
        gb1, gb2 = w1.new_empty(w1.shape[:2]), w2.new_empty(w2.shape[:2])
        gh = torch.empty_like(h)
        _expert_linear_backward(h, gy, w2, gw2, gb2, gh, sizes)
        if ctx.act == "relu":
            # h > 0 exactly where the ReLU passed and dropout kept; kept units were scaled by 1 / (1 - p).
            torch.ops.aten.threshold_backward.grad_input(gh, h, 0, grad_input=gh)
        elif mask is not None:
            gh.mul_(mask)
        if p > 0:
            gh.mul_(1.0 / (1.0 - p))
        ga = gh if ctx.act == "relu" else _activate_backward(gh, a, ctx.act)
        gx = torch.empty_like(xs)
        _expert_linear_backward(xs, ga, w1, gw1, gb1, gx, sizes)
        return gx, None, None, None, gw1, gb1, gw2, gb2


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype an ``nn.Linear`` would compute in here: autocast's when it is on, else the input's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _grouped_mm_ok(xs: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` has a kernel for these operands (CUDA sm90+, bf16, 16-aligned sizes)."""
    return (
        xs.is_cuda
        and _compute_dtype(xs) == torch.bfloat16
        and hasattr(torch, "_grouped_mm")
        and torch.cuda.get_device_capability(xs.device)[0] >= 9
        and all(n % 16 == 0 for n in w.shape[1:])
    )


@dataclass(frozen=True)
class MoEConfig:
    """An MoE block's experts and how they run: E experts of ``d_model -> d_inner -> d_model``, each token routed to
    ``top_k`` of them; see ``MoEFeedForward`` for the meaning of each field. Checked when made, so a bad value
    stops before any weight is drawn."""

    d_model: int
    d_inner: int
    n_experts: int = 8
    top_k: int = 1
    dropout: float = 0.2  # expert dropout
    capacity_factor: float | None = None  # None: every token is processed
    impl: str = "grouped"  # grouped | sequential | dense (see the module's notes)
    activation: str = "relu"  # one of ACTIVATIONS
    bias: bool = True

    def __post_init__(self):
        if not 1 <= self.top_k <= self.n_experts:
            raise ValueError(f"top_k must be between 1 and n_experts ({self.n_experts}), got {self.top_k}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive, got {self.capacity_factor}")
        if self.impl not in ("grouped", "sequential", "dense"):
            raise ValueError(f"impl must be 'grouped', 'sequential' or 'dense', got {self.impl!r}")
        if self.impl == "dense" and self.capacity_factor is not None:
            raise ValueError("impl 'dense' runs every assignment; it has no capacity limit")
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {self.activation!r}")


class MoEFeedForward(Block):
    """E feed-forward experts behind a linear router; each token goes to its top-1 or top-2 experts.

    Top-1 (Switch) scales the expert's output by its router probability; top-2 weights the two outputs by their
    probabilities renormalised to sum to 1. ``dropout`` is the expert dropout, applied to the experts' hidden units
    and to the block's output. Every token is processed unless ``capacity_factor`` is set: then each expert takes at
    most ceil(capacity_factor * tokens * top_k / E) assignments, first choices before second choices and earlier
    tokens first, and an assignment over capacity contributes nothing (the token keeps its residual).

    After each forward, ``balance_loss`` holds the Switch load-balancing loss E * sum_i f_i * P_i (f_i: fraction of
    tokens whose first choice is expert i; P_i: mean router probability of expert i), 1 when balanced and E when
    every token picks the same expert; ``expert_counts`` holds the number of assignments routed to each expert
    (before any capacity limit).

    The defaults are Transformer-XL's expert and block: ReLU experts with biases, residual then post-LayerNorm. The
    gpt backbone's experts take its MLP's shape instead (``activation`` gelu or swiglu, whose ``w1`` stacks gate
    and up projections, 2 * d_inner rows; ``bias=False`` keeps b1, b2 as zero buffers outside the state dict) and
    its pre-norm block, x + moe(norm(x)), with the ``norm`` it is given.
    """

    def __init__(self, cfg: MoEConfig, norm: nn.Module | None = None, pre_norm: bool = False):
        super().__init__()
        d_model, d_inner, n_experts = cfg.d_model, cfg.d_inner, cfg.n_experts
        self.n_experts, self.top_k, self.capacity_factor = n_experts, cfg.top_k, cfg.capacity_factor
        self.impl, self.activation, self.pre_norm = cfg.impl, cfg.activation, pre_norm
        rows = 2 * d_inner if cfg.activation == "swiglu" else d_inner
        self.router = nn.Linear(d_model, n_experts, bias=False)
        # Registered w1, b1, w2, b2: the parameters' order sets the order of sums over them (the gradient norm).
        shapes = {"w1": (n_experts, rows, d_model), "b1": (n_experts, rows), "w2": (n_experts, d_model, d_inner),
                  "b2": (n_experts, d_model)}  # fmt: skip
        for name, shape in shapes.items():
            if cfg.bias or name.startswith("w"):
                self.register_parameter(name, nn.Parameter(torch.empty(shape)))
            else:
                self.register_buffer(name, torch.zeros(shape), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.norm = norm if norm is not None else nn.LayerNorm(d_model)
        self.balance_loss: torch.Tensor | None = None
        self.expert_counts: torch.Tensor | None = None
        self.packed = PackedWeights()
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        """Transformer-XL's initialisation: N(0, std) weights, zero biases, identity LayerNorm."""
        for w in (self.router.weight, self.w1, self.w2):
            nn.init.normal_(w, 0.0, std)
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)
        self.norm.reset_parameters()

    def aux_loss(self) -> torch.Tensor | None:
        return self.balance_loss

    def train(self, mode: bool = True) -> MoEFeedForward:
        self.packed.clear()  # weights may have changed through .data while training
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        self.packed.clear()  # .to(), .cuda(), .half() give the weights new storage: drop the old copies
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor, mem: torch.Tensor | None = None) -> torch.Tensor:
        if self.pre_norm:
            return x + self.drop(self._mix(self.norm(x)))
        return self.norm(x + self.drop(self._mix(x)))

    def _mix(self, x: torch.Tensor) -> torch.Tensor:
        """Every token's gate-weighted sum of its experts' outputs, (batch, len, d_model)."""
        B, T, D = x.shape
        flat = x.reshape(B * T, D)
        if self.impl == "dense":
            return self._dense(flat).view(B, T, D)
        gate, slot, token, counts = self._route(flat)
        run = self._sequential if self.impl == "sequential" else self._experts
        ys = run(flat, token, counts)
        # Back to token order by gathers: each token reads its K expert rows, weighted by its gates.
        gate = gate.to(ys.dtype)[..., None]
        y = ys.index_select(0, slot[0]) * gate[0]
        for k in range(1, self.top_k):
            y = y.addcmul(ys.index_select(0, slot[k]), gate[k])
        return y.view(B, T, D)

    def _route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each token's K gates, and where its K expert outputs will be; the assignments in expert order.

        Returns ``gate`` and ``slot``, both (K, tokens): the gate weights and the row of the experts' output that
        holds each choice; ``token``, the token of every assignment an expert computes, ordered by expert, then
        first choices before second choices, then by token (also the priority order under a capacity limit); and
        the number of those assignments per expert. An assignment over capacity gets gate 0 and any valid slot.
        """
        N, E, K = flat.shape[0], self.n_experts, self.top_k
        probs, gate, choice = self._gates(flat)
        first = torch.bincount(choice[0], minlength=E)
        self._balance(probs, first)

        assigned = choice.reshape(-1)  # all first choices, then all second choices
        counts = first if K == 1 else torch.bincount(assigned, minlength=E)
        self.expert_counts = counts.detach()
        order = assigned.argsort(stable=True)
        row = torch.arange(N * K, device=flat.device)  # the output row of each assignment, in expert order
        kept = order
        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * N * K / E)
            keep = row - (counts.cumsum(0) - counts).repeat_interleave(counts, output_size=N * K) < capacity
            gate = gate.reshape(-1).index_fill(0, order[~keep], 0.0).view(K, N)
            row = (keep.cumsum(0) - 1).clamp_(min=0)
            counts = counts.clamp(max=capacity)
            kept = order[keep]
        slot = torch.empty_like(row).index_copy_(0, order, row).view(K, N)
        return gate, slot, kept % N if K > 1 else kept, counts

    def _gates(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Router probabilities (E, tokens), and each token's K gates and chosen experts, both (K, tokens).

        Router scores are laid out (E, tokens) so that the softmax and the top-k over E experts run along the long
        axis: over the short one they cost as much as the router itself.
        """
        logits = self.router.weight @ flat.t()
        probs = F.softmax(logits, dim=0, dtype=torch.promote_types(logits.dtype, torch.float32))
        if self.top_k == 1:
            gate, choice = probs.max(0, keepdim=True)
        else:
            gate, choice = probs.topk(self.top_k, dim=0)
            gate = gate / gate.sum(0, keepdim=True)
        return probs, gate, choice

    def _balance(self, probs: torch.Tensor, first: torch.Tensor) -> None:
        """Set ``balance_loss`` from the router probabilities and the count of first choices per expert."""
        self.balance_loss = torch.dot(first.to(probs.dtype), probs.mean(1)) * (self.n_experts / probs.shape[1])

    def _dense(self, flat: torch.Tensor) -> torch.Tensor:
        """``impl="dense"``: every expert on every token, summed with each token's gates (see the module's notes).

        Counts come from a one-hot comparison instead of ``bincount``, which graph exporters lack.
        """
        probs, gate, choice = self._gates(flat)
        experts = torch.arange(self.n_experts, device=flat.device)
        chosen = (choice[..., None] == experts).to(gate.dtype)  # (K, tokens, E), one-hot
        self._balance(probs, chosen[0].sum(0))
        self.expert_counts = chosen.sum((0, 1)).long().detach()
        weights = (chosen * gate[..., None]).sum(0)  # (tokens, E): the gate of every chosen expert, else 0
        h = self.drop(activate(torch.matmul(flat, self.w1.transpose(1, 2)) + self.b1[:, None], self.activation))
        ys = torch.matmul(h, self.w2.transpose(1, 2)) + self.b2[:, None]  # (E, tokens, d_model)
        return (weights.t().to(ys.dtype)[..., None] * ys).sum(0)

    def _experts(self, flat: torch.Tensor, token: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts' outputs for the expert-sorted assignments of rows ``token`` of ``flat``."""
        if _grouped_mm_ok(flat, self.w1):
            return self._experts_grouped_mm(flat.index_select(0, token), counts)
        sizes = counts.tolist()
        xs = flat.index_select(0, token)
        inference = not torch.is_grad_enabled() and not self.training
        dtype = _compute_dtype(xs)
        if inference and xs.device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
            return self._experts_packed(xs, sizes)
        params = (p.to(dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        return _Experts.apply(xs.to(dtype), sizes, self.drop.p if self.training else 0.0, self.activation, *params)

    def _experts_packed(self, xs: torch.Tensor, sizes: list[int]) -> torch.Tensor:
        w1, w2 = self.packed.get(self.w1, self.w2)
        b1, b2 = self.b1.unbind(0), self.b2.unbind(0)
        relu = self.activation == "relu"  # fused into the product; other activations run after it
        ys = []
        for e, xe in enumerate(xs.split(sizes)):
            if sizes[e]:
                h = packed_linear(xe, w1[e], b1[e], relu=relu)
                ys.append(packed_linear(h if relu else activate(h, self.activation), w2[e], b2[e]))
        return torch.cat(ys)

    def _experts_grouped_mm(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = counts.cumsum(0).to(torch.int32)
        rows = torch.arange(self.n_experts, device=xs.device).repeat_interleave(counts, output_size=xs.shape[0])
        xs = xs.to(torch.bfloat16)
        w1, b1, w2, b2 = (p.to(torch.bfloat16) for p in (self.w1, self.b1, self.w2, self.b2))
        h = self.drop(activate(torch._grouped_mm(xs, w1.transpose(1, 2), offs=offs) + b1[rows], self.activation))
        return torch._grouped_mm(h, w2.transpose(1, 2), offs=offs) + b2[rows]

    def _sequential(self, flat: torch.Tensor, token: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The paper's implementation: one expert after another, each gathering its own tokens, its own products."""
        sizes = counts.tolist()
        w1, b1, w2, b2 = self.w1.unbind(0), self.b1.unbind(0), self.w2.unbind(0), self.b2.unbind(0)
        ys = [
            F.linear(
                self.drop(activate(F.linear(flat.index_select(0, tok), w1[e], b1[e]), self.activation)), w2[e], b2[e]
            )
            for e, tok in enumerate(token.split(sizes))
        ]
        return torch.cat(ys)
