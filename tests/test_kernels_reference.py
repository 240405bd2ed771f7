"""ember.kernels' PyTorch path against naive float64 formulas: values, gradients, every option."""

from __future__ import annotations

import importlib

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ember.kernels as K
from ember.kernels import (
    CrossEntropyLoss,
    FusedLinearCrossEntropyLoss,
    RMSNorm,
    apply_rotary,
    cross_entropy,
    fused_linear_cross_entropy,
    rms_norm,
    swiglu,
)

f64 = torch.float64


def rand(*shape, seed=0, dtype=f64, requires_grad=True, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=dtype) * scale).requires_grad_(requires_grad)


def targets_for(n, vocab, *, seed=0, ignore_every=None, ignore_index=-100):
    g = torch.Generator().manual_seed(seed + 1000)
    t = torch.randint(0, vocab, (n,), generator=g)
    if ignore_every:
        t[::ignore_every] = ignore_index
    return t


def assert_same_values_and_grads(fn, naive, inputs, grad_out_seed=7, **tol):
    """``fn(*inputs)`` and ``naive(*inputs)`` agree, and so do their gradients for a random upstream gradient."""
    out, ref = fn(*inputs), naive(*inputs)
    outs, refs = (out, ref) if isinstance(out, tuple) else ((out,), (ref,))
    for o, r in zip(outs, refs):
        torch.testing.assert_close(o, r, **tol)
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    upstream = [rand(*r.shape, seed=grad_out_seed + i, dtype=r.dtype, requires_grad=False) for i, r in enumerate(refs)]
    got = torch.autograd.grad(outs, leaves, upstream)
    want = torch.autograd.grad(refs, leaves, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **tol)


# ---------------------------------------------------------------------------
# RMSNorm


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
def test_rms_norm_module_equals_function(offset):
    norm = RMSNorm(16, 1e-5, offset=offset, casting="gemma").double()
    torch.testing.assert_close(norm.weight + offset, torch.ones(16, dtype=f64))  # starts as the identity scale
    with torch.no_grad():
        norm.weight.copy_(rand(16, seed=3, requires_grad=False))
    x = rand(3, 16)
    torch.testing.assert_close(norm(x), rms_norm(x, norm.weight, 1e-5, offset=offset, casting="gemma"), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Rotary embeddings


def rope_tables(positions, rotary_dim, theta=10000.0):
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=f64) / rotary_dim)
    angles = torch.outer(torch.arange(positions, dtype=f64), inv_freq)
    return torch.cat((angles, angles), -1).cos(), torch.cat((angles, angles), -1).sin(), angles


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
    cos, sin, angles = rope_tables(seq + 4, rotary_dim)
    assert_same_values_and_grads(
        lambda q, k: apply_rotary(q, k, cos, sin),
        lambda q, k: (naive_rotary(q, angles[None, :seq]), naive_rotary(k, angles[None, :seq])),
        (q, k),
    )


def test_apply_rotary_position_ids_and_per_token_tables():
    batch, seq = 3, 6
    q, k = rand(batch, seq, 4, 8), rand(batch, seq, 2, 8, seed=1)
    cos, sin, angles = rope_tables(32, 8)
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
    cos, sin, _ = rope_tables(5, 16)
    hf_q, hf_k = modeling_llama.apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
    ours = apply_rotary(q, k, cos, sin)
    torch.testing.assert_close(ours[0], hf_q.transpose(1, 2))
    torch.testing.assert_close(ours[1], hf_k.transpose(1, 2))


def test_apply_rotary_keeps_dtype_and_computes_in_float32():
    q = rand(1, 4, 2, 8, dtype=torch.bfloat16, requires_grad=False)
    k = rand(1, 4, 2, 8, seed=1, dtype=torch.bfloat16, requires_grad=False)
    cos, sin, angles = rope_tables(4, 8)
    q_rot, k_rot = apply_rotary(q, k, cos.float(), sin.float())
    assert q_rot.dtype == k_rot.dtype == torch.bfloat16
    assert torch.equal(q_rot, naive_rotary(q.double(), angles[None]).to(torch.bfloat16))


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
# Cross-entropy


