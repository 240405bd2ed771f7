"""Output projection fused with cross-entropy, never holding more than one chunk of logits.

``loss = cross_entropy(hidden @ weight.T + bias, targets)``, but the tokens go through in
chunks: each chunk's logits give its losses and, in the same pass, its share of the
gradients for ``hidden``, ``weight`` and ``bias``, so the (tokens, vocab) logits of a
whole batch (4 GiB at 8k tokens and a 128k vocabulary in float32) never exist at once.
This is Liger-Kernel's scheme; backward only scales the stored gradients.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from ._dispatch import select, upcast
from .cross_entropy import check_options, check_targets, mean_denominator, reduce_losses, token_losses


class _LossOptions(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None


def _dlogits(logits: torch.Tensor, targets: torch.Tensor, opts: _LossOptions) -> torch.Tensor:
    """d(token loss)/d(logits) for a chunk, in at least float32; zero rows where ignored.

    With ``z`` the capped logits and ``p = softmax(z)``, differentiating the formula in
    :mod:`.cross_entropy` gives ``dloss/dz_j = p_j * (1 + 2 * z_loss * lse)
    - (1 - label_smoothing) * [j == target] - label_smoothing / V``; the soft cap then
    contributes ``dz/dlogits = 1 - (z / softcap)**2``.
    """
    z = upcast(logits)
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    grad = (z - lse).exp_()
    if opts.z_loss:
        grad.mul_(1.0 + 2.0 * opts.z_loss * lse)
    valid = targets != opts.ignore_index
    target_term = grad.new_full((len(targets), 1), opts.label_smoothing - 1.0)
    grad.scatter_add_(-1, torch.where(valid, targets, 0).unsqueeze(-1), target_term)
    if opts.label_smoothing:
        grad.sub_(opts.label_smoothing / z.shape[-1])
    if opts.softcap is not None:
        grad.mul_(1.0 - (z / opts.softcap).square())
    return grad.mul_(valid.unsqueeze(-1))


def _chunked(hidden, weight, bias, targets, opts: _LossOptions, chunk_size: int, grad_scale=None, needs=(True,) * 3):
    """Per-token losses, and when ``grad_scale`` is given the gradients of ``sum(grad_scale * losses)``.

    ``grad_scale`` is a scalar or one factor per token. ``weight`` and ``bias`` gradients
    accumulate over chunks in float32 (float64 for float64 inputs).
    """
    n = hidden.shape[0]
    acc_dtype = torch.promote_types(weight.dtype, torch.float32)
    losses = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    want = grad_scale is not None
    grad_hidden = torch.empty_like(hidden) if want and needs[0] else None
    grad_weight = torch.zeros_like(weight, dtype=acc_dtype) if want and needs[1] else None
    grad_bias = torch.zeros_like(bias, dtype=acc_dtype) if want and bias is not None and needs[2] else None
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h, t = hidden[start:end], targets[start:end]
        logits = F.linear(h, weight, bias)
        losses[start:end] = token_losses(logits, t, **opts._asdict())
        if not want:
            continue
        scale = grad_scale[start:end, None] if isinstance(grad_scale, torch.Tensor) and grad_scale.ndim else grad_scale
        dlogits = _dlogits(logits, t, opts).mul_(scale)
        del logits
        if grad_bias is not None:
            grad_bias += dlogits.sum(0)
        # The matmuls run in the inputs' dtype (or autocast's), as autograd of the unfused formula would.
        if grad_hidden is not None:
            grad_hidden[start:end] = dlogits.to(weight.dtype) @ weight
        if grad_weight is not None:
            grad_weight += dlogits.T.to(h.dtype) @ h
    return losses, (grad_hidden, grad_weight, grad_bias)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts, reduction, num_tokens, chunk_size):
        ctx.reduction = reduction
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        needs = ctx.needs_input_grad[:3]
        if reduction == "none":
            # Each token's loss has its own upstream gradient, unknown until backward,
            # and the weight gradient mixes tokens: recompute the chunks there, under the
            # same autocast state as here.
            device = hidden.device.type
            ctx.autocast = dict(
                device_type=device, dtype=torch.get_autocast_dtype(device), enabled=torch.is_autocast_enabled(device)
            )
            ctx.opts, ctx.chunk_size, ctx.needs = opts, chunk_size, needs
            ctx.save_for_backward(hidden, weight, bias, targets)
            losses, _ = _chunked(hidden, weight, bias, targets, opts, chunk_size)
            return losses
        denominator = mean_denominator(targets, opts.ignore_index, num_tokens) if reduction == "mean" else 1
        # An integer count would make the reciprocal float32, too coarse for float64 inputs.
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
        scale = 1.0 / torch.as_tensor(denominator, dtype=loss_dtype, device=hidden.device)
        losses, grads = _chunked(hidden, weight, bias, targets, opts, chunk_size, scale, needs)
        ctx.save_for_backward(*grads)
        return reduce_losses(losses, targets, reduction, opts.ignore_index, num_tokens)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            with torch.autocast(**ctx.autocast):
                _, grads = _chunked(hidden, weight, bias, targets, ctx.opts, ctx.chunk_size, grad_output, ctx.needs)
        else:
            grads = [None if g is None else g * grad_output for g in ctx.saved_tensors]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None)


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """PyTorch fused linear cross-entropy, chunked over tokens; see :func:`fused_linear_cross_entropy`."""
    check_options(
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, softcap=softcap, num_tokens=num_tokens
    )
    check_targets(hidden, targets, "hidden")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (vocab, {hidden.shape[-1]}) for hidden {tuple(hidden.shape)}; got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    opts = _LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    # Inside Function.forward every input counts as needing a gradient, even under
    # torch.no_grad(); evaluation must not pay for gradients, so it never enters it.
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        out = _FusedLinearCrossEntropy.apply(
            flat_hidden, weight, bias, flat_targets, opts, reduction, num_tokens, chunk_size
        )
        return out.view(targets.shape) if reduction == "none" else out
    losses, _ = _chunked(flat_hidden, weight, bias, flat_targets, opts, chunk_size)
    return reduce_losses(losses, targets, reduction, ignore_index, num_tokens)


# The Triton kernel, once written; None routes CUDA tensors to the reference.
_triton_impl = None


def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int = 4096,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets, ...)`` without materialising the logits.

    hidden (N, D) or (..., D), weight (V, D), bias (V,) or None, targets (N,) or (...).
    ``chunk_size`` tokens' logits exist at a time. The loss options are those of
    :func:`ember.kernels.cross_entropy`. Gradients are computed during the forward pass
    (one pass over the logits instead of two); with ``reduction="none"`` backward
    recomputes the chunks instead, since each token's upstream gradient is only known then.
    Not twice differentiable.
    """
    impl = select("fused_linear_cross_entropy", hidden, _triton_impl, fused_linear_cross_entropy_reference)
    return impl(
        hidden,
        weight,
        targets,
        bias=bias,
        chunk_size=chunk_size,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss=z_loss,
        reduction=reduction,
        softcap=softcap,
        num_tokens=num_tokens,
    )


class FusedLinearCrossEntropyLoss(nn.Module):
    """:func:`fused_linear_cross_entropy` with its options fixed at construction; ``num_tokens`` is per call."""

    def __init__(
        self, *, chunk_size=4096, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", softcap=None
    ):
        super().__init__()
        check_options(
            label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, softcap=softcap, num_tokens=None
        )
        self.options = dict(
            chunk_size=chunk_size,
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            reduction=reduction,
            softcap=softcap,
        )

    def forward(self, hidden, weight, targets, bias=None, *, num_tokens=None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, targets, bias=bias, num_tokens=num_tokens, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
