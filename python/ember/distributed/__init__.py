"""Distributed strategies behind one interface (see ``base.Strategy``).

``make_strategy(config)`` picks one from ``config.distributed``; ``setup_ddp`` and
``get_fsdp_config`` are the user guide's entry points.
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
        from ember.distributed.fsdp import FSDPStrategy, activation_checkpointing_mode

        activation_checkpointing_mode(dist_cfg.fsdp_config)  # reject unknown policies before any process group
        return FSDPStrategy(device, dist_cfg.fsdp_config)
    if name == "deepspeed":
        from ember.distributed.deepspeed import DeepSpeedStrategy

        return DeepSpeedStrategy(device, config)
    raise ValueError(f"distributed.strategy: unknown strategy {name!r}; known: auto, {', '.join(STRATEGIES)}")


def get_fsdp_config(
    mixed_precision: bool = True,
    sharding_strategy: str = "FULL_SHARD",
    checkpoint_activation: bool = False,
    activation_checkpointing_policy: str | None = None,
    cpu_offload: bool = False,
    reduce_dtype: str = "float32",
    replicate_degree: int | None = None,
):
    """The user guide's FSDP settings as a ``distributed.fsdp_config`` section.

    ``checkpoint_activation`` and ``activation_checkpointing_policy`` ("contiguous" = every
    block, "selective" = every other block) choose activation checkpointing."""
    from ember.config import FSDPSection
    from ember.distributed.fsdp import activation_checkpointing_mode

    known = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")
    if sharding_strategy not in known:
        raise ValueError(f"sharding_strategy must be one of {', '.join(known)}, got {sharding_strategy!r}")
    cfg = FSDPSection(
        sharding_strategy=sharding_strategy,
        mixed_precision=mixed_precision,
        activation_checkpointing=checkpoint_activation,
        activation_checkpointing_policy=activation_checkpointing_policy if checkpoint_activation else None,
        cpu_offload=cpu_offload,
        reduce_dtype=reduce_dtype,
        replicate_degree=replicate_degree,
    )
    activation_checkpointing_mode(cfg)
    return cfg


_ddp_strategy = None


def setup_ddp(backend: str | None = None, find_unused_parameters: bool = False, static_graph: bool = False, device: str = "auto"):
    """Joins the process group torchrun set up and returns the DDP strategy; wrap a model
    with ``setup_model_with_ddp(model)`` (or ``strategy.wrap(model)``)."""
    global _ddp_strategy
    from ember.distributed.ddp import DDPStrategy

    _, _, local_rank = env_world()
    strategy = DDPStrategy(resolve_device(device, local_rank), backend=backend, find_unused_parameters=find_unused_parameters, static_graph=static_graph)
    strategy.setup()
    _ddp_strategy = strategy
    return strategy


def setup_model_with_ddp(model: torch.nn.Module):
    """Moves ``model`` to this rank's device and wraps it in DDP with ``setup_ddp``'s settings."""
    if _ddp_strategy is None:
        raise RuntimeError("call setup_ddp(...) before setup_model_with_ddp(model)")
    return _ddp_strategy.wrap(model.to(_ddp_strategy.device))
