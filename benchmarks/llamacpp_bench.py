"""Speed of GGUF files (``planer export --gguf``: found models or rivals, and their baseline) in llama.cpp, and
whether llama.cpp computes what planer does.

    pip install 'planer[llamacpp]'   # llama-cpp-python, an optional extra
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --found found.gguf [rival.gguf ...] --baseline base.gguf \\
        [--prompt 512] [--decode 64] [--rounds 20] [--threads 2] [--record runs/smol]
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --check-logits --run runs/smol/planer-t0.50 --gguf found.gguf
    PYTHONPATH=src python benchmarks/llamacpp_bench.py --perplexity --run runs/smol/planer-t0.50 --gguf found.gguf

Timing: each file loaded once (``llama_cpp.Llama``, ``--threads`` threads, a context of prompt + decode
tokens). Every round runs them all, in a new random order: the cache cleared, a prefill of the same ``--prompt``
random token ids, then ``--decode`` steps of one given random token each. After one warm-up round the
table gives the medians over ``--rounds`` rounds of milliseconds per token and tokens per second, for prefill and
decode, and each model's speed-up over the baseline (named by their file names; see planer.latency.llamacpp).
``--record RUN_DIR`` keeps them in RUN_DIR/llamacpp.json, where ``planer report RUN_DIR`` shows them beside
PyTorch's speed-ups of the run's models of the same names (export each as ``RUN_DIR/NAME`` -> ``NAME.gguf``).

``--check-logits``: llama.cpp's logits for every position of a prompt (``logits_all=True``) against planer's
for the checkpoint the file was exported from (the largest absolute difference), and 16 greedy tokens of each
from the same prompt (how many agree, in order).

``--perplexity``: the file's perplexity in llama.cpp on ``--split`` (default test) of the checkpoint's data,
scoring exactly the tokens planer's evaluation scores (the same sliding windows, eval.tgt_len and eval.stride),
beside planer's own figure for the checkpoint (its eval.json), so a quantized file's cost shows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from planer.errors import PlanerError
from planer.latency.llamacpp import load, record, time_files

GREEDY = 16  # tokens each side decodes for --check-logits


def report(result: dict) -> None:
    """A Markdown table of medians as ms per token and tokens per second, and speed-ups over the baseline."""
    print(
        f"{result['runtime']}, {result['threads']} threads, batch 1: prefill of {result['prompt']} tokens, then "
        f"{result['decode']} decode steps; medians of {result['rounds']} interleaved rounds\n"
    )
    print(
        "| model | prefill ms/token | prefill tokens/s | decode ms/token | decode tokens/s | prefill speed-up | "
        "decode speed-up |\n|---|---|---|---|---|---|---|"
    )
    for name, m in result["models"].items():
        pre, dec = m["prefill_ms"], m["decode_ms"]
        print(
            f"| {name} | {pre:.3f} | {1000 / pre:.1f} | {dec:.3f} | {1000 / dec:.1f} | {m['prefill_speedup']:.2f}x | "
            f"{m['decode_speedup']:.2f}x |"
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
    p.add_argument("--record", type=Path, help="a run directory: keep the timings in its llamacpp.json for its report")
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
    result = time_files(files, args.baseline.stem, args.prompt, args.decode, args.rounds, args.threads)
    report(result)
    if args.record:
        print(f"wrote {record(args.record, result)}")


if __name__ == "__main__":
    try:
        main()
    except PlanerError as e:
        sys.exit(f"llamacpp_bench.py: {e}")
