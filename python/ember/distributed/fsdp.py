"""FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters, gradients and optimizer
state sharded over ranks, one shard group per transformer block."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from ember.config import FSDPSection
from ember.distributed.torch_dist import TorchDistributedStrategy

class FSDPStrategy(TorchDistributedStrategy):
    name = "fsdp"

    def __init__(self, device: torch.device, cfg: FSDPSection, backend: str | None = None):
        if cfg.cpu_offload and device.type == "cuda" and backend is None:
            backend = "cuda:nccl,cpu:gloo"  # offloaded optimizer steps reduce on the CPU
        super().__init__(device, backend)
        self.cfg = cfg
        self.mesh: DeviceMesh | None = None

    def setup(self) -> None:
        super().setup()
        self.mesh = self._mesh()

    def _mesh(self) -> DeviceMesh:
        world, kind = self.world_size, self.device.type
        strategy = self.cfg.sharding_strategy
        if strategy == "HYBRID_SHARD":
            replicas = self.cfg.replicate_degree
            if replicas is None:  # one replica per node: shard within a node, replicate across nodes
                local = int(__import__("os").environ.get("LOCAL_WORLD_SIZE", world))
                replicas = max(1, world // local)
            if world < 2 or replicas < 1 or world % replicas:
                raise ValueError(
                    f"distributed.fsdp_config: HYBRID_SHARD with {world} rank(s) and replicate_degree {replicas}: "
                    "it needs at least 2 ranks and a replicate_degree that divides the number of ranks"
                )
            return init_device_mesh(kind, (replicas, world // replicas), mesh_dim_names=("replicate", "shard"))
        if strategy == "NO_SHARD":
            return init_device_mesh(kind, (world, 1), mesh_dim_names=("replicate", "shard"))
        return init_device_mesh(kind, (world,), mesh_dim_names=("shard",))

    def shard(self, model: nn.Module) -> None:
        cfg = self.cfg
        mp = MixedPrecisionPolicy()
        if cfg.mixed_precision and self.device.type == "cuda":
            reduce = torch.float32 if cfg.reduce_dtype == "float32" else torch.bfloat16
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=reduce)
        offload = CPUOffloadPolicy() if cfg.cpu_offload else OffloadPolicy()
        # SHARD_GRAD_OP keeps each block's parameters gathered from forward to backward.
        reshard = cfg.sharding_strategy != "SHARD_GRAD_OP"
        for block in model.layers:
            fully_shard(block, mesh=self.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)
        fully_shard(model, mesh=self.mesh, mp_policy=mp, offload_policy=offload, reshard_after_forward=reshard)

    def materialize(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        model.to_empty(device="cpu" if self.cfg.cpu_offload else self.device)
        init_weights(model)
        self.model = model
        self.optimizer = make_optimizer(model)
        return model, self.optimizer

    def model_for_generation(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        # The parameters are sharded: generating from them would mix DTensors (or ZeRO
        # partitions) with plain tensors, so the main rank generates from gathered weights.
        return self._gathered_for_generation(build)

    def release(self) -> None:
        super().release()
        if self.mesh is not None:
            # DTensor's sharding caches keep the mesh alive, and the mesh holds its
            # process groups: empty its registry so the groups can go.
            getattr(self.mesh, "_pg_registry", {}).clear()
        self.mesh = None

    def no_sync(self):
        # FSDP2: skip the reduce-scatter on accumulation micro-steps; the last one syncs.
        return _GradSyncOff(self.model)


class _GradSyncOff:
    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.model.set_requires_gradient_sync(False)

    def __exit__(self, *exc):
        self.model.set_requires_gradient_sync(True)
        return False
