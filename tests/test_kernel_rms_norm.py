"""ember.kernels.rms_norm: the PyTorch reference against the float64 formula, and the Triton
kernels (plain and with the fused residual add) against float64 PyTorch; see kernel_fixtures.py."""

from __future__ import annotations

import importlib

import pytest
import torch

from ember.kernels import RMSNorm, rms_norm, rms_norm_reference
from kernel_fixtures import (  # tests/ is on sys.path when pytest collects it
    DEVICE,
    assert_as_accurate_as_pytorch,
    assert_same_values_and_grads,
    copies,
    f32,
    f64,
    forbid_launches,
    needs_cuda,
    on_triton,
    outputs_and_grads,
    rand,
    randn,
)

rms_norm_module = importlib.import_module("ember.kernels.rms_norm")


# ---------------------------------------------------------------------------
# The reference


def naive_rms_norm(x, w, eps, offset=0.0):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * (offset + w)


@pytest.mark.parametrize("shape", [(1, 7), (3, 5, 64), (2, 127)])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("casting", ["llama", "gemma"])
def test_rms_norm_matches_formula_in_float64(shape, offset, casting):
    x, w = rand(*shape), rand(shape[-1], seed=1)
    assert_same_values_and_grads(
        lambda x, w: rms_norm(x, w, 1e-5, offset=offset, casting=casting),
        lambda x, w: naive_rms_norm(x, w, 1e-5, offset),
        (x, w),
    )


def test_rms_norm_gradcheck():
    x, w = rand(3, 6), rand(6, seed=1)
    assert torch.autograd.gradcheck(lambda x, w: rms_norm(x, w, 1e-6, offset=0.5), (x, w))


def test_rms_norm_casting_modes_round_where_documented():
    x = rand(4, 32, dtype=torch.bfloat16, requires_grad=False)
    w = (1 + rand(32, seed=1, dtype=torch.bfloat16, requires_grad=False) / 3).to(torch.bfloat16)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + 1e-6)
    llama = rms_norm(x, w, casting="llama")
    gemma = rms_norm(x, w, casting="gemma")
    assert llama.dtype == gemma.dtype == torch.bfloat16
    assert torch.equal(llama, normed.to(torch.bfloat16) * w)  # rounded, then scaled in bfloat16
    assert torch.equal(gemma, (normed * w.float()).to(torch.bfloat16))  # scaled in float32, rounded once
    assert not torch.equal(llama, gemma)


def test_rms_norm_statistics_in_float32_for_half_inputs():
    x = rand(2, 4096, dtype=torch.float16, requires_grad=False, scale=200.0)  # x**2 overflows float16
    y = rms_norm(x, torch.ones(4096, dtype=torch.float16))
    want = naive_rms_norm(x.double(), torch.ones(4096, dtype=f64), 1e-6)
    torch.testing.assert_close(y.double(), want, atol=2e-3, rtol=2e-3)


def test_rms_norm_rejects_unknown_casting():
    with pytest.raises(ValueError, match="casting"):
        rms_norm(rand(2, 4), rand(4), casting="mistral")
    with pytest.raises(ValueError, match="casting"):
        RMSNorm(4, casting="mistral")


@pytest.mark.parametrize("offset", [0.0, 1.0])
def test_rms_norm_module_equals_function_in_float64(offset):
    norm = RMSNorm(16, 1e-5, offset=offset, casting="gemma").double()
    torch.testing.assert_close(norm.weight + offset, torch.ones(16, dtype=f64))  # starts as the identity scale
    with torch.no_grad():
        norm.weight.copy_(rand(16, seed=3, requires_grad=False))
    x = rand(3, 16)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, 1e-5, offset=offset, casting="gemma"), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# The Triton kernels

RMS_SHAPES = [(1, 3), (3, 127), (1, 5, 333), (33, 1000)]


