"""Training throughput: samples and tokens per unit of time, TFLOP/s per device and MFU.

Usage, as in the pretraining guide::

    speed_monitor = SpeedMonitor(window_size=50, time_unit="hours")
    for step in training_steps:
        ...  # forward, backward, optimizer step
        speed_monitor.update(samples=batch_size)
        if step % log_interval == 0:
            metrics = speed_monitor.compute()
            logger.info(f"Training speed: {metrics['samples_per_second']:.2f} samples/second")

``update()`` reads the host clock and adds integers: it never synchronises with the GPU, so it
costs nothing on the critical path. The host may run a few steps ahead of the GPU, but it cannot
stay ahead (the launch queue is bounded, and the loss is read back for logging), so a rate over a
window of many steps measures the GPU's throughput; do not read much into a window of two.

``samples`` and ``tokens`` are *global* counts: what the whole job consumed in that step, summed
over all data-parallel ranks (call ``update`` with the same numbers on every rank). ``world_size``
is then used only to turn the global FLOP rate into the per-device figures ``tflops_per_device``
and ``mfu``.
"""

from __future__ import annotations

import collections
import math
import os
import re
import time
from typing import Callable

import torch

# The FLOP formula lives with the model; re-exported here under the name the monitor's users know.
from ember.model.config import transformer_flops_per_token as flops_per_token  # noqa: F401

_SECONDS_PER = {"seconds": 1.0, "minutes": 60.0, "hours": 3600.0, "days": 86400.0}
_RATE_SUFFIX = {"seconds": "second", "minutes": "minute", "hours": "hour", "days": "day"}

# Dense (no 2:4 sparsity) bf16 tensor-core peaks from NVIDIA's data sheets, tried in order so that
# the specific H100 variants match before plain "H100" (the SXM part: "NVIDIA H100 80GB HBM3").
_BF16_PEAK_FLOPS = (
    (re.compile(r"h100.*nvl", re.I), 835e12),
    (re.compile(r"h100.*pcie", re.I), 756e12),
    (re.compile(r"h100", re.I), 989.4e12),
    (re.compile(r"h200", re.I), 989.4e12),  # H200 and GH200: the H100 SXM's compute, more memory
    (re.compile(r"a100", re.I), 312e12),
    (re.compile(r"l40s", re.I), 362.05e12),
    (re.compile(r"\bl4\b", re.I), 121e12),
)
# fp16 tensor cores run at the bf16 rate on all of these.
_PEAK_DTYPES = ("bf16", "fp16")

PEAK_TFLOPS_ENV = "EMBER_PEAK_TFLOPS"


def peak_flops_for(device_name: str, dtype: str = "bf16") -> float | None:
    """Dense peak FLOP/s of one GPU, matched by ``device_name`` (as ``torch.cuda.get_device_name()``
    reports it); ``None`` for a GPU not in the table. Supply ``peak_flops`` to ``SpeedMonitor``
    or set ``EMBER_PEAK_TFLOPS`` for those."""
    if dtype not in _PEAK_DTYPES:
        raise ValueError(f"no peak FLOP/s table for dtype {dtype!r}; known dtypes: {', '.join(_PEAK_DTYPES)}")
    for pattern, peak in _BF16_PEAK_FLOPS:
        if pattern.search(device_name):
            return peak
    return None


