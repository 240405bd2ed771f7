"""The one place where a plain model, built on the meta device, is turned into the model
a strategy trains, always in this order:

1. tensor and sequence parallelism (not yet in Ember; it goes first because it rewrites
   the plain blocks' linear layers, which the later steps wrap),
2. activation checkpointing (wraps whole blocks, so it sees them as they will run),
3. ``torch.compile``, block by block and in place (it compiles the checkpointed blocks;
   parameter names, and so checkpoints, stay as they are),
4. the parameter dtype, for pure-bf16 training (so that shards are made in bf16),
5. the strategy's data-parallel sharding on the meta device (FSDP2's ``fully_shard``).

Weights are materialised and initialised after this, by the strategy
(``Strategy.prepare`` calls :func:`parallelize`, then ``Strategy.materialize``); DDP and
DeepSpeed wrap the model only then, since they need real weights to wrap.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ember.model.checkpointing import apply_activation_checkpointing


@dataclass(frozen=True)
class ParallelPlan:
    """What :func:`parallelize` applies. Built once per run from the config."""

    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False
    param_dtype: torch.dtype | None = None  # bf16-true: torch.bfloat16


def parallelize(model: nn.Module, plan: ParallelPlan, *, shard: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """Applies ``plan`` to ``model`` (a :class:`~ember.model.Llama`, in place) in the order
    above, with ``shard`` (the strategy's data-parallel sharding) last."""
    if plan.activation_checkpointing != "none":
        apply_activation_checkpointing(model, plan.activation_checkpointing)
    if plan.compile:
        for block in model.layers:
            block.compile()
    if plan.param_dtype is not None:
        model.to(plan.param_dtype)
    if shard is not None:
        shard(model)
    return model
