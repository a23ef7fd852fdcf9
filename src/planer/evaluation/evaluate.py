"""Evaluation: a model's loss on a token stream, in one of two ways, and ``planer evaluate``.

``evaluate_ids`` reads segments in order and carries memory across them: each of the ``batch_size`` streams first
runs ``mem_len`` tokens unscored to fill the memory, so that every scored token sees full context; every token after
that is scored exactly once. A model without memory is scored by a sliding window instead (``evaluate_sliding``).
Which one a model gets is its backbone's choice (``Backbone.scorer``), and the same scorer serves ``planer
evaluate``, training's validation and the rerank. Loss is in nats per token; bits per character is reported for
char-level corpora.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from planer.config import Config
from planer.errors import PlanerError
from planer.io.checkpoint import CONFIG, WEIGHTS, load_checkpoint, read_json_object
from planer.io.data import Corpus, Segments, load_corpus, read_text
from planer.models.backbone import backbone
from planer.models.language_model import token_nll
from planer.training.distributed import resolve_device


@torch.no_grad()
def evaluate_ids(
    model: nn.Module, ids: torch.Tensor, batch_size: int, tgt_len: int, mem_len: int, max_segments: int = 0
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
    warm = mem_len if n - 1 > mem_len else 0
    stream = Segments(ids, batch_size, tgt_len, drop_last=False, offset=warm)
    mems = model(stream.data[:, :warm].to(device))[1] if warm else None
    total, count = 0.0, 0
    try:
        for seg in stream.walk(0, min(len(stream), max_segments or len(stream))):
            logits, mems = model(seg.x.to(device), mems)  # the first segment continues the warm-up
            y = seg.y.to(device)
            total += token_nll(logits, y).sum().item()
            count += y.numel()
    finally:
        model.train(was_training)
        model.mem_len = saved_mem_len
    return {"loss": total / count, "tokens": count}


@torch.no_grad()
def sliding_windows(n: int, window: int, stride: int) -> tuple[int, list[int], list[int]]:
    """How ``evaluate_sliding`` cuts ``n`` tokens: the window length L, each window's start (it reads
    ``ids[start : start + L + 1]``, inputs and targets) and the first of its L predictions not scored before.
    Shared with any runtime that must score exactly planer's tokens (benchmarks/llamacpp_bench.py)."""
    if n < 2:
        raise PlanerError(f"{n} tokens are too few to evaluate")
    if not 0 < stride <= window:
        raise PlanerError(f"the evaluation stride must be in [1, window {window}], got {stride}")
    L = min(window, n - 1)
    ends = [*range(L, n - 1, stride), n - 1]  # each window reads ids[end - L : end] and predicts up to ids[end]
    starts = [e - L for e in ends]
    first = [0] + [prev - b for prev, b in zip(ends, starts[1:])]
    return L, starts, first


def evaluate_sliding(
    model: nn.Module, ids: torch.Tensor, window: int, stride: int, batch_size: int, max_batches: int = 0
) -> dict:
    """Mean loss of a model without memory over ``ids``, by a window sliding ``stride`` tokens.

    The windows hold ``window`` tokens (all of ``ids`` when it is shorter). The first one scores every token it
    predicts; each later one ends ``stride`` tokens further on (the last one at the end of ``ids``) and scores
    only the tokens no window has scored yet. So every token but the first is scored exactly once, with at least
    window - stride tokens of context, or all of them near the start. stride = window is the cheap, pessimistic
    non-overlapping evaluation; stride 1 gives every token a full window at window times the cost; eval.stride's
    default is half the window. Windows are scored ``batch_size`` at a time; ``max_batches`` > 0 scores only the
    first that many batches of windows (a quick validation), the mean then over the tokens they score.
    """
    L, starts, first = sliding_windows(len(ids), window, stride)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = 0.0, 0
    try:
        for k in range(0, min(len(starts), max_batches * batch_size or len(starts)), batch_size):
            rows = torch.tensor(starts[k : k + batch_size])[:, None] + torch.arange(L + 1)
            chunk = ids[rows].to(device)  # (windows, L + 1)
            logits, _ = model(chunk[:, :-1])
            scored = torch.arange(L, device=device) >= torch.tensor(first[k : k + batch_size], device=device)[:, None]
            total += token_nll(logits, chunk[:, 1:])[scored].sum().item()
            count += int(scored.sum())
    finally:
        model.train(was_training)
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


def refuse_run_folder(path: Path) -> None:
    """A folder of model folders (a ``planer run`` directory) is not a checkpoint: say so, and name its models,
    rather than report a missing config.json."""
    if (path / CONFIG).exists() or not path.is_dir():
        return
    models = sorted(p.name for p in path.iterdir() if (p / WEIGHTS).is_file() and (p / CONFIG).is_file())
    if models:
        raise PlanerError(
            f"{path} is a run folder, not a checkpoint: evaluate one of its models, e.g. --run {path / models[0]}; "
            f"it holds {', '.join(models)}"
        )


def score_split(model: nn.Module, cfg: Config, corpus: Corpus, split: str) -> dict:
    """A model's score on a split of ``corpus``, measured by its backbone's scorer (what eval.json holds)."""
    score = backbone(cfg.model).scorer(model, cfg, 0)
    return summarize(score(corpus.split(split)), corpus.vocab.level, corpus.unseen[split])


def evaluate_run(
    run_dir: str | Path, split: str = "valid", text_file: str | Path | None = None, device: str = "cpu"
) -> dict:
    """Evaluate a checkpoint on a split of its corpus, or on any text file; split results go to eval.json."""
    refuse_run_folder(Path(run_dir))
    model, cfg, vocab = load_checkpoint(run_dir, resolve_device(str(device)))
    score = backbone(cfg.model).scorer(model, cfg, 0)
    if text_file is not None:
        ids, unk = vocab.encode(vocab.tokenize(read_text(text_file)))
        if len(ids) < 2:
            raise PlanerError(f"text file {text_file} has {len(ids)} tokens, too few to score")
        return summarize(score(ids), vocab.level, unk)
    path = Path(run_dir) / "eval.json"
    saved = read_json_object(path)
    result = score_split(model, cfg, load_corpus(cfg.data, vocab), split)
    saved[split] = result
    path.write_text(json.dumps(saved, indent=2) + "\n")
    return result