class SpeedMonitor:
    """Throughput over a sliding window of the last ``window_size`` updates.

    A window of timestamps t_1..t_W spans W - 1 intervals; the samples of update k were processed
    in the interval that ends at t_k, so ``samples_per_second = (samples of updates 2..W) /
    (t_W - t_1)``. The first ``warmup_steps`` steps (compilation, allocator warm-up) are never
    in a window: the first counted interval starts at the last warm-up update.

    ``compute()`` returns, with ``<u>`` the singular and ``<units>`` the plural of ``time_unit``:

    - ``samples_per_second``, ``tokens_per_second``, and ``samples_per_<u>``, ``tokens_per_<u>``
      unless the unit is seconds;
    - ``step_time``: seconds per step in the window;
    - ``elapsed_<units>``: time from the first update (warm-up included) to the latest one;
    - ``total_samples``, ``total_tokens``, ``steps``: totals since the first update;
    - ``eta_<units>``: time left to ``total_steps`` at the current step time, when given;
    - ``tflops_per_device`` and ``mfu`` (a fraction, not a percentage), when ``flops_per_token``
      is given; ``mfu`` needs a peak;
    - ``peak_memory_gb``: ``torch.cuda.max_memory_allocated`` in units of 1e9 bytes on a CUDA device.

    A value this monitor cannot measure at all is ``None``: token rates when ``update`` is never
    given tokens, ``mfu`` without a peak, ``peak_memory_gb`` off CUDA. A rate it cannot measure
    *yet* (fewer than two counted updates) is ``float("nan")``, so that format strings such as
    ``f"{rate:.2f}"`` work from the first step; test it with ``math.isnan``.

    The peak FLOP/s for ``mfu`` is, first found: the ``peak_flops`` argument (FLOP/s), the
    environment variable ``EMBER_PEAK_TFLOPS`` (TFLOP/s, e.g. ``989.4``), or ``peak_flops_for``
    applied to the CUDA device's name. ``device`` names the CUDA device for the peak and the memory
    figure; by default it is the current CUDA device when CUDA is available, else none.
    ``clock`` returns seconds; tests pass a fake one.
    """

    def __init__(
        self,
        window_size: int = 50,
        time_unit: str = "seconds",
        *,
        flops_per_token: float | None = None,
        peak_flops: float | None = None,
        warmup_steps: int = 0,
        world_size: int = 1,
        total_steps: int | None = None,
        device: torch.device | str | int | None = None,
        clock: Callable[[], float] = time.perf_counter,
    ) -> None:
        if time_unit not in _SECONDS_PER:
            raise ValueError(f"time_unit must be one of {', '.join(_SECONDS_PER)}; got {time_unit!r}")
        if window_size < 2:
            raise ValueError(f"window_size must be >= 2 (a rate needs two timestamps), got {window_size}")
        if warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if flops_per_token is not None and flops_per_token <= 0:
            raise ValueError(f"flops_per_token must be > 0, got {flops_per_token}")
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")

        self.time_unit = time_unit
        self.window_size = window_size
        self.warmup_steps = warmup_steps
        self.world_size = world_size
        self.total_steps = total_steps
        self.flops_per_token = flops_per_token
        self._clock = clock
        self._cuda_device = _cuda_device(device)
        self.peak_flops = _resolve_peak_flops(peak_flops, self._cuda_device)

        # Cumulative (time, samples, tokens, steps) at each counted update; differences of the
        # ends give the window's totals, so update and compute are O(1).
        self._window: collections.deque[tuple[float, int, int, int]] = collections.deque(maxlen=window_size)
        self._first_time: float | None = None
        self._samples = 0
        self._tokens = 0
        self._steps = 0
        self._has_tokens: bool | None = None  # fixed by the first update

    def update(self, samples: int, tokens: int | None = None, *, steps: int = 1) -> None:
        """Record that ``samples`` samples (and ``tokens`` tokens), global over all ranks, finished
        training in the last ``steps`` steps. Pass Python ints (``x.numel()``, a batch size), not
        tensors: reading a GPU tensor's value would wait for the GPU."""
        now = self._clock()
        if isinstance(samples, torch.Tensor) or isinstance(tokens, torch.Tensor):
            raise TypeError(
                "SpeedMonitor.update takes Python ints, not tensors (reading a CUDA tensor "
                "waits for the GPU); pass e.g. batch.shape[0] or batch.numel()"
            )
        if samples < 0 or (tokens is not None and tokens < 0) or steps < 0:
            raise ValueError(f"samples, tokens and steps must be >= 0, got {samples}, {tokens}, {steps}")
        if tokens is None and self.flops_per_token is not None:
            raise ValueError(
                "this SpeedMonitor has flops_per_token, so update() needs tokens to measure FLOP/s"
            )
        if self._has_tokens is None:
            self._has_tokens = tokens is not None
        elif self._has_tokens != (tokens is not None):
            raise ValueError(
                "update() was given tokens on some calls and not on others; "
                "pass tokens on every call or on none, or the token rate would be wrong"
            )

        if self._first_time is None:
            self._first_time = now
        self._samples += samples
        self._tokens += tokens or 0
        self._steps += steps
        if self._steps <= self.warmup_steps:
            self._window.clear()  # keep only the latest warm-up update, the start of the first interval
        self._window.append((now, self._samples, self._tokens, self._steps))

    def compute(self) -> dict[str, float | int | None]:
        """The metrics described in the class docstring; cheap, and never waits for the GPU."""
        nan = float("nan")
        samples_per_second = tokens_per_second = step_time = nan
        if len(self._window) >= 2:
            t0, samples0, tokens0, steps0 = self._window[0]
            t1, samples1, tokens1, steps1 = self._window[-1]
            if t1 > t0:
                samples_per_second = (samples1 - samples0) / (t1 - t0)
                tokens_per_second = (tokens1 - tokens0) / (t1 - t0)
            if steps1 > steps0:
                step_time = (t1 - t0) / (steps1 - steps0)
        if not self._has_tokens:
            tokens_per_second = None

        unit, per_unit = self.time_unit, _SECONDS_PER[self.time_unit]
        metrics: dict[str, float | int | None] = {
            "samples_per_second": samples_per_second,
            "tokens_per_second": tokens_per_second,
        }
        if unit != "seconds":
            rate_unit = _RATE_SUFFIX[unit]
            metrics[f"samples_per_{rate_unit}"] = samples_per_second * per_unit
            metrics[f"tokens_per_{rate_unit}"] = (
                None if tokens_per_second is None else tokens_per_second * per_unit
            )
        metrics["step_time"] = step_time
        last_time = self._window[-1][0] if self._window else None
        metrics[f"elapsed_{unit}"] = 0.0 if last_time is None else (last_time - self._first_time) / per_unit
        metrics["total_samples"] = self._samples
        metrics["total_tokens"] = self._tokens if self._has_tokens else None
        metrics["steps"] = self._steps
        if self.total_steps is not None:
            steps_left = max(0, self.total_steps - self._steps)
            metrics[f"eta_{unit}"] = 0.0 if steps_left == 0 else steps_left * step_time / per_unit
        if self.flops_per_token is not None:
            flops_per_device = tokens_per_second * self.flops_per_token / self.world_size
            metrics["tflops_per_device"] = flops_per_device / 1e12
            metrics["mfu"] = None if self.peak_flops is None else flops_per_device / self.peak_flops
        metrics["peak_memory_gb"] = (
            None if self._cuda_device is None else torch.cuda.max_memory_allocated(self._cuda_device) / 1e9
        )
        return metrics


def _cuda_device(device: torch.device | str | int | None) -> torch.device | None:
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else None
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    return device if device.type == "cuda" else None


def _resolve_peak_flops(peak_flops: float | None, cuda_device: torch.device | None) -> float | None:
    if peak_flops is not None:
        if peak_flops <= 0:
            raise ValueError(f"peak_flops must be > 0 FLOP/s, got {peak_flops}")
        return float(peak_flops)
    from_env = os.environ.get(PEAK_TFLOPS_ENV)
    if from_env:
        try:
            tflops = float(from_env)
        except ValueError:
            tflops = math.nan
        if not tflops > 0:
            raise ValueError(
                f"{PEAK_TFLOPS_ENV} must be a positive number of TFLOP/s such as 989.4, got {from_env!r}"
            )
        return tflops * 1e12
    if cuda_device is None:
        return None
    return peak_flops_for(torch.cuda.get_device_name(cuda_device))
