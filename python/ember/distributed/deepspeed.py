"""DeepSpeed ZeRO (stages 0-3, optimizer and parameter offload) through DeepSpeed's own engine.

Ember builds the DeepSpeed config from its own settings (micro-batch, accumulation,
clipping, precision) and merges the user's ``distributed.deepspeed_config`` (a dict, or
the path of a DeepSpeed JSON file) on top; where both set the same thing they must agree.
DeepSpeed then owns precision (its bf16/fp16 modes and loss scaling), gradient
accumulation boundaries and clipping. Checkpoints are DeepSpeed's own format.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ember.distributed.base import EXTRA_FILE
from ember.distributed.checkpoint_io import FileRecord, file_record, load_trainer_state
from ember.distributed.torch_dist import TorchDistributedStrategy
from ember.distributed.process_group import env_world

DS_TAG = "deepspeed"
UNIVERSAL_TAG = "deepspeed-universal"  # the same checkpoint converted for another world size
# The files DeepSpeed writes per data-parallel rank carry its number; all others are rank 0's.
_RANK_FILE = re.compile(r"zero_pp_rank_(\d+)_")


def saved_world_size(tag_dir: Path) -> int:
    """Ranks that wrote a DeepSpeed checkpoint's ZeRO partitions (0 for ZeRO-0, which has none)."""
    return len(list(tag_dir.glob("zero_pp_rank_*_mp_rank_00_optim_states.pt")))


