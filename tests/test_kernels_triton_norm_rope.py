"""The Triton kernels for RMSNorm, rotary embeddings and SwiGLU against float64 references.

Without CUDA the kernels run on CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``,
set only while each test runs) in float32, on small odd shapes; with CUDA the same tests run
the compiled kernels, and the tests marked ``gpu`` add half precision, large shapes,
torch.compile with Inductor and CUDA graphs. (The interpreter truncates float32 to bfloat16
instead of rounding it, so half-precision results are only checked on a GPU.)

Every run draws fresh inputs; a failing test prints its seed, and ``EMBER_TEST_SEED=<seed>``
replays it. A result passes when its error against float64 is no larger than PyTorch's own
result's in the same precision (times 1.1), give or take a few float32 rounding errors.
"""

from __future__ import annotations

import importlib

import pytest
import torch

pytest.importorskip("triton")

from ember.kernels import (
    RMSNorm,
    apply_rotary,
    apply_rotary_reference,
    rms_norm,
    rms_norm_reference,
    swiglu,
    swiglu_reference,
)

rms_norm_module = importlib.import_module("ember.kernels.rms_norm")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
f32, f64 = torch.float32, torch.float64
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("triton_backend")  # fixtures: tests/kernel_fixtures.py


def randn(gen, *shape, dtype=f32, scale=1.0, requires_grad=True):
    t = (torch.randn(shape, generator=gen, dtype=f64) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def copies(inputs, dtype=None):
    """Fresh leaves with the inputs' values (in ``dtype`` where given) and requires_grad."""
    return [
        x if not isinstance(x, torch.Tensor) else x.detach().to(dtype or x.dtype).requires_grad_(x.requires_grad)
        for x in inputs
    ]


def outputs_and_grads(fn, inputs, upstream):
    """``fn(*inputs)`` as a tuple, then the gradients of every input that requires grad."""
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    used = [(o, u) for o, u in zip(outs, upstream) if u is not None]
    grads = torch.autograd.grad(
        [o for o, _ in used], leaves, [u.to(o.dtype) for o, u in used], allow_unused=True, materialize_grads=True
    )
    return [o.detach() for o in outs], list(grads)


def assert_as_accurate_as_pytorch(kernel, reference, inputs, *, upstream_shapes=None, gen, grad_terms=None):
    """``kernel(*inputs)`` and its gradients are as close to ``reference`` evaluated in float64
    as ``reference`` evaluated in the inputs' own precision is.

    ``upstream_shapes``: one entry per output, None for an output left out of the loss.
    ``grad_terms(inputs, upstream)``: for gradients that are sums of terms which can
    cancel, the elementwise sum of the terms' magnitudes (float64), or None; a rounding
    error of a few ulps of those terms is allowed on top (with few elements there is no
    averaging, and near a cancellation any float32 formula loses relative accuracy).
    """
    probe = reference(*copies(inputs, f64))
    probe = probe if isinstance(probe, tuple) else (probe,)
    shapes = upstream_shapes or [o.shape for o in probe]
    upstream = [None if s is None else randn(gen, *s, dtype=f64, requires_grad=False) for s in shapes]
    got = outputs_and_grads(kernel, copies(inputs), upstream)
    same = outputs_and_grads(reference, copies(inputs), upstream)
    truth = outputs_and_grads(reference, copies(inputs, f64), upstream)
    terms = grad_terms(copies(inputs, f64), upstream) if grad_terms else []
    for kind, g_list, s_list, t_list in zip(("output", "gradient"), got, same, truth):
        for i, (g, s, t) in enumerate(zip(g_list, s_list, t_list)):
            assert g.shape == s.shape and g.dtype == s.dtype, f"{kind} {i}: {g.dtype} {tuple(g.shape)}"
            err, own, size = ((g.double() - t).norm().item(), (s.double() - t).norm().item(), t.norm().item())
            bound = 1.1 * own + 4 * torch.finfo(f32).eps * size
            if kind == "gradient" and i < len(terms) and terms[i] is not None:
                bound += 4 * torch.finfo(f32).eps * terms[i].norm().item()
            assert err <= bound, f"{kind} {i}: error {err:.3g} > {bound:.3g} (PyTorch's {own:.3g}, norm {size:.3g})"


def forbid_launches(monkeypatch, *modules):
    """Makes any kernel launch from ``modules`` fail, to prove a call took the reference."""

    def refuse(*args, **kwargs):
        raise AssertionError("a Triton kernel was launched")

    for name in modules:
        monkeypatch.setattr(importlib.import_module(f"ember.kernels.{name}"), "launch", refuse)


# ---------------------------------------------------------------------------
# RMSNorm

RMS_SHAPES = [(1, 3), (3, 127), (1, 5, 333), (33, 1000)]


@pytest.mark.parametrize("shape", RMS_SHAPES, ids=str)
@pytest.mark.parametrize("casting, offset", [("llama", 0.0), ("llama", 0.5), ("gemma", 1.0)])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_float64(gen, shape, casting, offset, with_residual):
    x, w = randn(gen, *shape), randn(gen, shape[-1], scale=0.5)
    inputs = (x, w, randn(gen, *shape)) if with_residual else (x, w)

    def call(fn):
        return lambda x, w, r=None: fn(x, w, 1e-5, offset=offset, casting=casting, residual=r)

    assert_as_accurate_as_pytorch(call(rms_norm), call(rms_norm_reference), inputs, gen=gen)


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


def test_rms_norm_row_of_64k_columns(gen):
    x, w = randn(gen, 2, 65537), randn(gen, 65537)
    assert_as_accurate_as_pytorch(rms_norm, rms_norm_reference, (x, w), gen=gen)


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


@pytest.mark.parametrize("used", ["normed", "sum"])
def test_rms_norm_residual_with_one_output_unused(gen, used):
    x, r, w = randn(gen, 4, 96), randn(gen, 4, 96), randn(gen, 96)
    shapes = [(4, 96), None] if used == "normed" else [None, (4, 96)]

    def call(fn):
        return lambda x, r, w: fn(x, w, residual=r)

    assert_as_accurate_as_pytorch(call(rms_norm), call(rms_norm_reference), (x, r, w), upstream_shapes=shapes, gen=gen)


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


def test_rms_norm_float64_takes_the_reference(gen, monkeypatch):
    forbid_launches(monkeypatch, "rms_norm")
    x, w = randn(gen, 3, 10, dtype=f64), randn(gen, 10, dtype=f64)
    torch.testing.assert_close(rms_norm(x, w, offset=0.5), rms_norm_reference(x, w, offset=0.5), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Rotary embeddings


def rope_tables(positions, rotary_dim, dtype=f32):
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, rotary_dim, 2, dtype=f64) / rotary_dim)
    angles = torch.outer(torch.arange(positions, dtype=f64), inv_freq)
    angles = torch.cat((angles, angles), -1)
    return angles.cos().to(DEVICE, dtype), angles.sin().to(DEVICE, dtype)