@on_triton
@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
@pytest.mark.parametrize("casting, offset", [("llama", 0.0), ("llama", 0.5), ("gemma", 1.0)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_float64(gen, shape, casting, offset, with_residual):
    x, w = randn(gen, *shape), randn(gen, shape[-1], scale=0.5)
    inputs = (x, w, randn(gen, *shape)) if with_residual else (x, w)

    def call(fn):
        return lambda x, w, r=None: fn(x, w, 1e-5, offset=offset, casting=casting, residual=r)

    assert_as_accurate_as_pytorch(call(rms_norm), call(rms_norm_reference), inputs, gen=gen)


@on_triton
def test_rms_norm_single_column(gen):
    # y = w x / sqrt(x^2 + eps): the input gradient w eps / (x^2 + eps)^1.5 is what is left after
    # two nearly equal terms cancel, so its error is measured against the size of those terms.
    x, w = randn(gen, 7, 1), randn(gen, 1)
    upstream = randn(gen, 7, 1, requires_grad=False)
    (y,), (dx, dw) = outputs_and_grads(rms_norm, (x, w), [upstream])
    (y64,), (dx64, dw64) = outputs_and_grads(rms_norm_reference, copies((x, w), f64), [upstream])
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(dw.double(), dw64, rtol=1e-5, atol=1e-6)
    cancelled = (upstream * w * torch.rsqrt(x.square() + 1e-6)).detach().abs().double()
    assert ((dx.double() - dx64).abs() <= 8 * torch.finfo(f32).eps * cancelled).all()


@on_triton
@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_rows_wider_than_a_block(gen, monkeypatch, casting, with_residual):
    monkeypatch.setattr(rms_norm_module, "MAX_BLOCK_COLS", 1024)
    shape = (3, 5000)  # five column blocks, the last one partial
    x, w = randn(gen, *shape), randn(gen, shape[-1])
    inputs = (x, w, randn(gen, *shape)) if with_residual else (x, w)

    def call(fn):
        return lambda x, w, r=None: fn(x, w, 1e-6, offset=0.25, casting=casting, residual=r)

    assert_as_accurate_as_pytorch(call(rms_norm), call(rms_norm_reference), inputs, gen=gen)


@on_triton
def test_rms_norm_row_of_64k_columns(gen):
    x, w = randn(gen, 2, 65537), randn(gen, 65537)
    assert_as_accurate_as_pytorch(rms_norm, rms_norm_reference, (x, w), gen=gen)


@on_triton
@pytest.mark.parametrize("rows, cols, block_cols", [(301, 150, None), (40, 100, 64)], ids=["one-block", "blocks"])
def test_rms_norm_weight_gradient_is_deterministic(gen, monkeypatch, rows, cols, block_cols):
    # Enough rows for several programs, each summing its own share of the weight gradient.
    if block_cols:
        monkeypatch.setattr(rms_norm_module, "MAX_BLOCK_COLS", block_cols)
    x, w = randn(gen, rows, cols), randn(gen, cols)
    upstream = randn(gen, rows, cols, requires_grad=False)
    runs = [torch.autograd.grad(rms_norm(x, w), (x, w), upstream) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert_as_accurate_as_pytorch(rms_norm, rms_norm_reference, (x, w), gen=gen)


@on_triton
@pytest.mark.parametrize("used", ["normed", "sum"])
def test_rms_norm_residual_with_one_output_unused(gen, used):
    x, r, w = randn(gen, 4, 96), randn(gen, 4, 96), randn(gen, 96)
    shapes = [(4, 96), None] if used == "normed" else [None, (4, 96)]

    def call(fn):
        return lambda x, r, w: fn(x, w, residual=r)

    assert_as_accurate_as_pytorch(call(rms_norm), call(rms_norm_reference), (x, r, w), upstream_shapes=shapes, gen=gen)


@on_triton
def test_rms_norm_residual_of_another_dtype(gen):
    # Mixed precision: a bfloat16 block output joins a float32 residual stream; both the sum
    # and the norm are float32, as the unfused ``x + residual`` would make them.
    x = randn(gen, 5, 64, dtype=torch.bfloat16)
    r, w = randn(gen, 5, 64), randn(gen, 64)
    normed, summed = rms_norm(x, w, residual=r)
    want_normed, want_summed = rms_norm_reference(x, w, residual=r)
    assert normed.dtype == summed.dtype == f32
    torch.testing.assert_close(summed, want_summed, rtol=0, atol=0)
    torch.testing.assert_close(normed, want_normed)
    got = torch.autograd.grad(normed.sum() + summed.square().sum(), (x, r, w))
    want = torch.autograd.grad(want_normed.sum() + want_summed.square().sum(), (x, r, w))
    for g, expected in zip(got, want):
        assert g.dtype == expected.dtype
        torch.testing.assert_close(g, expected, rtol=1e-5, atol=1e-5)


@on_triton
def test_rms_norm_strided_input_and_gradient(gen):
    rows = randn(gen, 6, 200)
    x = rows[:, 10:150]  # rows 200 apart
    w = randn(gen, 140)
    upstream = randn(gen, 140, 6, requires_grad=False).T  # columns 6 apart
    got = torch.autograd.grad(rms_norm(x, w), (rows, w), upstream)
    ref_rows, ref_w = rows.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    want = torch.autograd.grad(rms_norm_reference(ref_rows[:, 10:150], ref_w), (ref_rows, ref_w), upstream.double())
    for g, expected in zip(got, want):
        torch.testing.assert_close(g.double(), expected, rtol=1e-5, atol=1e-5)


@on_triton
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_module_equals_function(gen, with_residual):
    norm = RMSNorm(48, 1e-5, offset=1.0, casting="gemma").to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(randn(gen, 48, requires_grad=False))
    x = randn(gen, 2, 7, 48)
    r = randn(gen, 2, 7, 48) if with_residual else None
    got = norm(x, r) if with_residual else (norm(x),)
    want = rms_norm(x, norm.weight, 1e-5, offset=1.0, casting="gemma", residual=r)
    want = want if with_residual else (want,)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@on_triton
def test_rms_norm_float64_takes_the_reference(gen, monkeypatch):
    forbid_launches(monkeypatch, "rms_norm")
    x, w = randn(gen, 3, 10, dtype=f64), randn(gen, 10, dtype=f64)
    torch.testing.assert_close(rms_norm(x, w, offset=0.5), rms_norm_reference(x, w, offset=0.5), rtol=0, atol=0)


@on_triton
@pytest.mark.parametrize("op", ["rms_norm", "rms_norm_add", "rms_norm_backward"])
def test_custom_op_registration(gen, op):
    # Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them.
    x, r, w = randn(gen, 2, 3, 16), randn(gen, 2, 3, 16), randn(gen, 16)
    plain = [t.detach() for t in (x, r, w)]
    cases = {
        "rms_norm": (x, w, 1e-5, 0.5, False),
        "rms_norm_add": (x, r, w, 1e-5, 1.0, True),
        "rms_norm_backward": (plain[0], plain[1], plain[1], plain[2], 1e-5, 0.0, False),
    }
    torch.library.opcheck(getattr(torch.ops.ember, op).default, cases[op])


# ---------------------------------------------------------------------------
# On a GPU: half precision, large shapes


@on_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("casting", ["llama", "gemma"])
@pytest.mark.parametrize("residual_dtype", [None, "same", torch.float32], ids=["plain", "residual", "fp32-residual"])
@pytest.mark.gpu
@needs_cuda
def test_rms_norm_half_precision(gen, dtype, casting, residual_dtype):
    x, w = randn(gen, 2048, 4096, dtype=dtype), randn(gen, 4096, dtype=dtype, scale=0.3)
    inputs = (x, w)
    if residual_dtype is not None:
        inputs += (randn(gen, 2048, 4096, dtype=dtype if residual_dtype == "same" else residual_dtype),)

    offset = 1.0 if casting == "gemma" else 0.0

    def call(fn):
        return lambda x, w, r=None: fn(x, w, 1e-6, offset=offset, casting=casting, residual=r)

    assert_as_accurate_as_pytorch(call(rms_norm), call(rms_norm_reference), inputs, gen=gen)


@on_triton
@pytest.mark.parametrize("n_cols", [4096, 65536, 100_000])
@pytest.mark.gpu
@needs_cuda
def test_rms_norm_large_and_deterministic(gen, n_cols):
    n_rows = 2**26 // n_cols
    x, w = randn(gen, n_rows, n_cols, dtype=torch.bfloat16), randn(gen, n_cols, dtype=torch.bfloat16)
    upstream = randn(gen, n_rows, n_cols, dtype=torch.bfloat16, requires_grad=False)
    runs = [torch.autograd.grad(rms_norm(x, w), (x, w), upstream) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))
    assert_as_accurate_as_pytorch(rms_norm, rms_norm_reference, (x, w), gen=gen)
