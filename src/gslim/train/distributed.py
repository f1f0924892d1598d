"""Data-parallel training under torchrun: the process group, barriers, reductions, and the
seeds that make every rank's epoch reproducible."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from gslim.environment import resolve_device
from gslim.errors import GslimError, first_line


@dataclass
class DistInfo:
    world_size: int = 1
    rank: int = 0
    local_rank: int = 0
    owned: bool = False  # this module initialised the process group (and so destroys it)

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's (when installed) and torch's global RNGs (all devices)."""
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed % 2**32)
    except ImportError:  # pragma: no cover - numpy is a dependency, but optional here
        pass


def epoch_seed(seed: int, epoch: int, rank: int) -> int:
    # A fixed mixing of (seed, epoch, rank): distinct streams per rank and per epoch.
    return (seed * 1_000_003 + epoch * 10_007 + rank * 101 + 12345) % (2**63 - 1)


def env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise GslimError(f"environment variable {name}={raw!r} is not an integer") from exc


def init_distributed(device: torch.device) -> DistInfo:
    """Join the process group that ``torchrun`` describes, if any (idempotent).

    Returns world size 1 when not launched by torchrun. Uses NCCL for CUDA devices and Gloo
    for the CPU. A group initialised by a caller is reused and left to that caller.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_world_size(), dist.get_rank(), env_int("LOCAL_RANK", 0), owned=False)
    world = env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo()
    if not dist.is_available():
        raise GslimError("WORLD_SIZE > 1 but this torch build has no torch.distributed support")
    rank, local_rank = env_int("RANK", 0), env_int("LOCAL_RANK", 0)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    try:
        dist.init_process_group(backend=backend, world_size=world, rank=rank)
    except (RuntimeError, ValueError) as exc:
        raise GslimError(
            f"cannot join the {backend} process group (rank {rank} of {world}): {first_line(exc)}"
        ) from exc
    return DistInfo(world, rank, local_rank, owned=True)


def cleanup_distributed(info: Optional[DistInfo] = None) -> None:
    """Destroy the process group (only the one this module created, when ``info`` is given)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    if info is not None and not info.owned:
        return
    dist.destroy_process_group()


def barrier(info: DistInfo, device: torch.device) -> None:
    if info.enabled:
        import torch.distributed as dist

        if device.type == "cuda":
            dist.barrier(device_ids=[device.index or 0])
        else:
            dist.barrier()


def all_reduce_sum(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        import torch.distributed as dist

        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def device_for(cfg_device: str) -> torch.device:
    """The recipe's device; a bare 'cuda' becomes this process's GPU (LOCAL_RANK under torchrun)."""
    device = resolve_device(cfg_device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", env_int("LOCAL_RANK", 0))
    return device


# ----------------------------------------------------------------------------------------------
# optimisation pieces


def sync_buffers(model: nn.Module, info: DistInfo) -> None:
    """Score with rank 0's BatchNorm statistics, the ones that are saved."""
    if info.enabled:
        import torch.distributed as dist

        for b in model.buffers():
            dist.broadcast(b, src=0)
