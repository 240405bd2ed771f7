"""Joining and leaving the process group that torchrun (or the DeepSpeed launcher) set up."""

from __future__ import annotations

import datetime
import gc
import os
from collections.abc import Callable

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
        timeout = datetime.timedelta(minutes=timeout_minutes)
        kwargs = {}
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))
        if restart > 0 and "MASTER_PORT" in os.environ:
            # After torchrun restarts the workers, the launcher's store still holds the
            # previous round's addresses under the default keys; a new prefix per round
            # keeps the new processes from connecting to dead ones.
            base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world, is_master=False, timeout=timeout)
            kwargs = {"store": dist.PrefixStore(f"ember/restart-{restart}", base), "rank": rank, "world_size": world}
        dist.init_process_group(
            backend=backend or default_backend(device),
            timeout=timeout,
            device_id=device if device.type == "cuda" else None,
            **kwargs,
        )
    return dist.get_rank(), dist.get_world_size(), local


def destroy_process_group(destroy: Callable[[], None] = dist.destroy_process_group) -> None:
    """Leaves the group once every rank has arrived. Whatever holds the group (a DDP
    reducer, an FSDP mesh, a DeepSpeed engine) should be released first (see
    ``Strategy.release``): the group's worker threads end only when its last holder
    goes, and threads still running when the interpreter shuts down can abort the
    process after the work is done. ``destroy`` is the call that destroys the groups."""
    if dist.is_initialized():
        try:
            dist.barrier()
        except RuntimeError:
            pass  # a peer is gone already; leave anyway
        destroy()
        gc.collect()  # holders caught in reference cycles go now, and the groups with them
