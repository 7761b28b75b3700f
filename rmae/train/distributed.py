"""Process-group setup from torchrun's environment (no launcher of our own).

``torchrun --nproc_per_node N -m rmae.cli pretrain …`` (or the ``rmae`` script under torchrun)
sets RANK / WORLD_SIZE / LOCAL_RANK; multi-node uses torchrun's own rendezvous flags.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..device import DeviceError, resolve_device


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _env_int(key: str, default: int) -> int:
    text = os.environ.get(key, str(default))
    try:
        return int(text)
    except ValueError:
        raise DeviceError(f"{key}={text[:40]!r} is not a whole number; it is set by torchrun, leave it to it") from None


def init_distributed(device_request: str = "auto") -> tuple[DistInfo, torch.device]:
    rank, world, local = (_env_int(k, d) for k, d in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    if not (world >= 1 and 0 <= rank < world and local >= 0):
        raise DeviceError(f"RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local} do not describe a process group; "
                          "leave them to torchrun")
    info = DistInfo(rank, world, local)
    device = resolve_device(device_request, info.local_rank)
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return info, device


def all_reduce_mean(values: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        values = values.clone()
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
        values /= info.world_size
    return values


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


def cleanup(info: DistInfo) -> None:
    if info.enabled and dist.is_initialized():
        dist.destroy_process_group()
