"""Distributed-training helpers (torch DDP under torchrun): which process this is, its device, the
process group's start and end, and the collectives the loop needs. Without torchrun (no WORLD_SIZE or
WORLD_SIZE 1) every helper answers as the single process of a world of one and talks to no one."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist

from medfusion.device import pick_device

# the other ranks wait at the end while rank 0 runs the diagnosis stage and packages (minutes): a
# collective timeout well above that
GROUP_TIMEOUT = datetime.timedelta(hours=2)


def rank() -> int:
    """This process's rank in the process group, 0 … world_size() − 1 (0 without one)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of training processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def process_device(
    requested: str, local_rank: int | None = None, local_world: int | None = None
) -> torch.device:
    """The device of one training process: with several processes on CUDA, GPU number `local_rank`.

    Args:
        requested: a device name for `medfusion.device.pick_device` ("auto", "cpu", "cuda", …).
        local_rank: this process's rank on its node; default torchrun's LOCAL_RANK (0 without it).
        local_world: processes on this node; default torchrun's LOCAL_WORLD_SIZE (1 without it).

    Raises:
        ValueError: the device does not exist (`pick_device`), or there are more processes on the node
            than CUDA devices — NCCL refuses two ranks on one GPU, so this is refused here with a
            one-line reason rather than deep inside the first collective.
    """
    if local_rank is None:
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if local_world is None:
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    dev = pick_device(requested)
    if dev.type != "cuda" or local_world <= 1:
        return dev
    n = torch.cuda.device_count()
    if local_world > n:
        msg = (
            f"{local_world} training processes per node but {n} CUDA device(s): "
            f"use --nproc-per-node {n} or device: cpu (gloo)"
        )
        raise ValueError(msg)
    return torch.device("cuda", local_rank)


def start(requested_device: str) -> None:
    """Join torchrun's process group when launched as one of several ranks (WORLD_SIZE > 1) and not yet
    joined: NCCL for GPU tensors, gloo for CPU ones (also on a machine that has a GPU but was told cpu).
    Does nothing in a single process. Raises what `process_device` raises."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dev = process_device(requested_device)
        backend = "nccl" if dev.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=GROUP_TIMEOUT)


def stop() -> None:
    """Leave the process group, if this process joined one."""
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def broadcast_int(value: int, device: torch.device) -> int:
    """Rank 0's `value`, on every rank (`value` itself in a single process). The tensor lives on
    `device`: NCCL takes GPU tensors only."""
    if world_size() <= 1:
        return value
    flag = torch.tensor([value], dtype=torch.long, device=device)
    dist.broadcast(flag, 0)
    return int(flag.item())


def parameter_sums(model: torch.nn.Module) -> list[float]:
    """The sum of all parameters of `model` (float64) on each rank, in rank order (every rank takes
    part): equal after DDP, which keeps the replicas identical. One entry in a single process."""
    total = torch.stack([p.detach().double().sum() for p in model.parameters()]).sum().reshape(1)
    if world_size() <= 1:
        return [float(total)]
    sums = [torch.zeros(1, dtype=torch.float64, device=total.device) for _ in range(world_size())]
    dist.all_gather(sums, total)
    return [float(x) for x in sums]
