"""Latency in llama.cpp (llama-cpp-python, the optional ``planer[llamacpp]`` extra): where CPU users run a model.

A found model's worth on a CPU is its speed there, which PyTorch's table only estimates: llama.cpp's 4-bit kernels
and fused attention price blocks differently. Files are the ``planer export --gguf`` ones, each loaded once. Every
round runs them all in a new random order (load and clock drift hit all alike): the cache cleared, a prefill of the
same random prompt, then decode steps of one given token each. Round 0 warms up; medians of the rest.
``llamacpp.json`` in a run directory holds one such measurement, which ``planer report`` shows beside PyTorch's.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
from tqdm import tqdm

from planer.errors import PlanerError
from planer.io.checkpoint import atomic_write_text

RECORD = "llamacpp.json"


def load(path: Path, ctx: int, threads: int, logits_all: bool = False):
    """A ``llama_cpp.Llama`` for ``path``; one clear line where llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        raise PlanerError("timing in llama.cpp needs llama-cpp-python: pip install 'planer[llamacpp]'") from None
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


def time_files(files: dict[str, Path], baseline: str, prompt: int, decode: int, rounds: int, threads: int) -> dict:
    """Every file of ``files`` (by name) timed in interleaved rounds; medians of prefill and decode ms per token,
    and each one's speed-ups over the file named ``baseline``, with what was timed (the form of llamacpp.json)."""
    import llama_cpp

    models = {name: load(path, prompt + decode, threads) for name, path in files.items()}
    rng = random.Random(0)
    vocab = min(m.n_vocab() for m in models.values())
    prompt_ids = [rng.randrange(vocab) for _ in range(prompt)]
    steps = [rng.randrange(vocab) for _ in range(decode)]
    ms = {name: [] for name in files}
    for r in tqdm(range(rounds + 1), desc="llama.cpp rounds"):  # round 0 warms up
        for name in rng.sample(list(files), len(files)):
            result = one_round(models[name], prompt_ids, steps)
            if r:
                ms[name].append(result)
    medians = {name: np.median(np.array(rows), axis=0) for name, rows in ms.items()}
    return {
        "runtime": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})",
        "threads": threads,
        "prompt": prompt,
        "decode": decode,
        "rounds": rounds,
        "baseline": baseline,
        "models": {
            name: {
                "file": files[name].name,
                "bytes": files[name].stat().st_size,
                "prefill_ms": float(pre),
                "decode_ms": float(dec),
                "prefill_speedup": float(medians[baseline][0] / pre),
                "decode_speedup": float(medians[baseline][1] / dec),
            }
            for name, (pre, dec) in medians.items()
        },
    }


def record(run_dir: Path, result: dict) -> Path:
    """``result`` as ``run_dir/llamacpp.json``, for ``planer report``."""
    path = Path(run_dir) / RECORD
    atomic_write_text(path, json.dumps(result, indent=1) + "\n")
    return path
