"""End-to-end training throughput: Ember's training step against a plain PyTorch loop around
Hugging Face ``transformers.LlamaForCausalLM``, same architecture, same batch, in one run.

Run (see BENCHMARKS.md)::

    pytest benchmarks/test_e2e.py --benchmark-json=/tmp/e2e.json    # on a GPU: Llama 3.2 1B, ~2 minutes
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_e2e.py                # smoke: tiny preset, seconds

On a GPU: ``LlamaConfig.from_preset("llama3.2-1b")`` at seq 2048, micro-batch 4 (8,192 tokens
a step), bf16 autocast with float32 weights (the orchestrator's ``bf16-mixed``), fused AdamW.
Without a GPU, and with ``EMBER_BENCH_SMALL=1``, the ``tiny`` preset at 4 x 128 in float32;
there the figures only show that every code path runs.

One step is what ``ember train`` does per optimizer step at ``gradient_accumulation_steps=1``:
forward with the loss under autocast, backward, ``clip_grad_norm_(1.0)``, AdamW, zero_grad.

* ``ember-compile`` / ``ember-eager``: built as ``PretrainingOrchestrator._build_model`` builds
  it: ``Llama`` on the meta device, each block compiled in place (``model.compile: true``, the
  llama3.2-1b config's setting) or not, ``to_empty``, ``init_weights(seed=0)``,
  ``build_optimizer`` (fused AdamW on CUDA); loss ``model(input_ids, labels=labels)``.
* ``hf``: ``LlamaForCausalLM`` from ``ember.model.hf.config_to_hf`` (SDPA attention, float32
  weights, no KV cache), Ember's initial weights copied in; ``torch.optim.AdamW`` with the same
  two parameter groups and ``fused=True`` on CUDA; loss ``model(input_ids=..., labels=...,
  shift_labels=labels).loss`` (Ember's labels are already shifted; see test_train_step.py).

Each side runs ``WARMUP`` untimed steps (compilation, autotuning, optimizer state) and then
``STEPS`` steps timed by CUDA events recorded between steps, synchronising only after the
last: tokens/s = B*L*STEPS / their total time. MFU = tokens/s x model FLOPs per token / the
card's dense bf16 peak (``ember.train.speed_monitor.peak_flops_for``). Two FLOP counts are
stored: ``mfu`` uses ``ember.model.config.flops_per_token`` (what ``ember train`` logs: the
causal mask halves the attention term), ``mfu_full_attention`` torchtitan's count (12, not 6,
times layers x heads x head_dim x seq). Peak memory is ``torch.cuda.max_memory_allocated``
from the built model on: weights, gradients, AdamW state, activations. All figures go into
``benchmark.extra_info``; the Ember entries also get the HF figures and the ratio once the
``hf`` case has run. The first step of every variant starts from the same weights and tokens,
so their losses must agree.

Environment: ``EMBER_E2E_BATCH`` (micro-batch), ``EMBER_E2E_STEPS``, ``EMBER_E2E_WARMUP``,
``EMBER_E2E_COMPILE`` = ``both`` (default on CUDA), ``on`` or ``off`` (default on the CPU,
where Inductor would spend the run compiling C++).
"""

from __future__ import annotations

import contextlib
import copy
import gc
import itertools
import math
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from loader_bench_common import SMALL  # benchmarks/ is on sys.path when pytest collects it
from ember.model import Llama, LlamaConfig
from ember.model.config import flops_per_token, num_params
from ember.model.hf import config_to_hf, hf_state_dict
from ember.train import speed_monitor
from ember.train.optim import build_optimizer

transformers = pytest.importorskip("transformers")

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
FULL = CUDA and not SMALL
pytestmark = [pytest.mark.slow] if FULL else []

