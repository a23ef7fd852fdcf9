"""Speed of GGUF files (``planer export --gguf``: found models or rivals, and their baseline) in llama.cpp, and
whether llama.cpp computes what planer does.

    pip install llama-cpp-python   # not a planer dependency
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --found found.gguf [rival.gguf ...] --baseline base.gguf \\
        [--prompt 512] [--decode 64] [--rounds 20] [--threads 2]
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --check-logits --run runs/smol/planer-t0.50 --gguf found.gguf
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --perplexity --run runs/smol/planer-t0.50 --gguf found.gguf

Timing: each file loaded once (``llama_cpp.Llama``, ``--threads`` threads, a context of prompt + decode
tokens). Every round runs them all, in a new random order: the cache cleared, a prefill of the same ``--prompt``
random token ids, then ``--decode`` steps of one given random token each. After one warm-up round the
table gives the medians over ``--rounds`` rounds of milliseconds per token and tokens per second, for prefill and
decode, and each model's speed-up over the baseline (named by their file names).

``--check-logits``: llama.cpp's logits for every position of a prompt (``logits_all=True``) against planer's
for the checkpoint the file was exported from (the largest absolute difference), and 16 greedy tokens of each
from the same prompt (how many agree, in order).

``--perplexity``: the file's perplexity in llama.cpp on ``--split`` (default test) of the checkpoint's data,
scoring exactly the tokens planer's evaluation scores (the same sliding windows, eval.tgt_len and eval.stride),
beside planer's own figure for the checkpoint (its eval.json), so a quantized file's cost shows.
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

GREEDY = 16  # tokens each side decodes for --check-logits


def load(path: Path, ctx: int, threads: int, logits_all: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; one clear line and exit 2 where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        sys.exit("llamacpp_bench.py needs llama-cpp-python: pip install llama-cpp-python")
    return llama_cpp.Llama(str(path), n_threads=threads, n_ctx=ctx, logits_all=logits_all, verbose=False)


def one_round(llm, prompt: list[int], steps: list[int]) -> tuple[float, float]:
    """Milliseconds per token of a prefill of ``prompt`` and of decoding ``steps`` one token at a time after it
    (given tokens, not sampled ones: without logits_all, llama-cpp-python 0.3.36 keeps no logits to sample from,
    and a step's cost does not depend on its token)."""
    llm.reset()
    start = time.perf_counter()
    llm.eval(prompt)
    prefill = (time.perf_counter() - start) * 1000 / len(prompt)
    start = time.perf_counter()
    for token in steps:
        llm.eval([token])
    return prefill, (time.perf_counter() - start) * 1000 / len(steps)


def timed(files: dict[str, Path], args) -> dict[str, np.ndarray]:
    """Per round and file, (prefill, decode) milliseconds per token; rounds interleaved in random order."""
    models = {name: load(path, args.prompt + args.decode, args.threads) for name, path in files.items()}
    rng = random.Random(0)
    vocab = min(m.n_vocab() for m in models.values())
    prompt = [rng.randrange(vocab) for _ in range(args.prompt)]
    steps = [rng.randrange(vocab) for _ in range(args.decode)]
    ms = {name: [] for name in files}
    for r in range(args.rounds + 1):  # round 0 warms up
        for name in rng.sample(list(files), len(files)):
            result = one_round(models[name], prompt, steps)
            if r:
                ms[name].append(result)
    return {name: np.array(rows) for name, rows in ms.items()}  # (rounds, 2)


def report(ms: dict[str, np.ndarray], baseline: str, args) -> None:
    """A Markdown table of medians as ms per token and tokens per second, and speed-ups over ``baseline``."""
    import llama_cpp

    medians = {name: np.median(rows, axis=0) for name, rows in ms.items()}
    print(
        f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), {args.threads} threads, batch 1: prefill of "
        f"{args.prompt} tokens, then {args.decode} decode steps; medians of {args.rounds} interleaved rounds\n"
    )
    print(
        "| model | prefill ms/token | prefill tokens/s | decode ms/token | decode tokens/s | prefill speed-up | "
        "decode speed-up |\n|---|---|---|---|---|---|---|"
    )
    for name, (prefill, decode) in medians.items():
        up = medians[baseline] / medians[name]
        print(
            f"| {name} | {prefill:.3f} | {1000 / prefill:.1f} | {decode:.3f} | {1000 / decode:.1f} | {up[0]:.2f}x | "
            f"{up[1]:.2f}x |"
        )


