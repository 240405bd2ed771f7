"""Checkpoint directories: atomic writes, discovery of the latest complete one, pruning.

Each checkpoint is a directory ``step-00001200`` under the run's checkpoint
directory. It is written under a hidden temporary name and renamed only once
every rank has finished writing, so a crash (even SIGKILL) mid-save leaves no
directory that looks complete; such leftovers are removed at the next save.
What goes inside is the strategy's business (``Strategy.save_checkpoint``).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from ember.distributed.base import Strategy
from ember.train.state import TrainState

STEP_DIR = re.compile(r"^step-(\d{8})$")
CONFIG_FILE = "config.yaml"
ARCHITECTURE_FILE = "llama.json"  # the resolved LlamaConfig, so a checkpoint converts on its own


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, directory: Path, strategy: Strategy, keep_last: int | None = None):
        self.directory = Path(directory)
        self.strategy = strategy
        self.keep_last = keep_last

    def save(self, state: TrainState, config_yaml: str, architecture: dict[str, Any] | None = None) -> Path:
        """Writes ``state`` (model and optimizer through the strategy, the rest from
        ``state.state_dict()``) as ``step-NNNNNNNN``, with the run's config beside it."""
        final = self.directory / step_dir_name(state.step)
        tmp = self.directory / f".{final.name}.tmp"
        if self.strategy.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            (tmp / CONFIG_FILE).write_text(config_yaml)
            if architecture is not None:
                (tmp / ARCHITECTURE_FILE).write_text(json.dumps(architecture, indent=2) + "\n")
        self.strategy.barrier()
        self.strategy.save_checkpoint(tmp, state.state_dict())
        self.strategy.barrier()
        if self.strategy.is_main:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            if final.exists():  # a re-save of the same step (e.g. the final one after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune()
        self.strategy.barrier()
        return final

    def _prune(self) -> None:
        if self.keep_last is None:
            return
        found = list_checkpoints(self.directory)
        for _, path in found[: max(0, len(found) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, state: TrainState) -> None:
        """Restores ``state`` (and, through the strategy, its model and optimizer) from ``path``."""
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint directory not found")
        state.load_state_dict(self.strategy.load_checkpoint(path))