PRESET = "llama3.2-1b" if FULL else "tiny"
SEQ = 2048 if FULL else 128
BATCH = int(os.environ.get("EMBER_E2E_BATCH") or 4)
WARMUP = int(os.environ.get("EMBER_E2E_WARMUP") or (10 if FULL else 1))
STEPS = int(os.environ.get("EMBER_E2E_STEPS") or (30 if FULL else 2))
COMPILE = os.environ.get("EMBER_E2E_COMPILE") or ("both" if CUDA else "off")
# The orchestrator's precision "auto": bf16-mixed where the card has bf16, else float32.
AUTOCAST_DTYPE = torch.bfloat16 if CUDA and torch.cuda.is_bf16_supported() else None

LR, WEIGHT_DECAY, BETAS, EPS, CLIP, SEED = 3e-4, 0.1, (0.9, 0.95), 1e-8, 1.0, 0
# Initial losses of the variants, same weights and tokens: float32 agrees closely, bf16 less so.
LOSS_TOLERANCE = 2e-2 if AUTOCAST_DTYPE is not None else 1e-4

if COMPILE not in ("both", "on", "off"):
    raise ValueError(f"EMBER_E2E_COMPILE must be both, on or off, got {COMPILE!r}")
# hf before ember-eager: if the run is cut short, the default configuration and its baseline are in.
VARIANTS = [v for v in ("ember-compile", "hf", "ember-eager") if not (
    (v == "ember-compile" and COMPILE == "off") or (v == "ember-eager" and COMPILE == "on")
)]


def autocast() -> contextlib.AbstractContextManager:
    if AUTOCAST_DTYPE is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=DEVICE.type, dtype=AUTOCAST_DTYPE)


# -- the models -------------------------------------------------------------------


def build_ember(cfg: LlamaConfig, compile_blocks: bool) -> tuple[Llama, torch.optim.Optimizer]:
    """As PretrainingOrchestrator._build_model with the single-device strategy builds it."""
    with torch.device("meta"):
        model = Llama(cfg)
    if compile_blocks:
        for block in model.layers:
            block.compile()
    model.to_empty(device=DEVICE)
    model.init_weights(seed=SEED)
    model.train()
    return model, build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS, eps=EPS)


