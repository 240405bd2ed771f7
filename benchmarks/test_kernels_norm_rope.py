"""Kernel benchmarks: RMSNorm (plain and with the fused residual add), rotary embeddings and
SwiGLU, forward, backward and both, against PyTorch eager, torch.compile and Liger-Kernel.

Run::

    pytest benchmarks/test_kernels_norm_rope.py --benchmark-json=/tmp/norm_rope.json   # on a GPU, ~2 minutes
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_kernels_norm_rope.py --benchmark-disable  # smoke, CPU or GPU

Sizes on a GPU (bfloat16): RMSNorm 16384 x 4096; rotary at Llama 3 8B's attention, batch 2 x
seq 8192, 32 query and 8 key/value heads of 128; SwiGLU 16384 x 14336 (Llama 3 8B's FFN).
On the CPU, and with ``EMBER_BENCH_SMALL=1``, small float32 shapes; there only PyTorch eager
runs (the Triton kernels would run in Triton's interpreter, which measures nothing useful,
and torch.compile would spend the smoke run compiling).

Byte model: the bytes a pass cannot avoid moving, each input read once and each output
written once, per op below (weights and rotary tables included, scratch buffers not).
GB/s = bytes / median time; "x copy" divides that by the GB/s of a large device-to-device
copy measured in the same session (``test_copy_ceiling``), the practical ceiling of a
bandwidth-bound kernel. Each round runs the pass ``REPS`` times between two device
synchronisations and times itself, so the figures exist under ``--benchmark-disable`` too.
"""

from __future__ import annotations

import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from ember.kernels import apply_rotary, apply_rotary_reference, rms_norm, rms_norm_reference, swiglu, swiglu_reference
from loader_bench_common import SMALL  # benchmarks/ is on sys.path when pytest collects it

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPE = torch.bfloat16 if CUDA else torch.float32
FULL = CUDA and not SMALL
LIGER = CUDA and importlib.util.find_spec("liger_kernel") is not None

pytestmark = [pytest.mark.slow] if FULL else []

ROUNDS, WARMUP_ROUNDS, REPS = (10, 2, 20) if FULL else (2, 1, 2)
PASSES = ("forward", "backward", "both")
EPS = 1e-5


# -- workloads --------------------------------------------------------------------------


@dataclass
class Workload:
    """One op at one size: its inputs, each provider's function of them, and the byte model."""

    id: str
    label: str
    inputs: tuple[torch.Tensor, ...]
    providers: dict[str, Callable[..., Any]]
    bytes: dict[str, int]  # pass -> bytes moved
    byte_model: str


def _randn(*shape, dtype=DTYPE, requires_grad=True):
    return torch.randn(shape, device=DEVICE, dtype=dtype).requires_grad_(requires_grad)


