"""Checkpoint directories: atomic writes, a manifest to verify them by, the newest intact one, pruning.

Each checkpoint is a directory ``step-00001200`` under the run's checkpoint
directory. It is written under a hidden temporary name and renamed only once
every rank has finished writing, so a crash (even SIGKILL) mid-save leaves no
directory that looks complete; such leftovers are removed at the next save.
What goes inside is the strategy's business (``Strategy.save_checkpoint``); the
checkpointer adds ``manifest.json`` last, the size and CRC-32 of every file, as
measured by the rank that wrote it right after writing it.

A step directory is *intact* when every file its manifest lists is there with
that size (and, where asked, that checksum). Checkpoints written before
manifests existed are accepted when they are otherwise complete (their files
are all there, as long as the DCP metadata says they are), with a warning that
their contents cannot be verified: they too were renamed only after a full write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch.distributed as dist

from ember.distributed.base import EXTRA_FILE, Strategy
from ember.distributed.checkpoint_io import METADATA_FILE, CheckpointError, FileRecord, SafeFileSystemReader, file_record
from ember.distributed.deepspeed import DS_TAG
from ember.train.state import TrainState

STEP_DIR = re.compile(r"^step-(\d{8})$")
CONFIG_FILE = "config.yaml"
ARCHITECTURE_FILE = "llama.json"  # the resolved LlamaConfig, so a checkpoint converts on its own
MANIFEST_FILE = "manifest.json"
MANIFEST_FORMAT = 1


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """Every step directory in ``directory``, oldest first, intact or not (see
    :func:`inspect_checkpoint`); hidden directories of a save in progress are not listed."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found)


@dataclass
class CheckpointHealth:
    """What :func:`inspect_checkpoint` found: ``problems`` (each naming a file; none when
    the checkpoint is intact) and the manifest's records (None without a manifest)."""

    path: Path
    problems: list[str] = field(default_factory=list)
    files: dict[str, FileRecord] | None = None

    @property
    def intact(self) -> bool:
        return not self.problems

    @property
    def has_manifest(self) -> bool:
        return self.files is not None

    def describe(self) -> str:
        return "; ".join(self.problems)


def inspect_checkpoint(path: Path, strategy: Strategy | None = None, *, checksums: bool = False) -> CheckpointHealth:
    """Checks ``path`` against its manifest: every listed file present with its size
    and, with ``checksums``, its CRC-32. Reading the files for the checksums is shared
    out among the ranks by size; with ``checksums`` and a ``strategy`` of several ranks,
    every rank must call this together, and all get the same problems."""
    health = _inspect_sizes(path)
    if checksums:
        mine = _checksum_problems(path, health.files, strategy) if health.intact and health.files else []
        health.problems = _everyone(health.problems + mine, strategy)
    return health


def _inspect_sizes(path: Path) -> CheckpointHealth:
    manifest_path = path / MANIFEST_FILE
    if not manifest_path.is_file():
        return _inspect_without_manifest(path)
    health = CheckpointHealth(path)
    try:
        manifest = json.loads(manifest_path.read_text())
        files: dict[str, FileRecord] = manifest["files"]
        if manifest.get("format") != MANIFEST_FORMAT or not isinstance(files, dict):
            raise ValueError(f"format {manifest.get('format')!r}, expected {MANIFEST_FORMAT}")
        for name, record in files.items():
            if PurePosixPath(name).is_absolute() or ".." in PurePosixPath(name).parts:
                raise ValueError(f"it lists {name!r}, outside the checkpoint")
            int(record["size"]), int(record["crc32"], 16)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
        health.problems.append(f"{manifest_path}: unreadable manifest ({e})")
        return health
    health.files = files
    if EXTRA_FILE not in files:
        health.problems.append(f"{manifest_path}: lists no {EXTRA_FILE}")
    for name, record in sorted(files.items()):
        f = path / name
        try:
            size = f.stat().st_size
        except OSError:
            health.problems.append(f"{f}: missing")
            continue
        if size != record["size"]:
            health.problems.append(f"{f}: {size:,} bytes, the manifest says {record['size']:,} (truncated or overwritten)")
    return health


def _checksum_problems(path: Path, files: dict[str, FileRecord], strategy: Strategy | None) -> list[str]:
    """This rank's share of the checksums: largest files first, each to the least loaded
    rank, the same split on every rank."""
    rank, world = (strategy.rank, strategy.world_size) if strategy is not None else (0, 1)
    loads = [0] * world
    problems = []
    for name in sorted(files, key=lambda n: (-files[n]["size"], n)):
        r = loads.index(min(loads))
        loads[r] += files[name]["size"]
        if r != rank:
            continue
        try:
            crc = file_record(path / name)["crc32"]
        except OSError as e:
            problems.append(f"{path / name}: unreadable ({e.strerror or e})")
            continue
        if crc != files[name]["crc32"]:
            problems.append(f"{path / name}: checksum {crc}, the manifest says {files[name]['crc32']} (the file is damaged)")
    return problems


