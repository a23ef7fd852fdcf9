"""Corpora: vocabularies, splits, and the Transformer-XL ordered segment iterator.

The vocabulary comes from the training split alone, with ``<unk>`` standing for anything never seen there, so
evaluation on new text counts unknown symbols instead of failing. ``data.min_count`` leaves out symbols rarer than
that in training too, as WikiText's own vocabulary was cut (at 3, over its whole corpus): on WikiText-2 at word
level the output layer was half of the default model's latency, spent mostly on rare words. Word-level text is
split on whitespace with ``<eos>`` at every line end, as Transformer-XL does for WikiText (whose own ``<unk>`` maps
onto ours).
With ``data.tokenizer`` a Hugging Face ``tokenizer.json`` is the vocabulary instead (``TokenizerVocab``), as an
imported model needs: its ids are the model's, and no text is ever unknown to it.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from planer.config import DataConfig
from planer.errors import PlanerError

UNK, EOS = "<unk>", "<eos>"


def read_text(path: str | Path) -> str:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:  # the absolute path: which folder a relative one was read from is the usual question
        raise PlanerError(f"data file not found: {path.absolute()}") from None
    except OSError as e:
        raise PlanerError(f"cannot read data file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise PlanerError(f"data file {path} is not UTF-8 text (bad byte at offset {e.start})") from None
    if "\x00" in text:
        raise PlanerError(f"data file {path} looks binary (it contains NUL bytes)")
    if not text.strip():
        raise PlanerError(f"data file {path} is empty")
    return text


def tokenize(text: str, level: str) -> list[str]:
    if level == "char":
        return list(text)
    tokens = []
    for line in text.splitlines():
        tokens.extend(line.split())
        tokens.append(EOS)
    return tokens


@dataclass
class Vocab:
    symbols: list[str]
    level: str

    def __post_init__(self):
        self.index = {s: i for i, s in enumerate(self.symbols)}
        self.unk = self.index[UNK]

    @staticmethod
    def build(tokens: list[str], level: str, min_count: int = 1) -> Vocab:
        """Specials first, then the symbols seen at least ``min_count`` times by falling frequency (ties in order of
        first appearance)."""
        specials = [UNK] + ([EOS] if level == "word" else [])
        counts = Counter(tokens)
        ordered = sorted((s for s in counts if counts[s] >= min_count), key=lambda s: -counts[s])
        return Vocab(specials + [s for s in ordered if s not in specials], level)

    def __len__(self) -> int:
        return len(self.symbols)

    def encode(self, tokens: list[str]) -> tuple[torch.Tensor, int]:
        """Token ids and the number of tokens outside the vocabulary, now <unk> (the corpus's own <unk>s excluded)."""
        unk, index = self.unk, self.index
        ids = [index.get(t, unk) for t in tokens]
        unseen = sum(1 for t in tokens if t not in index)
        return torch.tensor(ids, dtype=torch.long), unseen

    def decode(self, ids) -> str:
        sep = "" if self.level == "char" else " "
        return sep.join(self.symbols[i] for i in ids)

    def tokenize(self, text: str) -> list[str]:
        return tokenize(text, self.level)


class TokenizerVocab:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library) with the interface of ``Vocab``.

    ``tokenize`` gives ids already, so ``encode`` only makes them a tensor; nothing falls back to an unknown token.
    Its size is one more than its largest id, the number of embedding rows a model needs for it.
    """

    level = "tokenizer"
    FILE = "tokenizer.json"

    def __init__(self, path: str | Path):
        path = Path(path)
        self.path = path / self.FILE if path.is_dir() else path
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise PlanerError("a tokenizer.json needs the 'tokenizers' package (pip install 'planer[hf]')") from None
        if not self.path.is_file():
            raise PlanerError(f"tokenizer not found: {self.path}")
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path))
        except Exception as e:  # the library raises plain Exceptions for unreadable or malformed files
            raise PlanerError(f"{self.path} is not a readable tokenizer.json: {str(e).splitlines()[0]}") from None
        self.size = max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def __len__(self) -> int:
        return self.size

    @property
    def symbols(self) -> list[str | None]:
        return [self.tokenizer.id_to_token(i) for i in range(self.size)]

    def tokenize(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode(self, ids: list[int]) -> tuple[torch.Tensor, int]:
        return torch.tensor(ids, dtype=torch.long), 0

    def decode(self, ids) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)


@dataclass
class Corpus:
    vocab: Vocab
    train: torch.Tensor
    valid: torch.Tensor
    test: torch.Tensor
    unseen: dict[str, int]  # tokens per split outside the vocabulary (unseen or rarer than min_count), now <unk>

    def split(self, name: str) -> torch.Tensor:
        if name not in ("train", "valid", "test"):
            raise PlanerError(f"unknown split '{name}': expected train, valid or test")
        return getattr(self, name)


def load_corpus(cfg: DataConfig, vocab: Vocab | TokenizerVocab | None = None) -> Corpus:
    """Read the corpus; with no vocab given, take data.tokenizer's, or build one from the training split."""
    if vocab is None and cfg.tokenizer:
        vocab = TokenizerVocab(cfg.tokenizer)
    cut = vocab.tokenize if isinstance(vocab, TokenizerVocab) else lambda text: tokenize(text, cfg.level)
    if cfg.train:
        if not (cfg.valid and cfg.test):
            raise PlanerError("data.train needs data.valid and data.test too")
        parts = [cut(read_text(p)) for p in (cfg.train, cfg.valid, cfg.test)]
    else:
        tokens = cut(read_text(cfg.path))
        a, b = int(len(tokens) * 0.9), int(len(tokens) * 0.95)
        parts = [tokens[:a], tokens[a:b], tokens[b:]]
    if vocab is None:
        vocab = Vocab.build(parts[0], cfg.level, cfg.min_count)
    (train, unk_train), (valid, unk_valid), (test, unk_test) = (vocab.encode(p) for p in parts)
    source = cfg.train or cfg.path
    for name, ids in (("training", train), ("validation", valid), ("test", test)):
        if len(ids) < 2:
            raise PlanerError(f"data file {source}: the {name} split has {len(ids)} tokens, too few to score")
    return Corpus(vocab, train, valid, test, {"train": unk_train, "valid": unk_valid, "test": unk_test})


