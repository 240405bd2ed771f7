"""Kernel benchmark: SwiGLU, forward, backward and both, against PyTorch eager, torch.compile and
Liger-Kernel.

Run::

    pytest benchmarks/test_kernel_swiglu.py --benchmark-json=/tmp/swiglu.json   # on a GPU
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_kernel_swiglu.py --benchmark-disable  # smoke, CPU or GPU

Size on a GPU (bfloat16): 16384 x 14336, Llama 3 8B's feed-forward. On the CPU, and with
``EMBER_BENCH_SMALL=1``, a small float32 shape where only PyTorch eager runs. The byte model
below, the copy ceiling and the timing are described in ``kernel_bench_common.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from ember.kernels import swiglu, swiglu_reference
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


def swiglu_workload() -> Workload:
    rows, cols = (16384, 14336) if FULL else (64, 384)
    gate, up = randn(rows, cols), randn(rows, cols)
    providers: dict[str, Callable] = {"ember": swiglu, "torch": swiglu_reference}
    liger_fn = liger("swiglu", "LigerSiLUMulFunction")
    if liger_fn is not None:
        providers["liger"] = lambda g, u: liger_fn.apply(g, u)
    act = size_of(gate)
    return Workload(
        "swiglu",
        f"swiglu {rows}x{cols} {str(DTYPE)[6:]}",
        (gate, up),
        providers,
        passes(3 * act, 5 * act),
        "fwd: gate, up read, out written; bwd: dout, gate, up read, dgate, dup written",
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {"swiglu": swiglu_workload}


@pytest.fixture(scope="module")
def figures(request):
    yield from module_figures(request, print_pass_table("SwiGLU"))


def test_copy_ceiling(benchmark, figures):
    measure_copy_ceiling(benchmark, figures)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_kernel(benchmark, monkeypatch, figures, name, provider, which):
    measure_pass(benchmark, monkeypatch, figures, WORKLOADS, name, provider, which)
