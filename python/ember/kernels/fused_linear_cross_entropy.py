"""Output projection fused with cross-entropy, never holding more than one chunk of logits.

``loss = cross_entropy(hidden @ weight.T + bias, targets)``, but the tokens go through in
chunks: each chunk's logits give its losses and, in the same pass, its share of the
gradients for ``hidden``, ``weight`` and ``bias``, so the (tokens, vocab) logits of a
whole batch (4 GiB at 8k tokens and a 128k vocabulary in float32) never exist at once.
This is Liger-Kernel's scheme; backward only scales the stored gradients.

By default a chunk holds as many tokens as fit :data:`WORKSPACE_BYTES` of logits
(4096 tokens for a 128k vocabulary in bfloat16). The weight and bias gradients accumulate
over chunks in float32 unless ``fp32_accumulation=False``; for bfloat16 weights that
float32 accumulator (vocab x hidden x 4 bytes) is the largest buffer the op allocates.

The Triton path (``_fused_linear_cross_entropy_triton``) runs per chunk: the logits by
cuBLAS into a reused workspace, the cross-entropy kernel of :mod:`._triton_ce` writing
d(logits) over them in place (times 1/denominator for ``"mean"``, a device tensor, except
in float16: see :func:`.cross_entropy.folds_mean_scale`), then two matmuls for the hidden
and weight gradients, the latter accumulated in place. With ``reduction="none"`` it keeps
the inputs and recomputes the chunks in backward with each token's upstream gradient
folded into the kernel's scale.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from ._dispatch import check_triton, select, upcast
from ._triton import KERNEL_DTYPES
from .cross_entropy import (
    check_options,
    check_targets,
    device_scalar,
    folds_mean_scale,
    mean_denominator,
    reduce_in_op,
    reduce_losses,
    scaled_gradient,
)

# Bytes of logits one chunk may hold when chunk_size is not given.
WORKSPACE_BYTES = 1 << 30


def default_chunk_size(num_tokens: int, vocab: int, itemsize: int) -> int:
    """Tokens per chunk so that a chunk's logits fit :data:`WORKSPACE_BYTES`: a multiple of 256
    (whole matmul tiles) when that many fit, never more than ``num_tokens``, at least 1."""
    rows = max(1, WORKSPACE_BYTES // max(1, vocab * itemsize))
    if rows >= 256:
        rows -= rows % 256
    return max(1, min(rows, num_tokens))


def _matmul_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """The dtype the output projection runs in: autocast's when it is on, else the inputs' common one."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device) and torch.float64 not in (hidden.dtype, weight.dtype):
        return torch.get_autocast_dtype(device)
    return torch.promote_types(hidden.dtype, weight.dtype)


def accumulator_dtype(dtype: torch.dtype, fp32_accumulation: bool) -> torch.dtype:
    """The dtype weight and bias gradients accumulate in across chunks."""
    return torch.promote_types(dtype, torch.float32) if fp32_accumulation else dtype


class _LossOptions(NamedTuple):
    ignore_index: int
    label_smoothing: float
    z_loss: float
    softcap: float | None


