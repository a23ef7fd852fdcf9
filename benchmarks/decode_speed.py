"""planer's decode against transformers' own Llama with its cache: the same weights, threads and prompt.

A random Llama-style model (about 53M parameters by default: d 640, 10 layers, 10 query / 2 key-value heads, MLP
1728, vocabulary 16,000) is made in transformers, saved, and imported into planer (``planer import --hf``). Both
prefill the same prompt once; then every timed round decodes one new token after the prompt with each model's
cache (the cache cut back to the prompt between rounds), in random order per round. Prints ms per token, tokens
per second and the ratio, medians of the rounds, and checks that both give the same logits.

    .venv/bin/python benchmarks/decode_speed.py [--prompt 256] [--rounds 40] [--threads 2] [--batch 1]
"""

from __future__ import annotations

import argparse
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from tokenizers import Tokenizer, models
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

from planer.io.checkpoint import load_checkpoint
from planer.latency.table import time_interleaved
from planer.models.gpt.cache import KVCache
from planer.models.gpt.hf import import_hf


def llama(args) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=args.d_model, num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, intermediate_size=args.mlp, vocab_size=args.vocab,
                      max_position_embeddings=2048, tie_word_embeddings=True)  # fmt: skip
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name, default in [("prompt", 256), ("rounds", 40), ("warmup", 5), ("threads", 2), ("batch", 1),
                          ("d_model", 640), ("layers", 10), ("heads", 10), ("kv_heads", 2), ("mlp", 1728),
                          ("vocab", 16000)]:  # fmt: skip
        p.add_argument(f"--{name.replace('_', '-')}", dest=name, type=int, default=default)
    args = p.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames past_key_values
    torch.set_num_threads(args.threads)
    hf = llama(args)
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        vocab = {f"t{i}": i for i in range(args.vocab)}  # planer's import wants a tokenizer; any of this size
        Tokenizer(models.WordLevel(vocab, unk_token="t0")).save(str(Path(tmp) / "tokenizer.json"))
        import_hf(tmp, Path(tmp) / "planer")
        ours = load_checkpoint(Path(tmp) / "planer")[0].eval()
    ids = torch.randint(0, args.vocab, (args.batch, args.prompt + 1), generator=torch.Generator().manual_seed(1))
    prompt, new = ids[:, :-1], ids[:, -1:]
    with torch.inference_mode():
        cache = KVCache(ours, args.batch, args.prompt + 1)
        ours(prompt, cache)
        hf_cache = DynamicCache(config=hf.config)
        hf(prompt, past_key_values=hf_cache, use_cache=True)

        def planer_step():
            cache.length = args.prompt
            return ours(new, cache, last_only=True)[0]

        def hf_step():
            if extra := hf_cache.get_seq_length() - args.prompt:
                hf_cache.crop(-extra)  # transformers 5 removes that many of the newest positions
            return hf(new, past_key_values=hf_cache, use_cache=True, logits_to_keep=1).logits

        diff = (planer_step() - hf_step()).abs().max().item()
        ms = time_interleaved({"planer": planer_step, "transformers": hf_step}, args.warmup, args.rounds,
                              torch.device("cpu"))  # fmt: skip
    params = sum(t.numel() for t in ours.parameters())
    print(f"decode after a {args.prompt}-token prompt, batch {args.batch}, {args.threads} threads, {params / 1e6:.1f}M "
          f"parameters, torch {torch.__version__}, transformers {transformers.__version__}; max |logit diff| {diff:.1e}")  # fmt: skip
    print("| model | ms per token (median) | p10 | p90 | tokens per second |\n|---|---|---|---|---|")
    for name, samples in ms.items():
        med = float(np.median(samples))
        q10, q90 = np.percentile(samples, [10, 90])
        print(f"| {name} | {med:.2f} | {q10:.2f} | {q90:.2f} | {1000 * args.batch / med:.1f} |")
    ratio = float(np.median(ms["transformers"])) / float(np.median(ms["planer"]))
    print(f"planer decodes {ratio:.2f}x as fast as transformers ({args.rounds} interleaved rounds, medians)")


if __name__ == "__main__":
    main()
