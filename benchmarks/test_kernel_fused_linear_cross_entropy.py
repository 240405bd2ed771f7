"""Kernel benchmark: fused linear cross-entropy, Ember's (cuBLAS and its Triton cross-entropy
kernel, chunk by chunk) against PyTorch eager, torch.compile, PyTorch's own
``F.linear_cross_entropy`` and Liger-Kernel where they exist.

Each provider is timed forward (a training forward: the inputs require grad), backward (the
forward run untimed first) and both; the median round is reported, in ``benchmark.extra_info``
and in a table printed after the module (timing: ``kernel_bench_common.py``).

Model, N tokens, hidden H, vocabulary V: three matmuls of ``2*N*H*V`` FLOPs each, one forward
(the logits) and two backward (hidden and weight gradients). TFLOP/s = model FLOPs / time;
"x ceiling" divides by one ``(N, H) @ (H, V)`` matmul measured in the same run. Ember and
Liger compute the gradients during the forward pass, so their forward is slow and their
backward nearly free by this model: compare the "fwd+bwd" rows.

``EMBER_BENCH_SMALL=1`` uses smoke sizes (float32 on the CPU, where the Triton providers skip:
Triton runs there only in its interpreter, which is for tests). Full size, for a GPU: 16384
tokens, H=4096, V=128256, bfloat16.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import fused_linear_cross_entropy
from kernel_bench_common import (  # benchmarks/ is on sys.path when pytest collects it
    CUDA,
    DEVICE,
    DTYPE,
    MODES,
    SIZES,
    compile_once,
    measure,
    module_figures,
    print_loss_table,
    use_backend,
)

try:
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
except ImportError:  # not installed (it is optional, and CUDA-only)
    liger_fused_linear_cross_entropy = None


def _flce_eager(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


def _flce_providers() -> dict[str, Callable | None]:
    """name -> loss(hidden, weight, targets), or None where the provider cannot run here."""
    native = getattr(F, "linear_cross_entropy", None)  # torch >= 2.13
    return {
        "ember": fused_linear_cross_entropy if CUDA else None,
        "torch": _flce_eager,
        "torch.compile": compile_once("flce", _flce_eager),
        "torch.linear_cross_entropy": (lambda h, w, t: native(h, w, t)) if native else None,
        "liger": (lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t))
        if CUDA and liger_fused_linear_cross_entropy
        else None,
    }


@pytest.fixture(scope="module")
def figures(request):
    s = SIZES
    model = f"flce: N={s.tokens} H={s.hidden} V={s.vocab}, model FLOPs fwd 2NHV, bwd 4NHV, fwd+bwd 6NHV"
    yield from module_figures(request, print_loss_table("fused linear cross-entropy", model, "one matmul"))


@pytest.fixture(scope="module")
def flce_inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    s = SIZES
    hidden = torch.randn(s.tokens, s.hidden, generator=gen, device=DEVICE).to(DTYPE)
    weight = (torch.randn(s.vocab, s.hidden, generator=gen, device=DEVICE) * 0.02).to(DTYPE).requires_grad_()
    targets = torch.randint(0, s.vocab, (s.tokens,), generator=gen, device=DEVICE)
    return hidden, weight, targets


def test_flce_matmul_ceiling(benchmark, figures, flce_inputs):
    hidden, weight, _ = flce_inputs
    w = weight.detach()
    flops = 2 * SIZES.tokens * SIZES.hidden * SIZES.vocab
    measure(benchmark, figures, "flce/ceiling", lambda: (), lambda: hidden @ w.T, flops, "TFLOP/s")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(_flce_providers()))
def test_flce(benchmark, monkeypatch, figures, flce_inputs, provider, mode):
    loss_fn = _flce_providers()[provider]
    if loss_fn is None:
        pytest.skip(f"{provider} does not run on {DEVICE.type} here")
    use_backend(monkeypatch, provider)
    base, weight, targets = flce_inputs

    def fresh():
        weight.grad = None
        return base.detach().clone().requires_grad_(), weight

    torch.testing.assert_close(
        loss_fn(*fresh(), targets).float(), _flce_eager(base, weight, targets), rtol=2e-2, atol=2e-2
    )
    flops = 2 * SIZES.tokens * SIZES.hidden * SIZES.vocab
    if mode == "fwd":
        setup, run, amount = fresh, lambda h, w: loss_fn(h, w, targets), flops
    elif mode == "bwd":
        setup, run, amount = lambda: (loss_fn(*fresh(), targets),), lambda loss: loss.backward(), 2 * flops
    else:
        setup, run, amount = fresh, lambda h, w: loss_fn(h, w, targets).backward(), 3 * flops
    measure(benchmark, figures, f"flce/{mode}/{provider}", setup, run, amount, "TFLOP/s")
