"""SpeedMonitor as a training loop meets it: rates, windows, warm-up, units, MFU, and no GPU syncs.

A fake clock makes every rate exact; the expected values are worked out by hand in the comments.
"""

from __future__ import annotations

import logging
import math
import re
import time

import pytest
import torch

from ember.train.speed_monitor import SpeedMonitor, flops_per_token, peak_flops_for


class FakeClock:
    def __init__(self, now: float = 0.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def run(monitor, clock, times, samples, tokens=None):
    for t in times:
        clock.now = t
        monitor.update(samples=samples, tokens=tokens)
    return monitor.compute()


@pytest.fixture(autouse=True)
def no_peak_env(monkeypatch):
    monkeypatch.delenv("EMBER_PEAK_TFLOPS", raising=False)


def test_rates_over_the_window_in_hours():
    clock = FakeClock()
    monitor = SpeedMonitor(window_size=50, time_unit="hours", clock=clock)
    # 5 updates at t = 0, 0.5, 1.0, 1.5, 2.0 s; 32 samples of 128 tokens each.
    m = run(monitor, clock, [0.0, 0.5, 1.0, 1.5, 2.0], samples=32, tokens=32 * 128)
    # The first update only starts the clock: 4 intervals * 32 = 128 samples in 2.0 s = 64 samples/s,
    # 64 * 3600 = 230400 samples/hour; tokens 4 * 4096 = 16384 in 2.0 s = 8192 tokens/s = 29491200/hour.
    assert m["samples_per_second"] == 64.0
    assert m["samples_per_hour"] == 230400.0
    assert m["tokens_per_second"] == 8192.0
    assert m["tokens_per_hour"] == 29491200.0
    assert m["step_time"] == 0.5
    assert m["elapsed_hours"] == pytest.approx(2.0 / 3600, rel=1e-15)
    assert (m["total_samples"], m["total_tokens"], m["steps"]) == (160, 20480, 5)


def test_guide_usage_works_from_the_first_step(caplog):
    # The pretraining guide's loop, verbatim apart from the loop's inputs; it logs at step 0, when
    # only one update exists, so the rate must still format with :.2f.
    logger = logging.getLogger("guide")
    training_steps, log_interval, batch_size = range(7), 3, 8
    with caplog.at_level(logging.INFO, logger="guide"):
        speed_monitor = SpeedMonitor(
            window_size=50,
            time_unit="hours"
        )

        # Update during training
        for step in training_steps:
            # Training logic
            time.sleep(0.002)
            speed_monitor.update(samples=batch_size)

            if step % log_interval == 0:
                metrics = speed_monitor.compute()
                logger.info(f"Training speed: {metrics['samples_per_second']:.2f} samples/second")
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "Training speed: nan samples/second"
    assert len(messages) == 3
    for message in messages[1:]:
        rate = float(re.fullmatch(r"Training speed: (\d+\.\d\d) samples/second", message).group(1))
        assert 0 < rate < 8 / 0.002  # at most one batch per sleep
    assert metrics["samples_per_hour"] == pytest.approx(metrics["samples_per_second"] * 3600)


def test_rates_are_nan_until_two_updates_and_none_when_unmeasurable():
    clock = FakeClock(100.0)
    monitor = SpeedMonitor(clock=clock, device="cpu")
    empty = monitor.compute()
    assert math.isnan(empty["samples_per_second"]) and math.isnan(empty["step_time"])
    assert (empty["elapsed_seconds"], empty["total_samples"], empty["steps"]) == (0.0, 0, 0)
    monitor.update(samples=4)
    one = monitor.compute()
    assert math.isnan(one["samples_per_second"])
    assert one["elapsed_seconds"] == 0.0 and one["total_samples"] == 4
    # Never given tokens, no CUDA device, no flops_per_token: those values are None or absent.
    assert one["tokens_per_second"] is None and one["total_tokens"] is None
    assert one["peak_memory_gb"] is None
    assert "mfu" not in one and "tflops_per_device" not in one


def test_old_intervals_leave_the_window():
    clock = FakeClock()
    monitor = SpeedMonitor(window_size=3, clock=clock)
    # Updates at t = 0, 10, 11 with 10 samples each: window [0, 10, 11] -> 20 samples / 11 s.
    assert run(monitor, clock, [0.0, 10.0, 11.0], samples=10)["samples_per_second"] == 20 / 11
    # One more at t = 12 pushes t = 0 out: window [10, 11, 12] -> 20 samples / 2 s = 10/s.
    assert run(monitor, clock, [12.0], samples=10)["samples_per_second"] == 10.0
    # Totals still count everything: 4 * 10 samples over 12 s.
    m = monitor.compute()
    assert (m["total_samples"], m["elapsed_seconds"]) == (40, 12.0)


def test_warmup_steps_are_left_out_of_rates():
    clock = FakeClock()
    monitor = SpeedMonitor(warmup_steps=2, clock=clock)
    # Two warm-up steps, the second slow (compilation): t = 0 and t = 30. No counted interval yet.
    assert math.isnan(run(monitor, clock, [0.0, 30.0], samples=32)["samples_per_second"])
    # The first counted interval starts at the last warm-up update (t = 30): 32 samples / 1 s.
    assert run(monitor, clock, [31.0], samples=32)["samples_per_second"] == 32.0
    # t = 32: 64 samples / 2 s = 32/s, not 128 / 32 s = 4/s as it would be with warm-up counted.
    m = run(monitor, clock, [32.0], samples=32)
    assert m["samples_per_second"] == 32.0 and m["step_time"] == 1.0
    assert (m["total_samples"], m["steps"], m["elapsed_seconds"]) == (128, 4, 32.0)


@pytest.mark.parametrize(
    "unit, rate_key, per_second, elapsed_key",
    [
        ("seconds", None, 1, "elapsed_seconds"),
        ("minutes", "samples_per_minute", 60, "elapsed_minutes"),
        ("hours", "samples_per_hour", 3600, "elapsed_hours"),
        ("days", "samples_per_day", 86400, "elapsed_days"),
    ],
)
def test_time_units(unit, rate_key, per_second, elapsed_key):
    clock = FakeClock()
    monitor = SpeedMonitor(time_unit=unit, clock=clock)
    # 3 updates 0.5 s apart, 32 samples each: 64 samples / 1.0 s = 64/s; elapsed 1.0 s.
    m = run(monitor, clock, [0.0, 0.5, 1.0], samples=32)
    assert m["samples_per_second"] == 64.0
    if rate_key is not None:
        # 64/s = 3840/minute = 230400/hour = 5529600/day
        assert m[rate_key] == 64.0 * per_second
        assert m[rate_key.replace("samples", "tokens")] is None
    assert m[elapsed_key] == pytest.approx(1.0 / per_second, rel=1e-15)
    assert not any(k.startswith("elapsed_") and k != elapsed_key for k in m)


def test_bad_time_unit_is_named():
    with pytest.raises(ValueError, match="'fortnights'"):
        SpeedMonitor(time_unit="fortnights")


def test_eta_counts_remaining_steps_at_the_current_step_time():
    clock = FakeClock()
    monitor = SpeedMonitor(time_unit="minutes", total_steps=10, clock=clock)
    # 4 steps 0.5 s apart -> 0.5 s/step; 6 steps left -> 3.0 s = 0.05 minutes.
    assert run(monitor, clock, [0.0, 0.5, 1.0, 1.5], samples=1)["eta_minutes"] == pytest.approx(0.05)
    # At and past total_steps nothing is left.
    assert run(monitor, clock, [2.0 + 0.5 * i for i in range(8)], samples=1)["eta_minutes"] == 0.0


def test_flops_per_token_formula():
    # 6 * 1e6 + 6 * 2 layers * 4 heads * 16 head_dim * 256 seq = 6_000_000 + 196_608
    assert flops_per_token(1_000_000, num_layers=2, num_heads=4, head_dim=16, seq_len=256) == 6_196_608


def test_tflops_and_mfu_per_device():
    clock = FakeClock()
    fpt = flops_per_token(1_000_000, 2, 4, 16, 256)  # 6_196_608
    monitor = SpeedMonitor(flops_per_token=fpt, peak_flops=1e12, world_size=4, clock=clock, device="cpu")
    # 3 updates 0.25 s apart, 65536 global tokens each: 131072 tokens / 0.5 s = 262144 tokens/s.
    m = run(monitor, clock, [0.0, 0.25, 0.5], samples=32, tokens=65536)
    assert m["tokens_per_second"] == 262144.0
    # 262144 * 6196608 = 1_624_403_607_552 FLOP/s over 4 devices = 406_100_901_888 per device
    # = 0.406100901888 TFLOP/s; against a 1e12 peak, MFU = 0.406100901888.
    assert m["tflops_per_device"] == pytest.approx(0.406100901888, rel=1e-12)
    assert m["mfu"] == pytest.approx(0.406100901888, rel=1e-12)


def test_peak_flops_precedence(monkeypatch):
    assert SpeedMonitor(flops_per_token=1, device="cpu").peak_flops is None
    monkeypatch.setenv("EMBER_PEAK_TFLOPS", "989.4")
    assert SpeedMonitor(flops_per_token=1, device="cpu").peak_flops == pytest.approx(989.4e12)
    assert SpeedMonitor(flops_per_token=1, peak_flops=5e14, device="cpu").peak_flops == 5e14
    monkeypatch.setenv("EMBER_PEAK_TFLOPS", "lots")
    with pytest.raises(ValueError, match="EMBER_PEAK_TFLOPS.*'lots'"):
        SpeedMonitor(device="cpu")


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA GH200 480GB", 989.4e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362.05e12),
        ("NVIDIA GeForce RTX 3090", None),
    ],
)
def test_peak_flops_table(name, peak):
    assert peak_flops_for(name) == peak
    assert peak_flops_for(name, dtype="fp16") == peak


