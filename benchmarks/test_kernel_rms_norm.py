"""Kernel benchmark: RMSNorm, plain and with the fused residual add, forward, backward and both,
against PyTorch eager, torch.compile and Liger-Kernel.

Run::

    pytest benchmarks/test_kernel_rms_norm.py --benchmark-json=/tmp/rms_norm.json   # on a GPU
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_kernel_rms_norm.py --benchmark-disable  # smoke, CPU or GPU

Size on a GPU (bfloat16): 16384 x 4096. On the CPU, and with ``EMBER_BENCH_SMALL=1``, a small
float32 shape; there only PyTorch eager runs (the Triton kernels would run in Triton's
interpreter, which measures nothing useful, and torch.compile would spend the smoke run
compiling). The byte model below, the copy ceiling and the timing are described in
``kernel_bench_common.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ember.kernels import rms_norm, rms_norm_reference
from kernel_bench_common import (  # benchmarks/ is on sys.path when pytest collects it
    DTYPE,
    FULL,
    PASSES,
    PROVIDERS,
    Workload,
    liger,
    measure_copy_ceiling,
    measure_pass,
    module_figures,
    passes,
    print_pass_table,
    randn,
    size_of,
)

pytestmark = [pytest.mark.slow] if FULL else []

EPS = 1e-5


def rms_norm_workload(residual: bool) -> Workload:
    rows, cols = (16384, 4096) if FULL else (64, 256)
    x, w = randn(rows, cols), randn(cols)
    providers: dict[str, Callable] = {
        "ember": lambda x, w, *r: rms_norm(x, w, EPS, residual=r[0] if r else None),
        "torch": lambda x, w, *r: rms_norm_reference(x, w, EPS, residual=r[0] if r else None),
    }
    if residual:
        liger_fn = liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    else:
        liger_fn = liger("rms_norm", "LigerRMSNormFunction")
    if liger_fn is not None:
        # in_place=False: Liger's default writes dX over the upstream gradient, which the
        # repeated backward passes here reuse.
        if residual:
            providers["liger"] = lambda x, w, r: liger_fn.apply(x, r, w, EPS, 0.0, "llama", False)
        else:
            providers["liger"] = lambda x, w: liger_fn.apply(x, w, EPS, 0.0, "llama", False)
    act = size_of(x)
    if residual:
        inputs = (x, w, randn(rows, cols))
        fwd, bwd = 4 * act + size_of(w), 4 * act + 2 * size_of(w)
        model = (
            "fwd: x, residual read, normed, sum written; bwd: both upstream gradients and the sum read, "
            "one gradient for x and residual written; + weight"
        )
    else:
        inputs = (x, w)
        fwd, bwd = 2 * act + size_of(w), 3 * act + 2 * size_of(w)
        model = "fwd: x read, y written; bwd: dy and x read, dx written; + weight read (and its gradient written)"
    name = "rms_norm+residual" if residual else "rms_norm"
    return Workload(name, f"{name} {rows}x{cols} {str(DTYPE)[6:]}", inputs, providers, passes(fwd, bwd), model)


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "rms_norm": lambda: rms_norm_workload(residual=False),
    "rms_norm+residual": lambda: rms_norm_workload(residual=True),
}


@pytest.fixture(scope="module")
def figures(request):
    yield from module_figures(request, print_pass_table("RMSNorm"))


def test_copy_ceiling(benchmark, figures):
    measure_copy_ceiling(benchmark, figures)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_kernel(benchmark, monkeypatch, figures, name, provider, which):
    measure_pass(benchmark, monkeypatch, figures, WORKLOADS, name, provider, which)
