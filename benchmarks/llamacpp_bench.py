"""Speed of two GGUF files (``planer export --gguf``: a found model and its baseline) in llama.cpp, and whether
llama.cpp computes what planer does.

    pip install llama-cpp-python   # not a planer dependency
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --found found.gguf --baseline baseline.gguf \\
        [--prompt 512] [--decode 64] [--rounds 20] [--threads 2]
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --check-logits --run runs/smol/planer-t0.50 --gguf found.gguf

Timing: each file loaded once (``llama_cpp.Llama``, ``--threads`` threads, a context of prompt + decode
tokens). Every round runs both, in a new random order: the cache cleared, a prefill of the same ``--prompt``
random token ids, then ``--decode`` steps of one given random token each. After one warm-up round the
table gives the medians over ``--rounds`` rounds of milliseconds per token and tokens per second, for prefill and
decode, and the found model's speed-up over the baseline.

``--check-logits``: llama.cpp's logits for every position of a prompt (``logits_all=True``) against planer's
for the checkpoint the file was exported from (the largest absolute difference), and 16 greedy tokens of each
from the same prompt (how many agree, in order).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

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


def report(ms: dict[str, np.ndarray]) -> None:
    """Medians as ms per token and tokens per second, and the found model's speed-ups."""
    medians = {name: np.median(rows, axis=0) for name, rows in ms.items()}
    print(f"{'model':10} {'prefill ms/tok':>15} {'prefill tok/s':>14} {'decode ms/tok':>14} {'decode tok/s':>13}")
    for name, (prefill, decode) in medians.items():
        print(f"{name:10} {prefill:15.3f} {1000 / prefill:14.1f} {decode:14.3f} {1000 / decode:13.1f}")
    speedup = medians["baseline"] / medians["found"]
    print(f"speed-up of found over baseline: prefill {speedup[0]:.2f}x, decode {speedup[1]:.2f}x")


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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--found", type=Path, help="the found model's GGUF file")
    p.add_argument("--baseline", type=Path, help="the baseline's GGUF file")
    p.add_argument("--prompt", type=int, default=512, help="prefill tokens (default 512)")
    p.add_argument("--decode", type=int, default=64, help="decode steps per round (default 64)")
    p.add_argument("--rounds", type=int, default=20, help="timed rounds (default 20)")
    p.add_argument("--threads", type=int, default=2, help="llama.cpp threads (default 2)")
    p.add_argument("--check-logits", action="store_true", help="compare --gguf's logits with --run's")
    p.add_argument("--run", type=Path, help="with --check-logits: the planer checkpoint the file came from")
    p.add_argument("--gguf", type=Path, help="with --check-logits: its GGUF file")
    args = p.parse_args()
    if args.check_logits:
        if not (args.run and args.gguf):
            p.error("--check-logits needs --run and --gguf")
        check_logits(args.run, args.gguf, args.threads, min(args.prompt, 128))
        return
    if not (args.found and args.baseline) or args.rounds < 1 or args.decode < 1 or args.prompt < 1:
        p.error("timing needs --found and --baseline, and positive --prompt, --decode and --rounds")
    report(timed({"found": args.found, "baseline": args.baseline}, args))


if __name__ == "__main__":
    main()