def test_peak_flops_unknown_dtype():
    with pytest.raises(ValueError, match="'fp8'.*bf16"):
        peak_flops_for("NVIDIA H100 80GB HBM3", dtype="fp8")


def test_update_never_synchronises_and_cuda_figures_come_from_the_device(monkeypatch):
    # Pretend to be on an H100 whose every synchronising call fails.
    def forbidden(*args, **kwargs):
        raise AssertionError("SpeedMonitor.update synchronised with the device")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    clock = FakeClock()
    monitor = SpeedMonitor(flops_per_token=1e9, clock=clock)
    monkeypatch.setattr(torch.cuda, "synchronize", forbidden)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    monkeypatch.setattr(torch.Tensor, "__index__", forbidden)
    monkeypatch.setattr(torch.Tensor, "__int__", forbidden)
    for t in [0.0, 1.0, 2.0]:
        clock.now = t
        monitor.update(samples=8, tokens=8 * 4096)
    with pytest.raises(TypeError, match="Python ints"):
        monitor.update(samples=torch.tensor(8), tokens=8 * 4096)

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12_500_000_000)
    m = monitor.compute()
    # 2 * 32768 tokens / 2 s = 32768 tokens/s; * 1e9 FLOP/token = 32.768 TFLOP/s on one device,
    # against the H100's 989.4 TFLOP/s.
    assert m["tflops_per_device"] == pytest.approx(32.768)
    assert m["mfu"] == pytest.approx(32.768 / 989.4)
    assert m["peak_memory_gb"] == 12.5


def test_inconsistent_tokens_are_rejected():
    monitor = SpeedMonitor(clock=FakeClock())
    monitor.update(samples=1, tokens=10)
    with pytest.raises(ValueError, match="tokens on some calls"):
        monitor.update(samples=1)
    with pytest.raises(ValueError, match="needs tokens"):
        SpeedMonitor(flops_per_token=1e6, clock=FakeClock()).update(samples=1)
