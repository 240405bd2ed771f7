"""One ``ember train`` per run directory, held for the whole run.

Two runs in one directory would interleave ``metrics.jsonl`` and prune each other's
checkpoints, so the main rank holds ``<run dir>/.ember-train.lock`` from before the
run writes anything until it ends, and a second run is refused at once, naming the
holder. The file is created exclusively (a hard link from a file written in full
beforehand, so it never appears empty) and holds the holder's host, PID and start
time; while it exists the holder also keeps an advisory ``flock`` on it and touches
it every ``HEARTBEAT_SECONDS``.

A lock file outlives its holder only when the holder was killed (SIGKILL, a job
scheduler's time limit). Another run then takes it over when

* the file is ``flock``-free and its PID is gone on this host, or
* it belongs to an earlier round of the same ``torchrun`` job (restarted workers), or
* it has not been touched for ``STALE_SECONDS``, whichever host wrote it: the holder
  was on another machine, whose processes this one cannot see.

``flock`` alone would judge every case where it works; the file's contents are the
fallback where it does not (some network file systems refuse it, or grant it per
machine only), and name the holder in the refusal.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch.distributed as dist

try:
    import fcntl
except ImportError:  # no flock on this platform: the lock file alone decides
    fcntl = None

LOCK_FILE = ".ember-train.lock"
HEARTBEAT_SECONDS = 60.0
STALE_SECONDS = 600.0  # ten missed heartbeats
# What a file system without (working) flock answers; NFS emulates flock with byte-range
# locks, which some mounts refuse with ENOLCK and some opens with EBADF.
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL, errno.EBADF}


class RunDirInUse(ValueError):
    """Another ``ember train`` holds the run directory; the message names it."""


class RunLock:
    """The lock on one run directory; ``with RunLock(run_dir):`` holds it for the block."""

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self._fd: int | None = None
        self._created_dir = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def acquire(self) -> None:
        """Takes the lock or raises :class:`RunDirInUse`; creates the run directory if needed."""
        self._created_dir = not self.run_dir.exists()
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._stop = threading.Event()
        for _ in range(10):  # each pass loses a race to a run that came and went meanwhile
            if self._create():
                break
            fd = _open_existing(self.path)
            if fd is None:
                continue  # its holder released it just now
            state = _flock(fd)
            if not _names_same_file(fd, self.path):  # replaced or removed while we opened it
                os.close(fd)
                continue
            holder = _read_holder(fd)
            if state == "held" or not self._stale(holder, fd):
                os.close(fd)
                raise RunDirInUse(self._refusal(holder))
            # Stale. Where flock works we hold it on the stale file, so no other run judges it
            # at the same moment; the file goes, and the next pass creates ours.
            os.unlink(self.path)
            os.close(fd)
        else:
            raise RunDirInUse(f"{self.run_dir}: could not take {self.path}: other runs keep creating and removing it")
        self._heartbeat = threading.Thread(target=self._beat, name="ember-run-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        """Removes the lock file (only if it is still this run's) and stops the heartbeat."""
        if self._fd is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with contextlib.suppress(OSError):
            if _names_same_file(self._fd, self.path):
                os.unlink(self.path)  # before the flock goes, so no one takes over a file about to vanish
        os.close(self._fd)
        self._fd = None
        if self._created_dir:
            with contextlib.suppress(OSError):
                self.run_dir.rmdir()  # only if the run wrote nothing there

    # -- taking it -------------------------------------------------------------

    def _create(self) -> bool:
        """Creates the lock file, already flocked and holding this process's details;
        False when one exists."""
        details = json.dumps(_holder_details()) + "\n"
        tmp = self.run_dir / f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            _flock(fd)
            os.write(fd, details.encode())
            os.fsync(fd)
            try:
                os.link(tmp, self.path)  # atomic, and fails if the lock file exists, on NFS too
            except FileExistsError:
                os.close(fd)
                return False
            except OSError:  # a file system without hard links: create the file itself exclusively
                os.close(fd)
                try:
                    fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                except FileExistsError:
                    return False
                _flock(fd)
                os.write(fd, details.encode())
                os.fsync(fd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.close(fd)
            raise
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        self._fd = fd
        return True

    def _stale(self, holder: dict[str, Any] | None, fd: int) -> bool:
        """Whether the lock in ``fd`` (not flock-held by anyone) outlived its holder."""
        age = _age_seconds(fd, self.run_dir)
        if age is not None and age > STALE_SECONDS:
            return True
        if holder is None:  # unreadable: written this instant by a creator without hard links, or junk
            return age is not None and age > 10
        job = os.environ.get("TORCHELASTIC_RUN_ID")
        if job is not None and holder.get("job") == job and holder.get("round", 0) < _restart_round():
            return True  # an earlier round of this torchrun job, whose workers torchrun stopped
        return holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", 0)))

    def _refusal(self, holder: dict[str, Any] | None) -> str:
        if holder is None:
            who = f"its lock file {self.path} names no holder"
        else:
            who = f"host {holder.get('host')}, pid {holder.get('pid')}, since {holder.get('since')}"
        text = (f"{self.run_dir} is in use by another ember train ({who}); wait for that run to end or stop it, "
                "or set logging.run_name to start a separate run")
        if holder is not None and holder.get("host") != socket.gethostname():
            text += (f". If no ember train runs on {holder.get('host')} any more, delete {self.path} "
                     f"(it is taken over by itself {STALE_SECONDS / 60:.0f} minutes after its holder stops)")
        return text

    # -- holding it ------------------------------------------------------------

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            with contextlib.suppress(OSError):
                os.utime(self._fd)


@contextlib.contextmanager
def hold_run_dir(run_dir: Path, strategy) -> Iterator[None]:
    """Holds ``run_dir`` for the block: the main rank takes the lock; when it is refused,
    every rank raises :class:`RunDirInUse` with its message, so the whole job stops at once.
    Every rank calls it, after the strategy's ``setup()``."""
    lock = RunLock(run_dir) if strategy.is_main else None
    error: Exception | None = None
    if lock is not None:
        try:
            lock.acquire()
        except Exception as e:  # every rank must hear of it, or the others would run on alone
            error = e
    message = None if error is None else str(error)
    if strategy.world_size > 1:
        shared = [message]
        dist.broadcast_object_list(shared, src=0)
        message = shared[0]
    if error is not None:
        raise error
    if message is not None:
        raise RunDirInUse(message)
    try:
        yield
    finally:
        if lock is not None:
            lock.release()


def _holder_details() -> dict[str, Any]:
    details: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "since": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
    }
    if "TORCHELASTIC_RUN_ID" in os.environ:
        details.update(job=os.environ["TORCHELASTIC_RUN_ID"], round=_restart_round())
    return details


def _restart_round() -> int:
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0))


def _open_existing(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDWR)
    except FileNotFoundError:
        return None


def _flock(fd: int) -> str:
    """'taken', 'held' (by another open file: a live holder) or 'unsupported'."""
    if fcntl is None:
        return "unsupported"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return "held"
    except OSError as e:
        if e.errno in _NO_FLOCK:
            return "unsupported"
        raise
    return "taken"


def _names_same_file(fd: int, path: Path) -> bool:
    try:
        on_disk = os.stat(path)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (on_disk.st_dev, on_disk.st_ino)


def _read_holder(fd: int) -> dict[str, Any] | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        holder = json.loads(os.read(fd, 4096).decode())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _age_seconds(fd: int, directory: Path) -> float | None:
    """Seconds since the lock file was last touched, by the file system's clock (that of
    the server, on a network file system) rather than this machine's: a file created
    now in ``directory`` gives the present."""
    probe = directory / f"{LOCK_FILE}.{socket.gethostname()}.{os.getpid()}.now"
    try:
        probe.touch()
        now = probe.stat().st_mtime
        probe.unlink()
        return now - os.fstat(fd).st_mtime
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    try:  # a killed process not yet reaped by its parent is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True
