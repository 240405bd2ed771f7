"""Kernel benchmark: cross-entropy, Ember's Triton kernel against PyTorch eager, torch.compile and
Liger-Kernel where it exists.

Each provider is timed forward (a training forward: the logits require grad), backward (the
forward run untimed first) and both; the median round is reported, in ``benchmark.extra_info``
and in a table printed after the module (timing: ``kernel_bench_common.py``).

Model, N tokens x V logits of ``b`` bytes: the ideal is one read of the logits (forward) and
one write of their gradient (backward): ``N*V*b`` bytes each, ``2*N*V*b`` for both. GB/s =
model bytes / time; "x ceiling" divides by a device-to-device copy of the logits measured in
the same run (its GB/s counting the read and the write). Ember and Liger compute the gradient
during the forward pass, so their forward is slow and their backward nearly free by this
model: compare the "fwd+bwd" rows.

``EMBER_BENCH_SMALL=1`` uses smoke sizes (float32 on the CPU, where the Triton providers skip:
Triton runs there only in its interpreter, which is for tests). Full size, for a GPU:
16384 x 128256 bfloat16 logits.
"""

from __future__ import annotations

from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import cross_entropy
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
    from liger_kernel.transformers.functional import liger_cross_entropy
except ImportError:  # not installed (it is optional, and CUDA-only)
    liger_cross_entropy = None


def _ce_eager(logits, targets):
    return F.cross_entropy(logits.float(), targets)


def _ce_providers() -> dict[str, Callable | None]:
    """name -> loss(logits, targets), or None where the provider cannot run here."""
    return {
        "ember": cross_entropy if CUDA else None,
        "torch": _ce_eager,
        "torch.compile": compile_once("ce", _ce_eager),
        "liger": (lambda x, t: liger_cross_entropy(x, t)) if CUDA and liger_cross_entropy else None,
    }


@pytest.fixture(scope="module")
def figures(request):
    model = f"ce: {SIZES.tokens} x {SIZES.vocab} logits, model bytes fwd = bwd = N*V*b, fwd+bwd = 2*N*V*b"
    yield from module_figures(request, print_loss_table("cross-entropy", model, "a device copy of the logits"))


@pytest.fixture(scope="module")
def ce_inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(SIZES.tokens, SIZES.vocab, generator=gen, device=DEVICE) * 3).to(DTYPE)
    targets = torch.randint(0, SIZES.vocab, (SIZES.tokens,), generator=gen, device=DEVICE)
    return logits, targets


def test_ce_copy_ceiling(benchmark, figures, ce_inputs):
    logits, _ = ce_inputs
    out = torch.empty_like(logits)
    nbytes = logits.numel() * logits.element_size()
    measure(benchmark, figures, "ce/ceiling", lambda: (), lambda: out.copy_(logits), 2 * nbytes, "GB/s")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(_ce_providers()))
def test_ce(benchmark, monkeypatch, figures, ce_inputs, provider, mode):
    loss_fn = _ce_providers()[provider]
    if loss_fn is None:
        pytest.skip(f"{provider} does not run on {DEVICE.type} here")
    use_backend(monkeypatch, provider)
    base, targets = ce_inputs
    # Liger overwrites its input with the gradient, so every round starts from a fresh copy.
    fresh = lambda: base.detach().clone().requires_grad_()  # noqa: E731
    want = _ce_eager(base, targets)
    torch.testing.assert_close(loss_fn(fresh(), targets).float(), want, rtol=2e-2, atol=2e-2)
    nbytes = base.numel() * base.element_size()
    if mode == "fwd":
        setup, run, amount = lambda: (fresh(),), lambda x: loss_fn(x, targets), nbytes
    elif mode == "bwd":
        setup, run, amount = lambda: (loss_fn(fresh(), targets),), lambda loss: loss.backward(), nbytes
    else:
        setup, run, amount = lambda: (fresh(),), lambda x: loss_fn(x, targets).backward(), 2 * nbytes
    measure(benchmark, figures, f"ce/{mode}/{provider}", setup, run, amount, "GB/s")