def naive_cross_entropy(
    logits,
    targets,
    *,
    ignore_index=-100,
    label_smoothing=0.0,
    z_loss=0.0,
    reduction="mean",
    softcap=None,
    num_tokens=None,
):
    """Term by term from the definition, one token at a time."""
    losses = []
    for row, t in zip(logits, targets.tolist()):
        if t == ignore_index:
            losses.append(row.sum() * 0)
            continue
        z = softcap * torch.tanh(row / softcap) if softcap is not None else row
        logp = z - torch.log(torch.exp(z - z.max()).sum()) - z.max()
        lse = z[t] - logp[t]
        loss = -(1 - label_smoothing) * logp[t] - label_smoothing * logp.mean() + z_loss * lse**2
        losses.append(loss)
    losses = torch.stack(losses) if losses else logits.sum(-1)
    valid = int((targets != ignore_index).sum())
    if reduction == "none":
        return losses
    if reduction == "sum":
        return losses.sum()
    return losses.sum() / (num_tokens if num_tokens is not None else max(valid, 1))


CE_OPTIONS = [
    {},
    {"ignore_index": 3},
    {"label_smoothing": 0.1},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_tokens": 1000},
    {"label_smoothing": 0.2, "z_loss": 1e-3, "softcap": 5.0, "reduction": "none"},
    {"label_smoothing": 0.05, "z_loss": 1e-4, "softcap": 30.0, "num_tokens": 77},
]


@pytest.mark.parametrize("n, vocab", [(1, 5), (3, 333), (127, 1000), (127, 5)])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
def test_cross_entropy_matches_definition(n, vocab, options):
    logits = rand(n, vocab, scale=3.0)
    targets = targets_for(n, vocab, ignore_every=4, ignore_index=options.get("ignore_index", -100))
    assert_same_values_and_grads(
        lambda x: cross_entropy(x, targets, **options), lambda x: naive_cross_entropy(x, targets, **options), (logits,)
    )


@pytest.mark.parametrize("label_smoothing", [0.0, 0.3])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_matches_pytorch_where_pytorch_has_the_option(label_smoothing, reduction):
    logits = rand(33, 50)
    targets = targets_for(33, 50, ignore_every=5)
    assert_same_values_and_grads(
        lambda x: cross_entropy(x, targets, label_smoothing=label_smoothing, reduction=reduction),
        lambda x: F.cross_entropy(x, targets, label_smoothing=label_smoothing, reduction=reduction),
        (logits,),
    )


def test_cross_entropy_all_ignored_batch_is_zero_with_zero_gradient():
    logits = rand(4, 10)
    targets = torch.full((4,), -100)
    for reduction in ("mean", "sum"):
        loss = cross_entropy(logits, targets, reduction=reduction, z_loss=1e-2, label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0
    assert torch.equal(cross_entropy(logits, targets, reduction="none"), torch.zeros(4, dtype=f64))


def test_cross_entropy_num_tokens_shares_a_denominator_across_micro_batches():
    logits, targets = rand(8, 20), targets_for(8, 20, ignore_every=3)
    whole = cross_entropy(logits, targets)
    total = int((targets != -100).sum())
    parts = sum(cross_entropy(logits[i : i + 3], targets[i : i + 3], num_tokens=total) for i in range(0, 8, 3))
    torch.testing.assert_close(parts, whole)
    torch.testing.assert_close(cross_entropy(logits, targets, num_tokens=torch.tensor(total)), whole)


def test_cross_entropy_computes_in_float32_for_half_logits():
    logits = rand(16, 300, dtype=torch.bfloat16, requires_grad=True)
    targets = targets_for(16, 300)
    loss = cross_entropy(logits, targets, z_loss=1e-3)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), naive_cross_entropy(logits.double(), targets, z_loss=1e-3))
    loss.backward()
    assert logits.grad.dtype == torch.bfloat16


def test_cross_entropy_accepts_leading_dimensions():
    logits, targets = rand(2, 3, 11), targets_for(6, 11).view(2, 3)
    torch.testing.assert_close(cross_entropy(logits, targets), cross_entropy(logits.view(6, 11), targets.view(6)))
    assert cross_entropy(logits, targets, reduction="none").shape == (2, 3)


