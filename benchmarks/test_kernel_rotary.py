"""Kernel benchmark: rotary embeddings (``apply_rotary``), forward, backward and both, against
PyTorch eager, torch.compile and Liger-Kernel.

Run::

    pytest benchmarks/test_kernel_rotary.py --benchmark-json=/tmp/rotary.json   # on a GPU
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_kernel_rotary.py --benchmark-disable  # smoke, CPU or GPU

Size on a GPU (bfloat16): Llama 3 8B's attention, batch 2 x seq 8192, 32 query and 8 key/value
heads of 128. On the CPU, and with ``EMBER_BENCH_SMALL=1``, a small float32 shape where only
PyTorch eager runs. The byte model below, the copy ceiling and the timing are described in
``kernel_bench_common.py``.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from ember.kernels import apply_rotary, apply_rotary_reference
from kernel_bench_common import (  # benchmarks/ is on sys.path when pytest collects it
    DEVICE,
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


def rotary_workload() -> Workload:
    batch, seq, heads, kv_heads, head_dim = (2, 8192, 32, 8, 128) if FULL else (1, 64, 8, 2, 64)
    q, k = randn(batch, seq, heads, head_dim), randn(batch, seq, kv_heads, head_dim)
    positions = torch.arange(seq, device=DEVICE, dtype=torch.float64)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE, dtype=torch.float64) / head_dim)
    angles = torch.outer(positions, inv_freq).repeat(1, 2)
    cos, sin = angles.cos().float(), angles.sin().float()
    providers: dict[str, Callable] = {
        "ember": lambda q, k: apply_rotary(q, k, cos, sin),
        "torch": lambda q, k: apply_rotary_reference(q, k, cos, sin),
    }
    liger_rope_function = liger("rope", "LigerRopeFunction")
    if liger_rope_function is not None:
        # Liger takes (batch, heads, seq, dim) views and rotates them in place (Ember's default
        # writes new tensors: one allocation more, the same bytes).
        def liger_rope(q, k):
            q_rot, k_rot = liger_rope_function.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

        providers["liger"] = liger_rope
    act = size_of(q) + size_of(k)
    tables = size_of(cos) + size_of(sin)
    return Workload(
        "rotary",
        f"rotary {batch}x{seq} tokens, {heads}/{kv_heads} heads x {head_dim} {str(DTYPE)[6:]}",
        (q, k),
        providers,
        passes(2 * act + tables, 2 * act + tables),
        "q and k read and written (their gradients in backward), + the cos and sin rows once",
    )


WORKLOADS: dict[str, Callable[[], Workload]] = {"rotary": rotary_workload}


@pytest.fixture(scope="module")
def figures(request):
    yield from module_figures(request, print_pass_table("rotary embeddings"))


def test_copy_ceiling(benchmark, figures):
    measure_copy_ceiling(benchmark, figures)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_kernel(benchmark, monkeypatch, figures, name, provider, which):
    measure_pass(benchmark, monkeypatch, figures, WORKLOADS, name, provider, which)
