"""Distributed strategies behind one interface (see ``base.Strategy``).

``make_strategy(config)`` picks one from ``config.distributed``. ``setup_ddp``,
``setup_model_with_ddp`` and ``get_fsdp_config`` are the user guide's entry points,
defined in :mod:`ember.compat` and re-exported here where the guide imports them.
"""

from __future__ import annotations

import torch

from ember.distributed.base import Strategy
from ember.distributed.process_group import env_world
from ember.distributed.single import SingleDeviceStrategy

__all__ = [
    "Strategy",
    "SingleDeviceStrategy",
    "get_fsdp_config",
    "make_strategy",
    "resolve_device",
    "setup_ddp",
    "setup_model_with_ddp",
]

STRATEGIES = ("single", "ddp", "fsdp", "deepspeed")


def resolve_device(spec: str, local_rank: int = 0) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"training.device is {spec!r} but CUDA is not available on this machine")
    if spec == "cuda":
        return torch.device("cuda", local_rank)
    return torch.device(spec)


def make_strategy(config) -> Strategy:
    """The strategy ``config.distributed.strategy`` names. ``auto`` is single-device in one
    process and FSDP under a launcher with several processes."""
    dist_cfg, precision = config.distributed, config.training.precision
    name = dist_cfg.strategy
    _, world_size, local_rank = env_world()
    if name == "auto":
        name = "single" if world_size == 1 else "fsdp"
    device = resolve_device(config.training.device, local_rank)
    if name == "single":
        if world_size > 1:
            raise ValueError(f"distributed.strategy is 'single' but WORLD_SIZE is {world_size}; choose ddp, fsdp or deepspeed")
        return SingleDeviceStrategy(device)
    if name == "ddp":
        from ember.distributed.ddp import DDPStrategy

        d = dist_cfg.ddp_config
        return DDPStrategy(device, backend=d.backend, find_unused_parameters=d.find_unused_parameters, static_graph=d.static_graph)
    if name == "fsdp":
        if precision == "fp16-mixed":
            raise ValueError("training.precision fp16-mixed is not supported with FSDP (its gradients are sharded); use bf16-mixed")
        from ember.distributed.fsdp import FSDPStrategy

        return FSDPStrategy(device, dist_cfg.fsdp_config)
    if name == "deepspeed":
        from ember.distributed.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(device, config)
    raise ValueError(f"distributed.strategy: unknown strategy {name!r}; known: auto, {', '.join(STRATEGIES)}")


# The user guide's entry points (see ember.compat).
from ember.compat import get_fsdp_config, setup_ddp, setup_model_with_ddp  # noqa: E402
