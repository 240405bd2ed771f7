"""SwiGLU, the gated activation of Llama's feed-forward: ``silu(gate) * up``.

The Triton kernels compute in float32 and round once. Backward recomputes ``silu`` from the
saved inputs rather than saving it: with ``sig = sigmoid(gate)``,
``d/dgate = grad * up * sig * (1 + gate * (1 - sig))`` and ``d/dup = grad * gate * sig``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ._dispatch import check_triton, select
from ._triton import KERNEL_DTYPES, jit, launch, rows_of, tl, triton

# Values per program: 8 to 16 bytes a thread in 4 warps.
BLOCK = 1024


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch SwiGLU; ``F.silu`` already evaluates half-precision inputs in float32."""
    return F.silu(gate) * up


# ---------------------------------------------------------------------------
# Triton kernels


@jit
def _swiglu_forward_kernel(G, U, OUT, g_row_stride, u_row_stride, n_cols, col_blocks, BLOCK: tl.constexpr):
    """One block of one row of ``out = silu(gate) * up``; OUT is contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    g = tl.load(G + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(OUT + row * n_cols + cols, (g * tl.sigmoid(g) * u).to(OUT.dtype.element_ty), mask=mask)


@jit
def _swiglu_backward_kernel(
    DOUT, G, U, DG, DU, dout_row_stride, g_row_stride, u_row_stride, n_cols, col_blocks, BLOCK: tl.constexpr
):
    """One block of one row of both input gradients; DG and DU are contiguous."""
    pid = tl.program_id(0).to(tl.int64)
    row = pid // col_blocks
    cols = (pid % col_blocks) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dout = tl.load(DOUT + row * dout_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + row * g_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + row * u_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    tl.store(DG + row * n_cols + cols, (dout * u * sig * (1.0 + g * (1.0 - sig))).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + row * n_cols + cols, (dout * g * sig).to(DU.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------
# Launch code


def _as_rows(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors, all of one shape, as (rows, columns) matrices with adjacent columns: one row
    when all are contiguous, else their last dimension (the halves of a fused gate-up output stay views)."""
    if any(t.shape != tensors[0].shape for t in tensors):
        raise ValueError(f"swiglu's tensors must have one shape, got {[tuple(t.shape) for t in tensors]}")
    if all(t.is_contiguous() for t in tensors):
        return [t.view(1, -1) for t in tensors]
    return [rows_of(t) for t in tensors]


def _forward(gate: Tensor, up: Tensor) -> Tensor:
    out = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    if gate.numel():
        g, u = _as_rows(gate, up)
        n_rows, n_cols = g.shape
        col_blocks = triton.cdiv(n_cols, BLOCK)
        grid = (n_rows * col_blocks,)
        args = (g, u, out, g.stride(0), u.stride(0), n_cols, col_blocks)
        launch(_swiglu_forward_kernel, grid, gate.device, *args, BLOCK=BLOCK, num_warps=4)
    return out


def _backward(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    grad_gate = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    grad_up = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    if gate.numel():
        d, g, u = _as_rows(grad, gate, up)
        n_rows, n_cols = g.shape
        col_blocks = triton.cdiv(n_cols, BLOCK)
        grid = (n_rows * col_blocks,)
        args = (d, g, u, grad_gate, grad_up, d.stride(0), g.stride(0), u.stride(0), n_cols, col_blocks)
        launch(_swiglu_backward_kernel, grid, gate.device, *args, BLOCK=BLOCK, num_warps=4)
    return grad_gate, grad_up


# ---------------------------------------------------------------------------
# Custom ops and their autograd


@torch.library.custom_op("ember::swiglu", mutates_args=())
def _swiglu_op(gate: Tensor, up: Tensor) -> Tensor:
    return _forward(gate, up)


@_swiglu_op.register_fake
def _(gate, up):
    return torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)


@torch.library.custom_op("ember::swiglu_backward", mutates_args=())
def _swiglu_backward_op(grad: Tensor, gate: Tensor, up: Tensor) -> tuple[Tensor, Tensor]:
    return _backward(grad, gate, up)


@_swiglu_backward_op.register_fake
def _(grad, gate, up):
    return (
        torch.empty(gate.shape, dtype=gate.dtype, device=gate.device),
        torch.empty(up.shape, dtype=up.dtype, device=up.device),
    )


def _setup_swiglu(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _swiglu_grads(ctx, grad):
    gate, up = ctx.saved_tensors
    return tuple(torch.ops.ember.swiglu_backward(grad, gate, up))


_swiglu_op.register_autograd(_swiglu_grads, setup_context=_setup_swiglu)


def _kernels_cover(gate: Tensor, up: Tensor) -> bool:
    """Whether the kernels handle these inputs; anything else (broadcasting, mixed dtypes,
    float64) takes the reference, which defines the behaviour."""
    same = gate.shape == up.shape and gate.dtype == up.dtype and gate.device == up.device
    return same and gate.dtype in KERNEL_DTYPES


def _swiglu_triton(gate: Tensor, up: Tensor) -> Tensor:
    if not _kernels_cover(gate, up):
        return swiglu_reference(gate, up)
    check_triton("swiglu", gate)
    return torch.ops.ember.swiglu(gate, up)



def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, elementwise."""
    return select(gate, _swiglu_triton, swiglu_reference)(gate, up)
