"""Learning-rate schedules and the AdamW parameter groups, as the training loop uses them."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from ember.train.optim import build_optimizer
from ember.train.schedule import SCHEDULES, build_scheduler, lr_multiplier


mult = lr_multiplier


def test_cosine_at_hand_computed_steps():
    kw = dict(warmup_steps=10, max_steps=110, schedule="cosine", min_lr_ratio=0.1)
    assert mult(0, **kw) == 0.1  # warm-up starts at 1/10, never at 0
    assert mult(4, **kw) == 0.5  # 5/10
    assert mult(9, **kw) == 1.0  # last warm-up step reaches the peak
    assert mult(10, **kw) == 1.0  # progress 0
    # progress (35 - 10) / 100 = 0.25: 0.1 + 0.9 * 0.5 * (1 + cos(pi/4)) = 0.86819805...
    assert mult(35, **kw) == pytest.approx(0.8681980515339464)
    # progress 0.5: 0.1 + 0.9 * 0.5 * (1 + 0) = 0.55
    assert mult(60, **kw) == pytest.approx(0.55)
    assert mult(110, **kw) == pytest.approx(0.1)  # progress 1: the floor
    assert mult(500, **kw) == pytest.approx(0.1)  # and it stays there


def test_linear_at_hand_computed_steps():
    kw = dict(warmup_steps=0, max_steps=100, schedule="linear", min_lr_ratio=0.2)
    assert mult(0, **kw) == 1.0  # no warm-up: start at the peak
    assert mult(50, **kw) == pytest.approx(0.6)  # 1 - 0.8 * 0.5
    assert mult(75, **kw) == pytest.approx(0.4)  # 1 - 0.8 * 0.75
    assert mult(100, **kw) == pytest.approx(0.2)


def test_constant_after_warmup():
    kw = dict(warmup_steps=4, max_steps=100, schedule="constant")
    assert [mult(s, **kw) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    assert mult(10_000, **kw) == 1.0


def test_wsd_is_stable_then_decays_over_the_last_decay_steps():
    kw = dict(warmup_steps=10, max_steps=100, schedule="wsd", decay_steps=20, min_lr_ratio=0.0)
    assert mult(0, **kw) == 0.1
    assert mult(50, **kw) == 1.0
    assert mult(80, **kw) == 1.0  # decay starts at 100 - 20 = 80, progress 0
    assert mult(90, **kw) == 0.5  # progress 10 / 20
    assert mult(100, **kw) == 0.0


def test_warmup_equal_to_max_steps_then_sits_at_the_floor():
    kw = dict(warmup_steps=5, max_steps=5, schedule="cosine", min_lr_ratio=0.3)
    assert mult(4, **kw) == 1.0
    assert mult(5, **kw) == pytest.approx(0.3)


@settings(max_examples=60, deadline=None)
@given(
    schedule=st.sampled_from(SCHEDULES),
    warmup=st.integers(0, 50),
    after=st.integers(1, 300),
    min_lr_ratio=st.floats(0.0, 1.0),
    decay_fraction=st.floats(0.01, 1.0),
)
def test_warmup_rises_then_decay_never_rises(schedule, warmup, after, min_lr_ratio, decay_fraction):
    max_steps = warmup + after
    decay_steps = max(1, int(after * decay_fraction)) if schedule == "wsd" else None
    kw = dict(warmup_steps=warmup, max_steps=max_steps, schedule=schedule,
              min_lr_ratio=min_lr_ratio, decay_steps=decay_steps)
    values = [mult(s, **kw) for s in range(max_steps + 20)]
    assert all(0.0 < v <= 1.0 or (v == 0.0 and s >= warmup) for s, v in enumerate(values))
    assert values[:warmup] == sorted(values[:warmup])
    decay = values[warmup:]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    floor = 1.0 if schedule == "constant" else min_lr_ratio
    assert all(v >= floor - 1e-12 for v in decay)
    assert decay[-1] == pytest.approx(floor)


def test_scheduler_drives_the_optimizer_lr_and_resumes():
    param = nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([param], lr=1e-3)
    scheduler = build_scheduler(optimizer, warmup_steps=2, max_steps=6, schedule="linear")
    lrs = []
    for _ in range(4):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    # warm-up 1/2, 2/2; then linear over 4 steps: progress 0, 1/4, (then 2/4, 3/4, 4/4 below)
    assert lrs == pytest.approx([0.5e-3, 1e-3, 1e-3, 0.75e-3])

    # A scheduler restored from a checkpoint continues the same curve.
    resumed_optimizer = torch.optim.AdamW([nn.Parameter(torch.zeros(2))], lr=1e-3)
    resumed = build_scheduler(resumed_optimizer, warmup_steps=2, max_steps=6, schedule="linear")
    resumed.load_state_dict(scheduler.state_dict())
    resumed_lrs = []
    for _ in range(3):
        resumed_optimizer.step()
        resumed.step()
        resumed_lrs.append(resumed_optimizer.param_groups[0]["lr"])
    assert resumed_lrs == pytest.approx([0.25e-3, 0.0, 0.0], abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.5e-3)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(warmup_steps=200, max_steps=100), r"warmup_steps \(200\).*max_steps \(100\)"),
        (dict(warmup_steps=0, max_steps=100, schedule="step"), r"'step'.*cosine, linear, constant, wsd"),
        (dict(warmup_steps=0, max_steps=100, schedule="wsd"), "needs decay_steps"),
        (dict(warmup_steps=90, max_steps=100, schedule="wsd", decay_steps=20), r"decay_steps \(20\)"),
        (dict(warmup_steps=0, max_steps=100, decay_steps=20), "only used by schedule 'wsd'"),
        (dict(warmup_steps=0, max_steps=100, min_lr_ratio=1.5), "min_lr_ratio"),
        (dict(warmup_steps=-1, max_steps=100), "warmup_steps must be >= 0"),
        (dict(warmup_steps=0, max_steps=0), "max_steps must be >= 1"),
    ],
)
def test_bad_schedule_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        lr_multiplier(0, **kwargs)
    with pytest.raises(ValueError, match=message):
        build_scheduler(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1.0), **kwargs)


def test_negative_step_is_rejected():
    with pytest.raises(ValueError, match="step must be >= 0"):
        lr_multiplier(-1, warmup_steps=0, max_steps=10)


class TinyLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.RMSNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Parameter(torch.ones(3, 3), requires_grad=False)


def ids(params):
    return {id(p) for p in params}


def test_parameter_groups_split_matrices_from_vectors_and_count_ties_once():
    model = TinyLM()
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert set(groups) == {"decay", "no_decay"}
    assert ids(groups["decay"]["params"]) == ids([model.embed.weight, model.proj.weight])
    assert ids(groups["no_decay"]["params"]) == ids([model.proj.bias, model.norm.weight])
    assert len(groups["decay"]["params"]) == 2  # the tied head is not a third entry
    assert (groups["decay"]["weight_decay"], groups["no_decay"]["weight_decay"]) == (0.1, 0.0)
    assert all(g["betas"] == (0.9, 0.95) and g["eps"] == 1e-8 and g["lr"] == 1e-3 for g in groups.values())
    assert not optimizer.defaults["fused"]  # CPU parameters: PyTorch's default implementation


def test_one_step_decays_only_the_decay_group():
    torch.manual_seed(0)
    model = TinyLM()
    lr, wd = 0.1, 0.5
    optimizer = build_optimizer(model, lr=lr, weight_decay=wd)
    with torch.no_grad():
        model.norm.weight.add_(0.5)  # away from 1 so decay would show
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    # With zero gradients Adam's own update is 0 / (0 + eps) = 0, leaving only the decoupled decay
    # p <- p * (1 - lr * wd) = p * 0.95.
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    after = dict(model.named_parameters())
    for name in ("embed.weight", "proj.weight"):
        torch.testing.assert_close(after[name], before[name] * (1 - lr * wd))
    for name in ("proj.bias", "norm.weight", "frozen"):
        torch.testing.assert_close(after[name], before[name], rtol=0, atol=0)


def test_only_vectors_gives_one_group_and_nothing_trainable_is_an_error():
    optimizer = build_optimizer(nn.LayerNorm(4), lr=1e-3)
    assert [g["name"] for g in optimizer.param_groups] == ["no_decay"]
    frozen = nn.Linear(2, 2).requires_grad_(False)
    with pytest.raises(ValueError, match="Linear has no parameters with requires_grad=True"):
        build_optimizer(frozen, lr=1e-3)


def test_explicit_fused_is_passed_through():
    assert build_optimizer(nn.Linear(2, 2), lr=1e-3, fused=False).defaults["fused"] is False
    assert build_optimizer(nn.Linear(2, 2), lr=1e-3, fused=True).defaults["fused"] is True