def _loss_and_dlogits(logits: torch.Tensor, targets: torch.Tensor, opts: _LossOptions, scale) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A chunk's per-token losses (0 where ignored) and, when ``scale`` is given,
    ``scale * d(loss)/d(logits)``, in at least float32, from one log-softmax.

    With ``z`` the capped logits and ``p = softmax(z)``, differentiating the formula in
    :mod:`.cross_entropy` gives ``dloss/dz_j = p_j * (1 + 2 * z_loss * lse)
    - (1 - label_smoothing) * [j == target] - label_smoothing / V``; the soft cap then
    contributes ``dz/dlogits = 1 - (z / softcap)**2``. The probabilities overwrite the
    log-probabilities in place: one vocabulary-sized temporary per chunk.
    """
    z = upcast(logits)
    if opts.softcap is not None:
        z = opts.softcap * torch.tanh(z / opts.softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != opts.ignore_index
    safe_targets = torch.where(valid, targets, 0).unsqueeze(-1)
    loss = -logp.gather(-1, safe_targets).squeeze(-1)
    if opts.label_smoothing:
        loss = (1.0 - opts.label_smoothing) * loss - opts.label_smoothing * logp.mean(dim=-1)
    lse = None
    if opts.z_loss:
        lse = z[:, 0] - logp[:, 0]
        loss = loss + opts.z_loss * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if scale is None:
        return loss, None
    grad = logp.exp_()
    if lse is not None:
        grad.mul_((1.0 + 2.0 * opts.z_loss * lse).unsqueeze(-1))
    grad.scatter_add_(-1, safe_targets, grad.new_full((len(targets), 1), opts.label_smoothing - 1.0))
    if opts.label_smoothing:
        grad.sub_(opts.label_smoothing / z.shape[-1])
    if opts.softcap is not None:
        grad.mul_(1.0 - (z / opts.softcap).square())
    return loss, grad.mul_((valid.to(grad.dtype) * scale).unsqueeze(-1))


def _chunked(
    hidden,
    weight,
    bias,
    targets,
    opts: _LossOptions,
    chunk_size: int,
    grad_scale=None,
    needs=(True,) * 3,
    fp32_accumulation=True,
):
    """Per-token losses, and when ``grad_scale`` is given the gradients of ``sum(grad_scale * losses)``.

    ``grad_scale`` is a scalar or one factor per token. ``weight`` and ``bias`` gradients
    accumulate over chunks in :func:`accumulator_dtype`.
    """
    n = hidden.shape[0]
    losses = torch.empty(n, dtype=torch.promote_types(hidden.dtype, torch.float32), device=hidden.device)
    want = grad_scale is not None
    grad_hidden = torch.empty_like(hidden) if want and needs[0] else None
    grad_weight = (
        torch.zeros_like(weight, dtype=accumulator_dtype(weight.dtype, fp32_accumulation))
        if want and needs[1]
        else None
    )
    grad_bias = (
        torch.zeros_like(bias, dtype=accumulator_dtype(bias.dtype, fp32_accumulation))
        if want and bias is not None and needs[2]
        else None
    )
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h, t = hidden[start:end], targets[start:end]
        logits = F.linear(h, weight, bias)
        scale = None
        if want:
            scale = grad_scale[start:end] if isinstance(grad_scale, torch.Tensor) and grad_scale.ndim else grad_scale
        losses[start:end], dlogits = _loss_and_dlogits(logits, t, opts, scale)
        del logits
        if not want:
            continue
        if grad_bias is not None:
            grad_bias += dlogits.sum(0)
        # The matmuls run in the inputs' dtype (or autocast's), as autograd of the unfused formula would.
        if grad_hidden is not None:
            if dlogits.dtype == weight.dtype == grad_hidden.dtype:
                torch.mm(dlogits, weight, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = dlogits.to(weight.dtype) @ weight
        if grad_weight is not None:
            if dlogits.dtype == h.dtype == grad_weight.dtype:
                grad_weight.addmm_(dlogits.T, h)
            else:
                grad_weight += dlogits.T.to(h.dtype) @ h
    return losses, (grad_hidden, grad_weight, grad_bias)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, opts, reduction, num_tokens, chunk_size, fp32_accumulation):
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
            ctx.opts, ctx.chunk_size, ctx.needs, ctx.fp32_accumulation = opts, chunk_size, needs, fp32_accumulation
            ctx.save_for_backward(hidden, weight, bias, targets)
            losses, _ = _chunked(hidden, weight, bias, targets, opts, chunk_size)
            return losses
        denominator = mean_denominator(targets, opts.ignore_index, num_tokens) if reduction == "mean" else 1
        # An integer count would make the reciprocal float32, too coarse for float64 inputs.
        loss_dtype = torch.promote_types(hidden.dtype, torch.float32)
        scale = 1.0 / torch.as_tensor(denominator, dtype=loss_dtype, device=hidden.device)
        losses, grads = _chunked(hidden, weight, bias, targets, opts, chunk_size, scale, needs, fp32_accumulation)
        ctx.save_for_backward(*grads)
        return reduce_losses(losses, targets, reduction, opts.ignore_index, num_tokens)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_output):
        if ctx.reduction == "none":
            hidden, weight, bias, targets = ctx.saved_tensors
            with torch.autocast(**ctx.autocast):
                _, grads = _chunked(
                    hidden,
                    weight,
                    bias,
                    targets,
                    ctx.opts,
                    ctx.chunk_size,
                    grad_output,
                    ctx.needs,
                    ctx.fp32_accumulation,
                )
        else:
            grads = [None if g is None else g * grad_output for g in ctx.saved_tensors]
        grads = [None if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return (*grads, None, None, None, None, None, None)


def check_inputs(hidden, weight, targets, bias, chunk_size, options) -> None:
    """Rejects what :func:`fused_linear_cross_entropy` cannot compute, naming the argument."""
    check_options(**options)
    check_targets(hidden, targets, "hidden")
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"weight must be (vocab, {hidden.shape[-1]}) for hidden {tuple(hidden.shape)}; got {tuple(weight.shape)}"
        )
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")


def fused_linear_cross_entropy_reference(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
    fp32_accumulation: bool = True,
) -> torch.Tensor:
    """PyTorch fused linear cross-entropy, chunked over tokens; see :func:`fused_linear_cross_entropy`."""
    options = dict(
        label_smoothing=label_smoothing, z_loss=z_loss, reduction=reduction, softcap=softcap, num_tokens=num_tokens
    )
    check_inputs(hidden, weight, targets, bias, chunk_size, options)
    opts = _LossOptions(ignore_index, label_smoothing, z_loss, softcap)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    if chunk_size is None:
        itemsize = _matmul_dtype(hidden, weight).itemsize
        chunk_size = default_chunk_size(flat_hidden.shape[0], weight.shape[0], itemsize)
    # Inside Function.forward every input counts as needing a gradient, even under
    # torch.no_grad(); evaluation must not pay for gradients, so it never enters it.
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (hidden, weight, bias)):
        out = _FusedLinearCrossEntropy.apply(
            flat_hidden, weight, bias, flat_targets, opts, reduction, num_tokens, chunk_size, fp32_accumulation
        )
        return out.view(targets.shape) if reduction == "none" else out
    losses, _ = _chunked(flat_hidden, weight, bias, flat_targets, opts, chunk_size)
    return reduce_losses(losses, targets, reduction, ignore_index, num_tokens)


# ---------------------------------------------------------------------------
# Triton path: chunks through cuBLAS and the cross-entropy kernel, as custom ops.


def _accumulate_product(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """``acc += a @ b``, the sum inside the matmul and rounded once to ``acc``'s dtype."""
    if acc.dtype == a.dtype:
        torch.addmm(acc, a, b, out=acc)
    elif acc.is_cuda and acc.dtype == torch.float32 and a.dtype in (torch.float16, torch.bfloat16):
        # cuBLAS reads and writes the float32 accumulator directly (torch >= 2.8).
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:  # mixed dtypes off CUDA (the interpreter's tests): widened operands, as cuBLAS sums
        torch.addmm(acc, a.to(acc.dtype), b.to(acc.dtype), out=acc)


