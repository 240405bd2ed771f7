"""``TrainState``: everything a training run changes as it goes, and what a checkpoint holds.

The model's and optimizer's tensors are saved by the strategy (sharded, in its own
format); ``state_dict()`` is the rest, plain data the main rank saves beside them: the
step, the tokens seen, the schedule, the loader's position, the gradient scaler and the
random number generators. Restoring both continues the run exactly where it stopped.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ember.data import TokenLoader


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a checkpoint stores the tuple as a list
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class TrainState:
    model: nn.Module  # as the strategy wrapped it
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    loader: TokenLoader  # the training data
    step: int = 0
    tokens_seen: int = 0
    skipped_steps: int = 0  # steps whose loss or gradient norm was not finite (no optimizer step)

    def state_dict(self) -> dict[str, Any]:
        """The run's progress beside the model and optimizer (which the strategy saves)."""
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "skipped_steps": self.skipped_steps,
            "scheduler": self.scheduler.state_dict(),
            "loader": self.loader.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        self.skipped_steps = state.get("skipped_steps", 0)  # absent from checkpoints of earlier versions
        self.scheduler.load_state_dict(state["scheduler"])
        self.loader.load_state_dict(state["loader"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
