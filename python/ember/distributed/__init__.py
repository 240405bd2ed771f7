"""Distributed strategies behind one interface (see ``base.Strategy``)."""

from __future__ import annotations

import os

import torch

from ember.distributed.base import Strategy
from ember.distributed.single import SingleDeviceStrategy

__all__ = ["Strategy", "SingleDeviceStrategy", "make_strategy", "resolve_device"]


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device is {spec!r} but CUDA is not available on this machine")
    return torch.device(spec)


def make_strategy(config) -> Strategy:
    """The strategy named by ``config.distributed.strategy`` ("auto" picks single-device
    for one process)."""
    name = config.distributed.strategy
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if name == "auto":
        name = "single" if world_size == 1 else "ddp"
    if name == "single":
        if world_size > 1:
            raise ValueError(f"distributed.strategy is 'single' but WORLD_SIZE is {world_size}; choose ddp, fsdp or deepspeed")
        return SingleDeviceStrategy(resolve_device(config.training.device))
    raise ValueError(
        f"distributed.strategy {name!r} is not available in this version of Ember; "
        "use 'single' (or 'auto') for one device"
    )
