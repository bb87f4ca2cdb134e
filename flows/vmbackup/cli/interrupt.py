"""Ctrl-C and SIGTERM during a backup or a restore.

Python's default Ctrl-C raises ``KeyboardInterrupt`` wherever the program
happens to be, including just after the mover committed a backup, which
would then be reported as interrupted. Here both signals only cancel the
mover's ``CancelToken``: the mover stops at its next check and raises
``CancelledError``, and a call that already finished (a committed backup, a
renamed restore) is reported as done. A signal that arrives between two
mover calls stops before the next one (``stop_if_requested``).

Python runs signal handlers only in the main thread, and that thread is in
the mover until its next progress report (about a second). So the signal's
number also goes to a wake-up pipe (``signal.set_wakeup_fd``), written by
the C-level handler at once, and a watcher thread cancels the token from
there: the mover stops within one block, not one second.
"""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType, TracebackType

from ..errors import Interrupted


class Interruptible:
    """Within ``with``, SIGINT and SIGTERM cancel ``token``."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        from .. import _mover

        self.token = _mover.CancelToken()
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
        self.token.cancel()

    def _watch(self, fd: int) -> None:
        while data := os.read(fd, 64):
            for signum in data:
                if signum in self.SIGNALS:
                    self._handle(signum, None)

    def __enter__(self) -> Interruptible:
        self._pipe: tuple[int, int] | None = None
        try:
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        except ValueError:  # not the main thread: signals stay as they were
            return self
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._pipe = (r, w)
        self._watcher = threading.Thread(target=self._watch, args=(r,), name="vmbackup-signals", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        if self._pipe is not None:
            signal.set_wakeup_fd(self._wakeup)
            os.close(self._pipe[1])  # the watcher reads the end and returns
            self._watcher.join()
            os.close(self._pipe[0])
        for s, h in self._previous.items():
            signal.signal(s, h)  # type: ignore[arg-type]

    def stop_if_requested(self, what: str) -> None:
        """Raises ``Interrupted`` if a signal came."""
        if self.signum is not None:
            raise Interrupted(self.signum, what)