def _everyone(problems: list[str], strategy: Strategy | None) -> list[str]:
    """The problems every rank found, on every rank: all ranks take the same decision."""
    if strategy is not None and strategy.world_size > 1:
        shares: list[list[str] | None] = [None] * strategy.world_size
        dist.all_gather_object(shares, problems)
        problems = [p for share in shares for p in share or []]
    return sorted(set(problems))


def _inspect_without_manifest(path: Path) -> CheckpointHealth:
    """A step directory without a manifest: a checkpoint from before manifests (complete
    when its files are all there), or not a checkpoint at all."""
    health = CheckpointHealth(path)
    extra = path / EXTRA_FILE
    if not extra.is_file() or extra.stat().st_size == 0:
        health.problems.append(f"{path / MANIFEST_FILE}: missing, and so is {EXTRA_FILE} (not a complete checkpoint)")
        return health
    if (path / DS_TAG).is_dir():
        if not any((path / DS_TAG).glob("*model_states.pt")):
            health.problems.append(f"{path / DS_TAG}: holds no DeepSpeed model states")
        return health
    needed: dict[str, int] = {}
    try:
        for info in (SafeFileSystemReader(str(path)).read_metadata().storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    except (OSError, ValueError) as e:  # the reader's messages name the file
        health.problems.append(str(e))
        return health
    except (AttributeError, TypeError) as e:
        health.problems.append(f"{path / METADATA_FILE}: unreadable checkpoint metadata: {e}")
        return health
    for name, end in sorted(needed.items()):
        f = path / name
        size = f.stat().st_size if f.is_file() else None
        if size is None:
            health.problems.append(f"{f}: missing")
        elif size < end:
            health.problems.append(f"{f}: {size:,} bytes, the checkpoint metadata needs {end:,} (truncated)")
    return health


def latest_checkpoint(directory: Path, strategy: Strategy | None = None, *, checksums: bool = False) -> Path | None:
    """The newest intact checkpoint in ``directory`` (None when there is none). Each newer
    step directory passed over is reported on standard error with what is wrong with it;
    one without a manifest that is chosen is reported as unverified. With ``checksums``
    and a ``strategy`` of several ranks, every rank must call this together."""
    return _newest_intact(_candidates(directory, strategy if checksums else None), strategy, checksums)


def resume_checkpoint(directory: Path, strategy: Strategy | None = None) -> Path | None:
    """For ``--resume auto``: the newest checkpoint in ``directory`` whose files all have
    their recorded sizes and checksums (None when the directory holds no step directory
    at all, a fresh start). Every rank must call this together."""
    candidates = _candidates(directory, strategy)
    found = _newest_intact(candidates, strategy, checksums=True)
    if found is None and candidates:
        raise CheckpointError(
            f"{directory}: none of its checkpoints is intact (see the warnings above); "
            "pass --resume with a checkpoint directory to use, or move the damaged ones away to start from step 0"
        )
    return found


def _candidates(directory: Path, strategy: Strategy | None) -> list[Path]:
    """The step directories, newest first, as the main rank sees them: ranks that check
    them together must go through the same list, whatever their own view of a network
    file system."""
    found = [path for _, path in reversed(list_checkpoints(directory))]
    if strategy is not None and strategy.world_size > 1:
        shared = [found]
        dist.broadcast_object_list(shared, src=0)
        found = shared[0]
    return found


def _newest_intact(candidates: list[Path], strategy: Strategy | None, checksums: bool) -> Path | None:
    for path in candidates:
        health = inspect_checkpoint(path, strategy, checksums=checksums)
        if health.intact:
            if not health.has_manifest:
                _warn(strategy, f"{path} has no {MANIFEST_FILE} (written by an earlier Ember): its files are all there, "
                                "but their contents cannot be verified")
            return path
        _warn(strategy, f"skipping checkpoint {path}: {health.describe()}")
    return None


def verify_checkpoint(path: Path, strategy: Strategy | None = None) -> None:
    """Raises :class:`CheckpointError`, naming the file, unless ``path`` is an intact
    checkpoint (sizes and checksums). Every rank must call this together."""
    health = inspect_checkpoint(path, strategy, checksums=True)
    if not health.intact:
        raise CheckpointError(f"{path}: not an intact checkpoint: {health.describe()}")
    if not health.has_manifest:
        _warn(strategy, f"{path} has no {MANIFEST_FILE} (written by an earlier Ember): its contents cannot be verified")


def _is_main(strategy: Strategy | None) -> bool:
    if strategy is not None:
        return strategy.is_main
    return not dist.is_initialized() or dist.get_rank() == 0


def _warn(strategy: Strategy | None, text: str) -> None:
    if _is_main(strategy):
        print(f"warning: {text}", file=sys.stderr, flush=True)


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


def _manifest_text(step: int, files: dict[str, FileRecord]) -> str:
    """The manifest as JSON with one line per file, for a person to read too."""
    lines = [f"  {json.dumps(name)}: {json.dumps(record)}" for name, record in sorted(files.items())]
    return f'{{"format": {MANIFEST_FORMAT}, "step": {step}, "files": {{\n' + ",\n".join(lines) + "\n}}\n"


def _write_synced(path: Path, text: str) -> FileRecord:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    return file_record(path)


class Checkpointer:
    def __init__(self, directory: Path, strategy: Strategy, keep_last: int | None = None):
        self.directory = Path(directory)
        self.strategy = strategy
        self.keep_last = keep_last
        self._warned: set[Path] = set()

    def save(self, state: TrainState, config_yaml: str, architecture: dict[str, Any] | None = None) -> Path:
        """Writes ``state`` (model and optimizer through the strategy, the rest from
        ``state.state_dict()``) as ``step-NNNNNNNN``, with the run's config beside it
        and, last, the manifest of every file."""
        final = self.directory / step_dir_name(state.step)
        tmp = self.directory / f".{final.name}.tmp"
        previous = list_checkpoints(self.directory)
        try:
            return self._write(state, config_yaml, architecture, final, tmp)
        except OSError as e:
            # A full disk (or a quota, or a lost mount) mid-save: the half-written temporary
            # directory is Ember's own and goes; earlier checkpoints were never touched.
            if self.strategy.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            kept = f"the previous checkpoint {previous[-1][1]} is intact" if previous else "there is no earlier checkpoint"
            raise OSError(e.errno, f"{e.strerror or e}, while writing checkpoint {final} (not kept); {kept}", e.filename) from e

    def _write(self, state: TrainState, config_yaml: str, architecture: dict[str, Any] | None, final: Path, tmp: Path) -> Path:
        records: dict[str, FileRecord] = {}
        if self.strategy.is_main:
            self.directory.mkdir(parents=True, exist_ok=True)
            for stale in self.directory.glob(".step-*.tmp"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp.mkdir()
            records[CONFIG_FILE] = _write_synced(tmp / CONFIG_FILE, config_yaml)
            if architecture is not None:
                records[ARCHITECTURE_FILE] = _write_synced(tmp / ARCHITECTURE_FILE, json.dumps(architecture, indent=2) + "\n")
        self.strategy.barrier()
        records |= self.strategy.save_checkpoint(tmp, state.state_dict())
        # Gathering the records waits for every rank's files as a barrier would.
        gathered = self._gather(records)
        if self.strategy.is_main:
            for f in tmp.rglob("*"):
                if f.is_file():
                    with open(f, "rb") as fh:
                        os.fsync(fh.fileno())
            _write_synced(tmp / MANIFEST_FILE, _manifest_text(state.step, gathered))
            if final.exists():  # a re-save of the same step (e.g. the final one after a periodic one)
                shutil.rmtree(final)
            os.replace(tmp, final)
            _fsync_dir(self.directory)
            self._prune(state.step)
        self.strategy.barrier()
        return final

    def _gather(self, records: dict[str, FileRecord]) -> dict[str, FileRecord]:
        """Every rank's records, on the main rank (empty elsewhere)."""
        if self.strategy.world_size == 1:
            return records
        shares: list[dict[str, FileRecord]] | None = [{} for _ in range(self.strategy.world_size)] if self.strategy.is_main else None
        dist.gather_object(records, shares, dst=0)
        return {name: record for share in shares or [] for name, record in share.items()}

    def _prune(self, saved_step: int) -> None:
        """Keeps the newest ``keep_last`` intact checkpoints up to the one just saved
        (sizes checked, not checksums). Step directories that are not intact are never
        deleted, only reported (once), so a wrong judgement costs disk space, not work;
        newer ones than the one just saved (left by an earlier attempt of the run) stay
        until the run reaches their step and replaces them."""
        if self.keep_last is None:
            return
        intact = []
        for step, path in list_checkpoints(self.directory):
            if step > saved_step:
                continue
            health = inspect_checkpoint(path)
            if health.intact:
                intact.append(path)
            elif path not in self._warned:
                self._warned.add(path)
                _warn(self.strategy, f"{path} is not an intact checkpoint, left in place: {health.describe()}")
        for path in intact[: max(0, len(intact) - self.keep_last)]:
            shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, state: TrainState) -> None:
        """Restores ``state`` (and, through the strategy, its model and optimizer) from
        ``path``. Checks that every file is there with its size; the checksums are
        checked where the checkpoint is chosen (:func:`resume_checkpoint`,
        :func:`verify_checkpoint`), which reads every file once more."""
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: checkpoint directory not found")
        health = inspect_checkpoint(path)
        if not health.intact:
            raise CheckpointError(f"{path}: not an intact checkpoint: {health.describe()}")
        state.load_state_dict(self.strategy.load_checkpoint(path))
