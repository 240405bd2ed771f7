"""The one interface every distributed strategy implements.

The orchestrator calls only these methods and never asks which strategy it
has, so single-device, DDP, FSDP and DeepSpeed runs share one training loop.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Strategy(ABC):
    name: str = "base"

    def __init__(self, device: torch.device, rank: int = 0, world_size: int = 1, local_rank: int = 0):
        self.device = device
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self) -> None:
        """Joins the process group (if any). Called once before anything else."""

    def teardown(self) -> None:
        """Leaves the process group (if any)."""

    @abstractmethod
    def prepare(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Takes a model built on the meta device; places (and shards or wraps) it,
        initialises its weights with ``init_weights``, and builds its optimizer."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-steps whose gradients are not yet to be reduced across ranks."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @abstractmethod
    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Clips gradients (when ``max_norm`` is set) and returns the total norm, without syncing the host."""

    def optimizer_step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over ranks."""
        return value

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (for decisions all ranks must share)."""
        return flag

    def barrier(self) -> None:
        """Waits for every rank."""

    @abstractmethod
    def save_checkpoint(self, directory: Path, extra: dict[str, Any]) -> None:
        """Writes model, optimizer and ``extra`` (plain data and tensors) into ``directory``."""

    @abstractmethod
    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Restores model and optimizer from ``directory`` and returns its ``extra``."""

    @abstractmethod
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on the main rank (empty elsewhere)."""

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Runs the body on the main rank first (e.g. to prepare data once), then on the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()
