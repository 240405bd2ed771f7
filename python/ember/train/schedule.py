"""Learning-rate schedules: linear warm-up, then cosine, linear, constant or warmup-stable-decay.

``lr_multiplier`` is the whole schedule as a pure function of the step; ``build_scheduler``
wraps it in a ``LambdaLR`` so the optimizer's learning rate is ``base_lr * lr_multiplier(step)``.

Steps count from 0, the way ``LambdaLR`` counts them: the multiplier for step 0 is in force
for the first optimizer step, and each ``scheduler.step()`` after ``optimizer.step()`` moves
to the next one. With ``warmup_steps=W`` the multiplier rises as ``1/W, 2/W, ..., 1`` over
steps ``0 .. W-1`` (so the first step never trains at a learning rate of zero), then decays
with ``progress = (step - W) / (max_steps - W)`` clamped to [0, 1]: it reaches
``min_lr_ratio`` at ``step == max_steps`` and stays there if training runs longer.
"""

from __future__ import annotations

import functools
import math
import operator

import torch

SCHEDULES = ("cosine", "linear", "constant", "wsd")


def lr_multiplier(
    step: int,
    *,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> float:
    """The factor in [0, 1] that scales the base learning rate at ``step`` (counted from 0).

    - ``cosine``: ``min + (1 - min) * 0.5 * (1 + cos(pi * progress))``.
    - ``linear``: ``1 - (1 - min) * progress``.
    - ``constant``: 1.0 after warm-up (``min_lr_ratio`` plays no part).
    - ``wsd`` (warmup-stable-decay): 1.0 after warm-up until the last ``decay_steps`` steps
      before ``max_steps``, then linear to ``min_lr_ratio``; here progress runs over those
      ``decay_steps`` steps only. ``decay_steps`` is required for ``wsd`` and refused for the
      others, so that it never silently does nothing.
    """
    _check_schedule(warmup_steps, max_steps, schedule, min_lr_ratio, decay_steps)
    step = operator.index(step)
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_start = max_steps - decay_steps if schedule == "wsd" else warmup_steps
    if step < decay_start:
        return 1.0
    span = max_steps - decay_start
    progress = 1.0 if span == 0 else min(1.0, (step - decay_start) / span)
    if schedule == "cosine":
        return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - min_lr_ratio) * progress  # linear, and the decay phase of wsd


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    warmup_steps: int,
    max_steps: int,
    schedule: str = "cosine",
    min_lr_ratio: float = 0.0,
    decay_steps: int | None = None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` over ``lr_multiplier`` with these arguments, checked here rather than at
    the first ``scheduler.step()``. Call ``scheduler.step()`` once after each ``optimizer.step()``.
    Its ``state_dict()`` holds the step count, so a resumed run continues the same curve."""
    _check_schedule(warmup_steps, max_steps, schedule, min_lr_ratio, decay_steps)
    multiplier = functools.partial(
        lr_multiplier,
        warmup_steps=warmup_steps,
        max_steps=max_steps,
        schedule=schedule,
        min_lr_ratio=min_lr_ratio,
        decay_steps=decay_steps,
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, multiplier)


def _check_schedule(warmup_steps, max_steps, schedule, min_lr_ratio, decay_steps) -> None:
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown lr schedule {schedule!r}; valid schedules: {', '.join(SCHEDULES)}")
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {warmup_steps}")
    if warmup_steps > max_steps:
        raise ValueError(
            f"warmup_steps ({warmup_steps}) is greater than max_steps ({max_steps}); "
            "shorten the warm-up or train for longer"
        )
    if not 0.0 <= min_lr_ratio <= 1.0:
        raise ValueError(f"min_lr_ratio must be in [0, 1], got {min_lr_ratio}")
    if schedule == "wsd":
        if decay_steps is None:
            raise ValueError(
                "schedule 'wsd' needs decay_steps, the length of the final decay "
                "(often 10-20% of max_steps)"
            )
        if not 0 < decay_steps <= max_steps - warmup_steps:
            raise ValueError(
                f"decay_steps ({decay_steps}) must be in [1, max_steps - warmup_steps] "
                f"= [1, {max_steps - warmup_steps}] so that the decay starts after the warm-up"
            )
    elif decay_steps is not None:
        raise ValueError(
            f"decay_steps is only used by schedule 'wsd', not {schedule!r}; "
            f"{schedule!r} decays over all steps after the warm-up"
        )
