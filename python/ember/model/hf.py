"""Hugging Face Llama checkpoints: read them into Ember, write Ember weights back.

A checkpoint directory holds ``config.json`` and safetensors weights
(``model.safetensors``, or shards listed in ``model.safetensors.index.json``).
Weights are mapped by name; Hugging Face's q/k projections already use the
half-split rotary convention Ember's attention uses, so no permutation is
needed. Pickle files (``pytorch_model.bin``) are refused, never unpickled.

Loading fills a model in place, parameter by parameter, reading from the files
only the rows each parameter needs: a model sharded with FSDP (DTensor
parameters) reads only its own shards, so no rank ever holds the full weights.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from torch.distributed.tensor import DTensor

from .config import LlamaConfig

CONFIG_FILE = "config.json"
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "model.pt", "consolidated.00.pth")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "generation_config.json")
SHARD_BYTES = 5 << 30

# Ember parameter name -> Hugging Face name; {i} is the layer.
_NAMES = [
    ("tok_embeddings.weight", "model.embed_tokens.weight"),
    ("layers.{i}.attention.wq.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("layers.{i}.attention.wk.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("layers.{i}.attention.wv.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("layers.{i}.attention.wo.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("layers.{i}.feed_forward.w1.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("layers.{i}.feed_forward.w3.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("layers.{i}.feed_forward.w2.weight", "model.layers.{i}.mlp.down_proj.weight"),
    ("layers.{i}.attention_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("layers.{i}.ffn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("norm.weight", "model.norm.weight"),
    ("output.weight", "lm_head.weight"),
]


def _to_hf_patterns() -> list[tuple[re.Pattern, str]]:
    out = []
    for ours, theirs in _NAMES:
        pattern = re.escape(ours).replace(re.escape("{i}"), r"(\d+)")
        out.append((re.compile(f"^{pattern}$"), theirs))
    return out


_PATTERNS = _to_hf_patterns()


def hf_name(ember_name: str) -> str:
    """The Hugging Face name of an Ember parameter (activation-checkpoint wrappers ignored)."""
    name = ember_name.replace("_checkpoint_wrapped_module.", "")
    for pattern, theirs in _PATTERNS:
        m = pattern.match(name)
        if m:
            return theirs.replace("{i}", m.group(1)) if m.groups() else theirs
    raise KeyError(f"no Hugging Face name for parameter {ember_name!r}")


# ---------------------------------------------------------------------------
# config.json


def config_from_hf(directory: str | Path) -> LlamaConfig:
    """Reads a Hugging Face Llama ``config.json`` (transformers 4 or 5 layout)."""
    path = Path(directory) / CONFIG_FILE
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found; {directory} is not a Hugging Face checkpoint directory") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: line {e.lineno}: not valid JSON: {e.msg}") from None
    problems = []
    if raw.get("model_type", "llama") != "llama":
        problems.append(f"model_type is {raw.get('model_type')!r}, not 'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if raw.get(key):
            problems.append(f"{key} is true; Ember's Llama has no biases")
    if raw.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act is {raw.get('hidden_act')!r}; Ember's Llama uses silu")
    rope = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = raw.get("rope_theta", rope.pop("rope_theta", 10000.0))
    rope.pop("rope_theta", None)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        scaling = None
    elif rope_type == "llama3":
        scaling = {k: rope[k] for k in ("rope_type", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings") if k in rope}
    else:
        problems.append(f"rope type {rope_type!r} is not supported (default or llama3)")
        scaling = None
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    problems += [f"missing {k}" for k in required if k not in raw]
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    cfg = LlamaConfig(
        vocab_size=raw["vocab_size"],
        hidden_size=raw["hidden_size"],
        intermediate_size=raw["intermediate_size"],
        num_hidden_layers=raw["num_hidden_layers"],
        num_attention_heads=raw["num_attention_heads"],
        num_key_value_heads=raw.get("num_key_value_heads"),
        head_dim=raw.get("head_dim"),
        max_position_embeddings=raw.get("max_position_embeddings", 4096),
        rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        rope_scaling=scaling,
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
        initializer_range=raw.get("initializer_range", 0.02),
    )
    bad = cfg.validate()
    if bad:
        raise ValueError(f"{path}: " + "; ".join(f"{k}: {m}" for k, m in bad))
    return cfg


def config_to_hf(cfg: LlamaConfig, dtype: torch.dtype) -> dict[str, Any]:
    # Fresh dicts: transformers edits the rope dicts it is given in place.
    rope = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling:
        rope = {**cfg.rope_scaling, "rope_theta": cfg.rope_theta}
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        # Both spellings: transformers 5 reads rope_parameters, transformers 4 rope_theta/rope_scaling.
        "rope_theta": cfg.rope_theta,
        "rope_scaling": dict(cfg.rope_scaling) if cfg.rope_scaling else None,
        "rope_parameters": rope,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.initializer_range,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


# ---------------------------------------------------------------------------
# Reading weights


class _WeightFiles:
    """Name -> file for a checkpoint directory's safetensors, opened lazily."""

    def __init__(self, directory: Path):
        self.directory = directory
        interrupted = _interrupted_export(directory)
        if interrupted is not None:
            raise ValueError(
                f"{interrupted}: an export into {directory} was interrupted while it replaced an earlier one, "
                "so its files are a mix of both; export again"
            )
        pickles = [f for f in PICKLE_FILES if (directory / f).exists()]
        index = directory / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise ValueError(f"{index}: not a safetensors index ({e})") from None
            self.files = {name: directory / f for name, f in weight_map.items()}
        elif (directory / SINGLE_FILE).is_file():
            with safe_open(str(directory / SINGLE_FILE), "pt") as f:
                self.files = {name: directory / SINGLE_FILE for name in f.keys()}
        elif pickles:
            raise ValueError(
                f"{directory / pickles[0]}: pickle checkpoints are not loaded (unpickling can run arbitrary code). "
                "Convert it to safetensors first, e.g. in Python: "
                "LlamaForCausalLM.from_pretrained(dir).save_pretrained(out_dir, safe_serialization=True)"
            )
        else:
            raise FileNotFoundError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE} found")
        missing_files = sorted({str(p) for p in self.files.values() if not p.is_file()})
        if missing_files:
            raise FileNotFoundError(f"{index}: lists weight files that do not exist: {', '.join(missing_files)}")
        self._open: dict[Path, Any] = {}

    def handle(self, name: str):
        path = self.files[name]
        if path not in self._open:
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path]

    def shape(self, name: str) -> list[int]:
        return list(self.handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self.handle(name).get_slice(name).get_dtype()

    def rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self.handle(name).get_slice(name)[start:stop]

    def full(self, name: str) -> torch.Tensor:
        return self.handle(name).get_tensor(name)


def _local_rows(param: torch.Tensor) -> tuple[int, int] | None:
    """For a parameter sharded on dim 0 (FSDP), the global rows this rank holds."""
    if not isinstance(param, DTensor):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    if any(o != 0 for o in offset[1:]) or list(shape[1:]) != list(param.shape[1:]):
        raise ValueError("only parameters sharded along their first dimension can be loaded piecewise")
    return offset[0], offset[0] + shape[0]


def load_hf_weights(model: nn.Module, directory: str | Path) -> None:
    """Fills ``model`` (an Ember ``Llama``, possibly sharded) with the checkpoint's weights.

    Every parameter must be found with the right shape, and every tensor in the
    checkpoint must be used; otherwise the error names each one."""
    directory = Path(directory)
    files = _WeightFiles(directory)
    wanted: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        wanted[hf_name(name)] = param
    tied = getattr(getattr(model, "config", None), "tie_word_embeddings", False)
    missing = sorted(n for n in wanted if n not in files.files and not (tied and n == "lm_head.weight"))
    unexpected = sorted(n for n in files.files if n not in wanted and not n.endswith("rotary_emb.inv_freq") and not (tied and n == "lm_head.weight"))
    wrong = [
        f"{n}: checkpoint {files.shape(n)}, model {list(p.shape)}"
        for n, p in wanted.items()
        if n in files.files and files.shape(n) != list(p.shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors: {', '.join(missing)}")
        if unexpected:
            parts.append(f"unexpected tensors: {', '.join(unexpected)}")
        if wrong:
            parts.append(f"shape mismatches: {'; '.join(wrong)}")
        raise ValueError(f"{directory}: does not match the model ({'; '.join(parts)})")
    with torch.no_grad():
        for n, param in wanted.items():
            if n not in files.files:
                continue  # the tied output layer, filled through the embedding
            rows = _local_rows(param)
            local = param.to_local() if isinstance(param, DTensor) else param
            src = files.full(n) if rows is None else files.rows(n, *rows)
            local.copy_(src.to(dtype=local.dtype))


def load_hf_checkpoint(directory: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """A Hugging Face Llama checkpoint as an Ember ``Llama`` on ``device``."""
    from .llama import Llama

    cfg = config_from_hf(directory)
    with torch.device("meta"):
        model = Llama(cfg)
    model.to_empty(device=device)
    load_hf_weights(model, directory)
    if dtype is not None:
        model.to(dtype)
        model.reset_rope()
    return model


# ---------------------------------------------------------------------------
# Writing


def hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: LlamaConfig) -> dict[str, torch.Tensor]:
    """Ember state dict -> Hugging Face names (the tied output layer left out, as HF does)."""
    out = {}
    for name, tensor in state_dict.items():
        if name.startswith(("rope_cos", "rope_sin")):
            continue
        theirs = hf_name(name)
        if cfg.tie_word_embeddings and theirs == "lm_head.weight":
            continue
        out[theirs] = tensor.detach().contiguous()
    return out


def save_hf_checkpoint(
    model_or_state: nn.Module | dict[str, torch.Tensor],
    directory: str | Path,
    config: LlamaConfig | None = None,
    *,
    dtype: torch.dtype | None = None,
    tokenizer_dir: str | Path | None = None,
    shard_bytes: int = SHARD_BYTES,
    overwrite: bool = False,
) -> Path:
    """Writes ``config.json`` and safetensors weights (sharded above ``shard_bytes``, with
    an index) that ``transformers.LlamaForCausalLM.from_pretrained`` loads, the tokenizer
    files found in ``tokenizer_dir``, and ``ember_export.json`` listing them all.

    ``directory`` must be new, empty, or (with ``overwrite``) an earlier export: see
    :func:`check_export_dir`. The files are written to a temporary directory beside it and
    moved into place at the end, so a crash never leaves a partial export under its name."""
    out = Path(directory)
    check_export_dir(out, overwrite=overwrite)  # before the work, and again before the files move in
    if isinstance(model_or_state, nn.Module):
        config = config or model_or_state.config
        state = model_or_state.state_dict()
    else:
        state = model_or_state
    if config is None:
        raise ValueError("save_hf_checkpoint needs the model's LlamaConfig when given a state dict")
    tensors = hf_state_dict(state, config)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    tensors = {k: v.cpu() for k, v in tensors.items()}
    tmp = _temp_dir_for(out)
    try:
        files = _write_export(tmp, tensors, config, tokenizer_dir, shard_bytes)
        _install_export(tmp, out, files, overwrite)
    finally:
        if tmp.is_dir():  # a failure on the way: the directory is this call's own
            shutil.rmtree(tmp)
    return out


def _write_export(tmp: Path, tensors: dict[str, torch.Tensor], config: LlamaConfig, tokenizer_dir: str | Path | None, shard_bytes: int) -> list[str]:
    """Writes the export into ``tmp`` (marker last, every file synced); returns its file names."""
    any_dtype = next(iter(tensors.values())).dtype
    (tmp / CONFIG_FILE).write_text(json.dumps(config_to_hf(config, any_dtype), indent=2) + "\n")
    shards = _split(tensors, shard_bytes)
    if len(shards) == 1:
        save_file(shards[0], str(tmp / SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, str(tmp / fname), metadata={"format": "pt"})
            weight_map.update({k: fname for k in shard})
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (tmp / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")
    if tokenizer_dir is not None:
        for fname in TOKENIZER_FILES:
            src = Path(tokenizer_dir) / fname
            if src.is_file():
                shutil.copy2(src, tmp / fname)
    files = sorted({p.name for p in tmp.iterdir()} | {EXPORT_MARKER})
    _write_marker(tmp / EXPORT_MARKER, files, complete=True)
    for name in files:
        _fsync(tmp / name)
    _fsync(tmp)
    return files


# ---------------------------------------------------------------------------
# The export directory: Ember replaces only what it wrote
#
# An export directory may be one the user already uses (a run directory, ``..``),
# so an export never deletes or overwrites a file Ember did not write. Ember's
# files are recognised by the marker every export ends with, which lists them.

EXPORT_MARKER = "ember_export.json"
_MARKER_FORMAT = "ember-hf-export"
_SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")
_INTERIM_MARKER = ".ember_export.interim.json"  # in the temporary directory, on its way to the export
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.tmp-(?P<pid>\d+)$")


def _is_export_file(name: str) -> bool:
    """Whether an export writes files of this name. A marker that lists any other name was
    not written by Ember, and is not trusted to say which files may be removed."""
    return name in (CONFIG_FILE, SINGLE_FILE, INDEX_FILE, EXPORT_MARKER, *TOKENIZER_FILES) or bool(_SHARD_NAME.match(name))


def check_export_dir(directory: str | Path, *, overwrite: bool = False) -> list[str]:
    """Checks that a Hugging Face export may be written to ``directory``; returns the files of
    the earlier export there that it replaces (empty when there is none).

    Allowed: a directory that does not exist, an empty one, and, with ``overwrite``, one
    holding an earlier export (its ``ember_export.json`` names the files it consists of;
    only those are replaced or removed, any other file there is left alone). Anything else
    (a file, a directory holding files without that marker) raises ``ValueError``:
    ``overwrite`` never lets an export into a directory Ember did not write."""
    out = Path(os.path.abspath(directory))  # `..` named as the directory it is
    if not out.exists():
        if out.is_symlink():
            raise ValueError(f"{out}: a symbolic link to nothing; pass a new or empty directory for the Hugging Face export")
        return []
    if not out.is_dir():
        raise ValueError(f"{out}: a file, not a directory; pass a new or empty directory for the Hugging Face export")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return []
    marker = out / EXPORT_MARKER
    if not marker.is_file():
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise ValueError(
            f"{out}: holds files Ember did not write ({shown}); nothing was written. Pass a new or empty "
            f"directory for the Hugging Face export (--overwrite replaces only an earlier export, "
            f"a directory with {EXPORT_MARKER})"
        )
    earlier = _read_marker(marker)
    if not overwrite:
        raise ValueError(
            f"{out}: holds an earlier Hugging Face export; nothing was written. Pass --overwrite "
            "(overwrite=True) to replace it, or a new or empty directory"
        )
    return earlier


def _read_marker(marker: Path) -> list[str]:
    try:
        raw = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raw, why = None, f"unreadable ({e})"
    else:
        why = "not the list of files Ember writes there"
    files = raw.get("files") if isinstance(raw, dict) and raw.get("format") == _MARKER_FORMAT else None
    if not isinstance(files, list) or EXPORT_MARKER not in files or not all(isinstance(f, str) and _is_export_file(f) for f in files):
        raise ValueError(
            f"{marker}: {why}, so Ember cannot tell which files in {marker.parent} are its own; "
            "nothing was written. Pass a new or empty directory for the Hugging Face export"
        )
    return files


def _write_marker(path: Path, files: list[str], *, complete: bool) -> None:
    path.write_text(json.dumps({"format": _MARKER_FORMAT, "complete": complete, "files": files}, indent=2) + "\n")


def _interrupted_export(directory: Path) -> Path | None:
    """The marker of an export into ``directory`` that was interrupted while it replaced an
    earlier one (its files are a mix of both), else None."""
    marker = directory / EXPORT_MARKER
    try:
        raw = json.loads(marker.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return marker if isinstance(raw, dict) and raw.get("format") == _MARKER_FORMAT and raw.get("complete") is False else None


def _temp_dir_for(out: Path) -> Path:
    """A new temporary directory beside ``out`` (on its file system, so the files move in by
    renaming), after removing those that crashed exports into ``out`` left behind."""
    out = out.resolve()
    if out.name == "":
        raise ValueError(f"{out}: the file system root cannot hold a Hugging Face export; pass a new or empty directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    for leftover in out.parent.glob(f".{glob.escape(out.name)}.tmp-*"):
        m = _TEMP_NAME.match(leftover.name)
        if m and m.group("name") == out.name and _is_own_leftover(leftover, int(m.group("pid"))):
            shutil.rmtree(leftover)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    try:
        tmp.mkdir()
    except FileExistsError:
        raise ValueError(f"{tmp}: in the way of the temporary directory of the Hugging Face export; move it away") from None
    return tmp


def _is_own_leftover(path: Path, pid: int) -> bool:
    """Whether ``path`` is a temporary export directory whose writer is gone: only export
    files in it, and its process id (the name's) is this process or not running."""
    if path.is_symlink() or not path.is_dir():
        return False
    if not all(p.is_file() and not p.is_symlink() and (_is_export_file(p.name) or p.name == _INTERIM_MARKER) for p in path.iterdir()):
        return False
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _install_export(tmp: Path, out: Path, files: list[str], overwrite: bool) -> None:
    """Moves the finished export in ``tmp`` to ``out``."""
    earlier = check_export_dir(out, overwrite=overwrite)  # it may have changed while the weights were written
    target = out.resolve()
    if not earlier:
        try:
            os.replace(tmp, target)  # atomic; replaces only an empty directory
        except OSError as e:
            raise ValueError(f"{out}: changed while the Hugging Face export was written ({e.strerror}); nothing in it was replaced") from None
    else:
        _replace_export(tmp, target, files, earlier)
    _fsync(target.parent)


def _replace_export(tmp: Path, out: Path, files: list[str], earlier: list[str]) -> None:
    """Replaces the earlier export in ``out`` file by file, leaving every file it does not list."""
    listed = set(earlier)
    clash = [f for f in files if (out / f).is_dir() or ((out / f).exists() and f not in listed)]
    if clash:
        raise ValueError(
            f"{out}: {', '.join(clash)} would be replaced, but the earlier export's {EXPORT_MARKER} does not "
            "list them (Ember did not write them); nothing was written. Move them away, or pass a new or empty directory"
        )
    # Until the new marker is in place the directory holds parts of both exports; the interim
    # marker lists them all, so a crash leaves nothing Ember would not recognise as its own.
    _write_marker(tmp / _INTERIM_MARKER, sorted(listed | set(files)), complete=False)
    os.replace(tmp / _INTERIM_MARKER, out / EXPORT_MARKER)
    for name in files:
        if name != EXPORT_MARKER:
            os.replace(tmp / name, out / name)
    for name in sorted(listed - set(files)):
        stale = out / name
        if stale.is_file() or stale.is_symlink():  # never a directory: the export wrote none
            stale.unlink()
    os.replace(tmp / EXPORT_MARKER, out / EXPORT_MARKER)
    tmp.rmdir()
    _fsync(out)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _split(tensors: dict[str, torch.Tensor], limit: int) -> list[dict[str, torch.Tensor]]:
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        n = t.numel() * t.element_size()
        if shards[-1] and size + n > limit:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += n
    return shards


def hf_names(model: nn.Module) -> Iterable[str]:
    return (hf_name(n) for n, _ in model.named_parameters())


def weights_loader(directory: str | Path) -> Callable[[nn.Module], None]:
    """An ``init_weights`` callback for strategies: fill the model from a HF checkpoint."""

    def load(model: nn.Module) -> None:
        load_hf_weights(model, directory)
        model.reset_rope()

    return load
