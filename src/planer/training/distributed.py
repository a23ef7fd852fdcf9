"""Data parallelism for processes started by ``torchrun``: NCCL on GPUs, gloo on CPUs.

Each rank trains on its share of the batch's streams (see ``Segments``) and the gradients are averaged after
every backward pass, weighted so that the result is the gradient of the configured global batch whatever the
number of processes. The sum is a bucketed flat all-reduce over the trainable parameters in a fixed order,
after the backward pass, rather than ``DistributedDataParallel``'s hooks: the supernet runs a different path
every step and trains its weights and its architecture weights in turn, which DDP's used-parameter bookkeeping
cannot follow without hangs or extra passes. Parameters no rank used keep no gradient, as in one process. The
price is no overlap of communication with the backward pass, small at the sizes planer trains. Rank 0 alone
writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from planer.errors import PlanerError
from planer.io.data import stream_share

BUCKET = 1 << 24  # elements per all-reduce


@dataclass(frozen=True)
class Env:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def rows(self, batch_size: int) -> list[int]:
        """How many of the batch's streams each rank holds (Segments' split)."""
        return [hi - lo for lo, hi in (stream_share(batch_size, r, self.world) for r in range(self.world))]


def resolve_device(name: str) -> torch.device:
    """cpu, cuda, cuda:N or auto (CUDA when there is one); anything else, or a GPU that is not there, is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise PlanerError(f"unknown device '{name}': expected cpu, cuda, cuda:N or auto")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PlanerError(f"device '{name}' was asked for, but no CUDA device is available")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise PlanerError(f"device '{name}' was asked for, but there are {torch.cuda.device_count()} CUDA devices")
    return device


def setup(device_name: str) -> tuple[Env, torch.device]:
    """This process's rank and device; joins the process group when started by torchrun with more than one."""
    device = resolve_device(device_name)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Env(), device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return Env(dist.get_rank(), dist.get_world_size()), device


def average_grads(params: list[torch.Tensor], env: Env) -> None:
    """Sum every rank's gradients (each already scaled by its share of the batch).

    A parameter that no rank used this step keeps no gradient, so the optimizer skips it exactly as it does in a
    single process; one that only some ranks used counts as zero on the others.
    """
    if env.world == 1:
        return
    used = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=params[0].device)
    dist.all_reduce(used)
    params = [p for p, n in zip(params, used.tolist()) if n > 0]
    i = 0
    while i < len(params):
        bucket, size = [], 0
        while i < len(params) and (not bucket or size + params[i].numel() <= BUCKET):
            bucket.append(params[i])
            size += params[i].numel()
            i += 1
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        offset = 0
        for p in bucket:
            p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
            offset += p.numel()


def all_sum(value: float, env: Env, device: torch.device) -> float:
    if env.world == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def broadcast_module(module: torch.nn.Module, env: Env) -> None:
    """Rank 0's parameters and buffers on every rank."""
    if env.world == 1:
        return
    for t in list(module.parameters()) + list(module.buffers()):
        dist.broadcast(t.data, src=0)


def gather_rows(t: torch.Tensor, env: Env, counts: list[int]) -> torch.Tensor:
    """Every rank's ``t`` (``counts[r]`` rows each) stacked in rank order, on every rank."""
    if env.world == 1:
        return t
    pad = max(counts)
    padded = torch.zeros((pad, *t.shape[1:]), dtype=t.dtype, device=t.device)
    padded[: t.size(0)] = t
    parts = [torch.empty_like(padded) for _ in range(env.world)]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, counts)])


def barrier(env: Env) -> None:
    if env.world > 1:
        dist.barrier()
