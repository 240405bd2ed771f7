"""Triton for every Ember kernel: the optional import, when the interpreter runs, and launching.

Triton is Linux-only, so without it the kernels are plain functions that nothing calls and
every op runs its PyTorch reference (:mod:`._dispatch` decides). A kernel launches compiled on
CUDA tensors and, on CPU tensors with ``TRITON_INTERPRET`` set, in Triton's interpreter,
however the environment stood when Triton was imported: tests set the variable only while
they run.
"""

from __future__ import annotations

import functools
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton ships for Linux only; the references run everywhere else.
    triton = tl = None

# The dtypes the kernels read and write; they compute in float32. Other dtypes (float64)
# take the reference.
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# The spellings of "on" that Triton's own parser of TRITON_INTERPRET accepts, compared
# lower-cased and unstripped as it compares them, so that Ember and Triton agree on whether
# the interpreter was asked for.
INTERPRETER_ON = ("1", "true", "on", "yes", "y")


def interpreter_requested() -> bool:
    """Whether ``TRITON_INTERPRET`` asks for Triton's interpreter now; plain Python over the
    environment, so that torch.compile traces it without a graph break."""
    return os.environ.get("TRITON_INTERPRET", "").lower() in INTERPRETER_ON


def jit(fn):
    """``triton.jit``, or ``fn`` unchanged where Triton is not installed."""
    return fn if triton is None else triton.jit(fn)


def launch(kernel, grid: tuple[int, ...], device: torch.device, *args, **meta) -> None:
    """Runs ``kernel`` over ``grid`` on ``device``'s tensors ``args``.

    On CUDA the kernel is compiled (once per specialisation) and launched on the current
    stream of ``device``; on the CPU it runs in Triton's interpreter, which needs
    ``TRITON_INTERPRET=1`` and is slow: it exists for tests.
    """
    if triton is None:
        raise RuntimeError("Triton is not installed (it ships for Linux only); Ember's kernels cannot launch")
    if device.type == "cuda":
        with torch.cuda.device(device):
            kernel[grid](*args, **meta)
        return
    if device.type != "cpu" or not interpreter_requested():
        raise RuntimeError(
            f"Ember's Triton kernels run on CUDA tensors, or on CPU tensors with TRITON_INTERPRET=1; got {device.type}"
        )
    from triton.runtime.jit import JITFunction

    # Decorated outside interpreter mode, the @jit functions a kernel calls (Triton's own
    # tl.sum, tl.sigmoid, tl.zeros...) refuse to run outside a compiled kernel; while this
    # kernel runs in the interpreter, they run there too.
    compiled_call = JITFunction.__call__
    JITFunction.__call__ = _call_interpreted
    try:
        _interpreted(kernel)[grid](*args, **meta)
    finally:
        JITFunction.__call__ = compiled_call


# Keyed by id: hashing a JITFunction walks its source, which fails while the interpreter
# has Triton's language patched.
_interpreted_twins: dict[int, object] = {}


def _interpreted(fn):
    """The @jit function ``fn`` as Triton's interpreter runs it, whether or not it was decorated in interpreter mode."""
    from triton.runtime.interpreter import InterpretedFunction

    if isinstance(fn, InterpretedFunction):
        return fn
    if id(fn) not in _interpreted_twins:
        _interpreted_twins[id(fn)] = InterpretedFunction(fn.fn)
    return _interpreted_twins[id(fn)]


def _call_interpreted(fn, *args, **kwargs):
    return _interpreted(fn)(*args, **kwargs)


@functools.cache
def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def programs_for(device: torch.device, work: int, per_unit: int = 4) -> int:
    """How many programs a kernel that loops over ``work`` items should launch: a few per SM
    on CUDA, so each program's partial result covers many items; a handful on the CPU."""
    units = _multiprocessors(device) if device.type == "cuda" else 2
    return max(1, min(work, units * per_unit))


def rows_of(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a (rows, last dim) matrix whose columns are adjacent in memory; a copy only if it must be."""
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(-1) == 1 or rows.shape[-1] == 1 else rows.contiguous()


def warps_for(elements: int) -> int:
    """Warps for a program holding ``elements`` values at once: 8 to 16 values per thread."""
    return max(4, min(16, triton.next_power_of_2(elements) // 512))
