"""Cross-entropy over a vocabulary, with the options pretraining uses.

Per token, with ``z`` the logits after the optional soft cap ``softcap * tanh(logits / softcap)``
and ``lse = logsumexp(z)``::

    loss = (1 - label_smoothing) * (lse - z[target])
         + label_smoothing * (lse - mean(z))        # PyTorch's label smoothing
         + z_loss * lse**2                          # PaLM's z-loss

Ignored tokens (``target == ignore_index``) have loss 0 and no gradient.

The Triton path (``_cross_entropy_triton``) computes each token's loss and its gradient in
one kernel during the forward pass (see :mod:`._triton_ce`): two sweeps over the row, the
gradient written into a fresh buffer of the logits' dtype, never over the caller's logits.
Backward only scales that buffer in place by the upstream gradient of each token's loss,
which autograd derives through the reduction, so every reduction and any ``num_tokens``
(an int or a device tensor) work without a host synchronisation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._dispatch import check_triton, select, upcast
from ._triton import KERNEL_DTYPES

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


# ---------------------------------------------------------------------------
# Triton path: custom ops (so torch.compile sees through them), autograd, entry point.


def folds_mean_scale(dtype: torch.dtype) -> bool:
    """Whether the forward kernel folds the mean's 1/denominator into a gradient of ``dtype``.

    Folding rounds the gradient once (backward multiplies by an upstream gradient that is
    usually 1). float16 is the exception: p/N is below its smallest subnormal for common
    vocabularies and batch sizes, so its gradient waits for backward to be divided.
    """
    return dtype != torch.float16


# cross_entropy stores a float16 gradient times this power of two, undone exactly in
# backward: softmax values under 6e-5 are float16 subnormals, and a loss scaler's factor
# only arrives in backward. |d loss / d logit| <= 1 + 2 z_loss |lse| stays far below
# 65504 / 2**12. (The fused linear op cannot: its float16 matmuls would carry the factor.)
FLOAT16_PRESCALE = 2.0**12


def device_scalar(value, device: torch.device) -> Tensor:
    """``value`` (a number or a tensor) as a 0-d float32 tensor on ``device``, without a host sync."""
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def reduce_in_op(losses: Tensor, reduction: str, denominator: Tensor | None) -> Tensor:
    """The reduction inside the custom ops, so their backward receives the upstream gradient itself."""
    if reduction == "none":
        return losses
    return losses.sum() if reduction == "sum" else losses.sum() / denominator


@torch.library.custom_op("ember::cross_entropy", mutates_args=())
def _cross_entropy_op(
    logits: Tensor,
    targets: Tensor,
    denominator: Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    with_grad: bool,
) -> tuple[Tensor, Tensor]:
    """The reduced loss (float32) and, if ``with_grad``, its gradient (N, V) in the logits' dtype
    for an upstream gradient of 1 (times :data:`FLOAT16_PRESCALE` in float16; else an empty
    tensor); ``denominator`` is the mean's."""
    from . import _triton_ce

    logits = logits if logits.stride(-1) == 1 else logits.contiguous()
    losses = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
    grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device) if with_grad else logits.new_empty(0)
    grad_scale = None
    if not folds_mean_scale(logits.dtype):
        grad_scale = torch.full((), FLOAT16_PRESCALE, dtype=torch.float32, device=logits.device)
    elif reduction == "mean":
        grad_scale = 1.0 / denominator
    _triton_ce.cross_entropy_rows(
        logits,
        targets.contiguous(),
        losses,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        softcap=softcap,
        grad=grad if with_grad else None,
        grad_scale=grad_scale,
    )
    return reduce_in_op(losses, reduction, denominator), grad


@_cross_entropy_op.register_fake
def _(logits, targets, denominator, reduction, ignore_index, label_smoothing, z_loss, softcap, with_grad):
    loss = logits.new_empty(logits.shape[:1] if reduction == "none" else (), dtype=torch.float32)
    return loss, (logits.new_empty(logits.shape) if with_grad else logits.new_empty(0))


def _cross_entropy_setup_context(ctx, inputs, output):
    logits, _, denominator, reduction = inputs[:4]
    _, grad = output
    ctx.mark_non_differentiable(grad)
    ctx.prescaled = not folds_mean_scale(logits.dtype)
    ctx.save_for_backward(grad, denominator if ctx.prescaled and reduction == "mean" else None)


def _cross_entropy_backward(ctx, grad_loss, _):
    # One factor for "mean" and "sum", one per row for "none". Scaling in place keeps one
    # (N, V) buffer alive instead of two; a second backward through the same graph
    # (retain_graph=True) then fails loudly, the saved gradient's version having changed.
    grad, denominator = ctx.saved_tensors
    scale = grad_loss
    if ctx.prescaled:
        scale = scale * (1.0 / FLOAT16_PRESCALE)
        if denominator is not None:
            scale = scale / denominator
    torch.ops.ember.scale_rows_(grad, scale)
    return (grad,) + (None,) * 8


_cross_entropy_op.register_autograd(_cross_entropy_backward, setup_context=_cross_entropy_setup_context)


@torch.library.custom_op("ember::scale_rows_", mutates_args=("x",))
def _scale_rows_inplace(x: Tensor, scale: Tensor) -> None:
    """``x *= scale``: ``scale`` 0-d, or one factor per row of ``x`` (R, C); in float32."""
    from . import _triton_ce

    _triton_ce.scale_rows(x, scale, x)


@torch.library.custom_op("ember::scale_rows", mutates_args=())
def _scale_rows_cast(x: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``(x * scale).to(dtype)`` without a float32 temporary; ``x`` contiguous."""
    from . import _triton_ce

    out = torch.empty(x.shape, dtype=dtype, device=x.device)
    _triton_ce.scale_rows(x, scale, out)
    return out


@_scale_rows_cast.register_fake
def _(x, scale, dtype):
    return x.new_empty(x.shape, dtype=dtype)


def scaled_gradient(grad: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """``grad * scale`` in ``dtype``: in place when ``grad`` already has that dtype."""
    if grad.dtype == dtype:
        torch.ops.ember.scale_rows_(grad, scale)
        return grad
    return torch.ops.ember.scale_rows(grad, scale, dtype)


def _kernels_cover(logits: torch.Tensor) -> bool:
    """Whether the kernel handles these logits; others (float64) take the reference, which
    defines the behaviour."""
    return logits.dtype in KERNEL_DTYPES


def _cross_entropy_triton(
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
    """:func:`cross_entropy` on the Triton kernel; float64 logits take the reference."""
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    check_options(reduction=reduction, num_tokens=num_tokens, **options)
    check_targets(logits, targets, "logits")
    if not _kernels_cover(logits):
        return cross_entropy_reference(
            logits, targets, ignore_index=ignore_index, reduction=reduction, num_tokens=num_tokens, **options
        )
    check_triton("cross_entropy", logits)
    flat_targets = targets.reshape(-1)
    denominator = None
    if reduction == "mean":
        denominator = device_scalar(mean_denominator(flat_targets, ignore_index, num_tokens), logits.device)
    loss, _ = torch.ops.ember.cross_entropy(
        logits.reshape(-1, logits.shape[-1]),
        flat_targets,
        denominator,
        reduction,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
        torch.is_grad_enabled() and logits.requires_grad,
    )
    return loss.view(targets.shape) if reduction == "none" else loss



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
    impl = select(logits, _cross_entropy_triton, cross_entropy_reference)
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
