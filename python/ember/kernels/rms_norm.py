"""RMSNorm: ``y = x / sqrt(mean(x**2) + eps) * (offset + weight)`` over the last dimension."""

from __future__ import annotations

import torch
from torch import nn

from ._dispatch import select, upcast

CASTING_MODES = ("llama", "gemma")


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """PyTorch RMSNorm; the statistics are always computed in at least float32.

    ``casting="llama"`` rounds the normalised ``x`` to its own dtype before the scale (Llama,
    Hugging Face ``LlamaRMSNorm``); ``casting="gemma"`` also scales in float32 and rounds once
    at the end. ``offset=1.0`` with a zero-initialised weight is Gemma's ``(1 + weight)``.
    """
    if casting not in CASTING_MODES:
        raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")
    xf = upcast(x)
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if casting == "llama":
        return normed.to(x.dtype) * (offset + weight)
    return (normed * (offset + upcast(weight))).to(x.dtype)


# The Triton kernel, once written; None routes CUDA tensors to the reference.
_triton_impl = None


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, *, offset: float = 0.0, casting: str = "llama"
) -> torch.Tensor:
    """RMSNorm of ``x`` over its last dimension; see :func:`rms_norm_reference` for the options."""
    impl = select("rms_norm", x, _triton_impl, rms_norm_reference)
    return impl(x, weight, eps, offset=offset, casting=casting)


class RMSNorm(nn.Module):
    """:func:`rms_norm` with a learned ``weight`` of shape ``(dim,)``, initialised so the scale is 1."""

    def __init__(
        self, dim: int, eps: float = 1e-6, offset: float = 0.0, casting: str = "llama", *, device=None, dtype=None
    ):
        super().__init__()
        if casting not in CASTING_MODES:
            raise ValueError(f"casting must be one of {CASTING_MODES}, got {casting!r}")
        self.eps, self.offset, self.casting = eps, offset, casting
        self.weight = nn.Parameter(torch.empty(dim, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 1.0 - self.offset)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, offset=self.offset, casting=self.casting)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, offset={self.offset}, casting={self.casting!r}"