def _run_chunks(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    grad_scale: Tensor | None,
    options: tuple,
    chunk_size: int,
    compute_dtype: torch.dtype,
    needs: tuple[bool, bool, bool],
    fp32_accumulation: bool,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None]:
    """Per-token losses and the gradients ``needs`` asks for, of ``sum(grad_scale * losses)``.

    ``grad_scale`` is None (1), 0-d (shared) or (N,) (per token). Gradients not needed are
    None; weight and bias gradients come in :func:`accumulator_dtype`. The matmuls run in
    ``compute_dtype`` (autocast's, decided by the caller), whatever autocast says here.
    """
    with torch.autocast(hidden.device.type, enabled=False):
        return _chunks_without_autocast(
            hidden, weight, bias, targets, grad_scale, options, chunk_size, compute_dtype, needs, fp32_accumulation
        )


def _chunks_without_autocast(
    hidden, weight, bias, targets, grad_scale, options, chunk_size, compute_dtype, needs, fp32_accumulation
):
    from . import _triton_ce

    n, vocab = hidden.shape[0], weight.shape[0]
    ignore_index, label_smoothing, z_loss, softcap = options
    device = hidden.device
    h = hidden.to(compute_dtype)
    w = weight.to(compute_dtype)
    b = None if bias is None else bias.to(compute_dtype)
    targets = targets.contiguous()
    want = any(needs)
    losses = torch.empty(n, dtype=torch.float32, device=device)
    grad_hidden = torch.empty(hidden.shape, dtype=hidden.dtype, device=device) if needs[0] else None
    grad_weight = (
        torch.zeros(weight.shape, dtype=accumulator_dtype(weight.dtype, fp32_accumulation), device=device)
        if needs[1]
        else None
    )
    grad_bias = (
        torch.zeros(vocab, dtype=accumulator_dtype(bias.dtype, fp32_accumulation), device=device)
        if bias is not None and needs[2]
        else None
    )
    workspace = torch.empty((min(chunk_size, n), vocab), dtype=compute_dtype, device=device)
    for start in range(0, n, chunk_size):
        end = min(start + chunk_size, n)
        h_chunk = h[start:end]
        logits = workspace[: end - start]
        if b is None:
            torch.mm(h_chunk, w.t(), out=logits)
        else:
            torch.addmm(b, h_chunk, w.t(), out=logits)
        scale = grad_scale
        if scale is not None and scale.ndim:
            scale = scale[start:end]
        _triton_ce.cross_entropy_rows(
            logits,
            targets[start:end],
            losses[start:end],
            ignore_index=ignore_index,
            label_smoothing=label_smoothing,
            z_loss=z_loss,
            softcap=softcap,
            grad=logits if want else None,
            grad_scale=scale,
        )
        if not want:
            continue
        dlogits = logits  # overwritten in place by the kernel
        if grad_hidden is not None:
            if grad_hidden.dtype == compute_dtype:
                torch.mm(dlogits, w, out=grad_hidden[start:end])
            else:
                grad_hidden[start:end] = dlogits @ w
        if grad_weight is not None:
            _accumulate_product(grad_weight, dlogits.t(), h_chunk)
        if grad_bias is not None:
            grad_bias += dlogits.sum(0, dtype=grad_bias.dtype)
    return losses, grad_hidden, grad_weight, grad_bias


