"""Architectures as sequences of block specs.

A Transformer-XL here is a sequence of blocks, not of layers: the baseline is ``attn:8 ffl`` repeated n_layer
times, and PLANER replaces each position with one option of its search space. A spec string names one block:

    skip           identity
    attn:H         relative-position attention with H heads of d_head = d_model / n_head
    attn:H/kvK     (gpt backbone) the same with K key/value heads, each read by H / K query heads: a trained
                   block's key/value heads merged group by group, as grouped-query attention is made from heads
    ffl            position-wise feed-forward, d_model -> d_inner -> d_model
    ffl:xM         the same with M * d_inner hidden units (the iso-parameter FFL)
    ffl:N          the same with N hidden units (a narrowed FFL keeps the N most important of a trained one's)
    moe:topK       mixture of experts of FFL shape, K in {1, 2}, the config's number of experts
    moe:topK:eE    the same with E experts
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from planer.errors import PlanerError

KINDS = ("skip", "attn", "ffl", "moe")


@dataclass(frozen=True)
class BlockSpec:
    kind: str
    heads: int = 0  # attn
    kv: int = 0  # attn: key/value heads (0: the model's grouping, see models/gpt/model.py's kv_heads)
    width: int = 1  # ffl: multiple of d_inner
    neurons: int = 0  # ffl: hidden units instead of a multiple of d_inner (0: width * d_inner)
    top_k: int = 0  # moe
    experts: int = 0  # moe; 0 means the model config's n_experts

    @staticmethod
    def parse(text: str) -> BlockSpec:
        parts = text.strip().split(":")
        kind, args = parts[0], parts[1:]
        try:
            if kind == "skip" and not args:
                return BlockSpec("skip")
            if kind == "attn" and len(args) == 1:
                heads, _, kv = args[0].partition("/kv")
                spec = BlockSpec("attn", heads=int(heads), kv=int(kv) if kv else 0)
                if spec.heads > 0 and (not kv or (spec.kv > 0 and spec.heads % spec.kv == 0)):
                    return spec
            if kind == "ffl" and not args:
                return BlockSpec("ffl")
            if kind == "ffl" and len(args) == 1 and args[0].startswith("x"):
                spec = BlockSpec("ffl", width=int(args[0][1:]))
                if spec.width > 0:
                    return spec
            if kind == "ffl" and len(args) == 1 and args[0].isdigit():
                spec = BlockSpec("ffl", neurons=int(args[0]))
                if spec.neurons > 0:
                    return spec
            if kind == "moe" and 1 <= len(args) <= 2 and args[0] in ("top1", "top2"):
                experts = 0
                if len(args) == 2:
                    if not args[1].startswith("e"):
                        raise ValueError
                    experts = int(args[1][1:])
                    if experts < 2:
                        raise ValueError
                top_k = int(args[0][3:])
                if experts and top_k > experts:
                    raise ValueError
                return BlockSpec("moe", top_k=top_k, experts=experts)
        except ValueError:
            pass
        raise PlanerError(
            f"unknown block '{text}': expected skip, attn:H, attn:H/kvK (K dividing H), ffl, ffl:xM, ffl:N, moe:top1, "
            "moe:top2 or moe:topK:eE"
        )

    def __str__(self) -> str:
        if self.kind == "attn":
            return f"attn:{self.heads}" + (f"/kv{self.kv}" if self.kv else "")
        if self.kind == "ffl":
            return f"ffl:{self.neurons}" if self.neurons else "ffl" if self.width == 1 else f"ffl:x{self.width}"
        if self.kind == "moe":
            return f"moe:top{self.top_k}" + (f":e{self.experts}" if self.experts else "")
        return self.kind

    def hidden(self, d_inner: int) -> int:
        """A feed-forward block's hidden units in a model whose ``ffl`` has ``d_inner``."""
        return self.neurons or d_inner * self.width


@dataclass(frozen=True)
class Arch:
    blocks: tuple[BlockSpec, ...]

    @staticmethod
    def parse(text: str) -> Arch:
        """A whitespace- or comma-separated list of specs."""
        items = text.replace(",", " ").split()
        if not items:
            raise PlanerError("an architecture needs at least one block")
        return Arch(tuple(BlockSpec.parse(t) for t in items))

    @staticmethod
    def baseline(n_layer: int, n_head: int) -> Arch:
        return Arch((BlockSpec("attn", heads=n_head), BlockSpec("ffl")) * n_layer)

    @staticmethod
    def load(path: str | Path) -> Arch:
        """Read arch.json (``{"arch": [...]}``) or a plain text file of specs."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise PlanerError(f"cannot read architecture file {path}: {e.strerror}") from None
        except UnicodeDecodeError as e:
            raise PlanerError(f"architecture file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
        if path.suffix == ".json":
            try:
                data = json.loads(text)
                specs = data["arch"]
                if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
                    raise TypeError
            except (json.JSONDecodeError, KeyError, TypeError):
                raise PlanerError(f"{path}: expected a JSON object with an 'arch' list of block specs") from None
            if not specs:
                raise PlanerError(f"{path}: the architecture is empty")
            return Arch(tuple(BlockSpec.parse(s) for s in specs))
        return Arch.parse(text)

    def specs(self) -> list[str]:
        return [str(b) for b in self.blocks]

    def __str__(self) -> str:
        return " ".join(self.specs())

    def __len__(self) -> int:
        return len(self.blocks)

    def __iter__(self):
        return iter(self.blocks)

    def short(self) -> str:
        """A compact form for tables: s=skip, aH=attention, aHkK=attention over K key/value heads, f=ffl, fxM=wide
        ffl, fN=ffl of N units, m1/m2=moe."""
        codes = {
            "skip": lambda b: "s",
            "attn": lambda b: f"a{b.heads}" + (f"k{b.kv}" if b.kv else ""),
            "ffl": lambda b: f"f{b.neurons}" if b.neurons else "f" if b.width == 1 else f"fx{b.width}",
            "moe": lambda b: f"m{b.top_k}" + (f"e{b.experts}" if b.experts else ""),
        }
        return "".join(codes[b.kind](b) for b in self.blocks)