def check_logits(run: Path, path: Path, threads: int, length: int) -> None:
    """llama.cpp's logits against planer's on a prompt, and their greedy continuations."""
    from planer.evaluation.generate import generate
    from planer.io.checkpoint import load_checkpoint

    model, _, vocab = load_checkpoint(run)
    model.eval()
    text = (Path(__file__).resolve().parents[1] / "data" / "tinyshakespeare.txt").read_text()[:4000]
    prompt = vocab.tokenize(text)[:length]
    llm = load(path, length + GREEDY, threads, logits_all=True)
    llm.eval(prompt)
    theirs = np.array(llm.scores[: len(prompt)])
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0].numpy()
    print(f"max |llama.cpp - planer| over {len(prompt)} positions' logits: {np.abs(theirs - ours).max():.3e}")
    expected = generate(model, prompt, GREEDY, temperature=0)
    got = []
    for _ in range(GREEDY):
        got.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([got[-1]])
    agree = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), GREEDY)
    print(f"greedy tokens: the first {agree} of {GREEDY} agree (llama.cpp {got}, planer {expected})")


def perplexity(run: Path, path: Path, threads: int, split: str) -> None:
    """llama.cpp's perplexity of ``path`` over planer's scoring windows of ``split``, and planer's of ``run``."""
    import json

    from planer.evaluation.evaluate import sliding_windows
    from planer.io.checkpoint import load_checkpoint
    from planer.io.data import load_corpus

    _, cfg, vocab = load_checkpoint(run)
    ids = load_corpus(cfg.data, vocab).split(split).tolist()
    window = cfg.eval.tgt_len or cfg.model.context
    L, starts, first = sliding_windows(len(ids), window, cfg.eval.stride or max(1, window // 2))
    llm = load(path, L, threads, logits_all=True)
    total, count = 0.0, 0
    for start, skip in zip(tqdm(starts, desc="llama.cpp windows"), first):
        chunk = ids[start : start + L + 1]
        llm.reset()
        llm.eval(chunk[:-1])
        logits = torch.from_numpy(np.array(llm.scores[:L], dtype=np.float64))
        nll = -torch.log_softmax(logits, -1)[torch.arange(L), torch.tensor(chunk[1:])]
        total, count = total + nll[skip:].sum().item(), count + L - skip
    ours = run / "eval.json"
    planer = json.loads(ours.read_text()).get(split, {}).get("ppl") if ours.is_file() else None
    said = f"planer's eval.json: {planer:.2f}" if planer else "planer's: no eval.json"
    print(f"{split} perplexity over {count} tokens: llama.cpp {np.exp(total / count):.2f} ({path.name}); {said}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--found", type=Path, nargs="+", help="GGUF files to time against the baseline")
    p.add_argument("--baseline", type=Path, help="the baseline's GGUF file")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens (default 512)")
    p.add_argument("--decode", type=int, default=64, help="decode steps per round (default 64)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--check-logits", action="store_true", help="compare --gguf's logits with --run's")
    p.add_argument("--perplexity", action="store_true", help="--gguf's perplexity on --run's data in llama.cpp")
    p.add_argument("--split", default="test", choices=["valid", "test"], help="with --perplexity (default test)")
    p.add_argument("--run", type=Path, help="with --check-logits or --perplexity: the checkpoint the file came from")
    p.add_argument("--gguf", type=Path, help="with --check-logits or --perplexity: its GGUF file")
    args = p.parse_args()
    if args.perplexity:
        if not (args.run and args.gguf):
            p.error("--perplexity needs --run and --gguf")
        perplexity(args.run, args.gguf, args.threads, args.split)
        return
    if args.check_logits:
        if not (args.run and args.gguf):
            p.error("--check-logits needs --run and --gguf")
        check_logits(args.run, args.gguf, args.threads, min(args.prompt, 128))
        return
    if not (args.found and args.baseline) or args.rounds < 1 or args.decode < 1 or args.prompt < 1:
        p.error("timing needs --found and --baseline, and positive --prompt, --decode and --rounds")
    files = {path.stem: path for path in [*args.found, args.baseline]}
    if len(files) < len(args.found) + 1:
        p.error("the files need different names: the table names each model by its file's")
    report(timed(files, args), args.baseline.stem, args)


if __name__ == "__main__":
    main()
