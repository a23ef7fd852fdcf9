"""Checkpoints: ``model.safetensors`` for the weights and ``config.json`` for everything needed to rebuild them.

safetensors holds nothing executable, so a checkpoint from anywhere can be opened without unpickling. Files are
written under a temporary name and renamed, so an interrupted save never leaves a half-written checkpoint.

config.json's ``vocab`` is ``{"level": "char" | "word", "symbols": [...]}``, or ``{"level": "tokenizer",
"size": V}`` for a model whose vocabulary is a Hugging Face tokenizer: that tokenizer.json is kept beside the
weights, so the folder is complete on its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from planer.config import Config, config_from_dict
from planer.errors import PlanerError
from planer.io.data import TokenizerVocab, Vocab
from planer.models.arch import Arch
from planer.models.backbone import backbone, build_model

WEIGHTS, CONFIG = "model.safetensors", "config.json"
SUPERNET = "supernet.safetensors"  # a Gumbel search's trained supernet, beside its arch.json
TRAINING_ONLY = ("dropout", "dropatt", "moe_dropout", "init_std", "n_experts")  # model keys no weight depends on


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes: what tells one model's weights from another's."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_json_object(path: Path) -> dict:
    """A JSON object a stage wrote ({} when it is not there); a damaged one is refused rather than overwritten."""
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if not isinstance(data, dict):
        raise PlanerError(f"{path} is damaged (not a JSON object); move it away and run the stage again")
    return data


def save_weights(path: Path, module: torch.nn.Module) -> None:
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, path)


def load_weights(module: torch.nn.Module, path: Path) -> None:
    """Fill ``module`` from a safetensors file that must hold exactly its tensors, in their shapes."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise PlanerError(f"checkpoint {path} is corrupt: {str(e).splitlines()[0]}") from None
    expected = module.state_dict()
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        what = f"missing {missing[:3]}" if missing else f"unexpected {unexpected[:3]}"
        raise PlanerError(f"checkpoint {path} does not match its config: {what}")
    for name, value in tensors.items():
        if value.shape != expected[name].shape:
            raise PlanerError(
                f"checkpoint {path} does not match its config: {name} has shape {tuple(value.shape)}, "
                f"expected {tuple(expected[name].shape)}"
            )
    module.load_state_dict(tensors)


def copy_tokenizer(vocab: TokenizerVocab, out_dir: Path) -> None:
    """Put the tokenizer's tokenizer.json into ``out_dir`` (unless it is that file already)."""
    target = out_dir / TokenizerVocab.FILE
    if not target.exists() or not target.samefile(vocab.path):
        tmp = target.with_name(target.name + ".tmp")
        shutil.copyfile(vocab.path, tmp)
        os.replace(tmp, target)


def vocab_record(vocab: Vocab | TokenizerVocab, out_dir: Path) -> dict:
    """config.json's description of the vocabulary; a tokenizer's file is copied into ``out_dir``."""
    if not isinstance(vocab, TokenizerVocab):
        return {"level": vocab.level, "symbols": vocab.symbols}
    copy_tokenizer(vocab, out_dir)
    return {"level": vocab.level, "size": len(vocab)}


def save_checkpoint(
    out_dir: str | Path, model: torch.nn.Module, cfg: Config, vocab: Vocab | TokenizerVocab, **extra
) -> None:
    out_dir = Path(out_dir)
    save_weights(out_dir / WEIGHTS, model)
    meta = {
        "config": cfg.to_dict(),
        "arch": model.arch.specs(),
        "vocab": vocab_record(vocab, out_dir),
        **extra,
    }
    atomic_write_text(out_dir / CONFIG, json.dumps(meta, indent=1) + "\n")


