"""ember.kernels.cross_entropy: the PyTorch reference against the definition, token by token in
float64 (and against ``F.cross_entropy`` where PyTorch has the option), and the Triton kernel
against float64 PyTorch; see kernel_fixtures.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import CrossEntropyLoss, cross_entropy, cross_entropy_reference
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


def test_cross_entropy_num_tokens_shares_a_denominator_across_micro_batches_in_float64():
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


@pytest.mark.parametrize("options, match", BAD_CE_OPTIONS)
def test_cross_entropy_rejects_bad_options(options, match):
    with pytest.raises(ValueError, match=match):
        cross_entropy(rand(2, 4), torch.tensor([0, 1]), **options)


def test_cross_entropy_rejects_mismatched_targets():
    with pytest.raises(ValueError, match="targets"):
        cross_entropy(rand(4, 6), torch.zeros(5, dtype=torch.long))


def test_cross_entropy_module_equals_function_in_float64():
    options = dict(ignore_index=0, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    logits, targets = rand(9, 30), targets_for(9, 30)
    module = CrossEntropyLoss(**options)
    want = cross_entropy(logits, targets, num_tokens=20, **options)
    torch.testing.assert_close(module(logits, targets, num_tokens=20), want, rtol=0, atol=0)


# ---------------------------------------------------------------------------
# The Triton kernel

# Rows are independent, so the options run on a few rows and the shapes with the plain loss.
SHAPES = [(n, v) for n in (1, 3, 127, 333) for v in (5, 333, 1000, 1031)]


@on_triton
@pytest.mark.parametrize("n, vocab", SHAPES)
def test_cross_entropy_every_shape(n, vocab, gen):
    logits, targets = randn(gen, n, vocab, scale=3.0), random_targets(gen, n, vocab)
    assert_matches_float64(
        lambda x: cross_entropy(x, targets), lambda x: expected_cross_entropy(x, targets), [logits], gen
    )


@on_triton
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


@on_triton
@pytest.mark.parametrize("n, vocab", [(3, 1031), (5, 1000)])
def test_cross_entropy_online_softmax_across_blocks(n, vocab, gen, monkeypatch):
    # 128-logit blocks: 8 or 9 per row, the last one partial.
    monkeypatch.setattr("ember.kernels._triton_ce.MAX_BLOCK", 128)
    targets = random_targets(gen, n, vocab)
    for reduction in ("mean", "none"):
        options = dict(EVERYTHING, reduction=reduction)
        assert_matches_float64(
            lambda x: cross_entropy(x, targets, **options),
            lambda x: expected_cross_entropy(x, targets, **options),
            [randn(gen, n, vocab, scale=6.0)],
            gen,
        )


@on_triton
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_cross_entropy_all_ignored_is_zero_with_zero_gradient(reduction, gen):
    logits = randn(gen, 4, 10)
    loss = cross_entropy(logits, torch.full((4,), -100, device=DEVICE), reduction=reduction, **EVERYTHING)
    (grad,) = torch.autograd.grad(loss.sum(), logits)
    assert torch.count_nonzero(loss) == 0 and torch.count_nonzero(grad) == 0


@on_triton
def test_cross_entropy_num_tokens_shares_a_denominator_across_micro_batches(gen):
    logits, targets = randn(gen, 12, 40, requires_grad=False), random_targets(gen, 12, 40)
    whole = cross_entropy(logits, targets)
    total = (targets != -100).sum()  # a device tensor: no .item() anywhere
    parts = sum(cross_entropy(logits[i : i + 5], targets[i : i + 5], num_tokens=total) for i in range(0, 12, 5))
    torch.testing.assert_close(parts, whole)


@on_triton
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


@on_triton
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


@on_triton
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


@on_triton
def test_cross_entropy_out_of_range_target_gives_nan_loss(gen):
    loss = cross_entropy(randn(gen, 3, 8), torch.tensor([1, 8, -100], device=DEVICE), reduction="none")
    assert not loss[0].isnan() and loss[1].isnan() and loss[2] == 0


@on_triton
def test_cross_entropy_second_backward_through_the_graph_fails_loudly(gen):
    logits, targets = randn(gen, 4, 9), random_targets(gen, 4, 9, ignored=0.0)
    loss = cross_entropy(logits, targets)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


@on_triton
def test_cross_entropy_module_equals_function(gen):
    options = dict(ignore_index=0, label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
    logits, targets = randn(gen, 9, 30), random_targets(gen, 9, 30, ignore_index=0)
    num_tokens = torch.tensor(20, device=DEVICE)
    got = CrossEntropyLoss(**options)(logits, targets, num_tokens=num_tokens)
    torch.testing.assert_close(got, cross_entropy(logits, targets, num_tokens=num_tokens, **options), rtol=0, atol=0)


@on_triton
def test_cross_entropy_no_host_synchronisation(gen):
    logits, targets = randn(gen, 7, 50), random_targets(gen, 7, 50)
    num_tokens = torch.tensor(5, device=DEVICE)
    with LargestTensor() as probe:
        for reduction in ("mean", "sum", "none"):
            cross_entropy(logits, targets, reduction=reduction, **EVERYTHING).sum().backward()
        cross_entropy(logits, targets, num_tokens=num_tokens).backward()
    assert probe.host_reads == []


@on_triton
def test_cross_entropy_evaluation_allocates_no_gradient_buffer(gen):
    logits, targets = randn(gen, 16, 64), random_targets(gen, 16, 64)
    with torch.no_grad(), LargestTensor() as probe:
        cross_entropy(logits, targets)
    assert probe.largest < 64 * 8  # no (N, V) gradient


@on_triton
def test_cross_entropy_custom_op_registrations_are_consistent(gen):
    logits, targets = randn(gen, 9, 40), random_targets(gen, 9, 40)
    den = torch.tensor(6.0, device=DEVICE)
    ops = torch.ops.ember
    cases = [
        (ops.cross_entropy, (logits, targets, den, "mean", -100, 0.1, 1e-3, 3.0, True)),
        (ops.cross_entropy, (logits, targets, None, "none", -100, 0.0, 0.0, None, True)),
        (ops.scale_rows, (randn(gen, 9, 40, requires_grad=False), torch.rand(9, device=DEVICE), torch.bfloat16)),
        (ops.scale_rows_, (randn(gen, 9, 40, requires_grad=False), torch.rand((), device=DEVICE))),
    ]
    for op, args in cases:
        torch.library.opcheck(op.default, args, test_utils=LOSS_OPCHECKS)


@on_triton
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_cross_entropy_fullgraph_compile(reduction, gen):
    # aot_eager traces the ops' fake and autograd registrations without a C++ toolchain;
    # the gpu test below compiles with inductor.
    logits, targets = randn(gen, 9, 40), random_targets(gen, 9, 40)
    num_tokens = torch.tensor(7, device=DEVICE) if reduction == "mean" else None

    def loss(logits):
        return cross_entropy(logits, targets, reduction=reduction, num_tokens=num_tokens, **EVERYTHING)

    assert_loss_compiles_like_eager(loss, (logits,), "aot_eager")


# ---------------------------------------------------------------------------
# GPU only: low precision, full sizes, inductor, CUDA graphs, sync


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


@on_triton
@pytest.mark.gpu
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
        errors[name] = (abs(loss.item() - want.item()), rel_error(grad, want_grad))
    print(errors)
    assert errors["ember"][0] <= errors["pytorch"][0] + 1e-6
    assert errors["ember"][1] <= errors["pytorch"][1] * 1.02
    # Against float32 math rounded once: float16 gradients are rounded twice by design
    # (FLOAT16_PRESCALE), bfloat16 ones once.
    assert errors["ember"][0] <= errors["pytorch-fp32-math"][0] * 2 + 1e-5
    assert errors["ember"][1] <= errors["pytorch-fp32-math"][1] * (1.05 if dtype == torch.bfloat16 else 1.5)


@on_triton
@pytest.mark.gpu
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


@on_triton
@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gpu_cross_entropy_fullgraph_compile_with_inductor(reduction, gen):
    logits, targets = randn(gen, 256, 1031), random_targets(gen, 256, 1031)
    num_tokens = (targets != -100).sum() if reduction == "mean" else None

    def loss(logits):
        return cross_entropy(logits, targets, reduction=reduction, num_tokens=num_tokens, **EVERYTHING)

    assert_loss_compiles_like_eager(loss, (logits,), "inductor")


@on_triton
@pytest.mark.gpu
@needs_cuda
def test_gpu_cross_entropy_cuda_graph_capture_and_replay(gen):
    n, vocab = 512, 1031
    logits, targets = randn(gen, n, vocab), random_targets(gen, n, vocab)

    def step():
        loss = cross_entropy(logits, targets, **EVERYTHING)
        loss.backward()
        return loss

    def refill():
        logits.copy_(torch.randn(logits.shape, generator=gen).to(DEVICE))
        targets.copy_(random_targets(gen, n, vocab))

    assert_cuda_graph_replays_like_eager(step, (logits,), refill)


@on_triton
@pytest.mark.gpu
@needs_cuda
def test_gpu_cross_entropy_no_host_synchronisation(gen):
    logits, targets = randn(gen, 256, 1031), random_targets(gen, 256, 1031)
    num_tokens = (targets != -100).sum()

    def run():
        for reduction in ("mean", "sum", "none"):
            cross_entropy(logits, targets, reduction=reduction, **EVERYTHING).sum().backward()
        cross_entropy(logits, targets, num_tokens=num_tokens).backward()

    run()  # compiles the kernels
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    finally:
        torch.cuda.set_sync_debug_mode("default")
