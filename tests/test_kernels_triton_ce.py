"""The Triton cross-entropy and fused linear cross-entropy against float64 PyTorch.

Without CUDA the kernels run in Triton's interpreter on CPU tensors: each test sets
``TRITON_INTERPRET=1`` and ``EMBER_KERNELS=triton`` only while it runs. With CUDA the same
tests run the compiled kernels, and the ``gpu``-marked ones below add low precision, full
sizes, torch.compile, CUDA graphs and memory. Inputs are fresh each run: a failing test
prints ``EMBER_TEST_SEED=...``; set that variable to replay it.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import ember.kernels._triton_ce as triton_ce
from ember.kernels import (
    CrossEntropyLoss,
    FusedLinearCrossEntropyLoss,
    cross_entropy,
    cross_entropy_reference,
    fused_linear_cross_entropy,
)
from ember.kernels.fused_linear_cross_entropy import WORKSPACE_BYTES, default_chunk_size

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
f64 = torch.float64

gpu = pytest.mark.gpu
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


pytestmark = pytest.mark.usefixtures("triton_backend")  # fixtures: tests/kernel_fixtures.py


def randn(gen, *shape, scale=1.0, dtype=torch.float32, requires_grad=True):
    if CUDA and math.prod(shape) > 2**22:  # full-size GPU inputs: drawn there, from a seed drawn here
        device_gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(2**62, (), generator=gen)))
        x = (torch.randn(shape, generator=device_gen, device=DEVICE) * scale).to(dtype)
    else:
        x = (torch.randn(shape, generator=gen, dtype=f64) * scale).to(DEVICE, dtype)
    return x.requires_grad_(requires_grad)


def random_targets(gen, n, vocab, ignore_index=-100, ignored=0.25):
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignored] = ignore_index
    return t.to(DEVICE)


# ---------------------------------------------------------------------------
# The float64 oracle, written from the definition in ember.kernels.cross_entropy.


def expected_cross_entropy(
    logits, targets, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", softcap=None,
    num_tokens=None,
):  # fmt: skip
    z = logits.to(f64)
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    lse = torch.logsumexp(z, -1)
    valid = targets != ignore_index
    target_logit = z.gather(-1, torch.where(valid, targets, 0).unsqueeze(-1)).squeeze(-1)
    loss = (1 - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - z.mean(-1)) + z_loss * lse**2
    loss = torch.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denominator = num_tokens if num_tokens is not None else valid.sum().clamp(min=1)
    return loss.sum() / (denominator.to(f64) if isinstance(denominator, torch.Tensor) else denominator)


def expected_linear_cross_entropy(hidden, weight, targets, bias=None, **options):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return expected_cross_entropy(logits, targets, **options)


def assert_close_to(got, want, rel):
    """Within ``rel`` of ``want``'s largest magnitude, elementwise."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.detach().to(f64), want.detach(), rtol=rel, atol=rel * max(scale, 1e-30))


def assert_matches_float64(run, expect, inputs, gen, *, loss_rel=1e-5, grad_rel=2e-5):
    """``run(*inputs)`` and its gradients for a random upstream gradient match ``expect`` on float64 copies."""
    wide = [x.detach().to(f64).requires_grad_() for x in inputs]
    got, want = run(*inputs), expect(*wide)
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert_close_to(got, want, loss_rel)
    upstream = torch.rand(want.shape, generator=gen, dtype=f64).to(DEVICE) + 0.5
    got_grads = torch.autograd.grad(got, inputs, upstream.to(got.dtype))
    want_grads = torch.autograd.grad(want, wide, upstream)
    for x, g, w in zip(inputs, got_grads, want_grads):
        assert g.dtype == x.dtype and g.shape == x.shape
        assert_close_to(g, w, grad_rel)


