"""Joining and leaving the process group that torchrun (or the DeepSpeed launcher) set up."""

from __future__ import annotations

import datetime
import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) as the launcher set them; (0, 1, 0) without a launcher."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_process_group(device: torch.device, backend: str | None = None, timeout_minutes: float = 30) -> tuple[int, int, int]:
    """Joins the group (once) and returns (rank, world size, local rank)."""
    rank, world, local = env_world()
    if world > 1 and "MASTER_ADDR" not in os.environ:
        raise ValueError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with torchrun or the DeepSpeed launcher")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend or default_backend(device),
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=device if device.type == "cuda" else None,
        )
    return dist.get_rank(), dist.get_world_size(), local


def destroy_process_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
