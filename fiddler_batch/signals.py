"""Stopping a run cleanly: SIGTERM and SIGUSR1 (what Slurm sends before a time limit or a preemption), SIGINT.

On SIGTERM or SIGUSR1 the run stops reading new requests and stops at the next group boundary (a static batch,
or a part of finished requests under continuous batching): what finished is written, the rank's lock released,
and the run exits with `exitcodes.STOPPED` (under Slurm, after `scontrol requeue` when asked to). When no group
ends within the grace period (`--stop-grace`, default `GRACE_S`), or a second signal comes, the batch in flight
is abandoned: its requests have no result yet and run again on resume. SIGINT abandons at once and exits 130.

Abandoning raises `StopNow` (a BaseException, so no `except Exception` swallows it) in the main thread,
wherever it is, except inside `deferred()` blocks (writing a part and its manifest line), where it waits for the
block's end. A part on disk therefore always has its manifest line, or is unknown to the manifest and removed
by the next run.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

log = logging.getLogger("fiddler_batch.signals")

GRACE_S = 20.0
"""How long a run waits, after SIGTERM or SIGUSR1, for the batch in flight to end before abandoning it."""
STOP_SIGNALS = ("SIGTERM", "SIGUSR1")


class StopNow(BaseException):
    """The run is to end now (a signal, its grace period over, or SIGINT): what is in flight is abandoned."""

    def __init__(self, signal_name: str):
        super().__init__(signal_name)
        self.signal_name = signal_name


class Stopper:
    """The process's stop requests (one per run; `install` it in the main thread)."""

    def __init__(self, grace_s: float = GRACE_S):
        self.grace_s = grace_s
        self.requested: str | None = None
        """The name of the first stop signal received, if any."""
        self._deferring = 0
        self._pending: str | None = None
        self._previous: dict[int, Any] = {}

    @contextmanager
    def install(self) -> Iterator[Stopper]:
        """Handle SIGTERM, SIGUSR1, SIGINT (and SIGALRM, the grace timer) while inside; restore them after. Outside
        the main thread nothing is installed."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        handlers = {name: self._on_stop for name in STOP_SIGNALS} | {"SIGINT": self._on_interrupt}
        handlers["SIGALRM"] = self._on_grace_over
        for name, handler in handlers.items():
            number = getattr(signal, name, None)
            if number is not None:
                self._previous[number] = signal.signal(number, handler)
        try:
            yield self
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for number, previous in self._previous.items():
                signal.signal(number, previous)
            self._previous.clear()

    @contextmanager
    def deferred(self) -> Iterator[None]:
        """A block that an abandon waits for (it is raised at the block's end)."""
        self._deferring += 1
        try:
            yield
        finally:
            self._deferring -= 1
        if self._deferring == 0 and self._pending is not None:
            pending, self._pending = self._pending, None
            raise StopNow(pending)

    def stop_now(self, name: str) -> None:
        """Abandon what is in flight (now, or at the end of a deferred block)."""
        if self._deferring:
            self._pending = self._pending or name
            return
        raise StopNow(name)

    def settle(self) -> None:
        """The run is ending: further stop signals only log (a half-written summary helps nobody)."""
        self.cancel_grace()
        if threading.current_thread() is threading.main_thread():
            for name in STOP_SIGNALS:
                signal.signal(getattr(signal, name), self._on_late_signal)

    def _on_late_signal(self, number: int, frame: FrameType | None) -> None:
        log.warning("received %s while stopping: already stopping", signal.Signals(number).name)

    def cancel_grace(self) -> None:
        """The run reached a boundary and stops there: no need to abandon anything."""
        if threading.current_thread() is threading.main_thread():
            signal.setitimer(signal.ITIMER_REAL, 0)

    def _on_stop(self, number: int, frame: FrameType | None) -> None:
        name = signal.Signals(number).name
        if self.requested is None:
            self.requested = name
            log.warning(
                "received %s: stopping after the batch in flight (abandoning it if it does not end within %.0f s); "
                "everything finished is kept",
                name,
                self.grace_s,
            )
            if self.grace_s > 0:
                signal.setitimer(signal.ITIMER_REAL, self.grace_s)
            else:
                self.stop_now(name)
            return
        log.warning("received %s again: abandoning the batch in flight", name)
        self.stop_now(self.requested)

    def _on_grace_over(self, number: int, frame: FrameType | None) -> None:
        log.warning("the batch in flight did not end within %.0f s: abandoning it", self.grace_s)
        self.stop_now(self.requested or "SIGTERM")

    def _on_interrupt(self, number: int, frame: FrameType | None) -> None:
        self.requested = self.requested or "SIGINT"
        self.stop_now("SIGINT")