def _empty(like: Tensor) -> Tensor:
    # Custom ops cannot return None; an absent gradient is a 0-element tensor.
    return like.new_empty(0)


@torch.library.custom_op("ember::linear_cross_entropy", mutates_args=())
def _reduced_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    denominator: Tensor | None,
    reduction: str,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int,
    compute_dtype: torch.dtype,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    fp32_accumulation: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The loss reduced by ``reduction`` ("mean", with its ``denominator``, or "sum") and its
    gradients for an upstream gradient of 1, all computed now."""
    fold = reduction == "mean" and folds_mean_scale(compute_dtype)
    losses, *grads = _run_chunks(
        hidden,
        weight,
        bias,
        targets,
        1.0 / denominator if fold else None,
        (ignore_index, label_smoothing, z_loss, softcap),
        chunk_size,
        compute_dtype,
        (grad_hidden, grad_weight, grad_bias),
        fp32_accumulation,
    )
    return (reduce_in_op(losses, reduction, denominator), *(_empty(hidden) if g is None else g for g in grads))


@_reduced_op.register_fake
def _(hidden, weight, bias, targets, denominator, reduction, ignore_index, label_smoothing, z_loss, softcap,
      chunk_size, compute_dtype, grad_hidden, grad_weight, grad_bias, fp32_accumulation):  # fmt: skip
    return (
        hidden.new_empty((), dtype=torch.float32),
        hidden.new_empty(hidden.shape) if grad_hidden else _empty(hidden),
        weight.new_empty(weight.shape, dtype=accumulator_dtype(weight.dtype, fp32_accumulation))
        if grad_weight
        else _empty(hidden),
        bias.new_empty(bias.shape, dtype=accumulator_dtype(bias.dtype, fp32_accumulation))
        if grad_bias and bias is not None
        else _empty(hidden),
    )


def _reduced_setup_context(ctx, inputs, output):
    hidden, weight, bias, _, denominator, reduction, _, _, _, _, _, compute_dtype, *_ = inputs
    _, *grads = output
    ctx.mark_non_differentiable(*grads)
    ctx.divide = reduction == "mean" and not folds_mean_scale(compute_dtype)
    ctx.save_for_backward(*grads, denominator if ctx.divide else None)
    ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)


def _reduced_backward(ctx, grad_loss, *_):
    # The gradients were computed in forward for an upstream gradient of 1; scale them.
    # Where a gradient already has its input's dtype this happens in place, so a second
    # backward through the same graph fails loudly rather than scaling twice.
    *grads, denominator = ctx.saved_tensors
    scale = grad_loss / denominator if ctx.divide else grad_loss
    grads = [
        scaled_gradient(g, scale, dtype) if needed else None
        for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad)
    ]
    return (*grads,) + (None,) * 13


_reduced_op.register_autograd(_reduced_backward, setup_context=_reduced_setup_context)


@torch.library.custom_op("ember::linear_cross_entropy_losses", mutates_args=())
def _losses_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int,
    compute_dtype: torch.dtype,
    fp32_accumulation: bool,
) -> Tensor:
    """Per-token losses (N,) float32: one matmul and one sweep of the kernel per chunk. Backward
    recomputes the chunks (``fp32_accumulation`` is for it)."""
    options = (ignore_index, label_smoothing, z_loss, softcap)
    losses, *_ = _run_chunks(
        hidden, weight, bias, targets, None, options, chunk_size, compute_dtype, (False,) * 3, fp32_accumulation
    )
    return losses


@_losses_op.register_fake
def _(hidden, weight, bias, targets, ignore_index, label_smoothing, z_loss, softcap, chunk_size, compute_dtype,
      fp32_accumulation):  # fmt: skip
    return hidden.new_empty(hidden.shape[0], dtype=torch.float32)


@torch.library.custom_op("ember::linear_cross_entropy_grads", mutates_args=())
def _grads_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    grad_losses: Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    chunk_size: int,
    compute_dtype: torch.dtype,
    grad_hidden: bool,
    grad_weight: bool,
    grad_bias: bool,
    fp32_accumulation: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of ``sum(grad_losses * losses)`` in the inputs' dtypes; the chunks recomputed."""
    _, *grads = _run_chunks(
        hidden,
        weight,
        bias,
        targets,
        grad_losses,
        (ignore_index, label_smoothing, z_loss, softcap),
        chunk_size,
        compute_dtype,
        (grad_hidden, grad_weight, grad_bias),
        fp32_accumulation,
    )
    dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
    return tuple(_empty(hidden) if g is None else g.to(dtype) for g, dtype in zip(grads, dtypes))