def _size(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _liger(module: str, name: str):
    return getattr(importlib.import_module(f"liger_kernel.ops.{module}"), name) if LIGER else None


def rms_norm_workload(residual: bool) -> Workload:
    rows, cols = (16384, 4096) if FULL else (64, 256)
    x, w = _randn(rows, cols), _randn(cols)
    providers: dict[str, Callable] = {
        "ember": lambda x, w, *r: rms_norm(x, w, EPS, residual=r[0] if r else None),
        "torch": lambda x, w, *r: rms_norm_reference(x, w, EPS, residual=r[0] if r else None),
    }
    if residual:
        liger = _liger("fused_add_rms_norm", "LigerFusedAddRMSNormFunction")
    else:
        liger = _liger("rms_norm", "LigerRMSNormFunction")
    if liger is not None:
        # in_place=False: Liger's default writes dX over the upstream gradient, which the
        # repeated backward passes here reuse.
        if residual:
            providers["liger"] = lambda x, w, r: liger.apply(x, r, w, EPS, 0.0, "llama", False)
        else:
            providers["liger"] = lambda x, w: liger.apply(x, w, EPS, 0.0, "llama", False)
    act = _size(x)
    if residual:
        inputs = (x, w, _randn(rows, cols))
        fwd, bwd = 4 * act + _size(w), 4 * act + 2 * _size(w)
        model = (
            "fwd: x, residual read, normed, sum written; bwd: both upstream gradients and the sum read, "
            "one gradient for x and residual written; + weight"
        )
    else:
        inputs = (x, w)
        fwd, bwd = 2 * act + _size(w), 3 * act + 2 * _size(w)
        model = "fwd: x read, y written; bwd: dy and x read, dx written; + weight read (and its gradient written)"
    name = "rms_norm+residual" if residual else "rms_norm"
    return Workload(name, f"{name} {rows}x{cols} {str(DTYPE)[6:]}", inputs, providers, _passes(fwd, bwd), model)


def rotary_workload() -> Workload:
    batch, seq, heads, kv_heads, head_dim = (2, 8192, 32, 8, 128) if FULL else (1, 64, 8, 2, 64)
    q, k = _randn(batch, seq, heads, head_dim), _randn(batch, seq, kv_heads, head_dim)
    positions = torch.arange(seq, device=DEVICE, dtype=torch.float64)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, head_dim, 2, device=DEVICE, dtype=torch.float64) / head_dim)
    angles = torch.outer(positions, inv_freq).repeat(1, 2)
    cos, sin = angles.cos().float(), angles.sin().float()
    providers: dict[str, Callable] = {
        "ember": lambda q, k: apply_rotary(q, k, cos, sin),
        "torch": lambda q, k: apply_rotary_reference(q, k, cos, sin),
    }
    liger = _liger("rope", "LigerRopeFunction")
    if liger is not None:
        # Liger takes (batch, heads, seq, dim) views and rotates them in place (Ember's default
        # writes new tensors: one allocation more, the same bytes).
        def liger_rope(q, k):
            q_rot, k_rot = liger.apply(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
            return q_rot.transpose(1, 2), k_rot.transpose(1, 2)

        providers["liger"] = liger_rope
    act = _size(q) + _size(k)
    tables = _size(cos) + _size(sin)
    return Workload(
        "rotary",
        f"rotary {batch}x{seq} tokens, {heads}/{kv_heads} heads x {head_dim} {str(DTYPE)[6:]}",
        (q, k),
        providers,
        _passes(2 * act + tables, 2 * act + tables),
        "q and k read and written (their gradients in backward), + the cos and sin rows once",
    )


def swiglu_workload() -> Workload:
    rows, cols = (16384, 14336) if FULL else (64, 384)
    gate, up = _randn(rows, cols), _randn(rows, cols)
    providers: dict[str, Callable] = {"ember": swiglu, "torch": swiglu_reference}
    liger = _liger("swiglu", "LigerSiLUMulFunction")
    if liger is not None:
        providers["liger"] = lambda g, u: liger.apply(g, u)
    act = _size(gate)
    return Workload(
        "swiglu",
        f"swiglu {rows}x{cols} {str(DTYPE)[6:]}",
        (gate, up),
        providers,
        _passes(3 * act, 5 * act),
        "fwd: gate, up read, out written; bwd: dout, gate, up read, dgate, dup written",
    )


def _passes(forward: int, backward: int) -> dict[str, int]:
    return {"forward": forward, "backward": backward, "both": forward + backward}


WORKLOADS: dict[str, Callable[[], Workload]] = {
    "rms_norm": lambda: rms_norm_workload(residual=False),
    "rms_norm+residual": lambda: rms_norm_workload(residual=True),
    "rotary": rotary_workload,
    "swiglu": swiglu_workload,
}
PROVIDERS = ("ember", "torch", "torch.compile", "liger")

_built: dict[str, Workload] = {}


def workload(name: str) -> Workload:
    """Built once, and one at a time: the full sizes take a few GB of device memory."""
    if name not in _built:
        _built.clear()
        torch._dynamo.reset()
        if CUDA:
            torch.cuda.empty_cache()
        work = WORKLOADS[name]()
        # One compilation serves all three passes (AOTAutograd compiles forward and backward).
        work.providers["torch.compile"] = torch.compile(work.providers["torch"], fullgraph=True)
        _built[name] = work
    return _built[name]


# -- timing ------------------------------------------------------------------------------


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def time_per_call(benchmark, fn: Callable[[], Any]) -> float:
    """Median over the measured rounds of the seconds per call, REPS calls a round."""
    fn()  # compile, autotune, allocate
    _sync()
    times: list[float] = []

    def one_round():
        _sync()
        t0 = time.perf_counter()
        for _ in range(REPS):
            fn()
        _sync()
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


# -- results and the summary table -----------------------------------------------------------

RESULTS: dict[tuple[str, str, str], dict[str, Any]] = {}  # (workload, provider, pass) -> extra_info
CEILING: dict[str, Any] = {}


class _Summary:
    """Registered as a plugin by the session fixture below (a test module cannot hold hooks)."""

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not RESULTS:
            return
        tr = terminalreporter
        mode = "SMOKE sizes (EMBER_BENCH_SMALL=1 or no GPU)" if not FULL else "full sizes"
        tr.section(f"Ember kernel benchmark summary: RMSNorm, rotary, SwiGLU ({mode})")
        device = torch.cuda.get_device_name() if CUDA else "CPU"
        ceiling = CEILING.get("gb_per_s")
        tr.write_line(
            f"{device}, torch {torch.__version__}, triton {_version('triton')}, liger {_version('liger_kernel')}; "
            f"copy ceiling {'-' if ceiling is None else f'{ceiling:,.0f} GB/s'}"
        )
        header = f"{'workload':<58} {'provider':<14} {'pass':<9} {'ms':>9} {'GB/s':>8} {'x copy':>7} {'x torch':>8}"
        tr.write_line(header)
        order = {name: i for i, name in enumerate(list(WORKLOADS) + list(PROVIDERS) + list(PASSES))}
        for (name, provider, which), info in sorted(RESULTS.items(), key=lambda item: [order[k] for k in item[0]]):
            torch_ms = RESULTS.get((name, "torch", which), {}).get("ms")
            of_copy = "-" if ceiling is None else f"{info['gb_per_s'] / ceiling:.2f}"
            speedup = "-" if torch_ms is None else f"{torch_ms / info['ms']:.2f}"
            tr.write_line(
                f"{info['label']:<58} {provider:<14} {which:<9} {info['ms']:>9.3f} {info['gb_per_s']:>8.1f} "
                f"{of_copy:>7} {speedup:>8}"
            )
        tr.write_line("  byte models:")
        for name in sorted({key[0] for key in RESULTS}):
            tr.write_line(f"    {name}: {next(i['byte_model'] for k, i in RESULTS.items() if k[0] == name)}")
        tr.write_line("  x copy = GB/s / copy ceiling; x torch = PyTorch eager's time / this time (speed-up)")


def _version(module: str) -> str:
    try:
        return importlib.import_module(module).__version__
    except ImportError:
        return "not installed"


@pytest.fixture(scope="session", autouse=True)
def _norm_rope_summary(pytestconfig):
    pm = pytestconfig.pluginmanager
    if not pm.has_plugin("ember-norm-rope-summary"):
        pm.register(_Summary(), "ember-norm-rope-summary")
    yield


# -- the benchmarks ----------------------------------------------------------------------------


def test_copy_ceiling(benchmark):
    """GB/s of ``dst.copy_(src)`` over 1 GiB (16 MiB on the CPU smoke run): read + write."""
    numel = (1 << 29) if FULL else (1 << 22)
    src = torch.empty(numel, device=DEVICE, dtype=torch.bfloat16 if CUDA else torch.float32).uniform_()
    dst = torch.empty_like(src)
    seconds = time_per_call(benchmark, lambda: dst.copy_(src))
    CEILING.update(gb_per_s=2 * _size(src) / seconds / 1e9, bytes=2 * _size(src), ms=seconds * 1e3)
    benchmark.extra_info.update(CEILING)


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_kernel(benchmark, monkeypatch, name, provider, which):
    if provider in ("ember", "torch.compile") and not CUDA:
        pytest.skip(f"{provider} is measured on a GPU only (on the CPU: the Triton interpreter / compile time)")
    work = workload(name)
    fn = work.providers.get(provider)
    if fn is None:
        pytest.skip(f"{provider} is not installed or has no {name}")
    # Ember's functions take the Triton path on CUDA tensors; forcing it makes a missing kernel an error.
    monkeypatch.setenv("EMBER_KERNELS", "triton" if provider == "ember" else "torch")
    benchmark.group = f"{name}-{which}"
    seconds = time_per_call(benchmark, pass_fn(fn, work.inputs, which))
    info = benchmark.extra_info
    info.update(
        workload=name,
        label=work.label,
        provider=provider,
        which=which,
        device=torch.cuda.get_device_name() if CUDA else "cpu",
        dtype=str(DTYPE),
        ms=seconds * 1e3,
        bytes=work.bytes[which],
        gb_per_s=work.bytes[which] / seconds / 1e9,
        byte_model=work.byte_model,
        copy_ceiling_gb_per_s=CEILING.get("gb_per_s"),
    )
    if CEILING:
        info["fraction_of_copy"] = info["gb_per_s"] / CEILING["gb_per_s"]
    RESULTS[(name, provider, which)] = info
