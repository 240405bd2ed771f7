"""Cross-entropy and fused linear cross-entropy: Ember's Triton kernels against PyTorch eager,
torch.compile, PyTorch's own ``F.linear_cross_entropy`` and Liger-Kernel where they exist.

Each op is timed forward (a training forward: inputs require grad), backward (the forward
run untimed first) and both. Every round times itself (CUDA events on a GPU), so the
figures also exist under ``--benchmark-disable``; the median round is reported, in
``benchmark.extra_info`` and in a table printed after the module.

Models, stated per mode so a figure means the same for every provider:

* cross-entropy, N tokens x V logits of ``b`` bytes: the ideal is one read of the logits
  (forward) and one write of their gradient (backward): ``N*V*b`` bytes each, ``2*N*V*b``
  for both. GB/s = model bytes / time; "x ceiling" divides by a device-to-device copy of
  the logits measured in the same run (its GB/s counting the read and the write).
* fused linear cross-entropy, N tokens, hidden H, vocabulary V: three matmuls of ``2*N*H*V``
  FLOPs each, one forward (the logits) and two backward (hidden and weight gradients).
  TFLOP/s = model FLOPs / time; "x ceiling" divides by one ``(N, H) @ (H, V)`` matmul
  measured in the same run.

Ember and Liger compute the gradients during the forward pass, so their forward is slow
and their backward nearly free by these models: compare the "fwd+bwd" rows.

``EMBER_BENCH_SMALL=1`` uses smoke sizes (float32 on the CPU, where the Triton providers
skip: Triton runs there only in its interpreter, which is for tests). Full sizes, for a
GPU: cross-entropy 16384 x 128256 bfloat16 logits, fused 16384 tokens, H=4096, V=128256.
"""

from __future__ import annotations

import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F

from ember.kernels import cross_entropy, fused_linear_cross_entropy

SMALL = os.environ.get("EMBER_BENCH_SMALL", "0") not in ("", "0")
CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32


@dataclass(frozen=True)
class Sizes:
    tokens: int
    vocab: int
    hidden: int
    rounds: int
    warmup_rounds: int


FULL = Sizes(tokens=16384, vocab=128256, hidden=4096, rounds=5, warmup_rounds=1)
SMOKE = Sizes(tokens=256, vocab=1031, hidden=64, rounds=2, warmup_rounds=1)
SIZES = SMOKE if SMALL else FULL
MODES = ("fwd", "bwd", "fwd+bwd")

try:
    from liger_kernel.transformers.functional import liger_cross_entropy, liger_fused_linear_cross_entropy
except ImportError:  # not installed (it is optional, and CUDA-only)
    liger_cross_entropy = liger_fused_linear_cross_entropy = None


def _ce_eager(logits, targets):
    return F.cross_entropy(logits.float(), targets)


def _flce_eager(hidden, weight, targets):
    return F.cross_entropy((hidden @ weight.T).float(), targets)


_compiled: dict[str, Callable] = {}


