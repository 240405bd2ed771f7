"""Ember's run configuration: typed sections, YAML loading, dotted overrides, validation.

A config has six sections: ``model``, ``training``, ``data``, ``distributed``,
``checkpoint`` and ``logging``. ``load_config`` reads YAML, applies overrides such
as ``training.max_steps=100``, checks every key and value, and reports every
problem at once in one :class:`ConfigError`, each with its key path.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from ember.compat import AC_POLICIES, SIZE_PRESETS
from ember.model.config import PRESETS, LlamaConfig


class ConfigError(ValueError):
    """One or more problems in a configuration; ``problems`` lists ``(key path, message)``."""

    def __init__(self, problems: list[tuple[str, str]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {source}" if source else ""
        lines = [f"{len(problems)} problem{'s' if len(problems) != 1 else ''}{where}:"]
        lines += [f"  {key or '<top level>'}: {msg}" for key, msg in problems]
        super().__init__("\n".join(lines))


ARCH_FIELDS = {f.name for f in dataclasses.fields(LlamaConfig)}


@dataclass
class ModelSection:
    """Architecture: a preset (or ``type`` + ``size``), then any Hugging Face-named field overrides it."""

    preset: str | None = None
    type: Literal["llama"] = "llama"
    size: str | None = None
    # A Hugging Face checkpoint directory to start from (continual pretraining).
    init_from: str | None = None
    activation_checkpointing: Literal["none", "full", "selective"] = "none"
    compile: bool = False
    # Fields of LlamaConfig given explicitly in the YAML (vocab_size, hidden_size, ...).
    arch: dict[str, Any] = field(default_factory=dict)

    def preset_name(self) -> str | None:
        if self.preset is not None:
            return self.preset
        if self.size is not None:
            return SIZE_PRESETS.get(self.size.lower())
        return None

    def llama_config(self) -> LlamaConfig:
        if self.init_from is not None:
            # Continual pretraining: the checkpoint's own config.json is the architecture;
            # fields given explicitly still override it (e.g. max_position_embeddings).
            from ember.model.hf import config_from_hf

            return dataclasses.replace(config_from_hf(self.init_from), **self.arch)
        name = self.preset_name()
        if name is None:
            return LlamaConfig(**self.arch)
        return LlamaConfig.from_preset(name, **self.arch)


@dataclass
class TrainingSection:
    batch_size: int = 8  # samples per device per micro-step
    gradient_accumulation_steps: int = 1
    learning_rate: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    max_steps: int = 1000
    max_tokens: int | None = None  # stop once this many tokens are trained on (over all ranks)
    time_budget: str | float | None = None  # "90m", "2h", or seconds
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    clip_grad_norm: float | None = 1.0
    precision: Literal["auto", "fp32", "bf16-mixed", "bf16-true", "fp16-mixed"] = "auto"
    seed: int = 1234
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    eval_every: int | None = None  # steps between validations (None: only at the end)
    eval_batches: int | None = 50  # None: the whole validation set
    warmup_monitor_steps: int = 2  # steps excluded from throughput (warm-up, compilation)
    max_skipped_steps: int = 5  # non-finite steps in a row (each skipped) before the run stops


@dataclass
class PrepareSection:
    """``ember prepare``: text corpora to tokenize into shards (docs/prepare.md). Unused while ``inputs`` is empty."""

    inputs: list[str] | str = field(default_factory=list)  # files, directories, globs, builtin:stdlib
    output: str | None = None  # gets train/, validation/ and manifest.json
    tokenizer: str | None = None  # default: data.tokenizer
    shard_tokens: int = 100_000_000
    validation_fraction: float | None = None
    validation_count: int | None = None
    bos: bool | None = None  # null: as the tokenizer defines
    eos: bool | None = None
    text_field: str = "text"  # JSON key / Parquet column
    txt_mode: Literal["file", "line", "paragraph"] = "file"
    skip_bad: bool = False
    workers: int | None = None  # default: one per core


@dataclass
class DataSection:
    # A path, a list of paths, or {path: weight}; "builtin:stdlib" is the built-in corpus.
    # Default with data.prepare: its output's train/ (and validation/).
    train: str | list[str] | dict[str, float] | None = None
    validation: str | list[str] | None = None
    seq_len: int = 2048
    tokenizer: str = "byte"  # "byte" or a path to a Hugging Face tokenizer (for samples and prepare)
    num_threads: int = 2
    prefetch: int = 8
    cache_dir: str = "data"  # where built-in corpora are tokenized to
    prepare: PrepareSection = field(default_factory=PrepareSection)

    def prepare_arguments(self) -> dict[str, Any]:
        """``data.prepare`` as the keyword arguments of :func:`ember.data.prepare.prepare`
        (``workers`` aside); its tokenizer defaults to ``data.tokenizer``."""
        p = self.prepare
        return {
            "inputs": [p.inputs] if isinstance(p.inputs, str) else list(p.inputs),
            "output": p.output,
            "tokenizer": p.tokenizer or self.tokenizer,
            "shard_tokens": p.shard_tokens,
            "validation_fraction": p.validation_fraction,
            "validation_count": p.validation_count,
            "bos": p.bos,
            "eos": p.eos,
            "text_field": p.text_field,
            "txt_mode": p.txt_mode,
            "skip_bad": p.skip_bad,
        }


@dataclass
class FSDPSection:
    sharding_strategy: Literal["FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD"] = "FULL_SHARD"
    mixed_precision: bool = True
    # The user guide's name for model.activation_checkpointing (see Config.activation_checkpointing).
    activation_checkpointing: bool | str = False
    activation_checkpointing_policy: str | None = None
    cpu_offload: bool = False
    reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    replicate_degree: int | None = None  # HYBRID_SHARD: how many replica groups (default: one per node)


    def activation_checkpointing_mode(self) -> str:
        """What ``activation_checkpointing`` (+ ``_policy``) asks for: none, full or selective."""
        ac = self.activation_checkpointing
        if ac is False or ac == "none":
            return "none"
        name = self.activation_checkpointing_policy or ("full" if ac is True else str(ac))
        if name not in AC_POLICIES:
            key = "activation_checkpointing_policy" if self.activation_checkpointing_policy else "activation_checkpointing"
            raise ValueError(f"distributed.fsdp_config.{key}: unknown policy {name!r}; known: {', '.join(AC_POLICIES)}")
        return AC_POLICIES[name]


@dataclass
class DDPSection:
    backend: str | None = None
    find_unused_parameters: bool = False
    static_graph: bool = False


@dataclass
class DistributedSection:
    strategy: Literal["auto", "single", "ddp", "fsdp", "deepspeed"] = "auto"
    fsdp_config: FSDPSection = field(default_factory=FSDPSection)
    ddp_config: DDPSection = field(default_factory=DDPSection)
    # A DeepSpeed config dict, or the path of a DeepSpeed JSON file.
    deepspeed_config: dict[str, Any] | str | None = None


@dataclass
class CheckpointSection:
    dir: str | None = None  # default: <run dir>/checkpoints
    every_n_steps: int | None = 500
    keep_last: int | None = 3
    resume: str | None = None  # None, "auto", or a checkpoint directory
    save_final: bool = True
    export_hf: bool = True


@dataclass
class LoggingSection:
    run_dir: str = "runs"
    run_name: str | None = None  # default: the config file's name
    log_every: int = 10
    progress_bar: bool = True
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str | None = None


@dataclass
class Config:
    model: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    data: DataSection = field(default_factory=DataSection)
    distributed: DistributedSection = field(default_factory=DistributedSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    logging: LoggingSection = field(default_factory=LoggingSection)
    source: str | None = field(default=None, compare=False)

    @property
    def activation_checkpointing(self) -> str:
        """The run's activation-checkpointing mode: none, full or selective. Two keys set it,
        ``model.activation_checkpointing`` and its alias from the user guide,
        ``distributed.fsdp_config.activation_checkpointing`` (+ ``_policy``), which applies
        under every strategy. Every reader of the setting reads this property; it raises
        ``ValueError`` naming both keys when both are set (also when the config is read)."""
        model_mode = self.model.activation_checkpointing
        fsdp_mode = self.distributed.fsdp_config.activation_checkpointing_mode()
        if model_mode != "none" and fsdp_mode != "none":
            raise ValueError(_AC_CONFLICT.format(model_mode, fsdp_mode))
        return fsdp_mode if model_mode == "none" else model_mode

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("source")
        arch = d["model"].pop("arch")
        d["model"].update(arch)
        d["training"]["betas"] = list(d["training"]["betas"])
        return d

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def run_name(self) -> str:
        if self.logging.run_name:
            return self.logging.run_name
        return Path(self.source).stem if self.source else "run"

    @property
    def run_dir(self) -> Path:
        return Path(self.logging.run_dir) / self.run_name

    @property
    def checkpoint_dir(self) -> Path:
        return Path(self.checkpoint.dir) if self.checkpoint.dir else self.run_dir / "checkpoints"


# ---------------------------------------------------------------------------
# Typed construction from plain data


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} values"
    if origin is list:
        return "a list"
    if origin is dict:
        return "a mapping"
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


_NO = object()


def _coerce(value: Any, tp: Any) -> Any:
    """Returns ``value`` as type ``tp``, or ``_NO`` when it is not one."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if tp is type(None):
        return None if value is None else _NO
    if origin is Literal:
        return value if value in typing.get_args(tp) else _NO
    if origin in (Union, types.UnionType):
        for a in typing.get_args(tp):
            r = _coerce(value, a)
            if r is not _NO:
                return r
        return _NO
    if tp is bool:
        return value if isinstance(value, bool) else _NO
    if tp is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NO
    if tp is float:
        # YAML 1.1 reads "3e-4" (no dot) as a string, so strings are read as numbers too.
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            return _NO
        try:
            number = float(value)
        except (ValueError, OverflowError):  # OverflowError: an integer beyond the float range
            return _NO
        # No key means anything by inf or nan (.inf, .nan in YAML): a learning rate, a norm or
        # a weight that is not finite turns every value it touches into nan.
        return number if math.isfinite(number) else _NO
    if tp is str:
        return value if isinstance(value, str) else _NO
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, list):
            return _NO
        out = [_coerce(v, item) for v in value]
        return _NO if any(o is _NO for o in out) else out
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return _NO
        out = tuple(_coerce(v, a) for v, a in zip(value, args))
        return _NO if any(o is _NO for o in out) else out
    if origin is dict:
        k_tp, v_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return _NO
        out = {_coerce(k, k_tp): _coerce(v, v_tp) for k, v in value.items()}
        return _NO if any(k is _NO or v is _NO for k, v in out.items()) else out
    raise TypeError(f"unsupported config type {tp}")


