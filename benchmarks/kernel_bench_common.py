"""What the kernel benchmarks share: the device and sizes, the timing of a provider, and the
table each module prints once its tests have run. One file per op,
``benchmarks/test_kernel_<op>.py``, named like the op's file in ``python/ember/kernels/``.

Two ways of timing, for two kinds of op:

* the elementwise ops (RMSNorm, rotary, SwiGLU): a pass takes microseconds to a millisecond
  and only moves bytes, so each round runs it ``REPS`` times between two device
  synchronisations (:func:`time_per_call`); backward reruns one forward's graph.
* the loss ops (cross-entropy, fused linear cross-entropy): a pass takes milliseconds, their
  backward consumes its graph (the stored gradient is scaled in place) and Liger's overwrites
  its input, so each round gets fresh inputs, untimed, then one timed call (:func:`measure`),
  by CUDA events on a GPU.

Either way every round times itself, so the figures exist under ``--benchmark-disable`` too,
and land in ``benchmark.extra_info`` (so in ``--benchmark-json``), where ``benchmarks/report.py``
reads them.
"""

from __future__ import annotations

import importlib
import importlib.util
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from loader_bench_common import SMALL  # benchmarks/ is on sys.path when pytest collects it

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
LIGER = CUDA and importlib.util.find_spec("liger_kernel") is not None


def use_backend(monkeypatch, provider: str) -> None:
    """Ember's ops on the Triton path for the "ember" provider, forced so that a Triton path
    that cannot run raises instead of reporting the reference under Ember's name."""
    monkeypatch.setenv("EMBER_KERNELS", "triton" if provider == "ember" else "torch")


def device_name() -> str:
    return torch.cuda.get_device_name() if CUDA else "cpu"


def version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


def size_of(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def module_figures(request, print_table: Callable[[Any, dict], None]) -> Iterator[dict]:
    """The body of a module's ``figures`` fixture: the dict its tests fill, printed by
    ``print_table(reporter, figures)`` once the module has run."""
    collected: dict = {}
    yield collected
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is None or not collected:
        return
    capture = request.config.pluginmanager.get_plugin("capturemanager")
    with capture.global_and_fixture_disabled():
        print_table(reporter, collected)


# -- elementwise ops: RMSNorm, rotary, SwiGLU ---------------------------------------------
#
# Byte model: the bytes a pass cannot avoid moving, each input read once and each output
# written once (weights and rotary tables included, scratch buffers not). GB/s = bytes /
# median time; "x copy" divides that by the GB/s of a large device-to-device copy measured in
# the same session (test_copy_ceiling), the practical ceiling of a bandwidth-bound kernel.

FULL = CUDA and not SMALL
ROUNDS, WARMUP_ROUNDS, REPS = (10, 2, 20) if FULL else (2, 1, 2)
PASSES = ("forward", "backward", "both")
PROVIDERS = ("ember", "torch", "torch.compile", "liger")
COPY = "copy ceiling"  # the figures' key of the copy ceiling; the others are (workload, provider, pass)


@dataclass
class Workload:
    """One op at one size: its inputs, each provider's function of them, and the byte model."""

    id: str
    label: str
    inputs: tuple[torch.Tensor, ...]
    providers: dict[str, Callable[..., Any]]
    bytes: dict[str, int]  # pass -> bytes moved
    byte_model: str


def randn(*shape, dtype=DTYPE, requires_grad=True) -> torch.Tensor:
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def liger(module: str, name: str):
    """``liger_kernel.ops.<module>.<name>``, or None without Liger-Kernel (it is optional, and CUDA-only)."""
    return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name) if LIGER else None


def passes(forward: int, backward: int) -> dict[str, int]:
    return {"forward": forward, "backward": backward, "both": forward + backward}


_built: dict[str, Workload] = {}


