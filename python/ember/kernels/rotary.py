"""Rotary position embedding (RoPE) in Hugging Face Llama's half-split convention.

Within the first ``rotary_dim`` features of each head, feature ``i`` pairs with feature
``i + rotary_dim // 2`` (``rotate_half``), not with its neighbour ``i + 1`` as in Meta's
original complex-number code. Checkpoints in Hugging Face layout need no permutation.

The Triton kernel reads ``q`` and ``k`` through their strides, so the views a projection
gives (heads split out of a fused QKV output, or a (batch, heads, seq, dim) tensor
transposed) are rotated without a copy. One program rotates every head of one token.
Backward applies the transposed rotation, itself a rotation, so the op is differentiable
any number of times.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._dispatch import check_triton, select, upcast
from ._triton import KERNEL_DTYPES, jit, launch, tl, triton


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch RoPE; rotates in at least float32 and returns ``q`` and ``k``'s dtypes."""
    cos, sin = _tables_for(q, k, cos, sin, position_ids)
    q_rot, k_rot = _rotate(q, cos, sin), _rotate(k, cos, sin)
    if inplace:
        return q.copy_(q_rot), k.copy_(k_rot)
    return q_rot, k_rot


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    xf = upcast(x)
    x_rot = xf[..., :rotary_dim]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat((rotated, xf[..., rotary_dim:]), dim=-1)
    return rotated.to(x.dtype)


def _check_shapes(q, k, cos, sin, position_ids) -> None:
    if q.ndim != 4 or k.ndim != 4 or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(
            "q and k must be (batch, seq, heads, head_dim) with the same batch, seq and head_dim; "
            f"got q {tuple(q.shape)}, k {tuple(k.shape)}"
        )
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have the same shape; got {tuple(cos.shape)} and {tuple(sin.shape)}")
    batch, seq, _, head_dim = q.shape
    rotary_dim = cos.shape[-1]
    if rotary_dim % 2 or rotary_dim > head_dim:
        raise ValueError(f"rotary_dim (cos.shape[-1] = {rotary_dim}) must be even and at most head_dim ({head_dim})")
    if cos.ndim == 3:
        if position_ids is not None:
            raise ValueError(
                "cos and sin of shape (batch, seq, rotary_dim) are already per position; pass position_ids=None"
            )
        if cos.shape[1] != seq or cos.shape[0] not in (1, batch):
            raise ValueError(f"cos of shape {tuple(cos.shape)} does not match q's batch {batch} and seq {seq}")
    elif cos.ndim == 2:
        if position_ids is not None:
            if position_ids.shape != (batch, seq):
                raise ValueError(f"position_ids must be (batch, seq) = {(batch, seq)}, got {tuple(position_ids.shape)}")
        elif cos.shape[0] < seq:
            raise ValueError(f"cos and sin hold {cos.shape[0]} positions, fewer than the sequence length {seq}")
    else:
        raise ValueError(
            f"cos and sin must be (positions, rotary_dim) or (batch, seq, rotary_dim), got {tuple(cos.shape)}"
        )


def _tables_for(q, k, cos, sin, position_ids):
    """``cos`` and ``sin`` as ``(batch or 1, seq, 1, rotary_dim)``, broadcastable over heads."""
    _check_shapes(q, k, cos, sin, position_ids)
    if cos.ndim == 2:
        if position_ids is not None:
            cos, sin = cos[position_ids], sin[position_ids]
        else:
            seq = q.shape[1]
            cos, sin = cos[None, :seq], sin[None, :seq]
    return cos.unsqueeze(2), sin.unsqueeze(2)


# ---------------------------------------------------------------------------
# Triton kernel