# Rows are independent, so the options run on a few rows and the shapes with the plain loss:
# the interpreter costs a few milliseconds a row.
SHAPES = [(n, v) for n in (1, 3, 127, 333) for v in (5, 333, 1000, 1031)]
EVERYTHING = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
OPTIONS = [
    {},
    {"ignore_index": 3},
    {"label_smoothing": 0.2},
    {"z_loss": 1e-2},
    {"softcap": 2.5},
    {"softcap": 30.0},  # mostly the series branch of the kernel's tanh
    {"reduction": "sum"},
    {"reduction": "none"},
    {"num_tokens": 1000},
    {"num_tokens": "tensor"},
    {**EVERYTHING, "reduction": "none"},
    {**EVERYTHING, "reduction": "sum", "ignore_index": 0},
    {**EVERYTHING, "num_tokens": "tensor"},
]


def resolve(options, targets):
    """``num_tokens="tensor"`` becomes a device tensor: the valid count plus 5, so it differs from the default."""
    if options.get("num_tokens") == "tensor":
        ignore_index = options.get("ignore_index", -100)
        return {**options, "num_tokens": (targets != ignore_index).sum() + 5}
    return options


# ---------------------------------------------------------------------------
# Cross-entropy


@pytest.mark.parametrize("n, vocab", SHAPES)
def test_cross_entropy_every_shape(n, vocab, gen):
    logits, targets = randn(gen, n, vocab, scale=3.0), random_targets(gen, n, vocab)
    assert_matches_float64(
        lambda x: cross_entropy(x, targets), lambda x: expected_cross_entropy(x, targets), [logits], gen
    )


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_cross_entropy_every_option(options, gen):
    n, vocab = 29, 1031
    targets = random_targets(gen, n, vocab, ignore_index=options.get("ignore_index", -100))
    options = resolve(options, targets)
    assert_matches_float64(
        lambda x: cross_entropy(x, targets, **options),
        lambda x: expected_cross_entropy(x, targets, **options),
        [randn(gen, n, vocab, scale=3.0)],
        gen,
    )


@pytest.mark.parametrize("n, vocab", [(3, 1031), (5, 1000)])
def test_cross_entropy_online_softmax_across_blocks(n, vocab, gen, monkeypatch):
    # 128-logit blocks: 8 or 9 per row, the last one partial.
    monkeypatch.setattr(triton_ce, "MAX_BLOCK", 128)
    targets = random_targets(gen, n, vocab)
    for reduction in ("mean", "none"):
        options = dict(EVERYTHING, reduction=reduction)
        assert_matches_float64(
            lambda x: cross_entropy(x, targets, **options),
            lambda x: expected_cross_entropy(x, targets, **options),
            [randn(gen, n, vocab, scale=6.0)],
            gen,
        )


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_is_zero_with_zero_gradient(reduction, gen):
    logits = randn(gen, 4, 10)
    loss = cross_entropy(logits, torch.full((4,), -100, device=DEVICE), reduction=reduction, **EVERYTHING)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


def test_cross_entropy_num_tokens_shares_a_denominator_across_micro_batches(gen):
    logits, targets = randn(gen, 12, 40, requires_grad=False), random_targets(gen, 12, 40)
    whole = cross_entropy(logits, targets)
    total = (targets != -100).sum()  # a device tensor: no .item() anywhere
    parts = sum(cross_entropy(logits[i : i + 5], targets[i : i + 5], num_tokens=total) for i in range(0, 12, 5))
    torch.testing.assert_close(parts, whole)


def test_cross_entropy_low_precision_loss_in_float32_gradient_in_input_dtype(gen):
    n, vocab = 16, 333
    targets = random_targets(gen, n, vocab)
    for dtype, rel in ((torch.bfloat16, 1e-2), (torch.float16, 2e-3)):
        logits = randn(gen, n, vocab, scale=3.0, dtype=dtype)
        loss = cross_entropy(logits, targets, **EVERYTHING)
        want = expected_cross_entropy(logits.detach().to(f64), targets, **EVERYTHING)
        assert loss.dtype == torch.float32
        assert_close_to(loss, want, 1e-5)  # the kernel reads the rounded logits exactly and works in float32
        (grad,) = torch.autograd.grad(loss, logits)
        assert grad.dtype == dtype
        assert_close_to(grad, _float64_grad(logits, targets, EVERYTHING), rel)