ROPE_SHAPES = [  # batch, seq, heads, kv_heads, head_dim, rotary_dim
    (1, 1, 1, 1, 2, 2),
    (2, 5, 4, 2, 8, 8),
    (3, 7, 6, 1, 16, 16),
    (2, 9, 5, 3, 12, 8),  # partial rotary
    (1, 3, 2, 1, 10, 4),
]


def tables_for(gen, form, batch, seq, rotary_dim):
    """(cos, sin, position_ids) in one of the three forms apply_rotary accepts."""
    positions = seq + 5
    cos, sin = rope_tables(positions, rotary_dim)
    ids = torch.randint(0, positions, (batch, seq), generator=gen).to(DEVICE)
    if form == "table":
        return cos, sin, None
    if form == "position_ids":
        return cos, sin, ids
    if form == "per_token":
        return cos[ids], sin[ids], None
    return cos[None, :seq], sin[None, :seq], None  # per token, shared by the batch


@pytest.mark.parametrize("shape", ROPE_SHAPES, ids=str)
@pytest.mark.parametrize("form", ["table", "position_ids", "per_token", "per_token_shared"])
def test_apply_rotary_matches_float64(gen, shape, form):
    batch, seq, heads, kv_heads, head_dim, rotary_dim = shape
    cos, sin, ids = tables_for(gen, form, batch, seq, rotary_dim)
    q, k = randn(gen, batch, seq, heads, head_dim), randn(gen, batch, seq, kv_heads, head_dim)

    def call(fn):
        return lambda q, k: fn(q, k, cos, sin, position_ids=ids)

    def reference(q, k):  # the float64 truth also gets float64 tables
        return apply_rotary_reference(q, k, cos.to(q.dtype), sin.to(q.dtype), position_ids=ids)

    assert_as_accurate_as_pytorch(call(apply_rotary), reference, (q, k), gen=gen)


