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
from torch.distributed.tensor import DTensor

from ember.distributed.checkpoint_io import FileRecord, file_record, full_model_state_dict, load_sharded, load_trainer_state, save_sharded
from ember.model.parallelize import ParallelPlan, parallelize

EXTRA_FILE = "trainer.pt"


class Strategy(ABC):
    name: str = "base"
    # True when the engine itself handles mixed precision and loss scaling (DeepSpeed):
    # the loop then applies no autocast and no gradient scaler of its own.
    owns_precision: bool = False
    # False when the optimizer has already stepped by the time the loop sees the loss and
    # gradient norm (DeepSpeed steps inside backward): a non-finite step cannot be skipped.
    can_skip_step: bool = True

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

    def teardown(self, failed: bool = False) -> None:
        """Leaves the process group (if any). After a failure (``failed``) it only
        releases: a peer may be waiting in a collective this rank will never join, and
        leaving would wait for it."""

    def release(self) -> None:
        """Drops the strategy's references to the model, optimizer and engine. Before the
        group is destroyed, nothing may still hold it: a wrapped model keeps the group's
        worker threads alive into interpreter shutdown, where they can abort the process."""
        self.model = None
        self.optimizer = None

    def prepare(
        self,
        model: nn.Module,
        plan: ParallelPlan,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Takes a model built on the meta device; applies ``plan`` and this strategy's
        sharding (:func:`ember.model.parallelize.parallelize`, in its one order), then
        places (or wraps) it, initialises its weights and builds its optimizer."""
        parallelize(model, plan, shard=self.shard)
        return self.materialize(model, make_optimizer, init_weights)

    def shard(self, model: nn.Module) -> None:
        """Data-parallel sharding applied on the meta device, last step of ``parallelize``
        (FSDP2). Strategies that wrap a materialised model do so in ``materialize``."""

    @abstractmethod
    def materialize(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        """Places the parallelized meta-device ``model`` on its device (wrapping it where
        the strategy does), initialises its weights with ``init_weights``, and builds its
        optimizer with ``make_optimizer``."""

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Context for micro-steps whose gradients are not yet to be reduced across ranks."""
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        """Clips gradients (when ``max_norm`` is set) and returns the total norm before
        clipping over all ranks' shards, without syncing the host; None where the engine
        does not report one (DeepSpeed)."""
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm is None:
            norm = torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        else:
            norm = torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)
        if isinstance(norm, DTensor):  # sharded gradients: the norm is a partial reduction
            norm = norm.full_tensor()
        return norm

    def optimizer_step(self) -> None:
        assert self.optimizer is not None
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of ``value`` over ranks."""
        return value

    def all_finite(self, *values: torch.Tensor | None) -> bool:
        """Whether every element of ``values`` (None ignored; DTensors by their local
        shards) is finite on every rank. One host sync, and one collective across ranks,
        so that all ranks take the same decision."""
        return bool(self._local_finite(values).item())

    def _local_finite(self, values) -> torch.Tensor:
        flags = [torch.isfinite(v.to_local() if isinstance(v, DTensor) else v).all().to(self.device) for v in values if v is not None]
        return torch.stack(flags).all() if flags else torch.tensor(True, device=self.device)

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank (for requests that arrive at each rank on its own, such as signals)."""
        return flag

    def broadcast_flag(self, flag: bool) -> bool:
        """Rank 0's ``flag``, on every rank (for decisions all ranks must share)."""
        return flag

    def barrier(self) -> None:
        """Waits for every rank."""

    def save_checkpoint(self, directory: Path, extra: dict[str, Any]) -> dict[str, FileRecord]:
        """Writes model and optimizer (sharded, see ``checkpoint_io``) and, from the main
        rank, ``extra`` (plain data and tensors) into ``directory``. Returns the size and
        checksum of each file this rank wrote, by its path relative to ``directory``."""
        assert self.model is not None and self.optimizer is not None
        records = save_sharded(directory, self.model, self.optimizer)
        if self.is_main:
            torch.save(extra, directory / EXTRA_FILE)
            records[EXTRA_FILE] = file_record(directory / EXTRA_FILE)
        return records

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        """Restores model and optimizer from ``directory``, whatever strategy and world
        size wrote it, and returns its ``extra``."""
        assert self.model is not None and self.optimizer is not None
        if not (directory / EXTRA_FILE).is_file():
            raise FileNotFoundError(f"{directory / EXTRA_FILE}: not found; {directory} is not a complete Ember checkpoint")
        if (directory / "deepspeed").is_dir() and not (directory / ".metadata").is_file():
            raise ValueError(
                f"{directory}: written by the deepspeed strategy, which alone can resume it "
                "(distributed.strategy=deepspeed); `ember convert` turns it into Hugging Face weights"
            )
        extra = load_trainer_state(directory / EXTRA_FILE)
        load_sharded(directory, self.model, self.optimizer)
        return extra

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on the CPU, on the main rank (empty elsewhere).
        Every rank must call it."""
        assert self.model is not None
        return full_model_state_dict(self.model)

    def model_for_generation(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """A plain model holding the trained weights, for generation on this rank, or None
        on ranks that do not generate. Every rank calls it. Here: the model itself."""
        assert self.model is not None
        return self.unwrap(self.model)

    def _gathered_for_generation(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        """For strategies whose model is sharded: the main rank gets a fresh ``build()``
        holding the gathered weights, on its device; the other ranks None."""
        state = self.full_state_dict()
        if not self.is_main:
            return None
        model = build()
        model.load_state_dict(state)
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The model itself, without a wrapper (for generation and export)."""
        return model

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Runs the body on the main rank first (e.g. to prepare data once), then on the others."""
        if not self.is_main:
            self.barrier()
        yield
        if self.is_main:
            self.barrier()
