"""Chooses between an op's Triton kernel and its PyTorch reference; the guard of every Triton
path; the references' dtype policy.

``EMBER_KERNELS=torch`` or ``EMBER_KERNELS=triton`` forces one backend for every op; unset,
CUDA tensors get Triton where it is installed and everything else gets the reference.
"""

from __future__ import annotations

import os
from typing import Callable

import torch

from ._triton import interpreter_requested, triton

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
    """``"triton"`` or ``"torch"``: the forced backend, else Triton on CUDA (where Triton is
    installed) and the reference elsewhere."""
    return forced_backend() or ("triton" if tensor.is_cuda and triton is not None else "torch")


def select(tensor: torch.Tensor, triton_impl: Callable, reference: Callable) -> Callable:
    """The implementation to run on ``tensor``: ``triton_impl`` when :func:`backend_for` says
    Triton, else ``reference``. ``triton_impl`` itself takes the reference for inputs its
    kernels do not cover and calls :func:`check_triton` before launching."""
    return triton_impl if backend_for(tensor) == "triton" else reference


def check_triton(op: str, tensor: torch.Tensor) -> None:
    """Refuses, naming ``ember.kernels.<op>``, a Triton path that cannot run: Triton is not
    installed, or ``tensor`` is neither on CUDA nor on the CPU under Triton's interpreter.

    Every op calls it at the same point, once its inputs are known to be covered by its
    kernels and just before launching, so a forced ``EMBER_KERNELS=triton`` never quietly
    reports reference numbers under the Triton name. Plain Python over the environment, so
    torch.compile traces it without a graph break.
    """
    if triton is None:
        raise NotImplementedError(
            f"{ENV_VAR}=triton, but Triton is not installed (it ships for Linux only), so ember.kernels.{op} "
            f"cannot run its Triton kernel; install triton or unset {ENV_VAR}"
        )
    if tensor.is_cuda or (tensor.device.type == "cpu" and interpreter_requested()):
        return
    raise NotImplementedError(
        f"{ENV_VAR}=triton, but ember.kernels.{op} cannot run its Triton kernel on {tensor.device.type} tensors "
        f"outside Triton's interpreter; use CUDA tensors, set TRITON_INTERPRET=1 (the interpreter on the CPU: "
        f"slow, for tests), or unset {ENV_VAR}"
    )


def upcast(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32: half-precision inputs are reduced in float32, float64 stays float64."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
