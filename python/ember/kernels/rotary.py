"""Rotary position embedding (RoPE) in Hugging Face Llama's half-split convention.

Within the first ``rotary_dim`` features of each head, feature ``i`` pairs with feature
``i + rotary_dim // 2`` (``rotate_half``), not with its neighbour ``i + 1`` as in Meta's
original complex-number code. Checkpoints in Hugging Face layout need no permutation.
"""

from __future__ import annotations

import torch

from ._dispatch import select, upcast


def apply_rotary_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PyTorch RoPE; rotates in at least float32 and returns ``q`` and ``k``'s dtypes."""
    cos, sin = _tables_for(q, k, cos, sin, position_ids)
    return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rotary_dim = cos.shape[-1]
    xf = upcast(x)
    x_rot = xf[..., :rotary_dim]
    x1, x2 = x_rot.chunk(2, dim=-1)
    rotated = x_rot * cos + torch.cat((-x2, x1), dim=-1) * sin
    if rotary_dim < x.shape[-1]:
        rotated = torch.cat((rotated, xf[..., rotary_dim:]), dim=-1)
    return rotated.to(x.dtype)


def _tables_for(q, k, cos, sin, position_ids):
    """``cos`` and ``sin`` as ``(batch or 1, seq, 1, rotary_dim)``, broadcastable over heads."""
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
            cos, sin = cos[position_ids], sin[position_ids]
        elif cos.shape[0] < seq:
            raise ValueError(f"cos and sin hold {cos.shape[0]} positions, fewer than the sequence length {seq}")
        else:
            cos, sin = cos[None, :seq], sin[None, :seq]
    else:
        raise ValueError(
            f"cos and sin must be (positions, rotary_dim) or (batch, seq, rotary_dim), got {tuple(cos.shape)}"
        )
    return cos.unsqueeze(2), sin.unsqueeze(2)


# The Triton kernel, once written; None routes CUDA tensors to the reference.
_triton_impl = None


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotates ``q`` (batch, seq, heads, head_dim) and ``k`` (batch, seq, kv_heads, head_dim).

    ``cos`` and ``sin`` are either a table ``(positions, rotary_dim)`` whose first ``seq`` rows
    are used, or whose rows ``position_ids`` (batch, seq) selects, or already per token
    ``(batch, seq, rotary_dim)``. Each holds the angles twice, ``cat(theta, theta)``, as
    Hugging Face builds them. ``rotary_dim < head_dim`` rotates only the first ``rotary_dim``
    features (partial rotary) and passes the rest through. Returns ``(q_rot, k_rot)``.
    """
    impl = select("apply_rotary", q, _triton_impl, apply_rotary_reference)
    return impl(q, k, cos, sin, position_ids=position_ids)
