"""One process, one device."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from ember.distributed.base import Strategy


class SingleDeviceStrategy(Strategy):
    name = "single"

    def materialize(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        model.to_empty(device=self.device)
        init_weights(model)
        self.model = model
        self.optimizer = make_optimizer(model)
        return model, self.optimizer
