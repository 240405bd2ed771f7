"""Training-step benchmark: one Ember step against a plain PyTorch loop around Hugging Face
``transformers.LlamaForCausalLM``, same architecture, same weights, same batch, on the CPU.

Run (see benchmarks/README.md, "Training-step benchmark")::

    pytest benchmarks/test_train_step.py --benchmark-json=/tmp/train_step.json   # full size, a few minutes
    EMBER_BENCH_SMALL=1 pytest benchmarks/test_train_step.py --benchmark-disable  # smoke, < 60 s

One step is what ``ember train`` does per optimizer step at ``gradient_accumulation_steps=1``,
fp32 on the CPU: forward with the loss, backward, ``clip_grad_norm_(1.0)``, AdamW, zero_grad.
Both sides run in one process and alternate step by step (E H | H E | E H ...), so drift
and other processes' load fall on both. Each step times itself, so the figures exist under
``--benchmark-disable`` too; pytest-benchmark's own statistics are those of one round, i.e.
one Ember step plus one Hugging Face step. tokens/s, step ms, the Ember/HF ratio, the CPU
load of other processes during the steps and the peak RSS growth of a step go into
``benchmark.extra_info`` and into a table printed at the end of the session.
"""

from __future__ import annotations

import gc
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
from ember.model.hf import hf_name
from ember.model import Llama, LlamaConfig
from ember.model.config import flops_per_token, num_params
from ember.train.optim import build_optimizer
from loader_bench_common import (  # benchmarks/ is on sys.path when pytest collects it
    SMALL,
    cpu_snapshot,
)

transformers = pytest.importorskip("transformers")

pytestmark = [] if SMALL else [pytest.mark.slow]

LR = 3e-4
WEIGHT_DECAY = 0.1
BETAS = (0.9, 0.95)  # build_optimizer's defaults, which the orchestrator passes on from the config
EPS = 1e-8
CLIP = 1.0
SEED = 0
LOSS_TOLERANCE = 1e-4  # initial losses, Ember against HF, same weights and tokens
QUIET_CORES = 0.25  # other processes' load under which a step counts as "quiet"


@dataclass(frozen=True)
class Case:
    id: str
    label: str
    preset: str
    overrides: dict[str, Any]
    batch: int
    seq: int
    rounds: int  # measured rounds; each round is one Ember step and one HF step
    warmup_rounds: int  # pytest-benchmark warm-up rounds, after one untimed step per side

    def config(self) -> LlamaConfig:
        return LlamaConfig.from_preset(self.preset, **self.overrides)


FULL_CASES = [
    Case("quickstart", "quickstart preset (3.0M params, vocab 259, tied)", "quickstart", {}, batch=16, seq=256, rounds=20, warmup_rounds=2),
    Case(
        "h512-l8",
        "h512 8L 8H/4KV ffn1408 vocab 32000 (56M params)",
        "tiny",
        {
            "hidden_size": 512,
            "num_hidden_layers": 8,
            "num_attention_heads": 8,
            "num_key_value_heads": 4,
            "intermediate_size": 1408,
            "vocab_size": 32000,
            "max_position_embeddings": 512,
        },
        batch=4,
        seq=512,
        rounds=12,
        warmup_rounds=1,
    ),
]
SMOKE_CASES = [Case("tiny", "tiny preset (smoke)", "tiny", {}, batch=4, seq=128, rounds=1, warmup_rounds=0)]
CASES = SMOKE_CASES if SMALL else FULL_CASES


# -- the two models ------------------------------------------------------------


def build_ember(cfg: LlamaConfig) -> tuple[Llama, torch.optim.Optimizer]:
    """As PretrainingOrchestrator._build_model does on a single CPU device, fp32, no checkpointing."""
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device="cpu")
    model.init_weights(seed=SEED)
    model.train()
    return model, build_optimizer(model, lr=LR, weight_decay=WEIGHT_DECAY)