def _float64_grad(logits, targets, options, upstream=1.0):
    wide = logits.detach().to(f64).requires_grad_()
    (grad,) = torch.autograd.grad(expected_cross_entropy(wide, targets, **options) * upstream, wide)
    return grad


def test_cross_entropy_float16_mean_gradient_survives_loss_scaling(gen):
    # Small softmax values, p / N, even p alone are float16 subnormals or zero here; what
    # the kernel stores must keep them until backward brings the loss scaler's factor.
    n, vocab, loss_scale = 256, 64, 2.0**16
    logits = randn(gen, n, vocab, scale=4.0, dtype=torch.float16)
    targets = random_targets(gen, n, vocab, ignored=0.0)
    (grad,) = torch.autograd.grad(cross_entropy(logits, targets) * loss_scale, logits)
    want = _float64_grad(logits, targets, {}, loss_scale)
    normal = want.abs() > 1e-3  # p > 4e-6: subnormal in float16, but not p * 256
    assert normal.sum() > n
    torch.testing.assert_close(grad[normal].to(f64), want[normal], rtol=2e-3, atol=0)


def test_cross_entropy_leaves_logits_alone_and_accepts_strided_rows(gen):
    wide = randn(gen, 2, 3, 50, scale=3.0, requires_grad=False)
    logits = wide[..., :37].requires_grad_()  # rows 50 apart in memory
    before = logits.detach().clone()
    targets = random_targets(gen, 6, 37).view(2, 3)
    assert_matches_float64(
        lambda x: cross_entropy(x, targets, reduction="none", softcap=3.0),
        lambda x: expected_cross_entropy(x.reshape(6, 37), targets.reshape(6), reduction="none", softcap=3.0).view(2, 3),
        [logits],
        gen,
    )
    assert torch.equal(logits.detach(), before)


def test_cross_entropy_out_of_range_target_gives_nan_loss(gen):
    loss = cross_entropy(randn(gen, 3, 8), torch.tensor([1, 8, -100], device=DEVICE), reduction="none")
    assert not loss[0].isnan() and loss[1].isnan() and loss[2] == 0