@pytest.mark.parametrize(
    "options, match",
    [
        ({"reduction": "avg"}, "reduction"),
        ({"label_smoothing": 1.5}, "label_smoothing"),
        ({"z_loss": -1.0}, "z_loss"),
        ({"softcap": 0.0}, "softcap"),
        ({"reduction": "sum", "num_tokens": 4}, "num_tokens"),
    ],
)
def test_cross_entropy_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(rand(2, 4), torch.tensor([0, 1]), **options)
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(rand(2, 3), rand(4, 3), torch.tensor([0, 1]), **options)


def test_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(rand(4, 6), torch.zeros(5, dtype=torch.long))


def test_cross_entropy_module_equals_function():
    options = dict(ignore_index=0, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    logits, targets = rand(9, 30), targets_for(9, 30)
    module = CrossEntropyLoss(**options)
    want = cross_entropy(logits, targets, num_tokens=20, **options)
    torch.testing.assert_close(module(logits, targets, num_tokens=20), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# Fused linear cross-entropy


def naive_linear_cross_entropy(hidden, weight, targets, bias=None, **options):
    logits = hidden @ weight.T + (bias if bias is not None else 0)
    return naive_cross_entropy(logits, targets, **options)


@pytest.mark.parametrize(
    "n, vocab, chunk_size", [(1, 5, 4096), (3, 333, 2), (127, 1000, 50), (127, 5, 16), (64, 40, 64)]
)
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("options", CE_OPTIONS, ids=str)
def test_fused_linear_cross_entropy_equals_unfused(n, vocab, chunk_size, with_bias, options):
    hidden, weight = rand(n, 12), rand(vocab, 12, seed=1, scale=0.5)
    bias = rand(vocab, seed=2) if with_bias else None
    targets = targets_for(n, vocab, ignore_every=4, ignore_index=options.get("ignore_index", -100))
    inputs = (hidden, weight) + ((bias,) if with_bias else ())
    assert_same_values_and_grads(
        lambda h, w, b=None: fused_linear_cross_entropy(h, w, targets, bias=b, chunk_size=chunk_size, **options),
        lambda h, w, b=None: naive_linear_cross_entropy(h, w, targets, b, **options),
        inputs,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_gradcheck(reduction):
    hidden, weight, bias = rand(7, 4), rand(9, 4, seed=1), rand(9, seed=2)
    targets = targets_for(7, 9, ignore_every=3)

    def fn(h, w, b):
        return fused_linear_cross_entropy(
            h, w, targets, bias=b, chunk_size=3, reduction=reduction, label_smoothing=0.1, z_loss=1e-2, softcap=3.0
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, bias))


def test_fused_linear_cross_entropy_only_grads_what_requires_grad():
    hidden, weight = rand(10, 6), rand(20, 6, seed=1, requires_grad=False)
    targets = targets_for(10, 20)
    (grad,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, targets, chunk_size=3), hidden)
    (want,) = torch.autograd.grad(naive_linear_cross_entropy(hidden, weight, targets), hidden)
    torch.testing.assert_close(grad, want)
    with torch.no_grad():
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, naive_linear_cross_entropy(hidden, weight, targets))


def test_fused_linear_cross_entropy_all_ignored_batch():
    hidden, weight = rand(5, 4), rand(7, 4, seed=1)
    loss = fused_linear_cross_entropy(hidden, weight, torch.full((5,), -100), chunk_size=2)
    grads = torch.autograd.grad(loss, (hidden, weight))
    assert loss.item() == 0.0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_fused_linear_cross_entropy_leading_dims_and_low_precision():
    hidden = rand(2, 5, 16, dtype=torch.bfloat16)
    weight = rand(50, 16, seed=1, dtype=torch.bfloat16, scale=0.3)
    targets = targets_for(10, 50).view(2, 5)
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=3)
    ref = cross_entropy(hidden @ weight.T, targets)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, ref)
    got = torch.autograd.grad(loss, (hidden, weight))
    want = torch.autograd.grad(ref, (hidden, weight))
    for g, w in zip(got, want):
        assert g.dtype == torch.bfloat16
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-3)
    assert fused_linear_cross_entropy(hidden, weight, targets, reduction="none").shape == (2, 5)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_under_autocast(reduction):
    # float32 weights and activations, bfloat16 matmuls: mixed-precision training on the CPU.
    hidden, weight = rand(40, 16, dtype=torch.float32), rand(30, 16, seed=1, dtype=torch.float32, scale=0.3)
    targets = targets_for(40, 30, ignore_every=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=7, reduction=reduction)
        ref = cross_entropy(hidden @ weight.T, targets, reduction=reduction)
    torch.testing.assert_close(loss, ref)
    upstream = torch.rand_like(ref)
    got = torch.autograd.grad(loss, (hidden, weight), upstream)
    want = torch.autograd.grad(ref, (hidden, weight), upstream)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, w, rtol=2e-2, atol=2e-2 * w.abs().max().item())


