"""The names of the user guide, kept for users who come from code written against it.

"The user guide" is the pretraining guide Ember's users brought with them: LMTK-style
training code that configures FSDP with ``get_fsdp_config(...)``, joins DDP with
``setup_ddp(...)`` and ``setup_model_with_ddp(model)``, sizes a model as ``type: llama,
size: 7B`` and names activation-checkpointing policies ``contiguous``. Ember's own API
does each of these another way (``distributed.fsdp_config``, strategies, ``model.preset``,
``model.activation_checkpointing``); this module maps the guide's names onto it, so the
guide's snippets and YAML run unchanged. Everything here is re-exported where the guide
imports it (``ember.distributed``) or read where its YAML lands (``ember.config``).
Other names of the guide are Ember's own API under the same name and need no shim:
``load_config``, ``PretrainingOrchestrator``, ``SpeedMonitor(window_size=..., time_unit=...)``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ember.config import FSDPSection
    from ember.distributed.ddp import DDPStrategy

# `model.size` as the guide writes it -> Ember's preset.
SIZE_PRESETS = {
    "1b": "llama3.2-1b",
    "3b": "llama3.2-3b",
    "7b": "llama2-7b",
    "8b": "llama3.1-8b",
    "70b": "llama3.1-70b",
}

# Activation-checkpointing policy names of the guide's FSDP settings (``contiguous``)
# and Ember's own -> Ember's mode (``model.activation_checkpointing``).
AC_POLICIES = {"contiguous": "full", "full": "full", "selective": "selective", "none": "none"}

def get_fsdp_config(
    mixed_precision: bool = True,
    sharding_strategy: str = "FULL_SHARD",
    checkpoint_activation: bool = False,
    activation_checkpointing_policy: str | None = None,
    cpu_offload: bool = False,
    reduce_dtype: str = "float32",
    replicate_degree: int | None = None,
) -> FSDPSection:
    """The guide's FSDP settings as a ``distributed.fsdp_config`` section.

    ``checkpoint_activation`` and ``activation_checkpointing_policy`` ("contiguous" = every
    block, "selective" = every other block) choose activation checkpointing."""
    import typing

    from ember.config import FSDPSection

    known = typing.get_args(typing.get_type_hints(FSDPSection)["sharding_strategy"])
    if sharding_strategy not in known:
        raise ValueError(f"sharding_strategy must be one of {', '.join(known)}, got {sharding_strategy!r}")
    cfg = FSDPSection(
        sharding_strategy=sharding_strategy,  # type: ignore[arg-type]
        mixed_precision=mixed_precision,
        activation_checkpointing=checkpoint_activation,
        activation_checkpointing_policy=activation_checkpointing_policy if checkpoint_activation else None,
        cpu_offload=cpu_offload,
        reduce_dtype=reduce_dtype,  # type: ignore[arg-type]
        replicate_degree=replicate_degree,
    )
    cfg.activation_checkpointing_mode()  # an unknown policy raises here, naming it
    return cfg


_ddp_strategy: DDPStrategy | None = None


def setup_ddp(backend: str | None = None, find_unused_parameters: bool = False, static_graph: bool = False,
              device: str = "auto") -> DDPStrategy:
    """Joins the process group torchrun set up and returns the DDP strategy; wrap a model
    with ``setup_model_with_ddp(model)`` (or ``strategy.wrap(model)``)."""
    global _ddp_strategy
    from ember.distributed import resolve_device
    from ember.distributed.ddp import DDPStrategy
    from ember.distributed.process_group import env_world

    _, _, local_rank = env_world()
    strategy = DDPStrategy(resolve_device(device, local_rank), backend=backend, find_unused_parameters=find_unused_parameters,
                           static_graph=static_graph)
    strategy.setup()
    _ddp_strategy = strategy
    return strategy


def setup_model_with_ddp(model: torch.nn.Module) -> torch.nn.Module:
    """Moves ``model`` to this rank's device and wraps it in DDP with ``setup_ddp``'s settings
    (the guide's ``setup_model_with_ddp``)."""
    if _ddp_strategy is None:
        raise RuntimeError("call setup_ddp(...) before setup_model_with_ddp(model)")
    return _ddp_strategy.wrap(model.to(_ddp_strategy.device))