@pytest.mark.parametrize("shape", ROPE_SHAPES[1:4], ids=str)
@pytest.mark.parametrize("form", ["table", "position_ids"])
def test_apply_rotary_in_place(gen, shape, form):
    batch, seq, heads, kv_heads, head_dim, rotary_dim = shape
    cos, sin, ids = tables_for(gen, form, batch, seq, rotary_dim)
    q0, k0 = randn(gen, batch, seq, heads, head_dim), randn(gen, batch, seq, kv_heads, head_dim)
    want = apply_rotary(q0, k0, cos, sin, position_ids=ids)
    q, k = q0 * 1, k0 * 1  # not leaves, so autograd allows writing over them
    got = apply_rotary(q, k, cos, sin, position_ids=ids, inplace=True)
    assert got[0] is q and got[1] is k
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    upstream = [randn(gen, *w.shape, requires_grad=False) for w in want]
    for g, w in zip(torch.autograd.grad(got, (q0, k0), upstream), torch.autograd.grad(want, (q0, k0), upstream)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@pytest.mark.parametrize("inplace", [False, True], ids=["out-of-place", "in-place"])
def test_apply_rotary_reads_projection_views_through_strides(gen, inplace):
    batch, seq, heads, kv_heads, head_dim = 2, 6, 4, 2, 16
    cos, sin = rope_tables(seq, head_dim)
    qkv = randn(gen, batch, seq, heads + 2 * kv_heads, head_dim, requires_grad=False)
    before = qkv.clone()
    q, k = qkv[:, :, :heads], qkv[:, :, heads : heads + kv_heads]
    want = apply_rotary_reference(q.double(), k.double(), cos.double(), sin.double())
    got = apply_rotary(q, k, cos, sin, inplace=inplace)
    for g, w in zip(got, want):
        torch.testing.assert_close(g.double(), w, rtol=1e-6, atol=1e-6)
    if inplace:  # written through the views into qkv; v untouched
        torch.testing.assert_close(qkv[:, :, : heads + kv_heads].double(), torch.cat(want, dim=2), rtol=1e-6, atol=1e-6)
        assert torch.equal(qkv[:, :, heads + kv_heads :], before[:, :, heads + kv_heads :])
    else:
        assert torch.equal(qkv, before)
    # (batch, heads, seq, dim) memory seen as (batch, seq, heads, dim), with a gradient in that layout too.
    q_bhsd = randn(gen, batch, heads, seq, head_dim)
    k_bhsd = randn(gen, batch, kv_heads, seq, head_dim)
    upstream = randn(gen, batch, heads, seq, head_dim, requires_grad=False).transpose(1, 2)
    inputs = (q_bhsd.transpose(1, 2), k_bhsd.transpose(1, 2))
    (grad,) = torch.autograd.grad(apply_rotary(*inputs, cos, sin)[0], q_bhsd, upstream)
    ref = q_bhsd.detach().double().requires_grad_()
    (want_grad,) = torch.autograd.grad(
        apply_rotary_reference(ref.transpose(1, 2), inputs[1].double(), cos.double(), sin.double())[0],
        ref,
        upstream.double(),
    )
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-6, atol=1e-6)