def build_hf(cfg: LlamaConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """LlamaForCausalLM (SDPA, float32 weights) holding Ember's initial weights, and a plain AdamW."""
    # A copy: transformers may add keys to the rope_scaling dict it is given, which is cfg's own.
    hf_cfg = transformers.LlamaConfig(
        **copy.deepcopy(config_to_hf(cfg, torch.float32)), attn_implementation="sdpa", use_cache=False
    )
    source = build_ember(cfg, compile_blocks=False)[0]  # its optimizer dropped: it holds the weights too
    with torch.device(DEVICE):
        hf = transformers.LlamaForCausalLM(hf_cfg)
    missing, unexpected = hf.load_state_dict(hf_state_dict(source.state_dict(), cfg), strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    del source
    _free_memory()
    assert hf.config._attn_implementation == "sdpa"
    assert all(p.dtype == torch.float32 for p in hf.parameters())  # as Ember's: autocast computes in bf16
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == cfg.tie_word_embeddings
    hf.train()
    params = [p for p in hf.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": WEIGHT_DECAY},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    fused = {"fused": True} if CUDA else {}
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **fused)
    return hf, opt


def make_step(model: torch.nn.Module, opt: torch.optim.Optimizer, hf: bool, input_ids, labels) -> Callable[[], torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> torch.Tensor:
        with autocast():
            if hf:
                loss = model(input_ids=input_ids, labels=labels, shift_labels=labels).loss
            else:
                loss = model(input_ids, labels=labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def make_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens, one (B, L+1) window: input_ids = w[:, :-1], labels = w[:, 1:]."""
    w = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=torch.Generator().manual_seed(SEED))
    return w[:, :-1].contiguous().to(DEVICE), w[:, 1:].contiguous().to(DEVICE)


# -- timing -------------------------------------------------------------------------


def timed_steps(step: Callable[[], torch.Tensor], n: int) -> tuple[list[float], list[torch.Tensor]]:
    """Seconds of each of ``n`` consecutive steps; on CUDA from events between the steps,
    with one synchronisation after the last."""
    losses = []
    if not CUDA:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            losses.append(step())
            times.append(time.perf_counter() - t0)
        return times, losses
    events = [torch.cuda.Event(enable_timing=True) for _ in range(n + 1)]
    events[0].record()
    for i in range(n):
        losses.append(step())
        events[i + 1].record()
    events[-1].synchronize()
    return [a.elapsed_time(b) / 1e3 for a, b in itertools.pairwise(events)], losses


def _free_memory() -> None:
    gc.collect()
    if CUDA:
        torch.cuda.empty_cache()


# -- results ---------------------------------------------------------------------------

RESULTS: dict[str, dict[str, Any]] = {}  # variant -> extra_info (the same dict)


def link_to_baseline() -> None:
    """Gives every Ember entry the HF figures and the ratio, once both have run."""
    hf = RESULTS.get("hf")
    if hf is None:
        return
    for variant, info in RESULTS.items():
        if variant != "hf":
            info["hf_tokens_per_s"] = hf["tokens_per_s"]
            info["ratio_over_hf"] = info["tokens_per_s"] / hf["tokens_per_s"]
            hf[f"ratio_{variant.replace('-', '_')}_over_hf"] = info["ratio_over_hf"]


class _Summary:
    """Registered by the session fixture below (a test module cannot hold hooks)."""

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not RESULTS:
            return
        tr = terminalreporter
        some = next(iter(RESULTS.values()))
        tr.section(f"Ember end-to-end training throughput ({'full size' if FULL else 'SMOKE size'})")
        tr.write_line(
            f"{some['device']}, {some['preset']} ({some['params'] / 1e6:,.1f}M params), {BATCH} x {SEQ} tokens a step, "
            f"{some['precision']}, {some['steps_timed']} timed steps after {some['warmup_steps']}; "
            f"torch {torch.__version__}, transformers {transformers.__version__}"
        )
        tr.write_line(f"{'variant':<15} {'tok/s':>12} {'step ms':>9} {'x HF':>7} {'MFU':>7} {'MFU 12x':>8} {'peak GB':>8} {'loss 0 -> n':>18}")
        for variant, info in RESULTS.items():
            ratio = info.get("ratio_over_hf")
            mfu, mfu12 = info["mfu"], info["mfu_full_attention"]
            peak = info["peak_memory_gb"]
            tr.write_line(
                f"{variant:<15} {info['tokens_per_s']:>12,.0f} {info['step_ms_median']:>9.1f} "
                f"{'-' if ratio is None else f'{ratio:.3f}':>7} {'-' if mfu is None else f'{mfu:.1%}':>7} "
                f"{'-' if mfu12 is None else f'{mfu12:.1%}':>8} {'-' if peak is None else f'{peak:.1f}':>8} "
                f"{info['initial_loss']:>8.4f} -> {info['final_loss']:<7.4f}"
            )
        tr.write_line(
            "  tok/s = B*L*steps / time of the timed steps; x HF = tok/s / HF's tok/s; MFU by ember's FLOP count "
            "(causal attention), MFU 12x by torchtitan's; peak = torch.cuda.max_memory_allocated"
        )


@pytest.fixture(scope="session", autouse=True)
def _e2e_summary(pytestconfig):
    pm = pytestconfig.pluginmanager
    if not pm.has_plugin("ember-e2e-summary"):
        pm.register(_Summary(), "ember-e2e-summary")
    yield


# -- the benchmark --------------------------------------------------------------------


@dataclass
class Run:
    times: list[float]  # seconds of each timed step
    first_step_s: float  # the first warm-up step: compilation and autotuning included
    initial_loss: float
    final_loss: float
    peak_memory_gb: float | None
    peak_memory_reserved_gb: float | None


def run_variant(benchmark, variant: str, cfg: LlamaConfig) -> Run:
    """Builds ``variant``, warms it up and times it; its model and optimizer are freed on return."""
    input_ids, labels = make_batch(cfg.vocab_size)
    if variant == "hf":
        model, opt = build_hf(cfg)
    else:
        model, opt = build_ember(cfg, compile_blocks=variant == "ember-compile")
    step = make_step(model, opt, variant == "hf", input_ids, labels)
    if CUDA:
        # From here: the weights, and what training adds (gradients, AdamW state, activations).
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    first_loss = step()
    if CUDA:
        torch.cuda.synchronize()
    first_step_s = time.perf_counter() - t0
    for _ in range(WARMUP - 1):
        step()
    if CUDA:
        torch.cuda.synchronize()
    measured: dict[str, list] = {}

    def timed_round():
        measured["times"], measured["losses"] = timed_steps(step, STEPS)

    benchmark.pedantic(timed_round, rounds=1, iterations=1)
    return Run(
        times=measured["times"],
        first_step_s=first_step_s,
        initial_loss=first_loss.item(),
        final_loss=measured["losses"][-1].item(),
        peak_memory_gb=torch.cuda.max_memory_allocated() / 1e9 if CUDA else None,
        peak_memory_reserved_gb=torch.cuda.max_memory_reserved() / 1e9 if CUDA else None,
    )


@pytest.mark.parametrize("variant", VARIANTS)
def test_e2e(benchmark, variant: str):
    benchmark.group = "e2e"
    cfg = LlamaConfig.from_preset(PRESET)
    _free_memory()
    try:
        run = run_variant(benchmark, variant, cfg)
    except torch.OutOfMemoryError as e:
        raise RuntimeError(f"{variant}: out of memory at micro-batch {BATCH} x {SEQ}; set EMBER_E2E_BATCH lower") from e
    finally:
        if variant == "ember-compile":
            torch._dynamo.reset()
        _free_memory()

    times = run.times
    tokens = BATCH * SEQ
    total = sum(times)
    tokens_per_s = tokens * len(times) / total
    fpt = flops_per_token(cfg, SEQ)
    n = num_params(cfg, include_embedding=False)
    # torchtitan counts 12 * layers * heads * head_dim * seq for attention, ember 6 (causal):
    # the same formula at twice the sequence length.
    fpt_full = speed_monitor.flops_per_token(n, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.head_size, 2 * SEQ)
    device_name = torch.cuda.get_device_name() if CUDA else "cpu"
    peak = speed_monitor.peak_flops_for(device_name) if CUDA else None
    info = benchmark.extra_info
    info.update(
        variant=variant,
        implementation="transformers.LlamaForCausalLM (sdpa)" if variant == "hf" else "ember.model.Llama",
        compiled=variant == "ember-compile",
        device=device_name,
        preset=PRESET,
        params=num_params(cfg),
        batch_size=BATCH,
        seq_len=SEQ,
        tokens_per_step=tokens,
        precision="bf16-mixed" if AUTOCAST_DTYPE is not None else "fp32",
        optimizer="AdamW fused" if CUDA else "AdamW",
        warmup_steps=WARMUP,
        steps_timed=len(times),
        first_step_s=run.first_step_s,
        tokens_per_s=tokens_per_s,
        step_ms_mean=total / len(times) * 1e3,
        step_ms_median=statistics.median(times) * 1e3,
        step_ms_min=min(times) * 1e3,
        step_ms_max=max(times) * 1e3,
        step_ms_all=[t * 1e3 for t in times],
        flops_per_token=fpt,
        flops_per_token_full_attention=fpt_full,
        tflops_per_s=tokens_per_s * fpt / 1e12,
        peak_tflops=None if peak is None else peak / 1e12,
        mfu=None if peak is None else tokens_per_s * fpt / peak,
        mfu_full_attention=None if peak is None else tokens_per_s * fpt_full / peak,
        peak_memory_gb=run.peak_memory_gb,
        peak_memory_reserved_gb=run.peak_memory_reserved_gb,
        initial_loss=run.initial_loss,
        final_loss=run.final_loss,
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
    )
    RESULTS[variant] = info
    link_to_baseline()

    assert math.isfinite(info["initial_loss"]) and math.isfinite(info["final_loss"]), info
    # Same initial weights and tokens: every variant must start from the same loss.
    for other, other_info in RESULTS.items():
        assert abs(info["initial_loss"] - other_info["initial_loss"]) <= LOSS_TOLERANCE, (variant, other, info, other_info)
