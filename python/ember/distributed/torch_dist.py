"""What DDP and FSDP share: a torch.distributed process group."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ember.distributed.base import Strategy
from ember.distributed.process_group import destroy_process_group, init_process_group


class TorchDistributedStrategy(Strategy):
    def __init__(self, device: torch.device, backend: str | None = None):
        super().__init__(device)
        self.backend = backend

    def setup(self) -> None:
        self.rank, self.world_size, self.local_rank = init_process_group(self.device, self.backend)

    def teardown(self, failed: bool = False) -> None:
        self.release()
        if not failed:
            destroy_process_group(self._destroy_groups)

    def _destroy_groups(self) -> None:
        """Destroys every process group; an engine that caches groups of its own makes it forget them too."""
        dist.destroy_process_group()

    def reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        # gloo has no AVG; SUM then divide works on every backend.
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def all_finite(self, *values: torch.Tensor | None) -> bool:
        ok = self._local_finite(values).to(torch.int32).reshape(1)
        dist.all_reduce(ok, op=dist.ReduceOp.MIN)  # gloo has no logical AND; MIN of 0/1 is one
        return bool(ok.item())

    def any_rank(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def broadcast_flag(self, flag: bool) -> bool:
        t = torch.tensor([1 if flag else 0], device=self.device)
        dist.broadcast(t, src=0)
        return bool(t.item())

    def barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()