def workload(builders: dict[str, Callable[[], Workload]], name: str) -> Workload:
    """``builders[name]()``, built once, and one at a time: the full sizes take a few GB of device memory."""
    if name not in _built:
        _built.clear()
        torch._dynamo.reset()
        if CUDA:
            torch.cuda.empty_cache()
        work = builders[name]()
        # One compilation serves all three passes (AOTAutograd compiles forward and backward).
        work.providers["torch.compile"] = torch.compile(work.providers["torch"], fullgraph=True)
        _built[name] = work
    return _built[name]


def time_per_call(benchmark, fn: Callable[[], Any]) -> float:
    """Median over the measured rounds of the seconds per call, REPS calls a round."""
    fn()  # compile, autotune, allocate
    sync()
    times: list[float] = []

    def one_round():
        sync()
        t0 = time.perf_counter()
        for _ in range(REPS):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / REPS)

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)
    return statistics.median(times[-ROUNDS:])


def pass_fn(fn: Callable, inputs: tuple[torch.Tensor, ...], which: str) -> Callable[[], Any]:
    """The callable timed for ``which`` pass of ``fn(*inputs)``; backward reuses one forward's graph."""
    leaves = [t for t in inputs if t.requires_grad]
    if which == "forward":
        return lambda: fn(*inputs)
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    upstream = [torch.randn_like(o) for o in outs]
    if which == "backward":
        return lambda: torch.autograd.grad(outs, leaves, upstream, retain_graph=True)
    return lambda: torch.autograd.grad(fn(*inputs), leaves, upstream)


def measure_copy_ceiling(benchmark, figures: dict) -> None:
    """GB/s of ``dst.copy_(src)`` over 1 GiB (16 MiB on the CPU smoke run): read + write."""
    numel = (1 << 29) if FULL else (1 << 22)
    src = torch.empty(numel, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = time_per_call(benchmark, lambda: dst.copy_(src))
    ceiling = dict(gb_per_s=2 * size_of(src) / seconds / 1e9, bytes=2 * size_of(src), ms=seconds * 1e3)
    figures[COPY] = ceiling
    benchmark.extra_info.update(ceiling)


def measure_pass(benchmark, monkeypatch, figures: dict, builders, name: str, provider: str, which: str) -> None:
    """Times ``provider``'s ``which`` pass of the workload ``builders[name]``, into ``figures``."""
    if provider in ("ember", "torch.compile") and not CUDA:
        pytest.skip(f"{provider} is measured on a GPU only (on the CPU: the Triton interpreter / compile time)")
    work = workload(builders, name)
    fn = work.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not installed or has no {name}")
    use_backend(monkeypatch, provider)
    benchmark.group = f"{name}-{which}"
    seconds = time_per_call(benchmark, pass_fn(fn, work.inputs, which))
    ceiling = figures.get(COPY, {})
    info = benchmark.extra_info
    info.update(
        workload=name,
        label=work.label,
        provider=provider,
        which=which,
        device=device_name(),
        dtype=str(DTYPE),
        ms=seconds * 1e3,
        bytes=work.bytes[which],
        gb_per_s=work.bytes[which] / seconds / 1e9,
        byte_model=work.byte_model,
        copy_ceiling_gb_per_s=ceiling.get("gb_per_s"),
    )
    if ceiling:
        info["fraction_of_copy"] = info["gb_per_s"] / ceiling["gb_per_s"]
    figures[(name, provider, which)] = info


def print_pass_table(title: str) -> Callable[[Any, dict], None]:
    """The table of an elementwise op's module: every workload, provider and pass."""

    def print_table(reporter, figures: dict) -> None:
        results = {k: v for k, v in figures.items() if k != COPY}
        if not results:
            return
        mode = "SMOKE sizes (EMBER_BENCH_SMALL=1 or no GPU)" if not FULL else "full sizes"
        reporter.write_sep("=", f"Ember kernel benchmark: {title}, {mode}")
        ceiling = figures.get(COPY, {}).get("gb_per_s")
        reporter.write_line(
            f"{device_name()}, torch {torch.__version__}, triton {version('triton')}, liger {version('liger_kernel')}; "
            f"copy ceiling {'-' if ceiling is None else f'{ceiling:,.0f} GB/s'}"
        )
        header = f"{'workload':<58} {'provider':<14} {'pass':<9} {'ms':>9} {'GB/s':>8} {'x copy':>7} {'x torch':>8}"
        reporter.write_line(header)
        names = list(dict.fromkeys(k[0] for k in results))
        order = {key: i for i, key in enumerate(names + list(PROVIDERS) + list(PASSES))}
        for (name, provider, which), info in sorted(results.items(), key=lambda item: [order[k] for k in item[0]]):
            torch_ms = results.get((name, "torch", which), {}).get("ms")
            of_copy = "-" if ceiling is None else f"{info['gb_per_s'] / ceiling:.2f}"
            speedup = "-" if torch_ms is None else f"{torch_ms / info['ms']:.2f}"
            reporter.write_line(
                f"{info['label']:<58} {provider:<14} {which:<9} {info['ms']:>9.3f} {info['gb_per_s']:>8.1f} "
                f"{of_copy:>7} {speedup:>8}"
            )
        reporter.write_line("  byte models:")
        for name in names:
            reporter.write_line(f"    {name}: {next(i['byte_model'] for k, i in results.items() if k[0] == name)}")
        reporter.write_line("  x copy = GB/s / copy ceiling; x torch = PyTorch eager's time / this time (speed-up)")

    return print_table


# -- loss ops: cross-entropy, fused linear cross-entropy ----------------------------------


@dataclass(frozen=True)
class Sizes:
    tokens: int
    vocab: int
    hidden: int
    rounds: int
    warmup_rounds: int


FULL_SIZES = Sizes(tokens=16384, vocab=128256, hidden=4096, rounds=5, warmup_rounds=1)
SMOKE_SIZES = Sizes(tokens=256, vocab=1031, hidden=64, rounds=2, warmup_rounds=1)
SIZES = SMOKE_SIZES if SMALL else FULL_SIZES
MODES = ("fwd", "bwd", "fwd+bwd")

_compiled: dict[str, Callable] = {}


def compile_once(name: str, fn: Callable) -> Callable:
    if name not in _compiled:
        _compiled[name] = torch.compile(fn)
    return _compiled[name]


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


def measure(benchmark, figures: dict, key: str, setup: Callable[[], tuple], run: Callable, amount: float, unit: str):
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
        device=device_name(),
        dtype=str(DTYPE),
        torch=torch.__version__,
        small=SMALL,
    )
    figures[key] = info
    return info