def build_hf(cfg: LlamaConfig, ember: Llama) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """LlamaForCausalLM with the same sizes (SDPA attention, float32), Ember's weights copied in, and a
    plain torch.optim.AdamW with the same two parameter groups and hyperparameters as build_optimizer."""
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_size,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        tie_word_embeddings=cfg.tie_word_embeddings,
        attention_dropout=0.0,
        use_cache=False,  # a training step has no use for a KV cache
        attn_implementation="sdpa",
        dtype=torch.float32,
    )
    hf = transformers.LlamaForCausalLM(hf_cfg).to(torch.float32)
    assert hf.config._attn_implementation == "sdpa"
    state = {hf_name(name): value.detach().clone() for name, value in ember.state_dict().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    assert (hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()) == cfg.tie_word_embeddings
    assert all(p.dtype == torch.float32 for p in hf.parameters())
    hf.train()
    decay = [p for p in hf.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in hf.parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
        weight_decay=WEIGHT_DECAY,
    )
    return hf, opt


def check_same_optimizer(ember_opt: torch.optim.Optimizer, hf_opt: torch.optim.Optimizer) -> None:
    """Same groups (parameter shapes, weight decay), lr, betas, eps and implementation choice."""
    keys = ("lr", "betas", "eps", "weight_decay", "foreach", "fused", "amsgrad", "maximize", "capturable")
    assert len(ember_opt.param_groups) == len(hf_opt.param_groups) == 2
    for ge, gh in zip(ember_opt.param_groups, hf_opt.param_groups):
        assert {k: ge[k] for k in keys} == {k: gh[k] for k in keys}, (ge, gh)
        assert sorted(tuple(p.shape) for p in ge["params"]) == sorted(tuple(p.shape) for p in gh["params"])


def make_batch(case: Case, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One (B, L+1) window of random tokens: input_ids = w[:, :-1], labels = w[:, 1:] (already shifted)."""
    w = torch.randint(0, vocab, (case.batch, case.seq + 1), generator=torch.Generator().manual_seed(SEED))
    return w[:, :-1].contiguous(), w[:, 1:].contiguous()


def step_fns(ember, ember_opt, hf, hf_opt, input_ids, labels) -> tuple[Callable[[], tuple], Callable[[], tuple]]:
    """The two training steps; each returns its loss and the gradient norm before clipping, as tensors."""
    ember_params = [p for p in ember.parameters() if p.requires_grad]
    hf_params = [p for p in hf.parameters() if p.requires_grad]

    def ember_step():
        loss = ember(input_ids, labels=labels)  # Ember's labels are already shifted
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(ember_params, CLIP)
        ember_opt.step()
        ember_opt.zero_grad(set_to_none=True)
        return loss.detach(), norm

    def hf_step():
        # HF shifts `labels` itself; `shift_labels` hands it the already-shifted ones, so both sides
        # predict the same B*L tokens from the same B*L inputs with the same work.
        loss = hf(input_ids=input_ids, labels=labels, shift_labels=labels).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(hf_params, CLIP)
        hf_opt.step()
        hf_opt.zero_grad(set_to_none=True)
        return loss.detach(), norm

    return ember_step, hf_step


# -- measuring ---------------------------------------------------------------------


def _read_status(*keys: str) -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in keys:
                out[k] = int(v.split()[0])
    return out


def _reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def wait_quiet(limit_s: float, window_s: float = 0.3) -> None:
    """Waits (at most ``limit_s``) until other processes use under QUIET_CORES cores over ``window_s``."""
    deadline = time.monotonic() + limit_s
    while limit_s > 0 and time.monotonic() < deadline:
        a = cpu_snapshot()
        time.sleep(window_s)
        b = cpu_snapshot()
        if ((b["busy"] - a["busy"]) - (b["own_ticks"] - a["own_ticks"])) / (b["t"] - a["t"]) < QUIET_CORES:
            return


@dataclass
class Side:
    name: str
    step: Callable[[], tuple]
    times: list[float] = field(default_factory=list)
    other: list[float] = field(default_factory=list)  # other processes' cores during each step
    rss_peak_kb: list[int] = field(default_factory=list)  # VmHWM - VmRSS before, per step
    losses: list[torch.Tensor] = field(default_factory=list)
    norms: list[torch.Tensor] = field(default_factory=list)

    def run(self, track_rss: bool) -> None:
        rss0 = _read_status("VmRSS")["VmRSS"] if track_rss and _reset_peak_rss() else None
        a = cpu_snapshot()
        t0 = time.perf_counter()
        loss, norm = self.step()
        dt = time.perf_counter() - t0
        b = cpu_snapshot()
        self.times.append(dt)
        # /proc/stat counts 10 ms ticks: meaningful for steps of 100 ms and more.
        self.other.append(max(0.0, (b["busy"] - a["busy"]) - (b["own_ticks"] - a["own_ticks"])) / (b["t"] - a["t"]))
        if rss0 is not None:
            self.rss_peak_kb.append(_read_status("VmHWM")["VmHWM"] - rss0)
        self.losses.append(loss)
        self.norms.append(norm)


def _median(xs):
    return statistics.median(xs) if xs else None


# -- results and the summary table ----------------------------------------------------

RESULTS: dict[str, dict[str, Any]] = {}  # case id -> extra_info (the same dict)


class _Summary:
    """Registered as a plugin by the session fixture below (a test module cannot hold hooks)."""

    def pytest_terminal_summary(self, terminalreporter, exitstatus, config):
        if not RESULTS:
            return
        tr = terminalreporter
        mode = "SMOKE sizes (EMBER_BENCH_SMALL=1)" if SMALL else "full sizes"
        tr.section(f"Ember training-step benchmark summary ({mode})")
        any_info = next(iter(RESULTS.values()))
        tr.write_line(
            f"CPU fp32, torch {torch.__version__}, transformers {transformers.__version__}, "
            f"torch.get_num_threads() = {any_info['torch_threads']} (default, both sides); one step = forward + loss, "
            "backward, clip_grad_norm_(1.0), AdamW, zero_grad"
        )
        tr.write_line("")
        tr.write_line(
            f"{'model':<50} {'B x L':>9} {'steps':>6} {'Ember tok/s':>12} {'HF tok/s':>10} {'Ember/HF':>9} "
            f"{'Ember ms':>9} {'HF ms':>8} {'Ember GF/s':>11} {'HF GF/s':>8} {'quiet E/HF':>11} {'other CPU':>10}"
        )
        for info in RESULTS.values():
            quiet = info.get("ratio_quiet_steps")
            tr.write_line(
                f"{info['label']:<50} {info['batch_size']:>3} x {info['seq_len']:<4} {info['steps_measured']:>6} "
                f"{info['ember_tokens_per_s']:>12,.0f} {info['hf_tokens_per_s']:>10,.0f} {info['ratio_ember_over_hf']:>8.3f}x "
                f"{info['ember_step_ms']:>9.1f} {info['hf_step_ms']:>8.1f} {info['ember_gflop_per_s']:>11.1f} "
                f"{info['hf_gflop_per_s']:>8.1f} {'-' if quiet is None else f'{quiet:.3f}x':>11} {info['other_cpu_cores_median']:>10.2f}"
            )
        tr.write_line(
            "  tok/s = B*L / median step time; Ember/HF = Ember tok/s / HF tok/s (target >= 1.0); GF/s = model FLOPs "
            "(ember.model.config.flops_per_token) per second; quiet E/HF = the same ratio from only the steps during which "
            f"other processes used < {QUIET_CORES} cores (when at least 3 per side); other CPU = median cores used by "
            "other processes during a step"
        )
        for info in RESULTS.values():
            rss = ""
            if info.get("ember_step_peak_rss_mb") is not None:
                rss = (
                    f"; peak RSS growth during a step (VmHWM above the RSS before it, median): "
                    f"Ember {info['ember_step_peak_rss_mb']:.0f} MB, HF {info['hf_step_peak_rss_mb']:.0f} MB"
                )
            tr.write_line(
                f"  {info['case']}: initial loss Ember {info['ember_initial_loss']:.6f}, HF {info['hf_initial_loss']:.6f}; "
                f"paired ratio {info['ratio_paired_median']:.3f}x{rss}"
            )
        noisy = [i["case"] for i in RESULTS.values() if i["other_cpu_cores_median"] > 0.2]
        if noisy:
            tr.write_line(
                f"  WARNING: other processes used > 0.2 cores during the steps of: {', '.join(noisy)} -- those figures are "
                "unreliable; rerun on an idle machine or with EMBER_BENCH_WAIT_IDLE=<s>"
            )


@pytest.fixture(scope="session", autouse=True)
def _train_step_summary(pytestconfig):
    pm = pytestconfig.pluginmanager
    if not pm.has_plugin("ember-train-step-summary"):
        pm.register(_Summary(), "ember-train-step-summary")
    yield


# -- the benchmark ---------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_train_step(benchmark, case: Case):
    """tokens/s of one Ember training step and one HF LlamaForCausalLM step, alternating, same batch."""
    benchmark.group = f"train-step-{case.id}"
    cfg = case.config()
    ember, ember_opt = build_ember(cfg)
    hf, hf_opt = build_hf(cfg, ember)
    check_same_optimizer(ember_opt, hf_opt)
    input_ids, labels = make_batch(case, cfg.vocab_size)
    ember_step, hf_step = step_fns(ember, ember_opt, hf, hf_opt, input_ids, labels)
    e, h = Side("ember", ember_step), Side("hf", hf_step)
    track_rss = _reset_peak_rss()
    wait_s = float(os.environ.get("EMBER_BENCH_WAIT_IDLE", "0") or 0)

    # One untimed step each from the identical initial weights: the losses (and gradient norms)
    # must agree, so both sides compute the same thing; the step also allocates AdamW's state.
    e.run(track_rss)
    h.run(track_rss)
    e_loss, h_loss = e.losses[0].item(), h.losses[0].item()
    assert abs(e_loss - h_loss) <= LOSS_TOLERANCE, (e_loss, h_loss)
    torch.testing.assert_close(e.norms[0], h.norms[0], rtol=1e-3, atol=0)
    rounds_done = 0

    def one_round():
        nonlocal rounds_done
        order = (e, h) if rounds_done % 2 == 0 else (h, e)
        for side in order:
            side.run(track_rss)
        rounds_done += 1

    benchmark.pedantic(
        one_round,
        setup=(lambda: wait_quiet(wait_s)) if wait_s > 0 else None,
        rounds=case.rounds,
        warmup_rounds=case.warmup_rounds,
        iterations=1,
    )
    # Measured = the last `rounds` rounds (all of them, one, under --benchmark-disable).
    n = min(case.rounds, rounds_done)
    et, ht = e.times[-n:], h.times[-n:]
    eo, ho = e.other[-n:], h.other[-n:]
    tokens = case.batch * case.seq
    e_med, h_med = statistics.median(et), statistics.median(ht)
    fpt = flops_per_token(cfg, case.seq)
    quiet_e = [t for t, o in zip(et, eo) if o < QUIET_CORES]
    quiet_h = [t for t, o in zip(ht, ho) if o < QUIET_CORES]
    ratio_quiet = statistics.median(quiet_h) / statistics.median(quiet_e) if min(len(quiet_e), len(quiet_h)) >= 3 else None
    # Both sides took the same steps on the same batch; they should still agree closely.
    e_last, h_last = e.losses[-1].item(), h.losses[-1].item()
    rss_e, rss_h = e.rss_peak_kb[-n:], h.rss_peak_kb[-n:]

    info = benchmark.extra_info
    info.update(
        case=case.id,
        label=case.label,
        preset=case.preset,
        config={k: v for k, v in vars(cfg).items()},
        params=num_params(cfg),
        batch_size=case.batch,
        seq_len=case.seq,
        tokens_per_step=tokens,
        steps_measured=n,
        warmup_steps=1 + (rounds_done - n),
        torch_threads=torch.get_num_threads(),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        ember_tokens_per_s=tokens / e_med,
        hf_tokens_per_s=tokens / h_med,
        ratio_ember_over_hf=h_med / e_med,
        ratio_paired_median=statistics.median(ht_ / et_ for et_, ht_ in zip(et, ht)),
        ratio_quiet_steps=ratio_quiet,
        quiet_steps=[len(quiet_e), len(quiet_h)],
        ember_step_ms=e_med * 1e3,
        hf_step_ms=h_med * 1e3,
        ember_step_ms_min=min(et) * 1e3,
        hf_step_ms_min=min(ht) * 1e3,
        ember_step_ms_all=[t * 1e3 for t in et],
        hf_step_ms_all=[t * 1e3 for t in ht],
        flops_per_token=fpt,
        ember_gflop_per_s=fpt * tokens / e_med / 1e9,
        hf_gflop_per_s=fpt * tokens / h_med / 1e9,
        other_cpu_cores_median=statistics.median(eo + ho),
        other_cpu_cores_max=max(eo + ho),
        ember_initial_loss=e_loss,
        hf_initial_loss=h_loss,
        ember_final_loss=e_last,
        hf_final_loss=h_last,
        ember_step_peak_rss_mb=None if not rss_e else _median(rss_e) / 1024,
        hf_step_peak_rss_mb=None if not rss_h else _median(rss_h) / 1024,
        step_order="alternating E,H / H,E per round",
        hf_labels="input_ids (B, L), labels=shift_labels=Ember's shifted labels (HF then does not shift)",
    )
    RESULTS[case.id] = info
    assert abs(e_last - h_last) <= 1e-2 * max(1.0, abs(h_last)), (e_last, h_last)
    # Free both models and their optimizer state before the next case.
    for side in (e, h):
        side.step = None
    del ember, ember_opt, hf, hf_opt, ember_step, hf_step
    gc.collect()
