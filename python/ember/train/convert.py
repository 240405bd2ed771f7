"""``ember convert``: an Ember checkpoint (any strategy, any world size) to a Hugging Face checkpoint.

A path that is not a checkpoint, or one whose ``llama.json``, ``config.yaml``,
``trainer.pt`` or weight files are damaged, raises ``ValueError`` / ``FileNotFoundError``
naming the file before anything is written; the output directory is checked first of all
(``ember.model.hf.check_export_dir``)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import yaml

from ember.model import Llama, LlamaConfig
from ember.model.hf import check_export_dir, save_hf_checkpoint
from ember.config import config_from_dict
from ember.distributed.base import EXTRA_FILE
from ember.train.checkpoint import ARCHITECTURE_FILE, CONFIG_FILE, latest_checkpoint

DEEPSPEED_DIR = "deepspeed"


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from a step directory, a run's checkpoints directory or a run directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such file or directory")
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: a file; pass an Ember checkpoint directory (step-N), or a run directory holding them")
    if (p / EXTRA_FILE).is_file():
        return p
    for candidate in (p, p / "checkpoints"):
        latest = latest_checkpoint(candidate)
        if latest is not None:
            return latest
    raise FileNotFoundError(f"{p}: no Ember checkpoint here (expected a step-N checkpoint directory, or a run directory holding them)")


def _checkpoint_architecture(ckpt: Path) -> LlamaConfig:
    """The architecture a checkpoint was trained with: its ``llama.json``, or for checkpoints
    written before they carried one, the model section of its ``config.yaml``."""
    path = ckpt / ARCHITECTURE_FILE
    if path.is_file():
        try:
            raw = json.loads(path.read_text())
            arch = LlamaConfig(**raw)
            problems = arch.validate()
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}; the checkpoint is damaged") from None
        except (TypeError, UnicodeDecodeError) as e:  # not a mapping, unknown fields, values of the wrong type
            raise ValueError(f"{path}: not an Ember architecture ({e}); the checkpoint is damaged") from None
        if problems:
            raise ValueError(f"{path}: " + "; ".join(f"{k}: {m}" for k, m in problems) + "; the checkpoint is damaged")
        return arch
    path = ckpt / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{ckpt / ARCHITECTURE_FILE}: not found (nor {CONFIG_FILE}); {ckpt} is not a complete Ember checkpoint")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.MarkedYAMLError as e:
        where = f"line {e.problem_mark.line + 1}: " if e.problem_mark else ""
        raise ValueError(f"{path}: {where}not valid YAML ({e.problem}); the checkpoint is damaged") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid YAML ({_describe(e)}); the checkpoint is damaged") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: not a config (a YAML mapping); the checkpoint is damaged")
    return config_from_dict(raw, source=str(path)).model.llama_config()


def _check_trainer_state(ckpt: Path) -> None:
    """A checkpoint whose trainer state is missing or unreadable was not written whole (or was
    damaged since); its weights are not trusted either."""
    path = ckpt / EXTRA_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; {ckpt} is not a complete Ember checkpoint")
    try:
        torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load reports a damaged file with whatever its reader hit
        raise ValueError(f"{path}: unreadable ({_describe(e)}); the checkpoint is damaged") from None


def _describe(e: BaseException) -> str:
    """One line for a reader's exception: its type and the first sentence of its message."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    text = text.split(". ")[0]
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def load_checkpoint_weights(checkpoint: str | Path) -> tuple[dict[str, torch.Tensor], LlamaConfig]:
    """The model weights (float32, CPU) and architecture stored in an Ember checkpoint."""
    ckpt = resolve_checkpoint(checkpoint)
    arch = _checkpoint_architecture(ckpt)
    _check_trainer_state(ckpt)
    if (ckpt / DEEPSPEED_DIR).is_dir():
        # DeepSpeed's own format: its consolidation utility reads (and unpickles) it.
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=DEEPSPEED_DIR)
        return {k.removeprefix("module."): v for k, v in state.items()}, arch
    if not (ckpt / ".metadata").is_file():
        raise FileNotFoundError(f"{ckpt / '.metadata'}: not found; {ckpt} is not a complete checkpoint")
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    from ember.distributed.checkpoint_io import SafeFileSystemReader, SafeLoadPlanner

    with torch.device("meta"):
        model = Llama(arch)
    model.to_empty(device="cpu")
    state = {"model": model.state_dict()}
    reader = SafeFileSystemReader(str(ckpt))
    try:
        # Read here first: DCP logs the traceback of a metadata it cannot read before it fails.
        reader.read_metadata()
    except ValueError as e:  # names the file
        raise ValueError(f"{e}; the checkpoint is damaged") from None
    try:
        with warnings.catch_warnings():
            # no_dist: this one process reads every rank's shards; DCP warns that it assumes so.
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner(allow_partial_load=True), no_dist=True)
    except (Exception, CheckpointException) as e:  # a damaged file surfaces as whatever its reader hit
        if isinstance(e, CheckpointException) and e.failures:
            e = next(iter(e.failures.values()))[0]
        raise ValueError(f"{ckpt}: the model weights could not be read ({_describe(e)}); the checkpoint is damaged") from None
    return state["model"], arch


def convert_to_hf(
    checkpoint: str | Path,
    out_dir: str | Path,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes the checkpoint's weights to ``out_dir`` as a Hugging Face checkpoint. ``out_dir``
    must be new or empty, or with ``overwrite`` an earlier export (``check_export_dir``);
    it is checked before the weights are read."""
    check_export_dir(out_dir, overwrite=overwrite)
    if tokenizer_dir is not None and not Path(tokenizer_dir).is_dir():
        raise FileNotFoundError(f"{tokenizer_dir}: not a directory; the tokenizer to copy alongside is a directory holding tokenizer.json and its companions")
    state, arch = load_checkpoint_weights(checkpoint)
    return save_hf_checkpoint(state, out_dir, arch, dtype=dtype, tokenizer_dir=tokenizer_dir, overwrite=overwrite)