def convert_to_universal(tag_dir: Path, out_dir: Path) -> None:
    """Runs DeepSpeed's ``ds_to_universal`` on ``tag_dir``, writing ``out_dir`` whole or not at all."""
    tmp = out_dir.with_name(out_dir.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    workers = str(max(1, min(4, os.cpu_count() or 1)))
    cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(tag_dir), "--output_folder", str(tmp),
           "--num_extract_workers", workers, "--num_merge_workers", workers, "--inject_missing_state"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"{tag_dir}: converting to a DeepSpeed universal checkpoint failed:\n{done.stderr[-3000:]}")
    shutil.rmtree(tmp / "tmp", ignore_errors=True)  # the converter's scratch space
    os.replace(tmp, out_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _import_deepspeed():
    try:
        import deepspeed
    except ImportError as e:
        raise ValueError(
            "distributed.strategy is 'deepspeed' but DeepSpeed is not installed: pip install deepspeed "
            "(on a machine without a GPU, set DS_ACCELERATOR=cpu)"
        ) from e
    return deepspeed


def user_deepspeed_config(value: dict[str, Any] | str | None) -> dict[str, Any]:
    if value is None:
        return {}
    if isinstance(value, dict):
        return json.loads(json.dumps(value))  # a deep copy
    path = Path(value)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: DeepSpeed config file (distributed.deepspeed_config) not found") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None


def build_deepspeed_config(config, world_size: int) -> dict[str, Any]:
    """Ember's settings as a DeepSpeed config, with the user's config merged in.
    Disagreements are errors naming both keys."""
    t = config.training
    user = user_deepspeed_config(config.distributed.deepspeed_config)
    ours: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": t.batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "train_batch_size": t.batch_size * t.gradient_accumulation_steps * world_size,
        "gradient_clipping": t.clip_grad_norm or 0.0,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    precision = t.precision
    if precision == "auto":
        precision = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    if precision in ("bf16-mixed", "bf16-true"):
        ours["bf16"] = {"enabled": True}
    elif precision == "fp16-mixed":
        ours["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}
    problems = []
    for key, value in ours.items():
        if key in user and key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size") and user[key] != value:
            problems.append(f"distributed.deepspeed_config.{key} is {user[key]} but Ember's training settings give {value}")
    for mode in ("bf16", "fp16"):
        if user.get(mode, {}).get("enabled") and mode not in ours:
            problems.append(f"distributed.deepspeed_config.{mode}.enabled is true but training.precision is {t.precision!r}")
    if problems:
        raise ValueError("DeepSpeed config disagrees with the training section:\n  " + "\n  ".join(problems))
    merged = {**ours, **user}
    merged.setdefault("zero_optimization", {"stage": 2})
    stage = merged["zero_optimization"].get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise ValueError(f"distributed.deepspeed_config.zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")
    if merged.get("fp16", {}).get("enabled") and merged.get("bf16", {}).get("enabled"):
        raise ValueError("distributed.deepspeed_config enables both fp16 and bf16")
    return merged


class DeepSpeedStrategy(TorchDistributedStrategy):
    name = "deepspeed"
    owns_precision = True
    can_skip_step = False  # the engine steps inside backward (its fp16 loss scaler skips overflows itself)

    def __init__(self, device: torch.device, config):
        super().__init__(device)
        self.deepspeed = _import_deepspeed()
        self.config = config
        self.ds_config: dict[str, Any] = {}
        self.engine = None

    def setup(self) -> None:
        rank, world, local = env_world()
        if world > 1 and "MASTER_ADDR" not in os.environ:
            raise ValueError("WORLD_SIZE > 1 but MASTER_ADDR is not set: launch with the DeepSpeed launcher or torchrun")
        if "MASTER_ADDR" not in os.environ:
            # One process without a launcher: give DeepSpeed the group a launcher would
            # (it would otherwise look for MPI).
            os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        self.deepspeed.init_distributed(dist_backend="nccl" if self.device.type == "cuda" else "gloo", verbose=False)
        self.rank, self.world_size, self.local_rank = dist.get_rank(), dist.get_world_size(), local
        self.ds_config = build_deepspeed_config(self.config, self.world_size)

    def materialize(
        self,
        model: nn.Module,
        make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
        init_weights: Callable[[nn.Module], None],
    ) -> tuple[nn.Module, torch.optim.Optimizer]:
        zero = self.ds_config["zero_optimization"]
        offload_params = zero.get("offload_param", {}).get("device") in ("cpu", "nvme")
        model.to_empty(device="cpu" if offload_params else self.device)
        init_weights(model)
        optimizer = make_optimizer(model)
        if zero.get("offload_optimizer", {}).get("device") in ("cpu", "nvme"):
            # Offloaded optimizer steps run on the CPU: DeepSpeed's vectorised Adam, same groups and settings.
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            groups = [{k: v for k, v in g.items() if k != "params"} | {"params": g["params"]} for g in optimizer.param_groups]
            d = optimizer.defaults
            optimizer = DeepSpeedCPUAdam(groups, lr=d["lr"], betas=d["betas"], eps=d["eps"], weight_decay=d["weight_decay"], adamw_mode=True)
        engine, ds_optimizer, _, _ = self.deepspeed.initialize(model=model, optimizer=optimizer, config=self.ds_config)
        self.engine = engine
        self.model = engine
        # ZeRO wraps the torch optimizer; the schedule drives the wrapped one's learning rates.
        inner = ds_optimizer if isinstance(ds_optimizer, torch.optim.Optimizer) else ds_optimizer.optimizer
        self.optimizer = inner
        return engine, inner

    def release(self) -> None:
        engine, self.engine = self.engine, None
        super().release()
        if engine is not None:
            try:
                engine.destroy()  # removes the hooks through which the model keeps the engine
            except Exception as error:  # never let cleanup replace the run's own outcome
                warnings.warn(f"DeepSpeed engine.destroy() failed: {error}", stacklevel=2)

    def _destroy_groups(self) -> None:
        # DeepSpeed's own destroy also forgets the groups it cached (its copy of the world
        # group, data-parallel groups), which would otherwise keep their threads alive.
        self.deepspeed.comm.destroy_process_group()
        from deepspeed.utils import groups

        if getattr(groups, "_WORLD_GROUP", None) is not None:  # older DeepSpeed releases keep it
            groups._WORLD_GROUP = None

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the accumulation steps. DeepSpeed steps (and clips)
        # itself at the accumulation boundary; between boundaries step() only counts.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor | None:
        # DeepSpeed reports no norm for ZeRO-0 in fp32 (a plain torch optimizer) or when
        # ZeRO 1/2 skip computing it; the step then logs no grad_norm rather than a made-up 0.
        norm = self.engine.get_global_grad_norm()
        if norm is None:
            return None
        return norm.detach() if isinstance(norm, torch.Tensor) else torch.tensor(float(norm))

    def optimizer_step(self) -> None:
        """Done inside ``backward`` at the accumulation boundary."""

    def save_checkpoint(self, directory: Path, extra: dict[str, Any]) -> dict[str, FileRecord]:
        # The marker DeepSpeed's ds_to_universal asks for: the checkpoint can move to another world size.
        from deepspeed.checkpoint import constants as ds

        universal = {ds.UNIVERSAL_CHECKPOINT_INFO: {ds.UNIVERSAL_CHECKPOINT_VERSION_KEY: ds.UNIVERSAL_CHECKPOINT_VERSION_VALUE}}
        before = {p for p in directory.rglob("*") if p.is_file()}  # what the checkpointer wrote already
        self.engine.save_checkpoint(str(directory), tag=DS_TAG, client_state=universal)
        if self.is_main:
            torch.save(extra, directory / EXTRA_FILE)
        # Each rank measures the files it wrote, which DeepSpeed's names tell apart.
        records = {}
        for path in sorted(p for p in directory.rglob("*") if p.is_file() and p not in before):
            owner = _RANK_FILE.search(path.name)
            if (int(owner.group(1)) if owner else 0) == self.rank:
                records[path.relative_to(directory).as_posix()] = file_record(path)
        return records

    def load_checkpoint(self, directory: Path) -> dict[str, Any]:
        if not (directory / DS_TAG).is_dir():
            raise FileNotFoundError(f"{directory / DS_TAG}: not found; {directory} is not a DeepSpeed checkpoint of this strategy")
        tag = DS_TAG
        saved = saved_world_size(directory / DS_TAG)
        if saved and saved != self.world_size:
            # ZeRO partitions written by another number of ranks: DeepSpeed loads them
            # only through its universal format. Converted once, beside the original.
            failure = [None]
            if self.is_main and not (directory / UNIVERSAL_TAG).is_dir():
                try:
                    convert_to_universal(directory / DS_TAG, directory / UNIVERSAL_TAG)
                except Exception as e:  # every rank raises it, none waits forever
                    failure = [str(e)]
            dist.broadcast_object_list(failure, src=0)
            if failure[0] is not None:
                raise RuntimeError(failure[0])
            tag = UNIVERSAL_TAG
        universal = self.engine._config.load_universal_checkpoint
        self.engine._config.load_universal_checkpoint = universal or tag == UNIVERSAL_TAG
        # DeepSpeed's universal loader for ZeRO-3 gives every parameter group the first
        # group's settings (weight decay included); each group's own come back after,
        # all but the learning rate, which is the checkpoint's.
        inner = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        settings = [{k: v for k, v in g.items() if k not in ("params", "lr")} for g in inner.param_groups]
        try:
            path, _ = self.engine.load_checkpoint(str(directory), tag=tag)
        finally:
            self.engine._config.load_universal_checkpoint = universal
        if tag == UNIVERSAL_TAG:
            for group, saved in zip(inner.param_groups, settings):
                group.update(saved)
            # The same loader hands one `step` tensor to every parameter group's state;
            # Adam counts it up in place, once per group, so each group gets its own.
            for state in inner.state.values():
                if isinstance(state.get("step"), torch.Tensor):
                    state["step"] = state["step"].clone()
        if path is None:
            raise ValueError(f"{directory}: DeepSpeed could not load this checkpoint")
        return load_trainer_state(directory / EXTRA_FILE)

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        if self.ds_config["zero_optimization"].get("stage", 0) == 3:
            sd = self.engine._zero3_consolidated_16bit_state_dict()
            return {k: v.float().cpu() for k, v in (sd or {}).items()} if self.is_main else {}
        return {k: v.detach().float().cpu() for k, v in self.engine.module.state_dict().items()} if self.is_main else {}

    def model_for_generation(self, build: Callable[[], nn.Module]) -> nn.Module | None:
        # The parameters are sharded: generating from them would mix DTensors (or ZeRO
        # partitions) with plain tensors, so the main rank generates from gathered weights.
        return self._gathered_for_generation(build)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return self.engine.module if self.engine is not None else model