def print_loss_table(title: str, model: str, ceiling: str) -> Callable[[Any, dict], None]:
    """The table of a loss op's module; ``model`` states its byte or FLOP model, ``ceiling`` what its ceiling is."""

    def print_table(reporter, figures: dict) -> None:
        for key, info in figures.items():
            measured = figures.get(info["key"].split("/")[0] + "/ceiling")
            if measured and not key.endswith("/ceiling"):
                info["ratio_to_ceiling"] = round(info["rate"] / measured["rate"], 3)
        reporter.write_sep("=", f"Ember {title} benchmarks ({'SMOKE sizes' if SMALL else 'full sizes'}, {DTYPE})")
        reporter.write_line(model)
        reporter.write_line(f"{'op/mode/provider':<44} {'ms':>9} {'rate':>17} {'x ceiling':>10} {'peak MB':>9}")
        for key in sorted(figures):
            info = figures[key]
            ratio = info.get("ratio_to_ceiling")
            peak = info["peak_extra_mb"]
            reporter.write_line(
                f"{key:<44} {info['ms_median']:>9.3f} {info['rate']:>9.2f} {info['unit']:<7} "
                f"{'-' if ratio is None else f'{ratio:.2f}':>10} {'-' if peak is None else f'{peak:.0f}':>9}"
            )
        reporter.write_line(
            "  median round; rate by the model above; peak MB = allocator peak beyond the inputs (CUDA only); "
            f"ceiling: {ceiling}"
        )

    return print_table
