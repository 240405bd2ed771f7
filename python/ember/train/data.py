"""A run's data, from its config: the shards named by ``data`` (preparing ``data.prepare``'s
output or the built-in corpus first when needed), checked against the model's vocabulary,
and the training and validation loaders over them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ember.config import Config, DataSection
from ember.data import TokenLoader, check_vocabulary
from ember.data.builtin import STDLIB, stdlib_shards
from ember.distributed.base import Strategy


def prepared_data_paths(data: DataSection, *, progress: bool | None = None) -> tuple[Any, Any]:
    """The train and validation paths of ``data.prepare``'s output, preparing it first
    unless it is finished (:func:`ember.data.prepare.ensure_prepared`). ``data.train`` and
    ``data.validation``, when given, take precedence over the prepared paths."""
    from ember.data.prepare import ensure_prepared, make_options

    args = data.prepare_arguments()
    inputs, out = args.pop("inputs"), Path(args.pop("output"))
    manifest = ensure_prepared(inputs, out, make_options(**args), workers=data.prepare.workers, progress=progress)
    train = data.train if data.train is not None else str(out / "train")
    validation = data.validation
    if validation is None and manifest["splits"]["validation"]["documents"]:
        validation = str(out / "validation")
    return train, validation


def data_paths(config: Config, strategy: Strategy) -> tuple[Any, Any]:
    """Training and validation paths (or ``{path: weight}`` blends) for the loaders. Data
    is prepared once, on the main rank, before any rank opens it."""
    d = config.data
    if d.prepare.inputs:
        with strategy.main_first():
            train, val = prepared_data_paths(d, progress=config.logging.progress_bar and strategy.is_main)
    else:
        train, val = d.train, d.validation
    if train == STDLIB or val == STDLIB:
        with strategy.main_first():
            std_train, std_val = stdlib_shards(d.cache_dir)
        if train == STDLIB:
            train = str(std_train)
            val = str(std_val) if val is None else val
        if val == STDLIB:
            val = str(std_val)
    return train, val


def build_loaders(config: Config, strategy: Strategy, vocab_size: int) -> tuple[TokenLoader, TokenLoader | None]:
    """This rank's training loader (shuffled, seeded) and validation loader (in order, or None)."""
    d, t = config.data, config.training
    train_paths, val_paths = data_paths(config, strategy)
    check_vocabulary(train_paths, vocab_size, "data.train")
    if val_paths:
        check_vocabulary(val_paths, vocab_size, "data.validation")
    common = dict(
        seq_len=d.seq_len,
        batch_size=t.batch_size,
        rank=strategy.rank,
        world_size=strategy.world_size,
        num_threads=d.num_threads,
        prefetch=d.prefetch,
        pin_memory=strategy.device.type == "cuda",
        vocab_size=vocab_size,
    )
    train = TokenLoader(train_paths, seed=t.seed, shuffle=True, **common)
    val = TokenLoader(val_paths, shuffle=False, **common) if val_paths else None
    if val is not None and len(val) == 0:
        # Found now, not after training, when the run could no longer save its final checkpoint.
        raise ValueError(
            f"data.validation {val_paths!r} yields no full batch of {t.batch_size} x {d.seq_len} tokens "
            f"on each of {strategy.world_size} rank(s); give more validation data or a smaller training.batch_size"
        )
    return train, val
