"""ember.kernels.swiglu: the PyTorch reference against the formula in float64, and the Triton
kernels against float64 PyTorch; see kernel_fixtures.py."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import swiglu, swiglu_reference
from kernel_fixtures import (  # tests/ is on sys.path when pytest collects it
    assert_as_accurate_as_pytorch,
    assert_same_values_and_grads,
    f64,
    forbid_launches,
    needs_cuda,
    on_triton,
    rand,
    randn,
)


# ---------------------------------------------------------------------------
# The reference


def test_swiglu_matches_formula():
    gate, up = rand(3, 17), rand(3, 17, seed=1)
    assert_same_values_and_grads(swiglu, lambda g, u: g / (1 + torch.exp(-g)) * u, (gate, up))


# ---------------------------------------------------------------------------
# The Triton kernels


@on_triton
@pytest.mark.parametrize("shape", [(1,), (3, 17), (127, 333), (2, 3, 1000)], ids=str)
@pytest.mark.parametrize("scale", [1.0, 30.0], ids=["unit", "saturated"])
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")  # the interpreter's sigmoid
def test_swiglu_matches_float64(gen, shape, scale):
    gate, up = randn(gen, *shape, scale=scale), randn(gen, *shape)

    def gate_grad_terms(inputs, upstream):
        # d/dgate = upstream * up * (s + gate * s * (1 - s)), s = sigmoid(gate): the two
        # terms cancel where silu's slope crosses zero (gate near -1.28).
        g, u = (x.detach() for x in inputs)
        sig = torch.sigmoid(g)
        return [(upstream[0] * u).abs() * (sig + (g * sig * (1 - sig)).abs()), None]

    assert_as_accurate_as_pytorch(swiglu, swiglu_reference, (gate, up), gen=gen, grad_terms=gate_grad_terms)


@on_triton
def test_swiglu_on_the_halves_of_a_fused_projection(gen):
    fused = randn(gen, 3, 5, 2 * 300)
    upstream = randn(gen, 300, 5, 3, requires_grad=False).permute(2, 1, 0)
    got = torch.autograd.grad(swiglu(*fused.chunk(2, dim=-1)), fused, upstream)[0]
    ref = fused.detach().double().requires_grad_()
    want = torch.autograd.grad(swiglu_reference(*ref.chunk(2, dim=-1)), ref, upstream.double())[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


@on_triton
def test_swiglu_broadcasting_and_float64_take_the_reference(gen, monkeypatch):
    forbid_launches(monkeypatch, "swiglu")
    gate, up = randn(gen, 4, 6), randn(gen, 6)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=0, atol=0)
    gate, up = randn(gen, 4, 6, dtype=f64), randn(gen, 4, 6, dtype=f64)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=0, atol=0)


@on_triton
@pytest.mark.parametrize("op", ["swiglu", "swiglu_backward"])
def test_custom_op_registration(gen, op):
    # Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them.
    x, r = randn(gen, 2, 3, 16), randn(gen, 2, 3, 16)
    plain = [t.detach() for t in (x, r)]
    cases = {"swiglu": (x, r), "swiglu_backward": (plain[0], plain[1], plain[0])}
    torch.library.opcheck(getattr(torch.ops.ember, op).default, cases[op])


# ---------------------------------------------------------------------------
# On a GPU: half precision at Llama 3 8B's feed-forward width


@on_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.gpu
@needs_cuda
def test_swiglu_half_precision(gen, dtype):
    gate, up = randn(gen, 2048, 14336, dtype=dtype), randn(gen, 2048, 14336, dtype=dtype)
    assert_as_accurate_as_pytorch(swiglu, swiglu_reference, (gate, up), gen=gen)
