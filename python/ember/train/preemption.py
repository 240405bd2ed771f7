"""Stopping cleanly when asked to: SIGTERM (what SLURM and Kubernetes send before they
kill a job), SIGINT (Ctrl-C) and SIGUSR1 (SLURM's ``--signal``, sent ahead of time).

The first of these only records the request; the training loop sees it at the end of the
current step, agrees on it with every rank, saves a checkpoint and stops
(:class:`Preempted`). A second signal does not wait: SIGINT raises ``KeyboardInterrupt``
at once, the others take their default action (the process ends).
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


class Preempted(RuntimeError):
    """The run stopped on a signal after saving a checkpoint; ``exit_code`` is 128 + the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class StopRequest:
    """While entered (in the main thread), remembers the first stop signal instead of dying of it."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            return
        # A second signal: the user (or the scheduler) will not wait for the checkpoint.
        self._restore()
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    def __enter__(self) -> StopRequest:
        # Handlers can only be set from the main thread; elsewhere signals keep their usual effect.
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __exit__(self, *exc: object) -> None:
        self._restore()
