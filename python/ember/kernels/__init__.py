"""Kernels for the hot operations.

Each op lives in its own file with its Triton kernels, its PyTorch reference (``*_reference``)
and the public function, which runs the Triton kernel on CUDA tensors and the reference
elsewhere (and everywhere Triton is not installed); ``EMBER_KERNELS=torch|triton`` forces one.
Inputs a kernel does not cover (float64, broadcasting) take the reference even then; a forced
Triton path that cannot run (no Triton, or CPU tensors outside ``TRITON_INTERPRET=1``) raises
``NotImplementedError`` naming the op. ``_dispatch`` chooses and guards, ``_triton`` launches.
"""

from ._dispatch import backend_for
from .cross_entropy import CrossEntropyLoss, cross_entropy, cross_entropy_reference
from .fused_linear_cross_entropy import (
    FusedLinearCrossEntropyLoss,
    fused_linear_cross_entropy,
    fused_linear_cross_entropy_reference,
)
from .rms_norm import RMSNorm, rms_norm, rms_norm_reference
from .rotary import apply_rotary, apply_rotary_reference
from .swiglu import swiglu, swiglu_reference

__all__ = [
    "CrossEntropyLoss",
    "FusedLinearCrossEntropyLoss",
    "RMSNorm",
    "apply_rotary",
    "apply_rotary_reference",
    "backend_for",
    "cross_entropy",
    "cross_entropy_reference",
    "fused_linear_cross_entropy",
    "fused_linear_cross_entropy_reference",
    "rms_norm",
    "rms_norm_reference",
    "swiglu",
    "swiglu_reference",
]