def test_cross_entropy_second_backward_through_the_graph_fails_loudly(gen):
    logits, targets = randn(gen, 4, 9), random_targets(gen, 4, 9, ignored=0.0)
    loss = cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_cross_entropy_module_equals_function(gen):
    options = dict(ignore_index=0, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    logits, targets = randn(gen, 9, 30), random_targets(gen, 9, 30, ignore_index=0)
    num_tokens = torch.tensor(20, device=DEVICE)
    got = CrossEntropyLoss(**options)(logits, targets, num_tokens=num_tokens)
    torch.testing.assert_close(got, cross_entropy(logits, targets, num_tokens=num_tokens, **options), rtol=0, atol=0)


@pytest.mark.skipif(CUDA, reason="the refusal concerns CPU tensors without the interpreter")
def test_cpu_tensors_without_the_interpreter_are_refused(monkeypatch, gen):
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        cross_entropy(randn(gen, 2, 4), torch.tensor([0, 1]))
    with pytest.raises(NotImplementedError, match="TRITON_INTERPRET=1"):
        fused_linear_cross_entropy(randn(gen, 2, 4), randn(gen, 5, 4), torch.tensor([0, 1]))


# ---------------------------------------------------------------------------
# Fused linear cross-entropy


def chunk_not_dividing(n):
    return max(1, n // 3 + 1) if n > 2 else 2


# Each N and each V, with chunks that do not divide N; the kernel's shapes are covered above.
@pytest.mark.parametrize("n, vocab", [(1, 1031), (3, 1000), (127, 5), (333, 333), (127, 1031)])
def test_fused_linear_cross_entropy_every_shape(n, vocab, gen):
    dim = 24
    hidden, weight, bias = randn(gen, n, dim), randn(gen, vocab, dim, scale=0.5), randn(gen, vocab)
    targets = random_targets(gen, n, vocab)
    chunk = chunk_not_dividing(n)
    assert_matches_float64(
        lambda h, w, b: fused_linear_cross_entropy(h, w, targets, bias=b, chunk_size=chunk, **EVERYTHING),
        lambda h, w, b: expected_linear_cross_entropy(h, w, targets, b, **EVERYTHING),
        [hidden, weight, bias],
        gen,
    )


@pytest.mark.parametrize("options", OPTIONS, ids=str)
def test_fused_linear_cross_entropy_every_option(options, gen):
    n, vocab, dim = 29, 333, 16
    with_bias = len(str(options)) % 2 == 0  # about half the cases, deterministically
    hidden, weight = randn(gen, n, dim), randn(gen, vocab, dim, scale=0.5)
    inputs = [hidden, weight] + ([randn(gen, vocab)] if with_bias else [])
    targets = random_targets(gen, n, vocab, ignore_index=options.get("ignore_index", -100))
    options = resolve(options, targets)
    assert_matches_float64(
        lambda h, w, b=None: fused_linear_cross_entropy(h, w, targets, bias=b, chunk_size=8, **options),
        lambda h, w, b=None: expected_linear_cross_entropy(h, w, targets, b, **options),
        inputs,
        gen,
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_only_computes_the_gradients_asked_for(reduction, gen):
    hidden, weight = randn(gen, 10, 6), randn(gen, 20, 6, requires_grad=False)
    bias = randn(gen, 20, requires_grad=False)
    targets = random_targets(gen, 10, 20)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=3, reduction=reduction)
    wide = hidden.detach().to(f64).requires_grad_()
    want = expected_linear_cross_entropy(wide, weight.to(f64), targets, bias.to(f64), reduction=reduction)
    assert_close_to(loss, want, 1e-5)
    (got,) = torch.autograd.grad(loss.sum(), hidden)
    (expected,) = torch.autograd.grad(want.sum(), wide)
    assert_close_to(got, expected, 2e-5)
    with torch.no_grad():
        assert not fused_linear_cross_entropy(hidden, weight, targets, chunk_size=3).requires_grad


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy_all_ignored(reduction, gen):
    hidden, weight, bias = randn(gen, 5, 4), randn(gen, 7, 4), randn(gen, 7)
    targets = torch.full((5,), -100, device=DEVICE)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=2, reduction=reduction)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    assert torch.count_nonzero(loss) == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


def test_fused_linear_cross_entropy_float32_accumulation_does_not_drift(gen):
    # 64 one-token chunks: the weight gradient is a sum of 64 products. Accumulated in
    # float32 and rounded once it is the one-chunk result (up to summation order); rounded
    # to bfloat16 after every chunk it drifts by many bfloat16 ulps.
    n, vocab, dim = 64, 50, 16
    hidden, weight = randn(gen, n, dim, dtype=torch.bfloat16), randn(gen, vocab, dim, scale=0.5, dtype=torch.bfloat16)
    targets = random_targets(gen, n, vocab, ignored=0.0)
    (one_chunk,) = torch.autograd.grad(fused_linear_cross_entropy(hidden, weight, targets, chunk_size=n), weight)
    drift = {}
    for fp32 in (True, False):
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=1, fp32_accumulation=fp32)
        (got,) = torch.autograd.grad(loss, weight)
        assert got.dtype == torch.bfloat16
        drift[fp32] = ((got.float() - one_chunk.float()).norm() / one_chunk.float().norm()).item()
    assert drift[True] < 2**-9 < drift[False]


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_under_autocast(reduction, gen):
    # float32 parameters, bfloat16 matmuls: the output layer of bf16-mixed training.
    hidden, weight = randn(gen, 40, 16), randn(gen, 30, 16, scale=0.3)
    targets = random_targets(gen, 40, 30)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=7, reduction=reduction)
    # The matmul rounds its operands to bfloat16; from there on everything is exact.
    h16, w16 = hidden.to(torch.bfloat16), weight.to(torch.bfloat16)
    want = expected_linear_cross_entropy(h16.to(f64), w16.to(f64), targets, reduction=reduction)
    assert loss.dtype == torch.float32
    assert_close_to(loss, want, 2e-2)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight))
    wide = [hidden.detach().to(f64).requires_grad_(), weight.detach().to(f64).requires_grad_()]
    want_grads = torch.autograd.grad(expected_linear_cross_entropy(*wide, targets, reduction=reduction).sum(), wide)
    for g, w in zip(grads, want_grads):
        assert g.dtype == torch.float32
        assert_close_to(g, w, 3e-2)


