"""What the kernel tests share: fixtures (loaded for every test by conftest.py), inputs, float64
oracles and the assertions that compare against them.

Each op's file, ``tests/test_kernel_<op>.py``, holds two kinds of test:

* reference tests: the PyTorch path (the default on CPU tensors) against naive float64
  formulas, on seeded float64 inputs (:func:`rand`);
* Triton tests, marked ``@on_triton``: the Triton path, compiled on CUDA tensors, else in
  Triton's interpreter on CPU tensors (``TRITON_INTERPRET=1``, set only while each test runs),
  on fresh inputs from the ``gen`` fixture (:func:`randn`). Without CUDA they run in float32
  on small odd shapes; the ones also marked ``gpu`` add half precision and full sizes. (The
  interpreter truncates float32 to bfloat16 instead of rounding it, so half-precision results
  are only checked on a GPU.) A failing test prints its seed; ``EMBER_TEST_SEED=<seed>``
  replays it.
"""

from __future__ import annotations

import importlib
import math
import os

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

CUDA = torch.cuda.is_available()
CPU = torch.device("cpu")
DEVICE = torch.device("cuda") if CUDA else CPU
f32, f64 = torch.float32, torch.float64

needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
on_triton = pytest.mark.usefixtures("triton_backend")


@pytest.fixture
def triton_backend(monkeypatch):
    """Every op takes its Triton path; on the CPU, in Triton's interpreter. Skips without Triton."""
    pytest.importorskip("triton")
    monkeypatch.setenv("EMBER_KERNELS", "triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.fixture
def gen() -> torch.Generator:
    """Fresh inputs every run; a failing test prints the seed that replays them."""
    seed = int(os.environ.get("EMBER_TEST_SEED") or int.from_bytes(os.urandom(4), "little"))
    print(f"inputs from seed {seed}: EMBER_TEST_SEED={seed} replays them")
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------
# Reference tests: seeded float64 inputs on the CPU


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
# Triton tests: fresh inputs from ``gen``, on DEVICE


def randn(gen, *shape, dtype=f32, scale=1.0, requires_grad=True):
    if CUDA and math.prod(shape) > 2**22:  # full-size GPU inputs: drawn there, from a seed drawn here
        device_gen = torch.Generator(device=DEVICE).manual_seed(int(torch.randint(2**62, (), generator=gen)))
        t = (torch.randn(shape, generator=device_gen, device=DEVICE) * scale).to(dtype)
    else:
        t = (torch.randn(shape, generator=gen, dtype=f64) * scale).to(DEVICE, dtype)
    return t.requires_grad_(requires_grad)


def random_targets(gen, n, vocab, ignore_index=-100, ignored=0.25):
    t = torch.randint(0, vocab, (n,), generator=gen)
    t[torch.rand(n, generator=gen) < ignored] = ignore_index
    return t.to(DEVICE)


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
    as ``reference`` evaluated in the inputs' own precision is: the error against float64 may
    be PyTorch's own times 1.1, give or take a few float32 rounding errors.

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


class LargestTensor(TorchDispatchMode):
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


# ---------------------------------------------------------------------------
# Rotary tables, as Hugging Face builds them


def rope_angles(positions, rotary_dim, theta=10000.0):
    """The float64 angles (positions, rotary_dim / 2) of each position and feature pair."""
    inv_freq = 1.0 / theta ** (torch.arange(0, rotary_dim, 2, dtype=f64) / rotary_dim)
    return torch.outer(torch.arange(positions, dtype=f64), inv_freq)


def rope_tables(positions, rotary_dim, dtype=f32, device=DEVICE):
    """cos and sin (positions, rotary_dim), each holding the angles twice, ``cat(theta, theta)``."""
    angles = rope_angles(positions, rotary_dim)
    angles = torch.cat((angles, angles), -1)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)


# ---------------------------------------------------------------------------
# Cross-entropy oracles, for cross_entropy and fused_linear_cross_entropy


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
    """Term by term from the definition, one token at a time (the reference tests' oracle)."""
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

# The options of the reference tests' bad-option checks: the values, and what the error names.
BAD_CE_OPTIONS = [
    ({"reduction": "avg"}, "reduction"),
    ({"label_smoothing": 1.5}, "label_smoothing"),
    ({"z_loss": -1.0}, "z_loss"),
    ({"softcap": 0.0}, "softcap"),
    ({"reduction": "sum", "num_tokens": 4}, "num_tokens"),
]


def expected_cross_entropy(
    logits, targets, *, ignore_index=-100, label_smoothing=0.0, z_loss=0.0, reduction="mean", softcap=None,
    num_tokens=None,
):  # fmt: skip
    """The Triton tests' float64 oracle, written from the definition in ember.kernels.cross_entropy."""
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


def assert_close_to(got, want, rel):
    """Within ``rel`` of ``want``'s largest magnitude, elementwise."""
    scale = want.detach().abs().max().item() if want.numel() else 0.0
    torch.testing.assert_close(got.detach().to(f64), want.detach(), rtol=rel, atol=rel * max(scale, 1e-30))


def rel_error(got, want):
    """``got``'s error relative to the float64 ``want``, in norm."""
    return ((got.to(f64) - want).norm() / want.norm()).item()


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


EVERYTHING = dict(label_smoothing=0.1, z_loss=1e-3, softcap=4.0)
# The Triton tests run the options on a few rows: rows are independent, and the interpreter
# costs a few milliseconds a row.
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
# The loss ops' custom ops under torch.compile and CUDA graphs

# The opcheck utilities the loss ops' custom ops are checked with.
LOSS_OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


def assert_loss_compiles_like_eager(fn, inputs, backend):
    """``torch.compile(fn, fullgraph=True)`` gives eager's loss and gradients for a random upstream gradient."""
    compiled = torch.compile(fn, fullgraph=True, backend=backend)
    got, want = compiled(*inputs), fn(*inputs)
    upstream = torch.rand_like(want) + 0.5
    leaves = [x for x in inputs if isinstance(x, torch.Tensor) and x.requires_grad]
    torch.testing.assert_close(got, want)
    for g, w in zip(torch.autograd.grad(got, leaves, upstream), torch.autograd.grad(want, leaves, upstream)):
        torch.testing.assert_close(g, w)


def assert_cuda_graph_replays_like_eager(step, leaves, refill):
    """Captures ``step()`` (a loss, backward into the ``leaves``' ``.grad``) in a CUDA graph after a
    warm-up on a side stream, gives the inputs new values (``refill()``), replays, and compares
    the replayed loss and gradients with an eager step on the new values."""
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
    with torch.no_grad():
        refill()
    graph.replay()
    got = [static_loss.clone()] + [x.grad.clone() for x in leaves]
    for x in leaves:
        x.grad = None
    want = [step()] + [x.grad for x in leaves]
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