def _show(value: Any) -> str:
    """``value`` as a message shows it; an integer of thousands of digits by its length."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**40:
        return f"a {len(str(abs(value)))}-digit integer"
    return repr(value)


def _not_finite(value: Any) -> bool:
    """Whether ``value`` is, or holds, a number that no float key can take: inf, nan, or an
    integer beyond the float range."""
    if isinstance(value, (list, tuple)):
        return any(_not_finite(v) for v in value)
    if isinstance(value, dict):
        return any(_not_finite(v) for v in value.values())
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        return False
    try:
        number = float(value)
    except ValueError:
        return False
    except OverflowError:
        return True
    return not math.isfinite(number)


def _takes_float(tp: Any) -> bool:
    if tp is float:
        return True
    return typing.get_origin(tp) is not Literal and any(_takes_float(a) for a in typing.get_args(tp))


def _type_problem(value: Any, tp: Any) -> str:
    """Why ``value`` (which ``_coerce`` refused) is not a ``tp``."""
    if _takes_float(tp) and _not_finite(value):
        many = isinstance(value, (list, tuple, dict))
        return f"{'every number must be' if many else 'must be'} finite, got {_show(value)}"
    return f"expected {_type_name(tp)}, got {_show(value)}"


# The range of a signed 64-bit integer, what torch and the Rust loader take. Every integer
# key is checked against it as it is read, so a typo such as 10**20 is reported here, naming
# the key, not as an OverflowError when the value reaches them.
_INT64 = (-(2**63), 2**63 - 1)


def _int_problem(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and not _INT64[0] <= value <= _INT64[1]:
        return f"must fit in a signed 64-bit integer (at most {_INT64[1]}), got {_show(value)}"
    return None


def _unknown(key: str, known: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(key, list(known), n=1)
    return "unknown key" + (f" (did you mean {close[0]!r}?)" if close else "")


def _build(cls: type, data: Any, path: str, problems: list[tuple[str, str]]) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        problems.append((path, f"expected a mapping of keys, got {type(data).__name__}"))
        return cls()
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in ("source", "arch")}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        key_path = f"{path}.{key}" if path else str(key)
        if cls is ModelSection and key in ARCH_FIELDS:
            kwargs.setdefault("arch", {})[key] = value
            continue
        if key not in fields:
            known = list(fields) + (sorted(ARCH_FIELDS) if cls is ModelSection else [])
            problems.append((key_path, _unknown(str(key), known)))
            continue
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = _build(tp, value, key_path, problems)
            continue
        coerced = _coerce(value, tp)
        if coerced is _NO:
            problems.append((key_path, _type_problem(value, tp)))
        elif problem := _int_problem(coerced):
            problems.append((key_path, problem))
        else:
            kwargs[key] = coerced
    if cls is ModelSection and "arch" in kwargs:
        kwargs["arch"] = _check_arch(kwargs["arch"], path, problems)
    return cls(**kwargs)


def _check_arch(arch: dict[str, Any], path: str, problems: list[tuple[str, str]]) -> dict[str, Any]:
    hints = typing.get_type_hints(LlamaConfig)
    out = {}
    for key, value in arch.items():
        coerced = _coerce(value, hints[key])
        if coerced is _NO:
            problems.append((f"{path}.{key}", _type_problem(value, hints[key])))
        elif problem := _int_problem(coerced):
            problems.append((f"{path}.{key}", problem))
        else:
            out[key] = coerced
    return out


# ---------------------------------------------------------------------------
# Consistency checks across fields

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)?\s*$")


def parse_duration(value: str | float | int) -> float:
    """Seconds in ``value``: a number of seconds, or a string like ``"90m"``, ``"2h"``, ``"1.5d"``."""
    if isinstance(value, (int, float)):
        return float(value)
    m = _DURATION.match(value)
    if not m:
        raise ValueError(f"cannot read {value!r} as a duration; use seconds or a number with s, m, h or d")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400, None: 1}[m.group(2)]


# Upper bounds within the 64-bit range. Each is far above any real run: they refuse a typo
# (a few zeros too many) here, naming the key, instead of an allocation that cannot succeed,
# or a loader that holds memory without bound, once training starts.
# A micro-batch is batch_size x seq_len tokens, held as int64 inputs and labels (16 bytes a
# token) on the host: at 2**31 tokens that is 32 GiB for one batch, before the model sees it.
MAX_BATCH_TOKENS = 2**31 - 1
# Each batch prepared ahead is host memory, pinned (page-locked, never paged out) when
# training on a GPU. Batches ahead only cover a read that is slower than usual; beyond a few
# dozen they hold memory and nothing more.
MAX_PREFETCH = 64
# Each loader thread is an operating-system thread, all started with the loader.
MAX_THREADS = 1024
# Any model dimension. The Llama presets' largest is 131,072 (positions); at 2**31 a single
# weight matrix with a width of 1,024 is 4 TiB in bf16.
MAX_ARCH_SIZE = 2**31 - 1
_ARCH_SIZES = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings",
)  # fmt: skip


def _size(nbytes: int) -> str:
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        nbytes /= 1024
        if nbytes < 1024:
            break
    return f"{nbytes:.1f} {unit}"


def _file_in_the_way(path: Path) -> Path | None:
    """The file (not a directory) at ``path`` or above it that stops ``path`` from being
    made a directory, if there is one."""
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():  # a dangling link cannot be made a directory either
            return None if p.is_dir() else p
    return None


def _directory_problems(cfg: Config) -> list[tuple[str, str]]:
    """The run and checkpoint directories are made at the first log line and the first save,
    possibly hours in: a file in their place is reported now."""
    p = []
    for key, path, what in (
        ("logging.run_dir", cfg.run_dir, "the run directory"),
        ("checkpoint.dir", cfg.checkpoint_dir, "the checkpoint directory" + ("" if cfg.checkpoint.dir else " (by default <run dir>/checkpoints)")),
    ):
        blocker = _file_in_the_way(path)
        if blocker == path:
            p.append((key, f"{path} is a file, not a directory; name a directory, or move the file"))
        elif blocker is not None:
            p.append((key, f"{blocker} is a file, so {path}, {what}, cannot be made under it; name another directory, or move the file"))
        if blocker is not None:
            break  # the checkpoint directory is usually under the run directory: one report
    return p


_AC_CONFLICT = (
    "model.activation_checkpointing: {!r}, and distributed.fsdp_config.activation_checkpointing asks for {!r}: "
    "they are two names for one setting; give only one (delete the other from the config)"
)


def _check_aliases(cfg: Config) -> list[tuple[str, str]]:
    """Problems with keys that are two names for one setting (see ``Config.activation_checkpointing``)."""
    try:
        cfg.activation_checkpointing
    except ValueError as e:
        key, _, message = str(e).partition(": ")
        return [(key, message)]
    return []


def _validate(cfg: Config) -> list[tuple[str, str]]:
    p: list[tuple[str, str]] = []
    m, t, d, c, lg = cfg.model, cfg.training, cfg.data, cfg.checkpoint, cfg.logging

    name = m.preset_name()
    if m.init_from is not None:
        pass  # the architecture comes from the checkpoint's config.json, read when the orchestrator is built
    elif m.preset is not None and m.size is not None:
        p.append(("model.size", f"give model.preset or model.size, not both (preset {m.preset!r}, size {m.size!r})"))
    elif m.preset is not None and m.preset not in PRESETS:
        p.append(("model.preset", f"unknown preset {m.preset!r}; known: {', '.join(sorted(PRESETS))}"))
    elif m.preset is None and m.size is not None and name is None:
        p.append(("model.size", f"no preset for size {m.size!r}; known sizes: {', '.join(sorted(SIZE_PRESETS))}"))
    else:
        try:
            llama = m.llama_config()
        except (TypeError, ValueError) as e:
            missing = sorted(
                f.name
                for f in dataclasses.fields(LlamaConfig)
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING and f.name not in m.arch
            )
            detail = f"missing {', '.join(missing)}" if missing else str(e)
            p.append(("model", f"no preset given and the architecture is incomplete: {detail}"))
        else:
            p += [(f"model.{k}", msg) for k, msg in llama.validate()]
            for k in _ARCH_SIZES:
                if (value := getattr(llama, k)) is not None and value > MAX_ARCH_SIZE:
                    p.append((f"model.{k}", f"must be at most {MAX_ARCH_SIZE}, got {value}"))
            for k, value in (llama.rope_scaling or {}).items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and _not_finite(value):
                    p.append((f"model.rope_scaling.{k}", f"must be finite, got {_show(value)}"))
            if llama.max_position_embeddings < d.seq_len and m.init_from is None:
                p.append(("data.seq_len", f"{d.seq_len} exceeds model.max_position_embeddings ({llama.max_position_embeddings})"))

    for key in ("batch_size", "gradient_accumulation_steps", "max_steps"):
        if getattr(t, key) < 1:
            p.append((f"training.{key}", f"must be at least 1, got {getattr(t, key)}"))
    if t.warmup_steps < 0:
        p.append(("training.warmup_steps", f"must not be negative, got {t.warmup_steps}"))
    elif t.warmup_steps > t.max_steps:
        p.append(("training.warmup_steps", f"{t.warmup_steps} is beyond training.max_steps ({t.max_steps})"))
    if t.learning_rate <= 0:
        p.append(("training.learning_rate", f"must be positive, got {t.learning_rate}"))
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        p.append(("training.min_lr_ratio", f"must be between 0 and 1, got {t.min_lr_ratio}"))
    if t.weight_decay < 0:
        p.append(("training.weight_decay", f"must not be negative, got {t.weight_decay}"))
    if not all(0.0 <= b < 1.0 for b in t.betas):
        p.append(("training.betas", f"each beta must be in [0, 1), got {list(t.betas)}"))
    if t.clip_grad_norm is not None and t.clip_grad_norm <= 0:
        p.append(("training.clip_grad_norm", f"must be positive or null, got {t.clip_grad_norm}"))
    if t.max_tokens is not None and t.max_tokens < 1:
        p.append(("training.max_tokens", f"must be positive, got {t.max_tokens}"))
    if t.time_budget is not None:
        try:
            seconds = parse_duration(t.time_budget)
            if not 0 < seconds < math.inf:  # "999...9d" reads as inf seconds
                p.append(("training.time_budget", f"must be positive and finite, got {t.time_budget!r}"))
        except ValueError as e:
            p.append(("training.time_budget", str(e)))
    if t.eval_every is not None and t.eval_every < 1:
        p.append(("training.eval_every", f"must be at least 1 or null, got {t.eval_every}"))
    if t.eval_batches is not None and t.eval_batches < 1:
        p.append(("training.eval_batches", f"must be at least 1 or null, got {t.eval_batches}"))
    if t.max_skipped_steps < 1:
        p.append(("training.max_skipped_steps", f"must be at least 1, got {t.max_skipped_steps}"))
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device):
        p.append(("training.device", f"expected auto, cpu, cuda or cuda:N, got {t.device!r}"))

    if t.seed < 0:
        p.append(("training.seed", f"must not be negative, got {t.seed}"))
    if (d.train is None or (isinstance(d.train, (list, dict)) and not d.train)) and not d.prepare.inputs:
        p.append(("data.train", "required: a shard path, a list of paths, {path: weight}, or builtin:stdlib (or data.prepare)"))
    elif isinstance(d.train, dict):
        for k, w in d.train.items():
            if w <= 0:
                p.append((f"data.train.{k}", f"weight must be positive, got {w}"))
    if d.seq_len < 1:
        p.append(("data.seq_len", f"must be at least 1, got {d.seq_len}"))
    if d.num_threads < 1 or d.prefetch < 1:
        p.append(("data", "num_threads and prefetch must be at least 1"))
    if d.num_threads > MAX_THREADS:
        p.append(("data.num_threads", f"must be at most {MAX_THREADS} (each is a thread started with the loader), got {d.num_threads}"))
    batch_tokens = t.batch_size * d.seq_len
    if batch_tokens > MAX_BATCH_TOKENS:
        p.append((
            "training.batch_size",
            f"{t.batch_size} samples of data.seq_len {d.seq_len} tokens is {batch_tokens} tokens per micro-batch, "
            f"above the limit of {MAX_BATCH_TOKENS} ({_size(16 * batch_tokens)} of inputs and labels for one batch)",
        ))
    if d.prefetch > MAX_PREFETCH:
        p.append((
            "data.prefetch",
            f"must be at most {MAX_PREFETCH}, got {d.prefetch}: each batch prepared ahead holds {t.batch_size} x {d.seq_len} tokens "
            f"at 16 bytes in host memory (pinned on a GPU), {_size(16 * batch_tokens * d.prefetch)} for {d.prefetch} batches",
        ))
    p += _validate_prepare(d)

    if c.every_n_steps is not None and c.every_n_steps < 1:
        p.append(("checkpoint.every_n_steps", f"must be at least 1 or null, got {c.every_n_steps}"))
    if c.keep_last is not None and c.keep_last < 1:
        p.append(("checkpoint.keep_last", f"must be at least 1 or null, got {c.keep_last}"))
    for key, module in (("tensorboard", "tensorboard"), ("wandb", "wandb")):
        if getattr(lg, key) and importlib.util.find_spec(module) is None:
            p.append((f"logging.{key}", f"is true but {module} is not installed (pip install {module})"))
    if lg.log_every < 1:
        p.append(("logging.log_every", f"must be at least 1, got {lg.log_every}"))
    if lg.run_name is not None and (not lg.run_name or "/" in lg.run_name or lg.run_name in (".", "..")):
        p.append(("logging.run_name", f"must be a plain directory name, got {lg.run_name!r}"))
    else:
        p += _directory_problems(cfg)
    return p


def _validate_prepare(d: DataSection) -> list[tuple[str, str]]:
    from ember.data.prepare import option_problems

    pr = d.prepare
    if not pr.inputs:
        return [("data.prepare.inputs", "required when data.prepare.output is set")] if pr.output else []
    p = [] if pr.output else [("data.prepare.output", "required: the directory to write the shards to")]
    if pr.tokenizer is not None and pr.tokenizer != d.tokenizer and d.tokenizer != "byte":
        p.append(("data.prepare.tokenizer", f"{pr.tokenizer!r} differs from data.tokenizer {d.tokenizer!r}; give it once, as data.tokenizer"))
    p += [
        (f"data.prepare.{key}", msg)
        for key, msg in option_problems(
            shard_tokens=pr.shard_tokens,
            validation_fraction=pr.validation_fraction,
            validation_count=pr.validation_count,
            txt_mode=pr.txt_mode,
            text_field=pr.text_field,
            workers=pr.workers,
        )
    ]
    return p


# ---------------------------------------------------------------------------
# Loading


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader (the same safe constructs), with an integer too long for
    Python to read (over 4,300 digits) reported at its line instead of as a bare ValueError."""

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # Python refuses to convert integers of over 4,300 digits
            problem = f"an integer of {len(node.value)} characters, too long to read"
            raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_yaml_int)

