"""RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)`` over the last dimension.

``residual=`` fuses the add before a pre-norm transformer's norm: the op normalises
``x + residual`` and also returns that sum, the residual stream's next value, so the sum
is written once and never read back.

The Triton kernels read a row once when it fits one block of columns, and in blocks of
``MAX_BLOCK_COLS`` (twice) when it does not. Backward recomputes each row's statistics
instead of saving them, and sums the weight gradient in float32, each program over its own
rows into its own buffer row, the buffer then reduced in a fixed order: no atomics, the
same bits every run.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from ._dispatch import check_triton, select, upcast
from ._triton import KERNEL_DTYPES, jit, launch, programs_for, rows_of, tl, triton, warps_for

CASTING_MODES = ("llama", "gemma")

# Columns a program holds at once; wider rows are walked in blocks of this many.
MAX_BLOCK_COLS = 8192


def _check_casting(casting: str) -> None:
    if casting not in CASTING_MODES:
        raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")


def rms_norm_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """PyTorch RMSNorm; the statistics are always computed in at least float32.

    ``casting="llama"`` rounds the normalised ``x`` to its own dtype before the scale (Llama,
    Hugging Face ``LlamaRMSNorm``); ``casting="gemma"`` also scales in float32 and rounds once
    at the end. ``offset=1.0`` with a zero-initialised weight is Gemma's ``(1 + weight)``.
    With ``residual``, normalises ``x + residual`` and returns ``(normed, x + residual)``.
    """
    _check_casting(casting)
    if residual is not None:
        summed = x + residual
        return rms_norm_reference(summed, weight, eps, offset=offset, casting=casting), summed
    xf = upcast(x)
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if casting == "llama":
        return normed.to(x.dtype) * (offset + weight)
    return (normed * (offset + upcast(weight))).to(x.dtype)


# ---------------------------------------------------------------------------
# Triton kernels


@jit
def _rms_norm_forward_kernel(
    X, R, S, W, Y,
    x_row_stride, r_row_stride, s_row_stride, y_row_stride,
    n_rows, n_cols, eps, offset,
    HAS_RESIDUAL: tl.constexpr, GEMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """Normalises BLOCK_M rows of S, where S is X, or X + R (stored, rounded to S's dtype)."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    # A row that fits one block stays in registers from the first loop to the second.
    v = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    sum_sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        v = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            r = tl.load(R + rows[:, None] * r_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            summed = (v + r).to(S.dtype.element_ty)
            tl.store(S + rows[:, None] * s_row_stride + cols[None, :], summed, mask=mask)
            v = summed.to(tl.float32)
        sum_sq += tl.sum(v * v, axis=1)
    rstd = tl.rsqrt(sum_sq / n_cols + eps)
    for start in range(0, n_cols, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        mask = row_ok[:, None] & (cols < n_cols)[None, :]
        if not ONE_BLOCK:
            v = tl.load(X + rows[:, None] * x_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_RESIDUAL:
                v += tl.load(R + rows[:, None] * r_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
                v = v.to(S.dtype.element_ty).to(tl.float32)
        w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
        if GEMMA:
            y = v * rstd[:, None] * (w + offset)[None, :]
        else:
            # Llama rounds the normalised row to the input's dtype and (offset + weight) to the weight's.
            scale = (w + offset).to(W.dtype.element_ty).to(tl.float32)
            y = (v * rstd[:, None]).to(S.dtype.element_ty).to(tl.float32) * scale[None, :]
        tl.store(Y + rows[:, None] * y_row_stride + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


@jit
def _rms_norm_backward_kernel(
    DY, DSUM, S, W, DS, DW_PARTIAL, RSTD,
    dy_row_stride, dsum_row_stride, s_row_stride,
    n_rows, n_cols, rows_per_program, eps, offset,
    HAS_GRAD_SUM: tl.constexpr, GEMMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    """Gradient of the normalised input S (plus DSUM, the gradient reaching S directly) for
    one program's rows.

    With ``g = dy * (offset + w)`` and ``xhat = s * rstd``, ``ds = rstd * (g - xhat * mean(g * xhat))``.
    A row in one block also adds its ``dy * xhat`` to the program's weight-gradient row
    DW_PARTIAL[pid]; wider rows leave their rstd in RSTD for _rms_norm_weight_grad_kernel.
    """
    pid = tl.program_id(0)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    if ONE_BLOCK:
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < n_cols
        w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
        if GEMMA:
            scale = w + offset
        else:
            scale = (w + offset).to(W.dtype.element_ty).to(tl.float32)
        dw = tl.zeros([BLOCK_N], dtype=tl.float32)
        for first in range(row_start, row_end, BLOCK_M):
            rows = first + tl.arange(0, BLOCK_M)
            mask = (rows < row_end)[:, None] & col_ok[None, :]
            v = tl.load(S + rows[:, None] * s_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            rstd = tl.rsqrt(tl.sum(v * v, axis=1) / n_cols + eps)
            xhat = v * rstd[:, None]
            g = dy * scale[None, :]
            ds = (g - xhat * (tl.sum(g * xhat, axis=1) / n_cols)[:, None]) * rstd[:, None]
            if HAS_GRAD_SUM:
                ds += tl.load(DSUM + rows[:, None] * dsum_row_stride + cols[None, :], mask=mask, other=0.0).to(
                    tl.float32
                )
            tl.store(DS + rows[:, None] * n_cols + cols[None, :], ds.to(DS.dtype.element_ty), mask=mask)
            if not GEMMA:
                xhat = xhat.to(S.dtype.element_ty).to(tl.float32)  # what the forward multiplied the weight by
            dw += tl.sum(dy * xhat, axis=0)
        tl.store(DW_PARTIAL + pid * n_cols + cols, dw, mask=col_ok)
    else:
        for row in range(row_start, row_end):
            # Since xhat = s * rstd, mean(g * xhat) = rstd * mean(g * s): one pass finds both sums.
            sum_sq = tl.zeros([BLOCK_N], dtype=tl.float32)
            dot = tl.zeros([BLOCK_N], dtype=tl.float32)
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < n_cols
                v = tl.load(S + row * s_row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
                if GEMMA:
                    scale = w + offset
                else:
                    scale = (w + offset).to(W.dtype.element_ty).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                sum_sq += v * v
                dot += dy * scale * v
            rstd = tl.rsqrt(tl.sum(sum_sq, axis=0) / n_cols + eps)
            coef = rstd * rstd * rstd * tl.sum(dot, axis=0) / n_cols
            for start in range(0, n_cols, BLOCK_N):
                cols = start + tl.arange(0, BLOCK_N)
                col_ok = cols < n_cols
                v = tl.load(S + row * s_row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                w = tl.load(W + cols, mask=col_ok, other=0.0).to(tl.float32)
                if GEMMA:
                    scale = w + offset
                else:
                    scale = (w + offset).to(W.dtype.element_ty).to(tl.float32)
                dy = tl.load(DY + row * dy_row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                ds = dy * scale * rstd - v * coef
                if HAS_GRAD_SUM:
                    ds += tl.load(DSUM + row * dsum_row_stride + cols, mask=col_ok, other=0.0).to(tl.float32)
                tl.store(DS + row * n_cols + cols, ds.to(DS.dtype.element_ty), mask=col_ok)
            tl.store(RSTD + row, rstd)


@jit
def _rms_norm_weight_grad_kernel(
    DY, S, RSTD, DW_PARTIAL,
    dy_row_stride, s_row_stride, n_rows, n_cols, rows_per_program,
    GEMMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """For rows too wide for one block: sums ``dy * xhat`` over one group of rows for one block
    of columns into DW_PARTIAL[group]."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < n_cols
    group = tl.program_id(1).to(tl.int64)
    row_start = group * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    for first in range(row_start, row_end, BLOCK_M):
        rows = first + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        v = tl.load(S + rows[:, None] * s_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + rows[:, None] * dy_row_stride + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + rows, mask=row_ok, other=0.0)
        xhat = v * rstd[:, None]
        if not GEMMA:
            xhat = xhat.to(S.dtype.element_ty).to(tl.float32)
        dw += tl.sum(dy * xhat, axis=0)
    tl.store(DW_PARTIAL + group * n_cols + cols, dw, mask=col_ok)


# ---------------------------------------------------------------------------
# Launch code


def _tiles(n_cols: int) -> tuple[int, int, bool]:
    """(rows, columns) per program and whether a row fits one block: short rows go several to
    a program so that each program still moves a few thousand values."""
    block_n = min(triton.next_power_of_2(n_cols), MAX_BLOCK_COLS)
    if block_n < n_cols:
        return 1, block_n, False
    return max(1, min(16, 2048 // block_n)), block_n, True


def _output_dtypes(x_dtype, residual_dtype, weight_dtype, gemma: bool) -> tuple[torch.dtype, torch.dtype]:
    """(dtype of the normalised input, dtype of the result), as the reference's type promotion gives them."""
    in_dtype = x_dtype if residual_dtype is None else torch.promote_types(x_dtype, residual_dtype)
    return in_dtype, (in_dtype if gemma else torch.promote_types(in_dtype, weight_dtype))


def _check_shapes(rows_like: torch.Tensor, weight: torch.Tensor, *same_shape: torch.Tensor | None) -> None:
    """The custom ops can be called directly: a mismatch must not become an out-of-bounds read."""
    if weight.shape != rows_like.shape[-1:] or any(t is not None and t.shape != rows_like.shape for t in same_shape):
        raise ValueError(
            f"rms_norm: weight must be ({rows_like.shape[-1]},) and every other tensor {tuple(rows_like.shape)}; "
            f"got weight {tuple(weight.shape)}, others {[None if t is None else tuple(t.shape) for t in same_shape]}"
        )


def _forward(x, residual, weight, eps, offset, gemma):
    """(y, x + residual or None), shaped like ``x``."""
    _check_shapes(x, weight, residual)
    in_dtype, out_dtype = _output_dtypes(x.dtype, None if residual is None else residual.dtype, weight.dtype, gemma)
    x2 = rows_of(x)
    n_rows, n_cols = x2.shape
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    if residual is None:
        r2 = s = x2
    else:
        r2 = rows_of(residual)
        s = torch.empty((n_rows, n_cols), dtype=in_dtype, device=x.device)
    if n_rows:
        block_m, block_n, one_block = _tiles(n_cols)
        launch(
            _rms_norm_forward_kernel, (triton.cdiv(n_rows, block_m),), x.device,
            x2, r2, s, weight.contiguous(), y,
            x2.stride(0), r2.stride(0), s.stride(0), y.stride(0),
            n_rows, n_cols, eps, offset,
            HAS_RESIDUAL=residual is not None, GEMMA=gemma,
            BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=warps_for(block_m * block_n),
        )
    return y.view(x.shape), (None if residual is None else s.view(x.shape))


def _backward(grad_y, grad_sum, normed_input, weight, eps, offset, gemma):
    """(gradient of the normalised input, gradient of the weight)."""
    _check_shapes(normed_input, weight, grad_y, grad_sum)
    s2, dy = rows_of(normed_input), rows_of(grad_y)
    dsum = dy if grad_sum is None else rows_of(grad_sum)
    n_rows, n_cols = s2.shape
    device = s2.device
    ds = torch.empty((n_rows, n_cols), dtype=normed_input.dtype, device=device)
    weight = weight.contiguous()
    if not n_rows:
        return ds.view(normed_input.shape), torch.zeros_like(weight)
    block_m, block_n, one_block = _tiles(n_cols)
    # Backward holds about twice the forward's values per row: twice the threads, and two
    # resident programs per SM, each looping over its share of the rows.
    num_warps = warps_for(2 * block_m * block_n)
    tiles = triton.cdiv(n_rows, block_m)
    rows_per_program = triton.cdiv(tiles, programs_for(device, tiles, per_unit=2)) * block_m
    programs = triton.cdiv(n_rows, rows_per_program)
    rstd = torch.empty(0 if one_block else n_rows, dtype=torch.float32, device=device)
    partial = torch.empty((programs, n_cols), dtype=torch.float32, device=device)
    launch(
        _rms_norm_backward_kernel, (programs,), device,
        dy, dsum, s2, weight, ds, partial, rstd,
        dy.stride(0), dsum.stride(0), s2.stride(0),
        n_rows, n_cols, rows_per_program, eps, offset,
        HAS_GRAD_SUM=grad_sum is not None, GEMMA=gemma,
        BLOCK_M=block_m, BLOCK_N=block_n, ONE_BLOCK=one_block, num_warps=num_warps,
    )
    if not one_block:
        block_m, block_n = 32, 256
        col_blocks = triton.cdiv(n_cols, block_n)
        row_tiles = triton.cdiv(n_rows, block_m)
        groups = max(1, programs_for(device, col_blocks * row_tiles) // col_blocks)
        rows_per_group = triton.cdiv(row_tiles, groups) * block_m
        groups = triton.cdiv(n_rows, rows_per_group)
        partial = torch.empty((groups, n_cols), dtype=torch.float32, device=device)
        launch(
            _rms_norm_weight_grad_kernel, (col_blocks, groups), device,
            dy, s2, rstd, partial,
            dy.stride(0), s2.stride(0), n_rows, n_cols, rows_per_group,
            GEMMA=gemma, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps_for(block_m * block_n),
        )
    return ds.view(normed_input.shape), partial.sum(0).to(weight.dtype)


# ---------------------------------------------------------------------------
# Custom ops and their autograd


@torch.library.custom_op("ember::rms_norm", mutates_args=())
def _rms_norm_op(x: Tensor, weight: Tensor, eps: float, offset: float, gemma: bool) -> Tensor:
    return _forward(x, None, weight, eps, offset, gemma)[0]


@_rms_norm_op.register_fake
def _(x, weight, eps, offset, gemma):
    return x.new_empty(x.shape, dtype=_output_dtypes(x.dtype, None, weight.dtype, gemma)[1])


@torch.library.custom_op("ember::rms_norm_add", mutates_args=())
def _rms_norm_add_op(
    x: Tensor, residual: Tensor, weight: Tensor, eps: float, offset: float, gemma: bool
) -> tuple[Tensor, Tensor]:
    return _forward(x, residual, weight, eps, offset, gemma)


@_rms_norm_add_op.register_fake
def _(x, residual, weight, eps, offset, gemma):
    in_dtype, out_dtype = _output_dtypes(x.dtype, residual.dtype, weight.dtype, gemma)
    return x.new_empty(x.shape, dtype=out_dtype), x.new_empty(x.shape, dtype=in_dtype)


@torch.library.custom_op("ember::rms_norm_backward", mutates_args=())
def _rms_norm_backward_op(
    grad_y: Tensor,
    grad_sum: Optional[Tensor],  # noqa: UP045 -- custom_op's schema inference wants typing.Optional
    normed_input: Tensor,
    weight: Tensor,
    eps: float,
    offset: float,
    gemma: bool,
) -> tuple[Tensor, Tensor]:
    return _backward(grad_y, grad_sum, normed_input, weight, eps, offset, gemma)


@_rms_norm_backward_op.register_fake
def _(grad_y, grad_sum, normed_input, weight, eps, offset, gemma):
    return normed_input.new_empty(normed_input.shape), weight.new_empty(weight.shape)


def _setup_rms_norm(ctx, inputs, output):
    x, weight, eps, offset, gemma = inputs
    ctx.save_for_backward(x, weight)
    ctx.options = (eps, offset, gemma)


def _rms_norm_grads(ctx, grad_y):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = torch.ops.ember.rms_norm_backward(grad_y, None, x, weight, *ctx.options)
    return grad_x, grad_weight, None, None, None


def _setup_rms_norm_add(ctx, inputs, output):
    x, residual, weight, eps, offset, gemma = inputs
    ctx.save_for_backward(output[1], weight)
    ctx.options = (eps, offset, gemma)
    ctx.dtypes = (x.dtype, residual.dtype)


def _rms_norm_add_grads(ctx, grad_y, grad_sum):
    summed, weight = ctx.saved_tensors
    grad_summed, grad_weight = torch.ops.ember.rms_norm_backward(grad_y, grad_sum, summed, weight, *ctx.options)
    # x and residual both receive the sum's gradient, as autograd's add gives it.
    return grad_summed.to(ctx.dtypes[0]), grad_summed.to(ctx.dtypes[1]), grad_weight, None, None, None


_rms_norm_op.register_autograd(_rms_norm_grads, setup_context=_setup_rms_norm)
_rms_norm_add_op.register_autograd(_rms_norm_add_grads, setup_context=_setup_rms_norm_add)


def _kernels_cover(x, weight, residual) -> bool:
    """Whether the kernels handle these inputs; anything else (float64, broadcasting, empty
    rows) takes the reference, which defines the behaviour."""
    tensors = (x, weight) if residual is None else (x, weight, residual)
    return (
        x.ndim >= 1
        and x.shape[-1] > 0
        and weight.shape == x.shape[-1:]
        and (residual is None or residual.shape == x.shape)
        and all(t.dtype in KERNEL_DTYPES and t.device == x.device for t in tensors)
    )


def _rms_norm_triton(x, weight, eps=1e-6, *, offset=0.0, casting="llama", residual=None):
    _check_casting(casting)
    if not _kernels_cover(x, weight, residual):
        return rms_norm_reference(x, weight, eps, offset=offset, casting=casting, residual=residual)
    check_triton("rms_norm", x)
    gemma = casting == "gemma"
    if residual is None:
        return torch.ops.ember.rms_norm(x, weight, float(eps), float(offset), gemma)
    normed, summed = torch.ops.ember.rms_norm_add(x, residual, weight, float(eps), float(offset), gemma)
    return normed, summed



def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    casting: str = "llama",
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm of ``x`` over its last dimension; see :func:`rms_norm_reference` for the options.

    With ``residual`` (shaped like ``x``), normalises ``x + residual`` instead and returns
    ``(normed, x + residual)``: a pre-norm block's ``h = h + out; y = norm(h)`` becomes
    ``y, h = rms_norm(out, weight, residual=h)``, one pass instead of two.
    """
    impl = select(x, _rms_norm_triton, rms_norm_reference)
    if residual is None:
        return impl(x, weight, eps, offset=offset, casting=casting)
    return impl(x, weight, eps, offset=offset, casting=casting, residual=residual)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned ``weight`` of shape ``(dim,)``, initialised so the scale is 1."""

    def __init__(
        self, dim: int, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama", *, device=None, dtype=None
    ):
        super().__init__()
        _check_casting(casting)
        self.eps, self.offset, self.casting = eps, offset, casting
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with ``residual`` the pair ``(norm(x + residual), x + residual)``."""
        return rms_norm(x, self.weight, self.eps, offset=self.offset, casting=self.casting, residual=residual)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"