@jit
def _rotary_kernel(
    X, OUT, COS, SIN, POSITIONS,
    seq_len, n_heads, half, n_tail,
    x_stride_b, x_stride_s, x_stride_h, x_stride_d,
    out_stride_b, out_stride_s, out_stride_h, out_stride_d,
    table_stride_b, table_stride_s, table_stride_d,
    positions_stride_b, positions_stride_s,
    HAS_POSITIONS: tl.constexpr, TRANSPOSE: tl.constexpr, COPY_TAIL: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    """Rotates every head of token (b, s) = divmod(program, seq_len) from X into OUT (which may be X).

    Per pair (x1, x2) = (x[d], x[d + half]) and the table halves (c1, c2), (s1, s2):
    ``(x1 c1 - x2 s1, x2 c2 + x1 s2)``, or with TRANSPOSE ``(x1 c1 + x2 s2, x2 c2 - x1 s1)``,
    the backward. The ``n_tail`` features after the rotated ones are copied when COPY_TAIL.
    """
    token = tl.program_id(0).to(tl.int64)
    b = token // seq_len
    s = token % seq_len
    if HAS_POSITIONS:
        table_row = tl.load(POSITIONS + b * positions_stride_b + s * positions_stride_s).to(tl.int64) * table_stride_s
    else:
        table_row = b * table_stride_b + s * table_stride_s
    d = tl.arange(0, BLOCK_HALF)
    d_ok = d < half
    c1 = tl.load(COS + table_row + d * table_stride_d, mask=d_ok, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table_row + (d + half) * table_stride_d, mask=d_ok, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table_row + d * table_stride_d, mask=d_ok, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table_row + (d + half) * table_stride_d, mask=d_ok, other=0.0).to(tl.float32)
    x_token = X + b * x_stride_b + s * x_stride_s
    out_token = OUT + b * out_stride_b + s * out_stride_s
    for first in range(0, n_heads, BLOCK_H):
        h = first + tl.arange(0, BLOCK_H)
        mask = (h < n_heads)[:, None] & d_ok[None, :]
        x_first = x_token + h[:, None] * x_stride_h + d[None, :] * x_stride_d
        out_first = out_token + h[:, None] * out_stride_h + d[None, :] * out_stride_d
        x1 = tl.load(x_first, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_first + half * x_stride_d, mask=mask, other=0.0).to(tl.float32)
        if TRANSPOSE:
            o1 = x1 * c1[None, :] + x2 * s2[None, :]
            o2 = x2 * c2[None, :] - x1 * s1[None, :]
        else:
            o1 = x1 * c1[None, :] - x2 * s1[None, :]
            o2 = x2 * c2[None, :] + x1 * s2[None, :]
        tl.store(out_first, o1.to(OUT.dtype.element_ty), mask=mask)
        tl.store(out_first + half * out_stride_d, o2.to(OUT.dtype.element_ty), mask=mask)
        if COPY_TAIL:
            t = 2 * half + tl.arange(0, BLOCK_TAIL)
            tail_mask = (h < n_heads)[:, None] & (t < 2 * half + n_tail)[None, :]
            tail = tl.load(x_token + h[:, None] * x_stride_h + t[None, :] * x_stride_d, mask=tail_mask, other=0.0)
            tl.store(out_token + h[:, None] * out_stride_h + t[None, :] * out_stride_d, tail, mask=tail_mask)


# ---------------------------------------------------------------------------
# Launch code


def _rotate_triton(x, out, cos, sin, position_ids, transpose: bool) -> None:
    """Writes the rotation of x (batch, seq, heads, head_dim) into out (x itself for in place)."""
    _check_shapes(x, out, cos, sin, position_ids)  # the ops can be called directly
    batch, seq, n_heads, head_dim = x.shape
    if not x.numel():
        return
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    half = cos.shape[-1] // 2
    if cos.ndim == 3:  # per token; a leading 1 broadcasts over the batch
        table_strides = (cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), cos.stride(2))
    else:
        table_strides = (0, cos.stride(0), cos.stride(1))
    positions = position_ids if position_ids is not None else cos  # unread without positions
    positions_strides = position_ids.stride() if position_ids is not None else (0, 0)
    n_tail = head_dim - 2 * half
    block_half = triton.next_power_of_2(half)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 2048 // block_half))
    launch(
        _rotary_kernel, (batch * seq,), x.device,
        x, out, cos, sin, positions,
        seq, n_heads, half, n_tail,
        *x.stride(), *out.stride(), *table_strides, *positions_strides,
        HAS_POSITIONS=position_ids is not None, TRANSPOSE=transpose,
        COPY_TAIL=n_tail > 0 and out is not x,
        BLOCK_H=block_h, BLOCK_HALF=block_half, BLOCK_TAIL=triton.next_power_of_2(max(n_tail, 1)),
        num_warps=max(1, min(8, block_h * block_half // 256)),  # 8 values a thread in each half
    )


# ---------------------------------------------------------------------------
# Custom ops and their autograd


@torch.library.custom_op("ember::rotary", mutates_args=())
def _rotary_op(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Optional[Tensor],  # noqa: UP045 -- custom_op's schema inference wants typing.Optional
    transpose: bool,
) -> Tensor:
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    _rotate_triton(x, out, cos, sin, position_ids, transpose)
    return out


@_rotary_op.register_fake
def _(x, cos, sin, position_ids, transpose):
    return torch.empty(x.shape, dtype=x.dtype, device=x.device)


@torch.library.custom_op("ember::rotary_", mutates_args=("x",))
def _rotary_inplace_op(
    x: Tensor,
    cos: Tensor,
    sin: Tensor,
    position_ids: Optional[Tensor],  # noqa: UP045
) -> None:
    _rotate_triton(x, x, cos, sin, position_ids, False)


@_rotary_inplace_op.register_fake
def _(x, cos, sin, position_ids):
    return None


def _setup_rotary(ctx, inputs, output):
    _, cos, sin, position_ids, transpose = inputs
    ctx.save_for_backward(cos, sin, position_ids)
    ctx.transpose = transpose


def _rotary_grads(ctx, grad):
    cos, sin, position_ids = ctx.saved_tensors
    return torch.ops.ember.rotary(grad, cos, sin, position_ids, not ctx.transpose), None, None, None, None


_rotary_op.register_autograd(_rotary_grads, setup_context=_setup_rotary)


class _RotaryInPlace(torch.autograd.Function):
    """Rotation in place; one tensor per call, since autograd refuses a Function that modifies
    two views (q and k of one QKV output) and returns both."""

    @staticmethod
    def forward(ctx, x, cos, sin, position_ids):
        torch.ops.ember.rotary_(x, cos, sin, position_ids)
        ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, position_ids)
        return x

    @staticmethod
    def backward(ctx, grad):
        cos, sin, position_ids = ctx.saved_tensors
        return torch.ops.ember.rotary(grad, cos, sin, position_ids, True), None, None, None


def _kernels_cover(q, k, cos, sin, position_ids) -> bool:
    """Whether the kernel handles these inputs; anything else (float64, gradients for the
    tables) takes the reference, which defines the behaviour."""
    if position_ids is not None and (position_ids.dtype.is_floating_point or position_ids.device != q.device):
        return False
    if torch.is_grad_enabled() and (cos.requires_grad or sin.requires_grad):
        return False
    return all(t.dtype in KERNEL_DTYPES and t.device == q.device for t in (q, k, cos, sin))


def _apply_rotary_triton(q, k, cos, sin, *, position_ids=None, inplace=False):
    _check_shapes(q, k, cos, sin, position_ids)
    if not _kernels_cover(q, k, cos, sin, position_ids):
        return apply_rotary_reference(q, k, cos, sin, position_ids=position_ids, inplace=inplace)
    check_triton("apply_rotary", q)
    if inplace:
        return _RotaryInPlace.apply(q, cos, sin, position_ids), _RotaryInPlace.apply(k, cos, sin, position_ids)
    rotary = torch.ops.ember.rotary
    return rotary(q, cos, sin, position_ids, False), rotary(k, cos, sin, position_ids, False)



def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
    inplace: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q`` (batch, seq, heads, head_dim) and ``k`` (batch, seq, kv_heads, head_dim).

    ``cos`` and ``sin`` are either a table ``(positions, rotary_dim)`` whose first ``seq`` rows
    are used, or whose rows ``position_ids`` (batch, seq) selects, or already per token
    ``(batch, seq, rotary_dim)``. Each holds the angles twice, ``cat(theta, theta)``, as
    Hugging Face builds them. ``rotary_dim < head_dim`` rotates only the first ``rotary_dim``
    features (partial rotary) and passes the rest through. Returns ``(q_rot, k_rot)``.

    ``inplace=True`` writes the rotation into ``q`` and ``k`` and returns them, saving two
    allocations; autograd then forbids it on leaves that require grad, as for any in-place op.
    Any strides are accepted; out of place, the results are contiguous.
    """
    impl = select(q, _apply_rotary_triton, apply_rotary_reference)
    return impl(q, k, cos, sin, position_ids=position_ids, inplace=inplace)
