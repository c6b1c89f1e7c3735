"""What a batch scheduler's end of job (SIGTERM) or a closed terminal (SIGHUP) does to a command: the same as
Ctrl-C. The signal is raised in the main thread as :class:`Stopped`, a ``KeyboardInterrupt``, so that every
clean-up written for Ctrl-C (half-written files removed, child processes stopped, i-PI asked to write RESTART)
runs for it too; the command then exits with 128 + the signal number, as a shell reports a killed job."""

from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP arrived."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_stopped(signum, _frame):
    raise Stopped(signum)


def exit_status(err: KeyboardInterrupt) -> int:
    """The exit status of a command ended by ``err``: 128 + the signal (130 for Ctrl-C)."""
    return 128 + (err.signum if isinstance(err, Stopped) else signal.SIGINT)


def describe(err: KeyboardInterrupt) -> str:
    """How a command ended by ``err`` says so: "interrupted" (Ctrl-C) or "stopped by SIGTERM"."""
    return f"stopped by {err}" if isinstance(err, Stopped) else "interrupted"


@contextmanager
def stop_like_ctrl_c():
    """Within the block, SIGTERM and SIGHUP raise :class:`Stopped` and Ctrl-C raises ``KeyboardInterrupt`` (also
    where SIGINT came in ignored, as for a job a script started with '&'); the handlers before are restored after.
    Outside the main thread (embedded use) it changes nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held = {sig: signal.signal(sig, _raise_stopped) for sig in (signal.SIGTERM, signal.SIGHUP)}
    held[signal.SIGINT] = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        for sig, handler in held.items():
            signal.signal(sig, handler)