@_grads_op.register_fake
def _(hidden, weight, bias, targets, grad_losses, ignore_index, label_smoothing, z_loss, softcap, chunk_size,
      compute_dtype, grad_hidden, grad_weight, grad_bias, fp32_accumulation):  # fmt: skip
    return (
        hidden.new_empty(hidden.shape) if grad_hidden else _empty(hidden),
        weight.new_empty(weight.shape) if grad_weight else _empty(hidden),
        bias.new_empty(bias.shape) if grad_bias and bias is not None else _empty(hidden),
    )


def _losses_setup_context(ctx, inputs, output):
    hidden, weight, bias, targets = inputs[:4]
    ctx.save_for_backward(hidden, weight, bias, targets)
    ctx.rest = inputs[4:]  # options, chunk_size, compute_dtype, fp32_accumulation


def _losses_backward(ctx, grad_losses):
    # Each token's upstream gradient weighs its row of d(logits) before the weight
    # gradient sums over tokens, so nothing computed in forward could be reused.
    hidden, weight, bias, targets = ctx.saved_tensors
    *options, chunk_size, compute_dtype, fp32_accumulation = ctx.rest
    needs = ctx.needs_input_grad[:3]
    grads = torch.ops.ember.linear_cross_entropy_grads(
        hidden, weight, bias, targets, grad_losses, *options, chunk_size, compute_dtype, *needs, fp32_accumulation
    )
    return tuple(g if needed else None for g, needed in zip(grads, needs)) + (None,) * 8


_losses_op.register_autograd(_losses_backward, setup_context=_losses_setup_context)


