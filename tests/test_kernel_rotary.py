"""ember.kernels.apply_rotary: the PyTorch reference against complex rotation in float64 (and
Hugging Face's ``apply_rotary_pos_emb``), and the Triton kernel against float64 PyTorch; see
kernel_fixtures.py."""

from __future__ import annotations

import pytest
import torch

from ember.kernels import apply_rotary, apply_rotary_reference
from kernel_fixtures import (  # tests/ is on sys.path when pytest collects it
    CPU,
    DEVICE,
    assert_as_accurate_as_pytorch,
    assert_same_values_and_grads,
    copies,
    f64,
    forbid_launches,
    needs_cuda,
    on_triton,
    rand,
    randn,
    rope_angles,
    rope_tables,
)


# ---------------------------------------------------------------------------
# The reference


def naive_rotary(x, angles):
    """Rotates feature pairs (i, i + rotary_dim/2) as complex numbers; angles (batch|1, seq, rotary_dim/2)."""
    half = angles.shape[-1]
    turn = torch.polar(torch.ones_like(angles), angles)[:, :, None]  # e^(i * angle), broadcast over heads
    pairs = torch.complex(x[..., :half], x[..., half : 2 * half]) * turn
    return torch.cat((pairs.real, pairs.imag, x[..., 2 * half :]), -1)


@pytest.mark.parametrize(
    "batch, seq, heads, kv_heads, head_dim, rotary_dim",
    [(1, 1, 1, 1, 2, 2), (2, 5, 4, 2, 8, 8), (3, 7, 6, 1, 16, 16), (2, 9, 4, 4, 12, 8), (1, 3, 2, 1, 10, 4)],
)
def test_apply_rotary_matches_complex_rotation(batch, seq, heads, kv_heads, head_dim, rotary_dim):
    q, k = rand(batch, seq, heads, head_dim), rand(batch, seq, kv_heads, head_dim, seed=1)
    cos, sin = rope_tables(seq + 4, rotary_dim, f64, CPU)
    angles = rope_angles(seq + 4, rotary_dim)
    assert_same_values_and_grads(
        lambda q, k: apply_rotary(q, k, cos, sin),
        lambda q, k: (naive_rotary(q, angles[None, :seq]), naive_rotary(k, angles[None, :seq])),
        (q, k),
    )


def test_apply_rotary_position_ids_and_per_token_tables():
    batch, seq = 3, 6
    q, k = rand(batch, seq, 4, 8), rand(batch, seq, 2, 8, seed=1)
    cos, sin = rope_tables(32, 8, f64, CPU)
    angles = rope_angles(32, 8)
    position_ids = torch.randint(0, 32, (batch, seq), generator=torch.Generator().manual_seed(5))
    want = (naive_rotary(q, angles[position_ids]), naive_rotary(k, angles[position_ids]))
    assert_same_values_and_grads(
        lambda q, k: apply_rotary(q, k, cos, sin, position_ids=position_ids), lambda q, k: want, (q, k)
    )
    per_token = apply_rotary(q, k, cos[position_ids], sin[position_ids])
    for got, w in zip(per_token, want):
        torch.testing.assert_close(got, w)
    arange = torch.arange(seq).expand(batch, seq)
    for a, b in zip(apply_rotary(q, k, cos, sin, position_ids=arange), apply_rotary(q, k, cos, sin)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_apply_rotary_matches_transformers():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    q, k = rand(2, 5, 4, 16, requires_grad=False), rand(2, 5, 2, 16, seed=1, requires_grad=False)
    cos, sin = rope_tables(5, 16, f64, CPU)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
    ours = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(ours[0], hf_q.transpose(1, 2))
    torch.testing.assert_close(ours[1], hf_k.transpose(1, 2))


def test_apply_rotary_keeps_dtype_and_computes_in_float32():
    q = rand(1, 4, 2, 8, dtype=torch.bfloat16, requires_grad=False)
    k = rand(1, 4, 2, 8, seed=1, dtype=torch.bfloat16, requires_grad=False)
    cos, sin = rope_tables(4, 8, f64, CPU)
    q_rot, k_rot = apply_rotary(q, k, cos.float(), sin.float())
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    assert torch.equal(q_rot, naive_rotary(q.double(), rope_angles(4, 8)[None]).to(torch.bfloat16))


@pytest.mark.parametrize(
    "q_shape, k_shape, table_rows, rotary_dim, position_ids, match",
    [
        ((1, 4, 2, 8), (1, 4, 2, 8), 3, 8, None, "fewer than the sequence length"),
        ((1, 4, 2, 8), (1, 4, 2, 8), 8, 7, None, "even"),
        ((1, 4, 2, 8), (1, 4, 2, 8), 8, 10, None, "at most head_dim"),
        ((1, 4, 2, 8), (1, 5, 2, 8), 8, 8, None, "same batch, seq"),
        ((1, 4, 2, 8), (1, 4, 2, 8), 8, 8, torch.zeros(2, 4, dtype=torch.long), "position_ids"),
    ],
)
def test_apply_rotary_rejects_mismatched_shapes(q_shape, k_shape, table_rows, rotary_dim, position_ids, match):
    table = torch.ones(table_rows, rotary_dim)
    with pytest.raises(ValueError, match=match):
        apply_rotary(torch.ones(q_shape), torch.ones(k_shape), table, table, position_ids=position_ids)


# ---------------------------------------------------------------------------
# The Triton kernel

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


@on_triton
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


@on_triton
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


@on_triton
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


@on_triton
def test_apply_rotary_in_place_refuses_leaves_that_require_grad(gen):
    q, k = randn(gen, 1, 2, 2, 8), randn(gen, 1, 2, 1, 8)
    cos, sin = rope_tables(2, 8)
    with pytest.raises(RuntimeError, match="leaf"):
        apply_rotary(q, k, cos, sin, inplace=True)


@on_triton
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


@on_triton
def test_apply_rotary_float64_takes_the_reference(gen, monkeypatch):
    forbid_launches(monkeypatch, "rotary")
    q, k = randn(gen, 1, 3, 2, 8, dtype=f64), randn(gen, 1, 3, 1, 8, dtype=f64)
    cos, sin = rope_tables(3, 8, f64)
    for g, w in zip(apply_rotary(q, k, cos, sin), apply_rotary_reference(q, k, cos, sin)):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


@on_triton
@pytest.mark.parametrize("op", ["rotary", "rotary_"])
def test_custom_op_registration(gen, op):
    # Schema, fake (meta) implementation and autograd registration, as torch.compile relies on them.
    x = randn(gen, 2, 3, 16)
    cos, sin = rope_tables(5, 8)
    ids = torch.randint(0, 5, (2, 3), generator=gen).to(DEVICE)
    cases = {
        "rotary": (x.view(2, 3, 2, 8), cos, sin, ids, False),
        "rotary_": (x.detach().clone().view(2, 3, 2, 8), cos, sin, None),
    }
    torch.library.opcheck(getattr(torch.ops.ember, op).default, cases[op])


# ---------------------------------------------------------------------------
# On a GPU: half precision at Llama 3 8B's attention shape


@on_triton
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
