"""Full training states for ``--resume``: everything a run needs to continue as if it had never stopped.

A state is a directory ``OUT/resume/step-NNNNNNNN`` holding ``state.safetensors`` (weights, optimizer moments,
Transformer-XL memories, random generator states) and ``state.json`` (counters, schedules, log offsets). It is
written into a temporary directory and renamed into place, so a run killed at any moment leaves either the
previous state or the new one, never half of one; older states are removed after the rename. Nothing is
unpickled: tensors come from safetensors and everything else is JSON.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from planer.errors import PlanerError

RESUME_DIR = "resume"


def save_state(out_dir: Path, step: int, tensors: dict[str, torch.Tensor], meta: dict) -> Path:
    root = Path(out_dir) / RESUME_DIR
    root.mkdir(exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    (tmp / "state.json").write_text(json.dumps(meta) + "\n")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in root.iterdir():
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def newest_state(out_dir: Path) -> Path | None:
    root = Path(out_dir) / RESUME_DIR
    states = sorted(p for p in root.glob("step-*") if (p / "state.json").exists()) if root.is_dir() else []
    return states[-1] if states else None


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    try:
        meta = json.loads((path / "state.json").read_text())
        tensors = load_file(str(path / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as e:
        raise PlanerError(
            f"resume state {path} is unreadable or corrupt ({str(e).splitlines()[0]}); remove it to resume from scratch"
        ) from None
    if not isinstance(meta, dict) or "progress" not in meta:
        raise PlanerError(f"resume state {path} is malformed; remove it to resume from scratch")
    return tensors, meta


def clear_states(out_dir: Path) -> None:
    shutil.rmtree(Path(out_dir) / RESUME_DIR, ignore_errors=True)


def module_tensors(module: torch.nn.Module, prefix: str) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in module.state_dict().items()}


def load_module(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str, where: Path) -> None:
    own = {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
    try:
        module.load_state_dict(own)
    except RuntimeError:
        raise PlanerError(
            f"resume state {where} does not match this run's model; remove it or use another --out"
        ) from None


def optimizer_state(opt: torch.optim.Optimizer, prefix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """An optimizer's state as tensors (``prefix.index.name``) and JSON (its hyper-parameters and scalars)."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{prefix}.{index}.{name}"] = value
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict, prefix: str) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            index, name = key[len(prefix) + 1 :].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for key, value in meta["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    groups = meta["param_groups"]
    for group in groups:
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    opt.load_state_dict({"state": state, "param_groups": groups})


def rng_tensors(prefix: str, device: torch.device) -> dict[str, torch.Tensor]:
    tensors = {f"{prefix}.cpu": torch.get_rng_state()}
    if device.type == "cuda":
        tensors[f"{prefix}.cuda"] = torch.cuda.get_rng_state(device)
    return tensors


def restore_rng(tensors: dict[str, torch.Tensor], prefix: str, device: torch.device, row: int) -> None:
    """Row ``row`` of the states ``rng_tensors`` saved, one row per rank (a rank the state lacks keeps its own)."""
    cpu, cuda = tensors.get(f"{prefix}.cpu"), tensors.get(f"{prefix}.cuda")
    if cpu is not None and row < len(cpu):
        torch.set_rng_state(cpu[row].contiguous())
    if device.type == "cuda" and cuda is not None and row < len(cuda):
        torch.cuda.set_rng_state(cuda[row].contiguous(), device)


def python_rng(rng: random.Random | None = None) -> list:
    version, internal, gauss = (rng or random).getstate()
    return [version, list(internal), gauss]


def restore_python_rng(state: list, rng: random.Random | None = None) -> None:
    version, internal, gauss = state
    (rng or random).setstate((version, tuple(internal), gauss))


def mems_tensors(mems: list | None, prefix: str) -> tuple[dict[str, torch.Tensor], list[bool] | None]:
    """Transformer-XL memories: a tensor per block that has one, and which blocks do."""
    if mems is None:
        return {}, None
    return {f"{prefix}.{i}": m for i, m in enumerate(mems) if m is not None}, [m is not None for m in mems]


def load_mems(tensors: dict[str, torch.Tensor], present: list[bool] | None, prefix: str, device) -> list | None:
    if present is None:
        return None
    return [tensors[f"{prefix}.{i}"].to(device) if has else None for i, has in enumerate(present)]


def truncate_log(path: Path, size: int) -> None:
    """Cut a JSON-lines log back to what it held when the state was saved; later lines are written again."""
    if path.exists():
        with open(path, "r+b") as f:
            f.truncate(size)
