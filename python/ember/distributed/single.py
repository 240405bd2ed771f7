"""One process, one device."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ember.distributed.base import Strategy

MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.pt"
EXTRA_FILE = "trainer.pt"


class SingleDeviceStrategy(Strategy):
    name = "single"

    def prepare(
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

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        assert self.model is not None
        params = [p for p in self.model.parameters() if p.grad is not None]
        if max_norm is None:
            return torch.nn.utils.get_total_norm([p.grad for p in params], foreach=True)
        return torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True)

    def save_checkpoint(self, directory: Path, extra: dict[str, Any]) -> None:
        assert self.model is not None and self.optimizer is not None
        # save_model drops the duplicate name of tied weights, which save_file refuses.
        safetensors.torch.save_model(self.model, str(directory / MODEL_FILE))
        torch.save(self.optimizer.state_dict(), directory / OPTIMIZER_FILE)
        torch.save(extra, directory / EXTRA_FILE)

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        assert self.model is not None and self.optimizer is not None
        missing, unexpected = safetensors.torch.load_model(self.model, str(directory / MODEL_FILE), strict=False, device=str(self.device))
        if missing or unexpected:
            raise ValueError(
                f"{directory / MODEL_FILE}: does not match the model: "
                f"missing {sorted(missing)[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {sorted(unexpected)[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        self.optimizer.load_state_dict(torch.load(directory / OPTIMIZER_FILE, map_location=self.device, weights_only=True))
        return torch.load(directory / EXTRA_FILE, map_location="cpu", weights_only=True)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        assert self.model is not None
        return {k: v.detach().to("cpu") for k, v in self.model.state_dict().items()}
