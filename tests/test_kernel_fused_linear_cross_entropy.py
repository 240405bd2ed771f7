"""ember.kernels.fused_linear_cross_entropy: the PyTorch reference against the unfused loss in
float64, and the Triton path (cuBLAS and the cross-entropy kernel, chunk by chunk) against
float64 PyTorch; see kernel_fixtures.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import FusedLinearCrossEntropyLoss, cross_entropy, fused_linear_cross_entropy
from ember.kernels.fused_linear_cross_entropy import WORKSPACE_BYTES, default_chunk_size
from kernel_fixtures import (  # tests/ is on sys.path when pytest collects it
    BAD_CE_OPTIONS,
    CE_OPTIONS,
    DEVICE,
    EVERYTHING,
    LOSS_OPCHECKS,
    OPTIONS,
    LargestTensor,
    assert_close_to,
    assert_cuda_graph_replays_like_eager,
    assert_loss_compiles_like_eager,
    assert_matches_float64,
    assert_same_values_and_grads,
    expected_cross_entropy,
    f64,
    naive_cross_entropy,
    needs_cuda,
    on_triton,
    rand,
    randn,
    random_targets,
    rel_error,
    resolve,
    targets_for,
)


# ---------------------------------------------------------------------------
# The reference


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
def test_fused_linear_cross_entropy_under_autocast_matches_the_unfused_loss(reduction):
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


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_never_holds_all_logits(reduction):
    n, vocab, dim, chunk = 200, 300, 8, 32
    hidden, weight = rand(n, dim), rand(vocab, dim, seed=1)
    targets = targets_for(n, vocab)
    with LargestTensor() as probe:
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    assert probe.largest <= chunk * vocab < n * vocab


def test_fused_linear_cross_entropy_module_equals_function_in_float64():
    options = dict(chunk_size=5, ignore_index=1, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    hidden, weight, bias = rand(11, 6), rand(30, 6, seed=1), rand(30, seed=2)
    targets = targets_for(11, 30)
    torch.testing.assert_close(
        FusedLinearCrossEntropyLoss(**options)(hidden, weight, targets, bias, num_tokens=9),
        fused_linear_cross_entropy(hidden, weight, targets, bias=bias, num_tokens=9, **options),
        rtol=0,
        atol=0,
    )


@pytest.mark.parametrize("options, match", BAD_CE_OPTIONS)
def test_fused_linear_cross_entropy_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        fused_linear_cross_entropy(rand(2, 3), rand(4, 3), torch.tensor([0, 1]), **options)


def test_fused_linear_cross_entropy_rejects_bad_shapes():
    with pytest.raises(ValueError, match="weight"):
        fused_linear_cross_entropy(rand(4, 6), rand(10, 5), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="bias"):
        fused_linear_cross_entropy(rand(4, 6), rand(10, 6), torch.zeros(4, dtype=torch.long), bias=rand(9))
    with pytest.raises(ValueError, match="chunk_size"):
        fused_linear_cross_entropy(rand(4, 6), rand(10, 6), torch.zeros(4, dtype=torch.long), chunk_size=0)


def test_default_chunk_size_fits_the_workspace():
    assert default_chunk_size(16384, 128256, 2) == 4096  # Llama 3's vocabulary in bfloat16: 1 GB of logits
    assert default_chunk_size(100, 128256, 2) == 100
    assert default_chunk_size(10**6, 32000, 4) * 32000 * 4 <= WORKSPACE_BYTES
    assert default_chunk_size(5, 10**12, 4) == 1


# ---------------------------------------------------------------------------
# The Triton path


def expected_linear_cross_entropy(hidden, weight, targets, bias=None, **options):
    logits = hidden @ weight.T + (0 if bias is None else bias)
    return expected_cross_entropy(logits, targets, **options)


def chunk_not_dividing(n):
    return max(1, n // 3 + 1) if n > 2 else 2


# Each N and each V, with chunks that do not divide N; the kernel's shapes are covered by
# tests/test_kernel_cross_entropy.py.
@on_triton
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


@on_triton
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


@on_triton
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


@on_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_fused_linear_cross_entropy_all_ignored(reduction, gen):
    hidden, weight, bias = randn(gen, 5, 4), randn(gen, 7, 4), randn(gen, 7)
    targets = torch.full((5,), -100, device=DEVICE)
    loss = fused_linear_cross_entropy(hidden, weight, targets, bias=bias, chunk_size=2, reduction=reduction)
    grads = torch.autograd.grad(loss.sum(), (hidden, weight, bias))
    assert torch.count_nonzero(loss) == 0 and all(torch.count_nonzero(g) == 0 for g in grads)


@on_triton
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


@on_triton
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


@on_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_holds_one_chunk_of_logits(reduction, gen):
    n, vocab, dim, chunk = 200, 300, 8, 32
    hidden, weight = randn(gen, n, dim), randn(gen, vocab, dim)
    targets = random_targets(gen, n, vocab)
    with LargestTensor() as probe:
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=chunk, reduction=reduction)
        loss.backward(torch.ones_like(loss))
    assert probe.largest <= chunk * vocab < n * vocab


@on_triton
def test_fused_linear_cross_entropy_default_chunking_matches(gen):
    hidden, weight = randn(gen, 33, 8), randn(gen, 20, 8)
    targets = random_targets(gen, 33, 20)
    assert_matches_float64(
        lambda h, w: fused_linear_cross_entropy(h.view(3, 11, 8), w, targets.view(3, 11), reduction="none").view(-1),
        lambda h, w: expected_linear_cross_entropy(h, w, targets, reduction="none"),
        [hidden, weight],
        gen,
    )


@on_triton
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


@on_triton
def test_fused_linear_cross_entropy_no_host_synchronisation(gen):
    hidden, weight = randn(gen, 7, 8), randn(gen, 50, 8)
    targets = random_targets(gen, 7, 50)
    num_tokens = torch.tensor(5, device=DEVICE)
    with LargestTensor() as probe:
        for reduction in ("mean", "sum", "none"):
            loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=3, reduction=reduction)
            loss.sum().backward()
        fused_linear_cross_entropy(hidden, weight, targets, num_tokens=num_tokens).backward()
    assert probe.host_reads == []


@on_triton
def test_fused_linear_cross_entropy_evaluation_allocates_no_gradient_buffers(gen):
    hidden, weight = randn(gen, 16, 8), randn(gen, 64, 8)
    targets = random_targets(gen, 16, 64)
    with torch.no_grad(), LargestTensor() as probe:
        fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4)
    assert probe.largest < 64 * 8  # neither an (N, V) gradient nor a (V, D) weight gradient


@on_triton
def test_fused_linear_cross_entropy_custom_op_registrations_are_consistent(gen):
    hidden, weight, bias = randn(gen, 9, 8), randn(gen, 40, 8), randn(gen, 40)
    targets = random_targets(gen, 9, 40)
    den = torch.tensor(6.0, device=DEVICE)
    ops = torch.ops.ember
    cases = [
        (ops.linear_cross_entropy, (hidden, weight, bias, targets, den, "mean", -100, 0.1, 1e-3, 3.0, 4,
                                    torch.float32, True, True, True, True)),
        (ops.linear_cross_entropy_losses, (hidden, weight, bias, targets, -100, 0.1, 1e-3, 3.0, 4, torch.float32, True)),
        (ops.linear_cross_entropy_grads, (hidden.detach(), weight.detach(), bias.detach(), targets,
                                          torch.rand(9, device=DEVICE), -100, 0.1, 1e-3, 3.0, 4, torch.float32,
                                          True, True, True, True)),
    ]  # fmt: skip
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=LOSS_OPCHECKS)


@on_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_fused_linear_cross_entropy_fullgraph_compile(reduction, gen):
    # aot_eager traces the ops' fake and autograd registrations without a C++ toolchain;
    # the gpu test below compiles with inductor.
    hidden, weight = randn(gen, 9, 8), randn(gen, 40, 8)
    targets = random_targets(gen, 9, 40)

    def loss(hidden, weight):
        return fused_linear_cross_entropy(hidden, weight, targets, chunk_size=4, reduction=reduction, **EVERYTHING)

    assert_loss_compiles_like_eager(loss, (hidden, weight), "aot_eager")


# ---------------------------------------------------------------------------
# GPU only: low precision, full sizes, inductor, CUDA graphs, memory, sync


@on_triton
@pytest.mark.gpu
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
        errors[name] = [abs(loss.item() - want.item())] + [rel_error(g, w) for g, w in zip(grads, want_grads)]
    print(errors)
    assert errors["ember"][0] <= errors["pytorch"][0] * 1.5 + 1e-5
    for ours, theirs in zip(errors["ember"][1:], errors["pytorch"][1:]):
        assert ours <= theirs * 1.1


@on_triton
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_fused_linear_cross_entropy_fullgraph_compile_with_inductor(reduction, gen):
    hidden, weight = randn(gen, 256, 64), randn(gen, 1031, 64, scale=0.2)
    targets = random_targets(gen, 256, 1031)

    def loss(hidden, weight):
        return fused_linear_cross_entropy(hidden, weight, targets, chunk_size=100, reduction=reduction, **EVERYTHING)

    assert_loss_compiles_like_eager(loss, (hidden, weight), "inductor")


@on_triton
@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_linear_cross_entropy_cuda_graph_capture_and_replay(gen):
    n, vocab, dim = 512, 1031, 64
    hidden, weight = randn(gen, n, dim), randn(gen, vocab, dim, scale=0.2)
    targets = random_targets(gen, n, vocab)

    def step():
        loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_size=200, **EVERYTHING)
        loss.backward()
        return loss

    def refill():
        hidden.copy_(torch.randn(hidden.shape, generator=gen).to(DEVICE))
        weight.copy_(torch.randn(weight.shape, generator=gen).to(DEVICE) * 0.2)
        targets.copy_(random_targets(gen, n, vocab))

    assert_cuda_graph_replays_like_eager(step, (hidden, weight), refill)


@on_triton
@pytest.mark.gpu
@needs_cuda
def test_gpu_fused_linear_cross_entropy_no_host_synchronisation(gen):
    hidden, weight = randn(gen, 256, 64), randn(gen, 1031, 64)
    targets = random_targets(gen, 256, 1031)
    num_tokens = (targets != -100).sum()

    def run():
        for reduction in ("mean", "sum", "none"):
            fused_linear_cross_entropy(hidden, weight, targets, chunk_size=100, reduction=reduction).sum().backward()
        fused_linear_cross_entropy(hidden, weight, targets, num_tokens=num_tokens).backward()
        fused_linear_cross_entropy(hidden, weight, targets, num_tokens=1000).backward()

    run()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@on_triton
@pytest.mark.gpu
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
