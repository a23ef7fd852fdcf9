"""Named architectures to compare PLANER against (paper §3.1), all with the baseline's number of blocks.

- ``baseline``: ``attn:H ffl`` repeated n_layer times.
- ``sandwich:K``: Sandwich Transformer ordering s^K (sf)^(n-K) f^K (Press et al.): K attention blocks first, K
  feed-forward blocks last, the same blocks as the baseline reordered.
- ``par``: a PAR Transformer ordering (Mandava et al.): attention only in the lower two thirds, evenly spaced,
  about one attention block in five, feed-forward everywhere else.
- the iso-parameter search space: every MoE option replaced by a dense feed-forward block with as many
  parameters (E x d_inner hidden units), which tells whether PLANER's gain comes from sparsity or from capacity.
"""

from __future__ import annotations

from planer.arch import Arch, BlockSpec
from planer.config import ModelConfig
from planer.errors import PlanerError


def sandwich(n_layer: int, n_head: int, k: int) -> Arch:
    if not 0 <= k <= n_layer:
        raise PlanerError(f"sandwich:K needs 0 <= K <= n_layer ({n_layer}), got {k}")
    s, f = BlockSpec("attn", heads=n_head), BlockSpec("ffl")
    return Arch((s,) * k + (s, f) * (n_layer - k) + (f,) * k)


def sandwich_sweep(n_layer: int) -> list[int]:
    """The K values ``sandwich`` chooses among on the valid split: 1 .. n_layer/3 (1 and 2 at least).

    K = n_layer - 1 orders the blocks exactly as K = n_layer does, so K stops below n_layer.
    """
    return list(range(1, max(1, min(n_layer - 1, max(2, n_layer // 3))) + 1))


def par(n_layer: int, n_head: int) -> Arch:
    blocks = 2 * n_layer
    n_attn = max(1, round(blocks / 5))
    lower = max(n_attn, (2 * blocks) // 3)
    attn_at = {round(i * lower / n_attn) for i in range(n_attn)}
    return Arch(tuple(BlockSpec("attn", heads=n_head) if i in attn_at else BlockSpec("ffl") for i in range(blocks)))


def named_arch(name: str, cfg: ModelConfig) -> Arch | None:
    """The named design, or None when ``name`` names none (it is then a list of block specs)."""
    if name == "baseline":
        return Arch.baseline(cfg.n_layer, cfg.n_head)
    if name == "par":
        return par(cfg.n_layer, cfg.n_head)
    if name.startswith("sandwich:"):
        try:
            k = int(name.split(":", 1)[1])
        except ValueError:
            raise PlanerError(f"sandwich:K needs an integer K, got '{name}'") from None
        return sandwich(cfg.n_layer, cfg.n_head, k)
    return None


def iso_space(space: list[str], n_experts: int) -> list[str]:
    """``space`` with every MoE option replaced by ``ffl:xE`` (E its expert count), each option once."""
    out: list[str] = []
    for text in space:
        spec = BlockSpec.parse(text)
        if spec.kind == "moe":
            spec = BlockSpec("ffl", width=spec.experts or n_experts)
        if str(spec) not in out:
            out.append(str(spec))
    return out
