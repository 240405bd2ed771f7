"""SwiGLU, the gated activation of Llama's feed-forward: ``silu(gate) * up``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._dispatch import select


def swiglu_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """PyTorch SwiGLU; ``F.silu`` already evaluates half-precision inputs in float32."""
    return F.silu(gate) * up


# The Triton kernel, once written; None routes CUDA tensors to the reference.
_triton_impl = None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up``, elementwise."""
    return select("swiglu", gate, _triton_impl, swiglu_reference)(gate, up)
