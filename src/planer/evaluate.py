"""Evaluation the Transformer-XL way: segments in order, memory carried across them.

Each of the ``batch_size`` streams first runs ``mem_len`` tokens unscored to fill the memory, so that every scored
token sees full context; every token after that is scored exactly once. Loss is in nats per token; bits per
character is reported for char-level corpora.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from planer.checkpoint import load_checkpoint, read_json_object
from planer.data import load_corpus, read_text, tokenize
from planer.distributed import resolve_device
from planer.errors import PlanerError
from planer.model import TransformerXL, token_nll


@torch.no_grad()
def evaluate_ids(
    model: TransformerXL, ids: torch.Tensor, batch_size: int, tgt_len: int, mem_len: int, max_segments: int = 0
) -> dict:
    """Mean loss over the scored tokens of ``ids``; ``max_segments`` > 0 scores only that many segments."""
    was_training, saved_mem_len = model.training, model.mem_len
    model.eval()
    model.mem_len = mem_len
    device = next(model.parameters()).device
    batch_size = max(1, min(batch_size, len(ids) // (2 * tgt_len)))
    n = len(ids) // batch_size
    if n < 2:
        raise PlanerError(f"{len(ids)} tokens are too few to evaluate")
    data = ids[: n * batch_size].view(batch_size, n).to(device)
    warm = mem_len if n - 1 > mem_len else 0
    mems = None
    if warm:
        _, mems = model(data[:, :warm])
    total, count, segments = 0.0, 0, 0
    try:
        for i in range(warm, n - 1, tgt_len):
            j = min(i + tgt_len, n - 1)
            logits, mems = model(data[:, i:j], mems)
            total += token_nll(logits, data[:, i + 1 : j + 1]).sum().item()
            count += (j - i) * batch_size
            segments += 1
            if max_segments and segments >= max_segments:
                break
    finally:
        model.train(was_training)
        model.mem_len = saved_mem_len
    return {"loss": total / count, "tokens": count}


def summarize(result: dict, level: str, unk: int) -> dict:
    loss = result["loss"]
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "bpc": loss / math.log(2) if level == "char" else None,
        "tokens": result["tokens"],
        "unk": unk,
    }


def evaluate_run(
    run_dir: str | Path, split: str = "valid", text_file: str | Path | None = None, device: str = "cpu"
) -> dict:
    """Evaluate a checkpoint on a split of its corpus, or on any text file; split results go to eval.json."""
    model, cfg, vocab = load_checkpoint(run_dir, resolve_device(str(device)))
    tgt_len = cfg.eval.tgt_len or cfg.model.tgt_len
    mem_len = cfg.eval.mem_len or cfg.model.mem_len
    if text_file is not None:
        ids, unk = vocab.encode(tokenize(read_text(text_file), vocab.level))
        if len(ids) < 2:
            raise PlanerError(f"text file {text_file} has {len(ids)} tokens, too few to score")
        return summarize(evaluate_ids(model, ids, cfg.eval.batch_size, tgt_len, mem_len), vocab.level, unk)
    path = Path(run_dir) / "eval.json"
    saved = read_json_object(path)
    corpus = load_corpus(cfg.data, vocab)
    result = summarize(
        evaluate_ids(model, corpus.split(split), cfg.eval.batch_size, tgt_len, mem_len),
        vocab.level,
        corpus.unseen[split],
    )
    saved[split] = result
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return result