def test_apply_rotary_in_place_refuses_leaves_that_require_grad(gen):
    q, k = randn(gen, 1, 2, 2, 8), randn(gen, 1, 2, 1, 8)
    cos, sin = rope_tables(2, 8)
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rotary(q, k, cos, sin, inplace=True)


def test_apply_rotary_is_twice_differentiable(gen):
    q, k = randn(gen, 2, 3, 2, 8), randn(gen, 2, 3, 1, 8)
    cos, sin = rope_tables(3, 8)
    v = randn(gen, 2, 3, 2, 8, requires_grad=True)
    u = randn(gen, 2, 3, 2, 8, requires_grad=False)

    def second(fn, q, k, v):
        (grad_q,) = torch.autograd.grad(fn(q, k, cos.to(q.dtype), sin.to(q.dtype))[0], q, v, create_graph=True)
        return torch.autograd.grad(grad_q, v, u)[0]

    want = second(apply_rotary_reference, *copies((q, k, v), f64))
    torch.testing.assert_close(second(apply_rotary, q, k, v).double(), want, rtol=1e-6, atol=1e-6)


def test_apply_rotary_float64_takes_the_reference(gen, monkeypatch):
    forbid_launches(monkeypatch, "rotary")
    q, k = randn(gen, 1, 3, 2, 8, dtype=f64), randn(gen, 1, 3, 1, 8, dtype=f64)
    cos, sin = rope_tables(3, 8, f64)
    for g, w in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# SwiGLU


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