def check_same_vocab(vocab, corpus_vocab, source: str) -> None:
    """A model another training made must predict this corpus's symbols, or its losses and logits mean nothing here."""
    if vocab.symbols != corpus_vocab.symbols:
        raise PlanerError(f"{source} was trained on another vocabulary than this config's data")


def stream_share(batch_size: int, rank: int, world: int) -> tuple[int, int]:
    """The streams [lo, hi) of a batch that ``rank`` of ``world`` processes holds; sizes differ by at most one."""
    return rank * batch_size // world, (rank + 1) * batch_size // world


class Segment(NamedTuple):
    position: int  # how many segments were served before this one (it is segment position % len(stream))
    x: torch.Tensor  # (streams, <= tgt_len) inputs
    y: torch.Tensor  # (streams, <= tgt_len) targets, x shifted by one
    reset: bool  # this segment does not continue the previous one: memory must start afresh


class Segments:
    """The token stream cut into ``batch_size`` parallel streams, served as consecutive (x, y) segments.

    Row b of segment k continues row b of segment k-1, so a model's memory carries context across segments.
    With ``drop_last`` the final, shorter segment is left out (training wants equal shapes); without it every
    token but the first of each stream is a target exactly once (evaluation). ``offset`` starts the first
    segment that many tokens into every stream (evaluation warms the memory on them first).

    ``rank`` and ``world`` keep only this process's share of the streams under data parallelism: the shares of
    all ranks together are exactly the single-process batch (sizes differ by at most one stream).
    """

    def __init__(
        self,
        ids: torch.Tensor,
        batch_size: int,
        tgt_len: int,
        drop_last: bool = True,
        rank: int = 0,
        world: int = 1,
        offset: int = 0,
    ):
        n = len(ids) // batch_size
        if n < 2 or (drop_last and n < tgt_len + 1):
            need = batch_size * ((tgt_len if drop_last else 1) + 1)
            raise PlanerError(
                f"{len(ids)} tokens are fewer than one segment needs ({need} = batch {batch_size} x "
                f"{'(tgt_len ' + str(tgt_len) + ' + 1)' if drop_last else '2'})"
            )
        if world > batch_size:
            raise PlanerError(
                f"{world} processes cannot share a batch of {batch_size} streams; "
                "use a batch size of at least the number of processes"
            )
        lo, hi = stream_share(batch_size, rank, world)
        self.data = ids[: n * batch_size].view(batch_size, n)[lo:hi]
        self.share = (hi - lo) / batch_size  # this rank's fraction of every step's tokens
        self.tgt_len = tgt_len
        stop = n - 1
        self.starts = list(range(offset, stop - tgt_len + 1 if drop_last else stop, tgt_len))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        i = self.starts[k]
        j = min(i + self.tgt_len, self.data.size(1) - 1)
        return self.data[:, i:j], self.data[:, i + 1 : j + 1]

    def walk(self, start: int, steps: int):
        """``steps`` segments from position ``start``, going round the stream as often as needed.

        Every walk over the data (training, the search's weight and architecture steps, evaluation) goes through
        here, so all of them reset memory where it must be: at segment 0, which does not continue the stream's
        last segment.
        """
        for position in range(start, start + steps):
            k = position % len(self)
            yield Segment(position, *self[k], k == 0)
