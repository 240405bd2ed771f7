"""Chooses between an op's Triton kernel and its PyTorch reference; the references' dtype policy.

``EMBER_KERNELS=torch`` or ``EMBER_KERNELS=triton`` forces one backend for every op;
unset, CUDA tensors get Triton and everything else gets the reference.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

ENV_VAR = "EMBER_KERNELS"
BACKENDS = ("torch", "triton")


def forced_backend() -> str | None:
    """The backend ``EMBER_KERNELS`` forces, or None when it is unset or empty."""
    value = os.environ.get(ENV_VAR, "").strip().lower()
    if not value:
        return None
    if value not in BACKENDS:
        raise ValueError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is not a kernel backend; set it to 'torch' or 'triton', or unset it"
        )
    return value


def backend_for(tensor: torch.Tensor) -> str:
    """``"triton"`` or ``"torch"``: the forced backend, else Triton on CUDA and the reference elsewhere."""
    return forced_backend() or ("triton" if tensor.is_cuda else "torch")


def select(op: str, tensor: torch.Tensor, triton_impl: Callable | None, reference: Callable) -> Callable:
    """The implementation of ``op`` to run on ``tensor``.

    An op without a Triton kernel (``triton_impl is None``) quietly uses its reference on
    CUDA, but refuses when Triton was asked for explicitly, so a benchmark or a GPU test
    never reports reference numbers under the Triton name.
    """
    if backend_for(tensor) == "triton":
        if triton_impl is not None:
            return triton_impl
        if forced_backend() == "triton":
            raise NotImplementedError(
                f"{ENV_VAR}=triton, but ember.kernels.{op} has no Triton kernel yet; "
                f"unset {ENV_VAR} or set it to 'torch'"
            )
    return reference


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: half-precision inputs are reduced in float32, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