class _LargestTensor(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_never_holds_all_logits(reduction):
    n, vocab, dim, chunk = 200, 300, 8, 32
    hidden, weight = rand(n, dim), rand(vocab, dim, seed=1)
    targets = targets_for(n, vocab)
    with _LargestTensor() as probe:
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    assert probe.largest <= chunk * vocab < n * vocab


def test_fused_linear_cross_entropy_module_equals_function():
    options = dict(chunk_size=5, ignore_index=1, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    hidden, weight, bias = rand(11, 6), rand(30, 6, seed=1), rand(30, seed=2)
    targets = targets_for(11, 30)
    torch.testing.assert_close(
        FusedLinearCrossEntropyLoss(**options)(hidden, weight, targets, bias, num_tokens=9),
        fused_linear_cross_entropy(hidden, weight, targets, bias=bias, num_tokens=9, **options),
        rtol=0,
        atol=0,
    )


def test_fused_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(rand(4, 6), rand(10, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(rand(4, 6), rand(10, 6), torch.zeros(4, dtype=torch.long), bias=rand(9))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(rand(4, 6), rand(10, 6), torch.zeros(4, dtype=torch.long), chunk_size=0)


# ---------------------------------------------------------------------------
# SwiGLU


def test_swiglu_matches_formula():
    gate, up = rand(3, 17), rand(3, 17, seed=1)
    assert_same_values_and_grads(swiglu, lambda g, u: g / (1 + torch.exp(-g)) * u, (gate, up))


# ---------------------------------------------------------------------------
# Backend selection


def _ops():
    x = torch.randn(2, 4)
    table = torch.ones(4, 4)
    return {
        "rms_norm": lambda: rms_norm(x, torch.ones(4)),
        "swiglu": lambda: swiglu(x, x),
        "apply_rotary": lambda: apply_rotary(x.view(1, 2, 1, 4), x.view(1, 2, 1, 4), table, table),
        "cross_entropy": lambda: cross_entropy(x, torch.tensor([0, 1])),
        "fused_linear_cross_entropy": lambda: fused_linear_cross_entropy(x, torch.randn(3, 4), torch.tensor([0, 1])),
    }


def test_default_backend_on_cpu_is_torch(monkeypatch):
    monkeypatch.delenv("EMBER_KERNELS", raising=False)
    assert K.backend_for(torch.ones(1)) == "torch"
    for call in _ops().values():
        call()


def test_forced_torch_backend(monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", "torch")
    assert K.backend_for(torch.ones(1)) == "torch"
    for call in _ops().values():
        call()


def test_unknown_backend_is_rejected_naming_the_variable(monkeypatch):
    monkeypatch.setenv("EMBER_KERNELS", "bogus")
    with pytest.raises(ValueError, match="EMBER_KERNELS"):
        rms_norm(torch.ones(2, 4), torch.ones(4))


@pytest.mark.parametrize("op", list(_ops()))
def test_forced_triton_without_a_kernel_raises(monkeypatch, op):
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    with pytest.raises(NotImplementedError, match=f"{op} has no Triton kernel"):
        _ops()[op]()


def test_forced_triton_runs_the_registered_kernel(monkeypatch):
    # The package's rms_norm attribute is the function; the file is reached through importlib.
    module = importlib.import_module("ember.kernels.rms_norm")
    calls = []
    monkeypatch.setattr(module, "_triton_impl", lambda *a, **kw: calls.append(kw) or "triton result")
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    assert rms_norm(torch.ones(2, 4), torch.ones(4), casting="gemma") == "triton result"
    assert calls == [{"offset": 0.0, "casting": "gemma"}]
    monkeypatch.setenv("EMBER_KERNELS", "torch")
    assert isinstance(rms_norm(torch.ones(2, 4), torch.ones(4)), torch.Tensor)