_MERGE = "tag:yaml.org,2002:merge"


def _repeated_keys(loader: _Loader, root: yaml.Node) -> list[tuple[str, list[int]]]:
    """Keys given more than once in one mapping, as ``(key path, 1-based lines)`` ordered by
    first line. YAML keeps the last silently: a second ``training:`` section would discard
    the first. A merge key (``<<``) and the keys after it that replace merged values are
    not repeats."""
    found: list[tuple[str, list[int]]] = []
    visited: set[int] = set()  # an alias names a node already walked (and may name its own parent)

    def walk(node: yaml.Node, path: str) -> None:
        if id(node) in visited:
            return
        visited.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                walk(item, f"{path}[{i}]")
        elif isinstance(node, yaml.MappingNode):
            lines: dict[Any, list[int]] = {}
            for key_node, value_node in node.value:
                if isinstance(key_node, yaml.ScalarNode) and key_node.tag != _MERGE:
                    key = loader.construct_object(key_node)  # so that 1 and 0x1, or true and True, are one key
                    lines.setdefault(key, []).append(key_node.start_mark.line + 1)
                    walk(value_node, f"{path}.{key}" if path else str(key))
                else:
                    walk(value_node, path)
            found.extend((f"{path}.{k}" if path else str(k), at) for k, at in lines.items() if len(at) > 1)

    walk(root, "")
    return sorted(found, key=lambda item: item[1][0])


