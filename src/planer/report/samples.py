"""A short sample of generated text per model, for the report: seeded, drawn once, kept in the model's folder.

Numbers say how far a smaller model is from the baseline; a few lines of its text say what that means. Every model
continues the same prompt, the first whole line of the valid split, with ``planer.evaluation.generate.generate`` at
``planer generate``'s defaults (seed 0, temperature 1, every token), so the command the report prints gives the
same text. The sample goes to ``sample.json`` beside the weights with their checksum: making the report again
reads it back instead of sampling again, and a model trained again (``--force``) is sampled afresh.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from planer import load
from planer.config import config_from_dict
from planer.errors import PlanerError
from planer.evaluation.generate import generate
from planer.io.checkpoint import WEIGHTS, atomic_write_text, file_digest, load_meta, read_json_object, read_vocab
from planer.io.data import EOS, load_corpus

SAMPLE_FILE = "sample.json"
TOKENS = 80  # new tokens after the prompt
SEED = 0  # planer generate's default, like the temperature (1) and top-k (0: every token) used here
PROMPT_TOKENS = {"char": 40}  # at most, from the line the prompt is taken from; 10 for words and subwords
SCAN = 2000  # tokens of the valid split searched for a whole line


def prompt_text(model_dir: Path) -> str:
    """The prompt: the first whole, non-trivial line of ``model_dir``'s valid split (the split starts mid-line),
    cut to a few tokens; a vocabulary without a line-end symbol (a tokenizer's) takes the split's first tokens."""
    meta = load_meta(model_dir)
    vocab = read_vocab(meta["vocab"], model_dir)
    ids = load_corpus(config_from_dict(meta["config"]).data, vocab).valid[:SCAN].tolist()
    ends = {i for i, s in enumerate(vocab.symbols) if s in ("\n", EOS)}
    lines, line = [], []
    for t in ids:
        if t in ends:
            lines.append(line)
            line = []
        else:
            line.append(t)
    whole = [kept for kept in lines[1:] if len(kept) >= 3]
    return vocab.decode((whole[0] if whole else ids)[: PROMPT_TOKENS.get(vocab.level, 10)]).strip()


def model_sample(model_dir: Path, prompt: Callable[[], str]) -> dict:
    """``model_dir``'s sample: the one in its sample.json while that was drawn from these weights, else a new one
    (``prompt()`` is only asked then, so a report made again needs no data files)."""
    if not (model_dir / WEIGHTS).is_file():
        raise PlanerError(f"{model_dir} has no {WEIGHTS}")
    digest = file_digest(model_dir / WEIGHTS)
    saved = read_json_object(model_dir / SAMPLE_FILE)
    if saved.get("weights_sha256") == digest and (saved.get("tokens"), saved.get("seed")) == (TOKENS, SEED):
        return saved
    text = prompt()
    with torch.random.fork_rng(devices=[]):  # building the model draws initial weights: leave the caller's RNG be
        model, vocab = load(model_dir)
    ids = vocab.encode(vocab.tokenize(text))[0].tolist()  # as planer generate --prompt reads it
    new = generate(model, ids, TOKENS, seed=SEED)
    record = {"prompt": text, "tokens": TOKENS, "seed": SEED, "text": vocab.decode(ids + new), "weights_sha256": digest}
    atomic_write_text(model_dir / SAMPLE_FILE, json.dumps(record, indent=1) + "\n")
    return record
