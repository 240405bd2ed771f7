"""Cross-entropy over a vocabulary, with the options pretraining uses.

Per token, with ``z`` the logits after the optional soft cap ``softcap * tanh(logits / softcap)``
and ``lse = logsumexp(z)``::

    loss = (1 - label_smoothing) * (lse - z[target])
         + label_smoothing * (lse - mean(z))        # PyTorch's label smoothing
         + z_loss * lse**2                          # PaLM's z-loss

Ignored tokens (``target == ignore_index``) have loss 0 and no gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ._dispatch import select, upcast

REDUCTIONS = ("mean", "sum", "none")


def check_options(*, label_smoothing, z_loss, reduction, softcap, num_tokens) -> None:
    """Rejects option values that would silently give a wrong loss."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if z_loss < 0:
        raise ValueError(f"z_loss must not be negative, got {z_loss}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"softcap must be positive or None, got {softcap}")
    if num_tokens is not None and reduction != "mean":
        raise ValueError(
            f"num_tokens is the denominator of reduction='mean'; it means nothing with reduction={reduction!r}"
        )


def check_targets(inputs: torch.Tensor, targets: torch.Tensor, what: str) -> None:
    if targets.shape != inputs.shape[:-1]:
        raise ValueError(
            f"targets must have the shape of {what} without its last dimension, {tuple(inputs.shape[:-1])}; "
            f"got {tuple(targets.shape)}"
        )


def token_losses(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
) -> torch.Tensor:
    """Per-token losses (N,) in at least float32 for logits (N, V), 0 where ignored."""
    z = upcast(logits)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    valid = targets != ignore_index
    lse = torch.logsumexp(z, dim=-1)
    loss = lse - z.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z.mean(dim=-1))
    if z_loss:
        loss = loss + z_loss * lse.square()
    return torch.where(valid, loss, 0.0)


def mean_denominator(targets: torch.Tensor, ignore_index: int, num_tokens) -> torch.Tensor | int | float:
    """``num_tokens`` when given, else the count of non-ignored targets (at least 1).

    The floor of 1 makes an all-ignored batch's mean 0 with zero gradients (PyTorch gives
    NaN), so a fully padded micro-batch cannot poison an accumulated gradient.
    """
    if num_tokens is not None:
        return num_tokens
    return (targets != ignore_index).sum().clamp(min=1)


def reduce_losses(losses: torch.Tensor, targets: torch.Tensor, reduction: str, ignore_index: int, num_tokens):
    if reduction == "none":
        return losses.view(targets.shape)
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / mean_denominator(targets, ignore_index, num_tokens)


def cross_entropy_reference(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch cross-entropy through autograd; logits (..., V), targets (...)."""
    check_options(
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, softcap=softcap, num_tokens=num_tokens
    )
    check_targets(logits, targets, "logits")
    losses = token_losses(
        logits.reshape(-1, logits.shape[-1]),
        targets.reshape(-1),
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
    )
    return reduce_losses(losses, targets, reduction, ignore_index, num_tokens)


# The Triton kernel, once written; None routes CUDA tensors to the reference.
_triton_impl = None


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of logits (N, V) (or (..., V)) against targets (N,) (or (...)), computed in float32.

    ``reduction="mean"`` divides the summed loss by the number of non-ignored targets, or by
    ``num_tokens`` when given (a denominator shared by all micro-batches of a step, so
    gradient accumulation weighs every token equally); ``"sum"`` sums; ``"none"`` returns
    per-token losses shaped like ``targets``, 0 where ignored. The result is float32 (float64
    for float64 logits) whatever the logits' dtype. See the module docstring for the formula.
    """
    impl = select("cross_entropy", logits, _triton_impl, cross_entropy_reference)
    return impl(
        logits,
        targets,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        softcap=softcap,
        num_tokens=num_tokens,
    )


class CrossEntropyLoss(nn.Module):
    """:func:`cross_entropy` with its options fixed at construction; ``num_tokens`` is per call."""

    def __init__(self, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", softcap=None):
        super().__init__()
        check_options(
            label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, softcap=softcap, num_tokens=None
        )
        self.options = dict(
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
            softcap=softcap,
        )

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, *, num_tokens=None) -> torch.Tensor:
        return cross_entropy(logits, targets, num_tokens=num_tokens, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