def load_meta(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlanerError(f"no checkpoint in {run_dir}: {CONFIG} is missing") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        raise PlanerError(f"checkpoint config {path} is unreadable or not JSON") from None
    if not isinstance(meta, dict) or not {"config", "arch", "vocab"} <= meta.keys():
        raise PlanerError(f"checkpoint config {path} lacks config, arch or vocab")
    return meta


def saved_config(run_dir: str | Path) -> Config:
    """The config a checkpoint was saved with; a bad value is refused naming the file that holds it."""
    meta = load_meta(run_dir)
    try:
        return config_from_dict(meta["config"])
    except PlanerError as e:
        raise PlanerError(f"checkpoint config {Path(run_dir) / CONFIG}: {e}") from None


def with_checkpoint_model(cfg: Config, run_dir: str | Path) -> Config:
    """``cfg`` with the model section of the checkpoint in ``run_dir`` (and its tokenizer, when it has one): a copy.

    The checkpoint's weights fix its architecture, so a config starting from it need not repeat it. What no weight
    depends on stays the config's: the keys only training reads (``TRAINING_ONLY``) and ``tgt_len``, the segments
    the run trains and scores on. Where that ``tgt_len`` is not the checkpoint's, the model's positions are written
    out (``n_positions``, where 0 meant its own ``tgt_len``), so that a gpt model keeps them and a ``tgt_len``
    beyond them is refused by the config's checks.
    An imported model's text must be cut into its own ids, so its tokenizer.json becomes ``data.tokenizer``; a
    planer char or word checkpoint has none and keeps the config's data, whose vocabulary is checked against it.
    """
    run_dir = Path(run_dir)
    own = saved_config(run_dir).model
    model = dataclasses.asdict(own) | {k: getattr(cfg.model, k) for k in (*TRAINING_ONLY, "tgt_len")}
    if model["tgt_len"] != own.tgt_len:
        model["n_positions"] = own.context
    values = cfg.to_dict() | {"model": model}
    if (run_dir / TokenizerVocab.FILE).exists():
        values["data"]["tokenizer"] = os.path.abspath(run_dir)
    try:
        return config_from_dict(values)
    except PlanerError as e:
        raise PlanerError(f"with the model of {run_dir}: {e}") from None


def read_vocab(record: dict, run_dir: Path) -> Vocab | TokenizerVocab:
    """The vocabulary that config.json's ``vocab`` record describes (a tokenizer's from the folder's own file)."""
    if record["level"] == TokenizerVocab.level:
        return TokenizerVocab(run_dir / TokenizerVocab.FILE)
    return Vocab(list(record["symbols"]), record["level"])


def load_checkpoint(
    run_dir: str | Path, device: str | torch.device = "cpu"
) -> tuple[torch.nn.Module, Config, Vocab | TokenizerVocab]:
    """Rebuild the model from config.json and fill it from model.safetensors; any mismatch is a PlanerError."""
    run_dir = Path(run_dir)
    meta = load_meta(run_dir)
    try:
        cfg = config_from_dict(meta["config"])
        arch = Arch.parse(" ".join(meta["arch"]))
        vocab = read_vocab(meta["vocab"], run_dir)
    except PlanerError as e:  # say which file holds the bad value
        raise PlanerError(f"checkpoint config {run_dir / CONFIG}: {e}") from None
    except (TypeError, KeyError):
        raise PlanerError(f"checkpoint config {run_dir / CONFIG} has a malformed arch or vocab") from None
    if vocab.level not in ("char", "word", TokenizerVocab.level):
        raise PlanerError(f"checkpoint config {run_dir / CONFIG}: unknown vocabulary level '{vocab.level}'")
    if len(vocab) != cfg.model.vocab_size:
        raise PlanerError(
            f"checkpoint {run_dir}: vocabulary size {len(vocab)} != model.vocab_size {cfg.model.vocab_size}"
        )
    path = run_dir / WEIGHTS
    if not path.exists():
        raise PlanerError(f"no checkpoint in {run_dir}: {WEIGHTS} is missing")
    model = build_model(cfg.model, arch)
    load_weights(model, path)
    return model.to(device), cfg, vocab


def export(run_dir: str | Path, fmt: str, out: str | Path, force: bool = False, **options):
    """``planer export``: the checkpoint in ``run_dir`` written as ``fmt`` by its backbone's exporter (given the
    format's own ``options``); a PlanerError naming the formats it has where its backbone has no such exporter."""
    return backbone(saved_config(run_dir).model).exporter(fmt)(run_dir, out, force=force, **options)