def _load_yaml(text: str) -> tuple[Any, list[tuple[str, list[int]]]]:
    """The document in ``text`` as ``yaml.safe_load`` reads it, or None with the repeated keys
    (see :func:`_repeated_keys`) when there are any; raises ``yaml.YAMLError``."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None, []
        repeated = _repeated_keys(loader, node)
        return (None if repeated else loader.construct_document(node)), repeated
    finally:
        loader.dispose()


def _times(n: int) -> str:
    return "twice" if n == 2 else f"{n} times"


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.max_steps=100"`` -> (["training", "max_steps"], 100); the value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError([(text, "an override must look like section.key=value")])
    try:
        value, repeated = _load_yaml(raw) if raw.strip() else (None, [])
    except yaml.YAMLError as e:
        raise ConfigError([(key, f"cannot read value {raw!r}: {e}")]) from None
    if repeated:
        raise ConfigError([(f"{key}.{path}", f"given {_times(len(at))} in the override {text!r}") for path, at in repeated])
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: typing.Iterable[str]) -> dict[str, Any]:
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for i, k in enumerate(keys[:-1]):
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError([(".".join(keys[: i + 1]), f"is not a section, cannot set {'.'.join(keys)}")])
            node = nxt
        node[keys[-1]] = value
    return raw


def config_from_dict(raw: dict[str, Any] | None, source: str | None = None) -> Config:
    """Builds and validates a :class:`Config`; raises :class:`ConfigError` listing every problem."""
    problems: list[tuple[str, str]] = []
    cfg = _build(Config, raw or {}, "", problems)
    cfg.source = source
    # Cross-field checks run on what could be read, so one pass reports everything;
    # a key already reported is not reported again.
    reported = {k for k, _ in problems}
    problems += [(k, m) for k, m in _check_aliases(cfg) + _validate(cfg) if k not in reported]
    if problems:
        raise ConfigError(problems, source)
    return cfg


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of sections in a YAML file; every problem with the file itself (not UTF-8,
    YAML syntax, a key given twice) raises :class:`ConfigError` naming the file and line."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: config file not found") from None
    except OSError as e:
        raise ConfigError([("", f"cannot read the file: {e.strerror or e}")], str(path)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        where = f"line {line}, byte {e.start}"
        problem = f"the file is not UTF-8 text ({e.reason}: {data[e.start:e.start + 4]!r}); a config is a YAML file saved as UTF-8"
        raise ConfigError([(where, problem)], str(path)) from None
    try:
        raw, repeated = _load_yaml(text)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, as in a binary file
        line = text.count("\n", 0, e.position) + 1
        where = f"line {line}, byte {len(text[:e.position].encode())}"
        problem = f"character #x{e.character:04x}, which YAML does not allow ({e.reason}); is this a binary file?"
        raise ConfigError([(where, problem)], str(path)) from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        problem = getattr(e, "problem", None) or str(e)
        kind = "YAML error" if isinstance(e, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise ConfigError([(where, f"{kind}: {problem}")], str(path)) from None
    if repeated:
        problems = []
        for key, at in repeated:
            lines = ", ".join(map(str, at[:-1])) + f" and {at[-1]}"
            problems.append((key, f"given {_times(len(at))}, at lines {lines}; give each key once (YAML would keep only the last)"))
        raise ConfigError(problems, str(path))
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError([("", f"the file must hold a mapping of sections, got {type(raw).__name__}")], str(path))
    return raw


def load_config(path: str | Path | None = None, overrides: typing.Iterable[str] = ()) -> Config:
    """Loads a YAML config (or the built-in quickstart when ``path`` is None), applies overrides, validates.

    ``path`` may also name a config shipped with Ember (``quickstart``, ``llama3.2-1b``, ...),
    see :func:`builtin_configs`.
    """
    if path is None:
        path = "quickstart"
    resolved = resolve_config_path(path)
    raw = apply_overrides(read_yaml(resolved), overrides)
    return config_from_dict(raw, str(resolved))


CONFIG_DIR = Path(__file__).parent / "configs"


def builtin_configs() -> dict[str, Path]:
    """Example configs shipped inside the package, by name."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def resolve_config_path(path: str | Path) -> Path:
    p = Path(path)
    if p.is_file():
        return p
    if p.is_dir() and str(path) not in builtin_configs():
        raise FileNotFoundError(f"{path}: is a directory, not a config file")
    shipped = builtin_configs()
    if str(path) in shipped:
        return shipped[str(path)]
    raise FileNotFoundError(f"{path}: config file not found (built-in configs: {', '.join(shipped)})")
