"""The decoder-only backbone (GPT-2 and Llama flavours), as the rest of planer sees it: see models/backbone.py."""

from __future__ import annotations

import shlex
from pathlib import Path

from torch import nn

from planer.config import Config, ModelConfig
from planer.errors import PlanerError
from planer.evaluation.evaluate import evaluate_sliding
from planer.models.arch import Arch
from planer.models.backbone import Backbone, Scorer
from planer.models.gpt.decilm import check_fits
from planer.models.gpt.gguf_export import llama_layers
from planer.models.gpt.hf import export_form
from planer.models.gpt.model import GPT, build_block

FLAVOURS = ("gpt2", "llama")


def check(cfg: ModelConfig) -> None:
    if cfg.flavour not in FLAVOURS:
        raise PlanerError(f"config model.flavour must be 'gpt2' or 'llama', got '{cfg.flavour}'")
    if cfg.flavour == "llama" and cfg.d_head % 2:
        raise PlanerError(f"config model: rotary positions need an even head size, got d_head {cfg.d_head}")
    if cfg.flavour == "gpt2" and not cfg.tie_embeddings:
        raise PlanerError("config model.tie_embeddings: the gpt2 flavour always ties its output to the embedding")
    if cfg.tgt_len > cfg.context:
        raise PlanerError(f"config model.tgt_len ({cfg.tgt_len}) exceeds model.n_positions ({cfg.n_positions})")


def scorer(model: nn.Module, cfg: Config, max_batches: int) -> Scorer:
    """A sliding window of eval.tgt_len tokens (the model's context by default) advancing eval.stride tokens (half
    the window by default): the model has no memory to carry context across segments."""
    e = cfg.eval
    window = e.tgt_len or cfg.model.context
    stride = e.stride or max(1, window // 2)
    return lambda ids: evaluate_sliding(model, ids, window, stride, e.batch_size, max_batches)


def fingerprint(cfg: ModelConfig) -> dict:
    return {"backbone": cfg.backbone, "flavour": cfg.flavour, "n_kv_head": cfg.n_kv_head}


def export_hint(model_dir: Path, cfg: ModelConfig, arch: Arch) -> str:
    """Every format the model leaves planer in, each with its command, or in one line why it has none: the report
    says it per model, so a user sees which engines can run the found model before exporting anything."""
    run = f"`planer export --run {shlex.quote(str(model_dir))}"
    try:
        form = export_form(cfg, arch)
    except PlanerError as e:
        return f"`planer.load({str(model_dir)!r})` loads it in Python; it has no Hugging Face form ({e})."
    hf = " with planer's modeling code (trust_remote_code=True)" if form != "plain" else " for transformers"
    forms = [f"{run} --hf OUT` writes it as a Hugging Face folder{hf}", f"{run} --onnx OUT.onnx` for onnxruntime"]
    for name, fits, args in (("DeciLM", check_fits, "--hf OUT --format decilm"), ("GGUF", llama_layers, "--gguf OUT")):
        try:
            fits(cfg, arch)
            forms.append(f"{run} {args}` as {name}")
        except PlanerError as e:
            forms.append(f"no {name} form ({e})")
    return "; ".join(forms) + "."


BACKBONE = Backbone(
    name="gpt",
    model=GPT,
    block=build_block,
    check=check,
    scorer=scorer,
    fingerprint=fingerprint,
    exporters={
        "hf": "planer.models.gpt.hf:export_hf",
        "decilm": "planer.models.gpt.decilm:export_decilm",
        "onnx": "planer.models.gpt.onnx:export_onnx",
        "gguf": "planer.models.gpt.gguf_export:export_gguf",
    },
    export_hint=export_hint,
)
