"""``ember convert``: an Ember checkpoint (any strategy, any world size) to a Hugging Face checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import yaml

from ember.model import Llama, LlamaConfig
from ember.model.hf import save_hf_checkpoint
from ember.config import config_from_dict
from ember.distributed.base import EXTRA_FILE
from ember.train.checkpoint import ARCHITECTURE_FILE, CONFIG_FILE, latest_checkpoint

DEEPSPEED_DIR = "deepspeed"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a run's checkpoints directory or a run directory."""
    p = Path(path)
    if (p / EXTRA_FILE).is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{p}: no Ember checkpoint here (expected a step-N checkpoint directory, or a run directory holding them)")


def load_checkpoint_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """The model weights (float32, CPU) and architecture stored in an Ember checkpoint."""
    ckpt = resolve_checkpoint(checkpoint)
    if (ckpt / ARCHITECTURE_FILE).is_file():
        arch = LlamaConfig(**json.loads((ckpt / ARCHITECTURE_FILE).read_text()))
    else:  # written before checkpoints carried their architecture
        arch = config_from_dict(yaml.safe_load((ckpt / CONFIG_FILE).read_text())).model.llama_config()
    if (ckpt / DEEPSPEED_DIR).is_dir():
        # DeepSpeed's own format: its consolidation utility reads (and unpickles) it.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_DIR)
        return {k.removeprefix("module."): v for k, v in state.items()}, arch
    if not (ckpt / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt / '.metadata'}: not found; {ckpt} is not a complete checkpoint")
    import torch.distributed.checkpoint as dcp

    from ember.distributed.checkpoint_io import SafeFileSystemReader, SafeLoadPlanner

    with torch.device("meta"):
        model = Llama(arch)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    dcp.load(state, storage_reader=SafeFileSystemReader(str(ckpt)), planner=SafeLoadPlanner(allow_partial_load=True))
    return state["model"], arch


def convert_to_hf(checkpoint: str | Path, out_dir: str | Path, *, dtype: torch.dtype | None = None, tokenizer_dir: str | Path | None = None) -> Path:
    state, arch = load_checkpoint_weights(checkpoint)
    return save_hf_checkpoint(state, out_dir, arch, dtype=dtype, tokenizer_dir=tokenizer_dir)