def _compile(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


def _ce_providers() -> dict[str, Callable | None]:
    """name -> loss(logits, targets), or None where the provider cannot run here."""
    return {
        "ember": cross_entropy if CUDA else None,
        "torch": _ce_eager,
        "torch.compile": _compile("ce", _ce_eager),
        "liger": (lambda x, t: liger_cross_entropy(x, t)) if CUDA and liger_cross_entropy else None,
    }


def _flce_providers() -> dict[str, Callable | None]:
    """name -> loss(hidden, weight, targets), or None where the provider cannot run here."""
    native = getattr(F, "linear_cross_entropy", None)  # torch >= 2.13
    return {
        "ember": fused_linear_cross_entropy if CUDA else None,
        "torch": _flce_eager,
        "torch.compile": _compile("flce", _flce_eager),
        "torch.linear_cross_entropy": (lambda h, w, t: native(h, w, t)) if native else None,
        "liger": (lambda h, w, t: liger_fused_linear_cross_entropy(h, w, t))
        if CUDA and liger_fused_linear_cross_entropy
        else None,
    }


# -- timing -------------------------------------------------------------------------


def _timed(fn: Callable[[], object]) -> float:
    """Seconds ``fn`` takes, by CUDA events on a GPU."""
    if not CUDA:
        t0 = time.perf_counter()
        fn()
        return time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3


def measure(benchmark, results: dict, key: str, setup: Callable[[], tuple], run: Callable, amount: float, unit: str):
    """Times ``run(*setup())`` rounds, ``setup`` untimed; ``amount`` is the model's bytes or FLOPs."""
    times: list[float] = []
    peaks: list[int] = []
    baseline = [0]

    def setup_round():
        state = setup()
        if CUDA:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            baseline[0] = torch.cuda.memory_allocated()
        return state, {}

    def target(*state):
        times.append(_timed(lambda: run(*state)))
        if CUDA:
            peaks.append(torch.cuda.max_memory_allocated() - baseline[0])

    target(*setup_round()[0])  # untimed: compiles kernels and graphs, warms cuBLAS
    times.clear()
    peaks.clear()
    benchmark.pedantic(target, setup=setup_round, rounds=SIZES.rounds, warmup_rounds=SIZES.warmup_rounds, iterations=1)
    measured = times[-SIZES.rounds :]
    median = statistics.median(measured)
    scale = 1e9 if unit == "GB/s" else 1e12
    info = benchmark.extra_info
    info.update(
        key=key,
        unit=unit,
        model_amount=amount,
        ms_median=median * 1e3,
        ms_best=min(measured) * 1e3,
        rate=amount / median / scale,
        rounds_measured=len(measured),
        peak_extra_mb=max(peaks) / 2**20 if peaks else None,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        dtype=str(DTYPE),
        torch=torch.__version__,
        small=SMALL,
    )
    results[key] = info
    return info


@pytest.fixture(scope="module")
def results(request):
    """Figures of this module, printed as a table once it has run."""
    collected: dict[str, dict] = {}
    yield collected
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not collected:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        _print_table(reporter, collected)


def _print_table(reporter, collected: dict[str, dict]) -> None:
    for key, info in collected.items():
        ceiling = collected.get(info["key"].split("/")[0] + "/ceiling")
        if ceiling and not key.endswith("/ceiling"):
            info["ratio_to_ceiling"] = round(info["rate"] / ceiling["rate"], 3)
    reporter.write_sep("=", f"Ember cross-entropy benchmarks ({'SMOKE sizes' if SMALL else 'full sizes'}, {DTYPE})")
    s = SIZES
    reporter.write_line(
        f"ce: {s.tokens} x {s.vocab} logits, model bytes fwd = bwd = N*V*b, fwd+bwd = 2*N*V*b; "
        f"flce: N={s.tokens} H={s.hidden} V={s.vocab}, model FLOPs fwd 2NHV, bwd 4NHV, fwd+bwd 6NHV"
    )
    reporter.write_line(f"{'op/mode/provider':<44} {'ms':>9} {'rate':>17} {'x ceiling':>10} {'peak MB':>9}")
    for key in sorted(collected):
        info = collected[key]
        ratio = info.get("ratio_to_ceiling")
        peak = info["peak_extra_mb"]
        reporter.write_line(
            f"{key:<44} {info['ms_median']:>9.3f} {info['rate']:>9.2f} {info['unit']:<7} "
            f"{'-' if ratio is None else f'{ratio:.2f}':>10} {'-' if peak is None else f'{peak:.0f}':>9}"
        )
    reporter.write_line(
        "  median round; rate by the model above; peak MB = allocator peak beyond the inputs (CUDA only); "
        "ceilings: device copy (ce), one matmul (flce)"
    )


@pytest.fixture(autouse=True)
def triton_kernels(monkeypatch):
    # Never report the reference under Ember's name: a missing kernel raises instead.
    if CUDA:
        monkeypatch.setenv("EMBER_KERNELS", "triton")


# -- cross-entropy ------------------------------------------------------------------


@pytest.fixture(scope="module")
def ce_inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    logits = (torch.randn(SIZES.tokens, SIZES.vocab, generator=gen, device=DEVICE) * 3).to(DTYPE)
    targets = torch.randint(0, SIZES.vocab, (SIZES.tokens,), generator=gen, device=DEVICE)
    return logits, targets


def test_ce_copy_ceiling(benchmark, results, ce_inputs):
    logits, _ = ce_inputs
    out = torch.empty_like(logits)
    nbytes = logits.numel() * logits.element_size()
    measure(benchmark, results, "ce/ceiling", lambda: (), lambda: out.copy_(logits), 2 * nbytes, "GB/s")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(_ce_providers()))
def test_ce(benchmark, results, ce_inputs, provider, mode):
    loss_fn = _ce_providers()[provider]
    if loss_fn is None:
        pytest.skip(f"{provider} does not run on {DEVICE.type} here")
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
    measure(benchmark, results, f"ce/{mode}/{provider}", setup, run, amount, "GB/s")


# -- fused linear cross-entropy -----------------------------------------------------


@pytest.fixture(scope="module")
def flce_inputs():
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    s = SIZES
    hidden = torch.randn(s.tokens, s.hidden, generator=gen, device=DEVICE).to(DTYPE)
    weight = (torch.randn(s.vocab, s.hidden, generator=gen, device=DEVICE) * 0.02).to(DTYPE).requires_grad_()
    targets = torch.randint(0, s.vocab, (s.tokens,), generator=gen, device=DEVICE)
    return hidden, weight, targets


def test_flce_matmul_ceiling(benchmark, results, flce_inputs):
    hidden, weight, _ = flce_inputs
    w = weight.detach()
    flops = 2 * SIZES.tokens * SIZES.hidden * SIZES.vocab
    measure(benchmark, results, "flce/ceiling", lambda: (), lambda: hidden @ w.T, flops, "TFLOP/s")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("provider", list(_flce_providers()))
def test_flce(benchmark, results, flce_inputs, provider, mode):
    loss_fn = _flce_providers()[provider]
    if loss_fn is None:
        pytest.skip(f"{provider} does not run on {DEVICE.type} here")
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
    measure(benchmark, results, f"flce/{mode}/{provider}", setup, run, amount, "TFLOP/s")
