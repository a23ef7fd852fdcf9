"""An exported Hugging Face folder against the planer checkpoint it came from: logits on a prompt and greedy tokens.

The tests check tiny models; this checks a real one (the found SmolLM2 of docs/results/smollm2-135m) the way a user
loads it, with ``trust_remote_code`` from the folder alone:

    planer export --run runs/smollm2-t06/planer-t0.60 --hf runs/export/planer-t0.60-hf
    python benchmarks/hf_export_check.py --run runs/smollm2-t06/planer-t0.60 --hf runs/export/planer-t0.60-hf
"""

from __future__ import annotations

import argparse

import torch
import transformers

import planer
from planer.evaluation.generate import generate

PROMPT = "The tower is 324 metres tall, about the same height as"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the planer checkpoint folder")
    parser.add_argument("--hf", required=True, help="the folder planer export --hf wrote from it")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens to compare (default 16)")
    args = parser.parse_args()
    model, vocab = planer.load(args.run)
    hf = transformers.AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=True, local_files_only=True)
    ids = vocab.encode(vocab.tokenize(PROMPT))[0][None]  # (1, T)
    with torch.no_grad():
        diff = (model(ids)[0] - hf.eval()(ids).logits).abs().max().item()
        theirs = hf.generate(ids, max_new_tokens=args.tokens, do_sample=False)[0, ids.size(1) :].tolist()
    ours = generate(model, ids[0].tolist(), args.tokens, temperature=0.0)[-args.tokens :]
    agree = sum(a == b for a, b in zip(ours, theirs))
    print(f"transformers {transformers.__version__}: {type(hf).__name__}, max |logit difference| {diff:.2e} on "
          f"{ids.size(1)} prompt tokens, greedy tokens agree {agree}/{args.tokens}")  # fmt: skip


if __name__ == "__main__":
    main()