class _LargestTensor(TorchDispatchMode):
    """Largest tensor any op returns, and whether anything read a value back to the host."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.host_reads = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten._local_scalar_dense.default, torch.ops.aten.item.default):
            self.host_reads.append(func)
        out = func(*args, **(kwargs or {}))
        if func.is_view:  # no new memory
            return out
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_holds_one_chunk_of_logits(reduction, gen):
    n, vocab, dim, chunk = 200, 300, 8, 32
    hidden, weight = randn(gen, n, dim), randn(gen, vocab, dim)
    targets = random_targets(gen, n, vocab)
    with _LargestTensor() as probe:
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    assert probe.largest <= chunk * vocab < n * vocab


def test_no_host_synchronisation(gen):
    logits, hidden, weight = randn(gen, 7, 50), randn(gen, 7, 8), randn(gen, 50, 8)
    targets = random_targets(gen, 7, 50)
    num_tokens = torch.tensor(5, device=DEVICE)
    with _LargestTensor() as probe:
        for reduction in ("mean", "sum", "none"):
            cross_entropy(logits, targets, reduction=reduction, **EVERYTHING).sum().backward()
            loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=3, reduction=reduction)
            loss.sum().backward()
        cross_entropy(logits, targets, num_tokens=num_tokens).backward()
        fused_linear_cross_entropy(hidden, weight, targets, num_tokens=num_tokens).backward()
    assert probe.host_reads == []


def test_evaluation_allocates_no_gradient_buffers(gen):
    logits, hidden, weight = randn(gen, 16, 64), randn(gen, 16, 8), randn(gen, 64, 8)
    targets = random_targets(gen, 16, 64)
    with torch.no_grad(), _LargestTensor() as probe:
        cross_entropy(logits, targets)
        fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert probe.largest < 64 * 8  # neither an (N, V) gradient nor a (V, D) weight gradient


def test_default_chunk_size_fits_the_workspace():
    assert default_chunk_size(16384, 128256, 2) == 4096  # Llama 3's vocabulary in bfloat16: 1 GB of logits
    assert default_chunk_size(100, 128256, 2) == 100
    assert default_chunk_size(10**6, 32000, 4) * 32000 * 4 <= WORKSPACE_BYTES
    assert default_chunk_size(5, 10**12, 4) == 1


def test_fused_linear_cross_entropy_default_chunking_matches(gen):
    hidden, weight = randn(gen, 33, 8), randn(gen, 20, 8)
    targets = random_targets(gen, 33, 20)
    assert_matches_float64(
        lambda h, w: fused_linear_cross_entropy(h.view(3, 11, 8), w, targets.view(3, 11), reduction="none").view(-1),
        lambda h, w: expected_linear_cross_entropy(h, w, targets, reduction="none"),
        [hidden, weight],
        gen,
    )


def test_fused_linear_cross_entropy_module_equals_function(gen):
    options = dict(chunk_size=5, ignore_index=1, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    hidden, weight, bias = randn(gen, 11, 6), randn(gen, 30, 6), randn(gen, 30)
    targets = random_targets(gen, 11, 30, ignore_index=1)
    torch.testing.assert_close(
        FusedLinearCrossEntropyLoss(**options)(hidden, weight, targets, bias, num_tokens=9),
        fused_linear_cross_entropy(hidden, weight, targets, bias=bias, num_tokens=9, **options),
        rtol=0,
        atol=0,
    )


# ---------------------------------------------------------------------------
# The custom ops under torch.compile


def test_custom_op_registrations_are_consistent(gen):
    opcheck_tests = ("test_schema", "test_autograd_registration", "test_faketensor")
    logits, targets = randn(gen, 9, 40), random_targets(gen, 9, 40)
    hidden, weight, bias = randn(gen, 9, 8), randn(gen, 40, 8), randn(gen, 40)
    den = torch.tensor(6.0, device=DEVICE)
    ops = torch.ops.ember
    cases = [
        (ops.cross_entropy, (logits, targets, den, "mean", -100, 0.1, 1e-3, 3.0, True)),
        (ops.cross_entropy, (logits, targets, None, "none", -100, 0.0, 0.0, None, True)),
        (ops.scale_rows, (randn(gen, 9, 40, requires_grad=False), torch.rand(9, device=DEVICE), torch.bfloat16)),
        (ops.scale_rows_, (randn(gen, 9, 40, requires_grad=False), torch.rand((), device=DEVICE))),
        (ops.linear_cross_entropy, (hidden, weight, bias, targets, den, "mean", -100, 0.1, 1e-3, 3.0, 4,
                                    torch.float32, True, True, True, True)),
        (ops.linear_cross_entropy_losses, (hidden, weight, bias, targets, -100, 0.1, 1e-3, 3.0, 4, torch.float32, True)),
        (ops.linear_cross_entropy_grads, (hidden.detach(), weight.detach(), bias.detach(), targets,
                                          torch.rand(9, device=DEVICE), -100, 0.1, 1e-3, 3.0, 4, torch.float32,
                                          True, True, True, True)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=opcheck_tests)


def _compiled_matches_eager(fn, inputs, backend):
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got, want = compiled(*inputs), fn(*inputs)
    upstream = torch.rand_like(want) + 0.5
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fullgraph_compile(reduction, gen):
    # aot_eager traces the ops' fake and autograd registrations without a C++ toolchain;
    # the gpu tests below compile with inductor.
    logits, hidden, weight = randn(gen, 9, 40), randn(gen, 9, 8), randn(gen, 40, 8)
    targets = random_targets(gen, 9, 40)
    num_tokens = torch.tensor(7, device=DEVICE) if reduction == "mean" else None

    def loss(logits, hidden, weight):
        a = cross_entropy(logits, targets, reduction=reduction, num_tokens=num_tokens, **EVERYTHING)
        b = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4, reduction=reduction, **EVERYTHING)
        return a + b

    _compiled_matches_eager(loss, (logits, hidden, weight), "aot_eager")


# ---------------------------------------------------------------------------
# GPU only: low precision, full sizes, inductor, CUDA graphs, memory, sync


def _rel_error(got, want):
    return ((got.to(f64) - want).norm() / want.norm()).item()


def _pytorch_same_precision(logits, targets, options):
    """PyTorch's own answer in the logits' dtype: softcap and z-loss as PyTorch ops, F.cross_entropy."""
    z = logits
    if options.get("softcap") is not None:
        z = options["softcap"] * torch.tanh(z / options["softcap"])
    loss = F.cross_entropy(z, targets, label_smoothing=options.get("label_smoothing", 0.0))
    if options.get("z_loss"):
        valid = targets != -100
        lse = torch.logsumexp(z, -1)
        loss = loss + options["z_loss"] * (lse.square() * valid).sum() / valid.sum()
    return loss


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("options", [{}, EVERYTHING], ids=["plain", "everything"])
def test_gpu_low_precision_cross_entropy_no_worse_than_pytorch(dtype, options, gen):
    n, vocab = 4096, 32003
    logits = randn(gen, n, vocab, scale=4.0, dtype=dtype)
    targets = random_targets(gen, n, vocab)
    wide = logits.detach().to(f64).requires_grad_()
    want = expected_cross_entropy(wide, targets, **options)
    (want_grad,) = torch.autograd.grad(want, wide)
    errors = {}
    for name, run in (("ember", lambda x: cross_entropy(x, targets, **options)),
                      ("pytorch", lambda x: _pytorch_same_precision(x, targets, options)),
                      ("pytorch-fp32-math", lambda x: cross_entropy_reference(x, targets, **options))):  # fmt: skip
        loss = run(logits)
        (grad,) = torch.autograd.grad(loss, logits)
        errors[name] = (abs(loss.item() - want.item()), _rel_error(grad, want_grad))
    print(errors)
    assert errors["ember"][0] <= errors["pytorch"][0] + 1e-6
    assert errors["ember"][1] <= errors["pytorch"][1] * 1.02
    # Against float32 math rounded once: float16 gradients are rounded twice by design
    # (FLOAT16_PRESCALE), bfloat16 ones once.
    assert errors["ember"][0] <= errors["pytorch-fp32-math"][0] * 2 + 1e-5
    assert errors["ember"][1] <= errors["pytorch-fp32-math"][1] * (1.05 if dtype == torch.bfloat16 else 1.5)


@gpu
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_low_precision_fused_linear_no_worse_than_pytorch(dtype, gen):
    n, dim, vocab = 2048, 1024, 32003
    hidden, weight = randn(gen, n, dim, dtype=dtype), randn(gen, vocab, dim, scale=0.05, dtype=dtype)
    targets = random_targets(gen, n, vocab)
    wide = [hidden.detach().to(f64).requires_grad_(), weight.detach().to(f64).requires_grad_()]
    want = expected_linear_cross_entropy(*wide, targets)
    want_grads = torch.autograd.grad(want, wide)
    errors = {}
    for name, run in (("ember", lambda h, w: fused_linear_cross_entropy(h, w, targets, chunk_size=512)),
                      ("pytorch", lambda h, w: F.cross_entropy((h @ w.T).float(), targets))):  # fmt: skip
        loss = run(hidden, weight)
        grads = torch.autograd.grad(loss, (hidden, weight))
        errors[name] = [abs(loss.item() - want.item())] + [_rel_error(g, w) for g, w in zip(grads, want_grads)]
    print(errors)
    assert errors["ember"][0] <= errors["pytorch"][0] * 1.5 + 1e-5
    for ours, theirs in zip(errors["ember"][1:], errors["pytorch"][1:]):
        assert ours <= theirs * 1.1


@gpu
@needs_cuda
def test_gpu_cross_entropy_beyond_int32_offsets(gen):
    # 16896 x 128256 bfloat16 logits: element offsets pass 2**31.
    n, vocab = 16896, 128256
    assert n * vocab > 2**31
    logits = randn(gen, n, vocab, scale=3.0, dtype=torch.bfloat16)
    targets = random_targets(gen, n, vocab)
    losses = cross_entropy(logits, targets, reduction="none", **EVERYTHING)
    (grad,) = torch.autograd.grad(losses.sum(), logits)
    for rows in (slice(0, 64), slice(n - 64, n)):
        part = logits.detach()[rows].to(f64).requires_grad_()
        want = expected_cross_entropy(part, targets[rows], reduction="none", **EVERYTHING)
        assert_close_to(losses[rows], want, 1e-5)
        (want_grad,) = torch.autograd.grad(want.sum(), part)
        assert_close_to(grad[rows], want_grad, 1e-2)


@gpu
@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_fullgraph_compile_with_inductor(reduction, gen):
    logits, hidden, weight = randn(gen, 256, 1031), randn(gen, 256, 64), randn(gen, 1031, 64, scale=0.2)
    targets = random_targets(gen, 256, 1031)
    num_tokens = (targets != -100).sum() if reduction == "mean" else None

    def loss(logits, hidden, weight):
        a = cross_entropy(logits, targets, reduction=reduction, num_tokens=num_tokens, **EVERYTHING)
        b = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=100, reduction=reduction, **EVERYTHING)
        return a + b

    _compiled_matches_eager(loss, (logits, hidden, weight), "inductor")


@gpu
@needs_cuda
def test_gpu_cuda_graph_capture_and_replay(gen):
    n, vocab, dim = 512, 1031, 64
    logits, hidden, weight = randn(gen, n, vocab), randn(gen, n, dim), randn(gen, vocab, dim, scale=0.2)
    targets = random_targets(gen, n, vocab)
    leaves = (logits, hidden, weight)

    def step():
        loss = cross_entropy(logits, targets, **EVERYTHING) + fused_linear_cross_entropy(
            hidden, weight, targets, chunk_size=200, **EVERYTHING
        )
        loss.backward()
        return loss

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            for x in leaves:
                x.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    for x in leaves:
        x.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss = step()
    with torch.no_grad():  # new inputs, replayed
        for x in leaves:
            x.copy_(torch.randn(x.shape, generator=gen).to(DEVICE) * (0.2 if x is weight else 1.0))
        targets.copy_(random_targets(gen, n, vocab))
    graph.replay()
    got = [static_loss.clone()] + [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    want = [step()] + [x.grad for x in leaves]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


@gpu
@needs_cuda
def test_gpu_no_host_synchronisation(gen):
    logits, hidden, weight = randn(gen, 256, 1031), randn(gen, 256, 64), randn(gen, 1031, 64)
    targets = random_targets(gen, 256, 1031)
    num_tokens = (targets != -100).sum()

    def run():
        for reduction in ("mean", "sum", "none"):
            cross_entropy(logits, targets, reduction=reduction, **EVERYTHING).sum().backward()
            fused_linear_cross_entropy(hidden, weight, targets, chunk_size=100, reduction=reduction).sum().backward()
        cross_entropy(logits, targets, num_tokens=num_tokens).backward()
        fused_linear_cross_entropy(hidden, weight, targets, num_tokens=num_tokens).backward()
        fused_linear_cross_entropy(hidden, weight, targets, num_tokens=1000).backward()

    run()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@gpu
@needs_cuda
@pytest.mark.parametrize("fp32_accumulation", [True, False])
def test_gpu_fused_linear_memory_at_full_size(fp32_accumulation, gen):
    # BT=16384, H=4096, V=128256 in bfloat16: the unfused logits alone would be 4.2 GB.
    n, dim, vocab = 16384, 4096, 128256
    hidden = randn(gen, n, dim, dtype=torch.bfloat16)
    weight = randn(gen, vocab, dim, scale=0.02, dtype=torch.bfloat16)
    targets = random_targets(gen, n, vocab)
    fused_linear_cross_entropy(hidden[:256], weight, targets[:256]).backward()  # kernels compiled, cuBLAS warm
    hidden.grad = weight.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fused_linear_cross_entropy(hidden, weight, targets, fp32_accumulation=fp32_accumulation).backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    gradients = (hidden.numel() + weight.numel()) * 2
    accumulator = weight.numel() * 4 if fp32_accumulation else 0  # the float32 weight gradient, by design
    extra = peak - gradients - accumulator
    print(f"peak +{peak / 1e9:.2f} GB: gradients {gradients / 1e9:.2f}, accumulator {accumulator / 1e9:.2f}, "
          f"extra {extra / 1e9:.2f} GB")  # fmt: skip
    assert extra <= 1.5e9