def _kernels_cover(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether the kernel and cuBLAS handle these inputs; others (float64) take the reference,
    which defines the behaviour."""
    return all(t.dtype in KERNEL_DTYPES for t in (hidden, weight, bias) if t is not None)


def _fused_linear_cross_entropy_triton(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
    fp32_accumulation: bool = True,
) -> torch.Tensor:
    """:func:`fused_linear_cross_entropy` on cuBLAS and the Triton kernel; float64 takes the reference."""
    options = dict(label_smoothing=label_smoothing, z_loss=z_loss, softcap=softcap)
    common = dict(ignore_index=ignore_index, reduction=reduction, num_tokens=num_tokens, **options)
    check_inputs(hidden, weight, targets, bias, chunk_size, dict(reduction=reduction, num_tokens=num_tokens, **options))
    if not _kernels_cover(hidden, weight, bias):
        return fused_linear_cross_entropy_reference(
            hidden, weight, targets, bias=bias, chunk_size=chunk_size, fp32_accumulation=fp32_accumulation, **common
        )
    check_triton("fused_linear_cross_entropy", hidden)
    flat_hidden, flat_targets = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    compute_dtype = _matmul_dtype(hidden, weight)
    if chunk_size is None:
        chunk_size = default_chunk_size(flat_hidden.shape[0], weight.shape[0], compute_dtype.itemsize)
    loss_options = (
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        None if softcap is None else float(softcap),
    )
    needs = tuple(
        torch.is_grad_enabled() and x is not None and x.requires_grad for x in (hidden, weight, bias)
    )
    if reduction == "none" or not any(needs):
        losses = torch.ops.ember.linear_cross_entropy_losses(
            flat_hidden, weight, bias, flat_targets, *loss_options, chunk_size, compute_dtype, fp32_accumulation
        )
        return reduce_losses(losses, targets, reduction, ignore_index, num_tokens)
    denominator = None
    if reduction == "mean":
        denominator = device_scalar(mean_denominator(flat_targets, ignore_index, num_tokens), hidden.device)
    loss, *_ = torch.ops.ember.linear_cross_entropy(
        flat_hidden,
        weight,
        bias,
        flat_targets,
        denominator,
        reduction,
        *loss_options,
        chunk_size,
        compute_dtype,
        *needs,
        fp32_accumulation,
    )
    return loss



def fused_linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    chunk_size: int | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    reduction: str = "mean",
    softcap: float | None = None,
    num_tokens: int | torch.Tensor | None = None,
    fp32_accumulation: bool = True,
) -> torch.Tensor:
    """``cross_entropy(hidden @ weight.T + bias, targets, ...)`` without materialising the logits.

    hidden (N, D) or (..., D), weight (V, D), bias (V,) or None, targets (N,) or (...).
    ``chunk_size`` tokens' logits exist at a time; None sizes chunks to
    :data:`WORKSPACE_BYTES` of logits (:func:`default_chunk_size`). The loss options are
    those of :func:`ember.kernels.cross_entropy`. Gradients are computed during the forward
    pass (one pass over the logits instead of two); with ``reduction="none"`` backward
    recomputes the chunks instead, since each token's upstream gradient is only known then.
    Weight and bias gradients accumulate across chunks in float32, or with
    ``fp32_accumulation=False`` in the weight's dtype (less memory, one rounding per chunk).
    Not twice differentiable.
    """
    impl = select(hidden, _fused_linear_cross_entropy_triton, fused_linear_cross_entropy_reference)
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
        fp32_accumulation=fp32_accumulation,
    )


class FusedLinearCrossEntropyLoss(nn.Module):
    """:func:`fused_linear_cross_entropy` with its options fixed at construction; ``num_tokens`` is per call."""

    def __init__(
        self,
        *,
        chunk_size=None,
        ignore_index=-100,
        label_smoothing=0.0,
        z_loss=0.0,
        reduction="mean",
        softcap=None,
        fp32_accumulation=True,
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
            fp32_accumulation=fp32_accumulation,
        )

    def forward(self, hidden, weight, targets, bias=None, *, num_tokens=None) -> torch.Tensor:
        return fused_linear_cross_entropy(hidden, weight, targets, bias=bias, num_tokens=num_tokens, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())
