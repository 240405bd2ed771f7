"""The cross-entropy kernels that :mod:`.cross_entropy` and :mod:`.fused_linear_cross_entropy`
share, and their launchers; imported only once an op's Triton path has passed its guard.

One program handles one token (one row of logits) and sweeps its vocabulary twice, a
block of ``BLOCK`` logits at a time:

1. online softmax: running max and rescaled sum of ``exp`` give ``lse``; the same sweep
   picks out the target's logit and, for label smoothing, sums the logits;
2. with a gradient buffer given, each block is read again and ``d(loss)/d(logits)`` is
   written, times an optional per-token or shared scale.

So a row costs two reads and one write, no softmax is ever stored, and the gradient can
be written over the logits themselves (the fused linear path does, into its own chunk
workspace). Everything is computed in float32 whatever the logits' dtype; the gradient is
stored in the gradient buffer's dtype.

Kernels launch through :func:`._triton.launch`, as every Ember kernel does:
compiled on CUDA tensors and, on CPU tensors while ``TRITON_INTERPRET=1`` is set, in
Triton's interpreter (slow; for tests), however the environment stood at import.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton import launch

# Logits a program holds at once. 32k float32 values over 32 warps is 32 registers a
# thread, the size Liger settled on; larger rows loop. Tests lower it to exercise the loop.
MAX_BLOCK = 32768
SCALE_BLOCK = 4096


@triton.jit
def _tanh(u):
    """tanh from ``exp`` (libdevice's has no interpreter version). Near 0, where
    ``1 - exp(-2|u|)`` cancels, the odd Taylor series to u**9 takes over: for |u| < 1/4 its
    first omitted term is under 1e-8 relative."""
    u2 = u * u
    e = tl.exp(-2.0 * tl.abs(u))
    t = tl.where(u < 0.0, e - 1.0, 1.0 - e) / (1.0 + e)
    series = u * (
        1.0
        + u2 * (-0.3333333333333333 + u2 * (0.13333333333333333 + u2 * (-0.05396825396825397 + u2 * 0.021869488536155203)))
    )
    return tl.where(u2 < 0.0625, series, t)


@triton.jit
def _cross_entropy_kernel(
    logits_ptr,
    logits_row_stride,
    grad_ptr,  # may be logits_ptr: each element is read before it is overwritten, by the same program
    grad_row_stride,
    targets_ptr,
    losses_ptr,
    scale_ptr,
    scale_stride,  # 0: one scale shared by all rows
    n_cols,
    ignore_index,
    label_smoothing,
    z_loss,
    softcap,
    HAS_SMOOTHING: tl.constexpr,
    HAS_Z_LOSS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_SCALE: tl.constexpr,
    WRITE_GRAD: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # int64: at 16k tokens and a 128k vocabulary, row * stride is within 2% of 2**31.
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    offsets = tl.arange(0, BLOCK)
    target = tl.load(targets_ptr + row)

    if target == ignore_index:
        tl.store(losses_ptr + row, 0.0)
        if WRITE_GRAD:
            zeros = tl.zeros([BLOCK], dtype=grad_ptr.dtype.element_ty)
            for start in range(0, n_cols, BLOCK):
                cols = start + offsets
                tl.store(grad_ptr + cols, zeros, mask=cols < n_cols)
        return

    # Sweep 1: lse by online softmax, the target's logit, the sum of logits.
    m = float("-inf")
    s = 0.0
    z_target = 0.0
    z_sum = 0.0
    for start in range(0, n_cols, BLOCK):
        cols = start + offsets
        mask = cols < n_cols
        z = tl.load(logits_ptr + cols, mask=mask, other=float("-inf")).to(tl.float32)
        if HAS_SOFTCAP:
            z = tl.where(mask, softcap * _tanh(z / softcap), float("-inf"))
        m_new = tl.maximum(m, tl.max(z, 0))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new), 0)
        m = m_new
        z_target += tl.sum(tl.where(cols == target, z, 0.0), 0)
        if HAS_SMOOTHING:
            z_sum += tl.sum(tl.where(mask, z, 0.0), 0)
    lse = m + tl.log(s)

    # A target outside [0, n_cols) cannot be checked on the host without a sync; make its loss NaN.
    in_range = (target >= 0) & (target < n_cols)
    loss = tl.where(in_range, lse - z_target, float("nan"))
    if HAS_SMOOTHING:
        loss = (1.0 - label_smoothing) * loss + label_smoothing * (lse - z_sum / n_cols)
    if HAS_Z_LOSS:
        loss += z_loss * lse * lse
    tl.store(losses_ptr + row, loss)

    # Sweep 2: dloss/dz_j = p_j (1 + 2 z_loss lse) - (1 - smoothing) [j == target] - smoothing / V,
    # times dz/dlogits = 1 - (z / softcap)^2 under the cap, times the scale.
    if WRITE_GRAD:
        scale = 1.0
        if HAS_SCALE:
            scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
        p_scale = scale
        if HAS_Z_LOSS:
            p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        target_term = scale
        uniform_term = 0.0
        if HAS_SMOOTHING:
            target_term = (1.0 - label_smoothing) * scale
            uniform_term = label_smoothing / n_cols * scale
        for start in range(0, n_cols, BLOCK):
            cols = start + offsets
            mask = cols < n_cols
            z = tl.load(logits_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            if HAS_SOFTCAP:
                t = _tanh(z / softcap)
                z = softcap * t
            g = tl.exp(z - lse) * p_scale - uniform_term
            g = tl.where(cols == target, g - target_term, g)
            if HAS_SOFTCAP:
                g = g * (1.0 - t * t)
            tl.store(grad_ptr + cols, g.to(grad_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
    src_ptr,
    src_row_stride,
    dst_ptr,  # may be src_ptr
    dst_row_stride,
    scale_ptr,
    scale_stride,
    n_cols,
    BLOCK: tl.constexpr,
):
    # A 1-D grid of blocks, row-major: no grid dimension limit however many rows.
    pid = tl.program_id(0).to(tl.int64)
    blocks_per_row = tl.cdiv(n_cols, BLOCK)
    row = pid // blocks_per_row
    cols = (pid % blocks_per_row) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    scale = tl.load(scale_ptr + row * scale_stride).to(tl.float32)
    x = tl.load(src_ptr + row * src_row_stride + cols, mask=mask).to(tl.float32)
    tl.store(dst_ptr + row * dst_row_stride + cols, (x * scale).to(dst_ptr.dtype.element_ty), mask=mask)


def _num_warps(block: int) -> int:
    return max(4, min(32, block // 1024))


def cross_entropy_rows(
    logits: torch.Tensor,
    targets: torch.Tensor,
    losses: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss: float,
    softcap: float | None,
    grad: torch.Tensor | None = None,
    grad_scale: torch.Tensor | None = None,
) -> None:
    """Fills ``losses`` (N,) float32 with the per-token losses of ``logits`` (N, V).

    With ``grad`` (N, V), also writes ``d(scale_i * loss_i)/d(logits)`` there; ``grad`` may
    be ``logits`` itself. ``grad_scale`` is None (1), a 0-d tensor, or one value per row.
    Rows and targets need unit stride in their last dimension; rows may be strided.
    """
    n_rows, n_cols = logits.shape
    if n_rows == 0:
        return
    block = min(MAX_BLOCK, triton.next_power_of_2(n_cols))
    out = logits if grad is None else grad
    scale = losses if grad_scale is None else grad_scale
    launch(
        _cross_entropy_kernel,
        (n_rows,),
        logits.device,
        logits,
        logits.stride(0),
        out,
        out.stride(0),
        targets,
        losses,
        scale,
        scale.stride(0) if scale.ndim else 0,
        n_cols,
        ignore_index,
        float(label_smoothing),
        float(z_loss),
        float(softcap or 1.0),
        HAS_SMOOTHING=label_smoothing > 0,
        HAS_Z_LOSS=z_loss > 0,
        HAS_SOFTCAP=softcap is not None,
        HAS_SCALE=grad_scale is not None,
        WRITE_GRAD=grad is not None,
        BLOCK=block,
        num_warps=_num_warps(block),
    )


def scale_rows(src: torch.Tensor, scale: torch.Tensor, out: torch.Tensor) -> None:
    """``out = src * scale`` computed in float32 and stored in ``out``'s dtype; ``out`` may be ``src``.

    ``scale`` is 0-d (``src`` contiguous, any shape) or (R,) for ``src`` (R, C), one factor
    per row; rows may be strided, with unit stride within a row.
    """
    if src.numel() == 0:
        return
    if scale.ndim:
        src2, out2 = src, out
    else:  # one long row
        src2, out2 = src.view(1, -1), out.view(1, -1)
    rows, cols = src2.shape
    block = min(SCALE_BLOCK, triton.next_power_of_2(cols))
    launch(
        _scale_rows_kernel,
        (rows * triton.cdiv(cols, block),),
        src.device,
        src2,
        src2.stride(0),
        out2,
        out2.stride(0),
        scale,
        scale.stride(0) if scale.ndim else 0,
        cols,
        BLOCK=block,
        num_warps=_num_warps(block),
    )