def test_swiglu_on_the_halves_of_a_fused_projection(gen):
    fused = randn(gen, 3, 5, 2 * 300)
    upstream = randn(gen, 300, 5, 3, requires_grad=False).permute(2, 1, 0)
    got = torch.autograd.grad(swiglu(*fused.chunk(2, dim=-1)), fused, upstream)[0]
    ref = fused.detach().double().requires_grad_()
    want = torch.autograd.grad(swiglu_reference(*ref.chunk(2, dim=-1)), ref, upstream.double())[0]
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_swiglu_broadcasting_and_float64_take_the_reference(gen, monkeypatch):
    forbid_launches(monkeypatch, "swiglu")
    gate, up = randn(gen, 4, 6), randn(gen, 6)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=0, atol=0)
    gate, up = randn(gen, 4, 6, dtype=f64), randn(gen, 4, 6, dtype=f64)
    torch.testing.assert_close(swiglu(gate, up), swiglu_reference(gate, up), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Custom ops, torch.compile, dispatch


def opcheck_cases(gen):
    x, r = randn(gen, 2, 3, 16), randn(gen, 2, 3, 16)
    w = randn(gen, 16)
    cos, sin = rope_tables(5, 8)
    ids = torch.randint(0, 5, (2, 3), generator=gen).to(DEVICE)
    plain = [t.detach() for t in (x, r, w)]
    return {
        "rms_norm": (x, w, 1e-5, 0.5, False),
        "rms_norm_add": (x, r, w, 1e-5, 1.0, True),
        "rms_norm_backward": (plain[0], plain[1], plain[1], plain[2], 1e-5, 0.0, False),
        "rotary": (x.view(2, 3, 2, 8), cos, sin, ids, False),
        "rotary_": (plain[0].clone().view(2, 3, 2, 8), cos, sin, None),
        "swiglu": (x, r),
        "swiglu_backward": (plain[0], plain[1], plain[0]),
    }


@pytest.mark.parametrize(
    "op", ["rms_norm", "rms_norm_add", "rms_norm_backward", "rotary", "rotary_", "swiglu", "swiglu_backward"]
)
def test_custom_op_registration(gen, op):
    # Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them.
    torch.library.opcheck(getattr(torch.ops.ember, op).default, opcheck_cases(gen)[op])


def transformer_block(x, h, norm_weight, gate_weight, cos, sin):
    normed, h = rms_norm(x, norm_weight, 1e-5, residual=h)
    batch, seq, _ = normed.shape
    q, k = apply_rotary(normed.view(batch, seq, -1, 8), (2 * normed).view(batch, seq, -1, 8)[:, :, :1], cos, sin)
    k2, _ = apply_rotary(3 * k, 2 * q, cos, sin, inplace=True)
    return swiglu(normed * gate_weight, normed) + q.flatten(2) + k2.flatten(2).sum(-1, keepdim=True) + h


def block_inputs(gen, dtype=f32, batch=2, seq=5, dim=32):
    return (
        randn(gen, batch, seq, dim, dtype=dtype),
        randn(gen, batch, seq, dim, dtype=dtype),
        randn(gen, dim, dtype=dtype),
        randn(gen, dim, dtype=dtype),
        *rope_tables(seq, 8),
    )


def assert_compiled_matches_eager(gen, backend, dtype=f32, **tol):
    torch._dynamo.reset()
    inputs = block_inputs(gen, dtype)
    upstream = randn(gen, *inputs[0].shape, dtype=dtype, requires_grad=False)
    compiled = torch.compile(transformer_block, fullgraph=True, backend=backend)
    want = outputs_and_grads(transformer_block, inputs, [upstream])
    got = outputs_and_grads(compiled, inputs, [upstream])
    for g, w in zip(got[0] + got[1], want[0] + want[1]):
        torch.testing.assert_close(g, w, **tol)


def test_compiles_into_one_graph(gen):
    # aot_eager traces forward and backward through the fake implementations without
    # generating code; the gpu test below runs Inductor.
    assert_compiled_matches_eager(gen, "aot_eager", rtol=0, atol=0)


def test_cpu_tensors_need_the_interpreter(gen, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.ones(2, 4)
    table = torch.ones(2, 4)
    calls = [
        lambda: rms_norm(x, torch.ones(4)),
        lambda: swiglu(x, x),
        lambda: apply_rotary(x.view(1, 2, 1, 4), x.view(1, 2, 1, 4), table, table),
    ]
    for call in calls:
        with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
            call()


# ---------------------------------------------------------------------------
# On a GPU: half precision, large shapes, Inductor, CUDA graphs


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


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("form", ["table", "position_ids"])
@pytest.mark.gpu
@needs_cuda
def test_apply_rotary_half_precision_llama3_8b(gen, dtype, form):
    batch, seq, heads, kv_heads, head_dim = 2, 2048, 32, 8, 128
    cos, sin, ids = tables_for(gen, form, batch, seq, head_dim)
    q, k = randn(gen, batch, seq, heads, head_dim, dtype=dtype), randn(gen, batch, seq, kv_heads, head_dim, dtype=dtype)

    def call(fn):
        return lambda q, k: fn(q, k, cos, sin, position_ids=ids)

    assert_as_accurate_as_pytorch(call(apply_rotary), call(apply_rotary_reference), (q, k), gen=gen)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.gpu
@needs_cuda
def test_swiglu_half_precision(gen, dtype):
    gate, up = randn(gen, 2048, 14336, dtype=dtype), randn(gen, 2048, 14336, dtype=dtype)
    assert_as_accurate_as_pytorch(swiglu, swiglu_reference, (gate, up), gen=gen)


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


@pytest.mark.gpu
@needs_cuda
def test_compiles_with_inductor(gen):
    assert_compiled_matches_eager(gen, "inductor", torch.bfloat16, rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@needs_cuda
def test_cuda_graph_replays_forward_and_backward(gen):
    inputs = block_inputs(gen, torch.bfloat16, batch=4, seq=64, dim=256)
    upstream = randn(gen, 4, 64, 256, dtype=torch.bfloat16, requires_grad=False)
    leaves = [t for t in inputs if t.requires_grad]

    def step():
        return torch.autograd.grad(transformer_block(*inputs), leaves, upstream)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compile the kernels outside the capture
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    with torch.no_grad():
        for t in leaves:
            t.copy_(randn(gen, *t.shape, dtype=t.dtype, requires_grad=False))
    graph.replay()
    for g, w in zip(captured, step()):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
