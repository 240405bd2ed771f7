"""DistributedDataParallel: every rank holds the whole model; gradients are averaged."""

from __future__ import annotations

import weakref
from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ember.distributed.torch_dist import TorchDistributedStrategy


class DDPStrategy(TorchDistributedStrategy):
    name = "ddp"

    def __init__(
        self,
        device: torch.device,
        *,
        backend: str | None = None,
        find_unused_parameters: bool = False,
        static_graph: bool = False,
    ):
        super().__init__(device, backend)
        self.find_unused_parameters = find_unused_parameters
        self.static_graph = static_graph
        # Weak: setup_ddp's module-level strategy (ember.compat) must not keep a wrapped model (and
        # through it the process group) alive after the script let go of it.
        self._ddp: weakref.ref[DistributedDataParallel] | None = None

    def wrap(self, model: nn.Module) -> DistributedDataParallel:
        """Wraps a materialised model (``ember.compat.setup_model_with_ddp`` calls it)."""
        ddp = DistributedDataParallel(
            model,
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.find_unused_parameters,
            static_graph=self.static_graph,
            gradient_as_bucket_view=True,
        )
        self._ddp = weakref.ref(ddp)
        return ddp

    def materialize(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        model.to_empty(device=self.device)
        init_weights(model)  # same seed on every rank; DDP also broadcasts rank 0's weights
        wrapped = self.wrap(model)
        self.model = wrapped
        self.optimizer = make_optimizer(model)
        return wrapped, self.optimizer

    def release(self) -> None:
        super().release()
        self._ddp = None

    def no_sync(self):
        ddp = self._ddp() if self._ddp is not None else None
        assert ddp is not None, "no_sync() needs the model wrap() returned"
        return ddp.no_sync()

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, DistributedDataParallel) else model
