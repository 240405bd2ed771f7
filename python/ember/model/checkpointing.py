"""Activation checkpointing: recompute transformer blocks in backward instead of storing their activations."""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    checkpoint_wrapper,
)

# "contiguous" is the user guide's name for "full" (see ember.compat.AC_POLICIES).
MODES = ("none", "full", "selective", "contiguous")


def apply_activation_checkpointing(model: nn.Module, mode: str = "full", *, every: int = 2) -> nn.Module:
    """Wraps blocks of ``model`` (a :class:`~ember.model.Llama`) in place so backward recomputes them.

    ``"full"`` (alias ``"contiguous"``) checkpoints every block; ``"selective"`` checkpoints
    blocks 0, every, 2 * every, ... (torchtitan's selective layer checkpointing), trading
    some memory for less recomputation; ``"none"`` changes nothing. Apply it before
    ``fully_shard`` or ``torch.compile``.

    PyTorch's non-reentrant ``checkpoint_wrapper`` is used because ``state_dict`` and
    ``torch.distributed.checkpoint`` strip its ``_checkpoint_wrapped_module`` prefix:
    checkpoints from runs with and without checkpointing are interchangeable.
    ``named_parameters()`` does show the prefix.
    """
    if mode not in MODES:
        raise ValueError(f"activation checkpointing mode must be one of {MODES}, got {mode!r}")
    if every < 1:
        raise ValueError(f"every must be at least 1, got {every}")
    if mode == "none":
        return model
    stride = every if mode == "selective" else 1
    for index, block in enumerate(model.layers):
        if isinstance(block, CheckpointWrapper):
            raise ValueError("activation checkpointing is already applied to this model")
        if index % stride == 0:
            # The blocks hold no dropout, so there is no random state to replay.
            model.layers[index] = checkpoint_wrapper(
                block, checkpoint_impl=CheckpointImpl.NO_REENTRANT, preserve_rng_state=False
            )
    return model
