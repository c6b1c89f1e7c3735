"""Stopping a run's processes in order, by the launcher or, when the launcher is killed, by its watchdog.

:func:`stop` is the one shutdown sequence of a run: i-PI gets SIGTERM and a
grace period to exit softly (it writes ``RESTART``, flushes its outputs and
sends EXIT to its clients); then each worker gets 10 s to end, SIGTERM, 10 s,
SIGKILL; whatever is left in the session of any of them (MPI ranks) is killed;
the socket files and i-PI's shared-memory segments are removed.

The launcher runs it at the end of a run and on Ctrl-C, SIGTERM or SIGHUP. For
the case it cannot handle, being killed outright (``kill -9``, the OOM killer),
it starts ``python -m qmmm_driver.reaper RUN_DIR`` in a session of its own and
tells it, line by line through a pipe, what it started (``ipi PID``,
``worker PID``, ``socket PATH``). When the pipe closes without a last ``done``
line, the launcher is gone: the watchdog runs :func:`stop` on those processes
and says so in ``RUN_DIR/watchdog.log``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# imported when the watchdog starts, not when it acts: by then the installed files may be gone or replaced (an
# upgrade or a removed environment while the run goes on), and a failed import would leave i-PI running
from .ipi.shm import remove_segments

#: what a worker gets, after i-PI is gone, before SIGTERM and again before SIGKILL (s)
WORKER_GRACE_S = 10.0
#: i-PI's grace period for a soft exit when the watchdog stops a run (s)
WATCHDOG_GRACE_S = 60.0


class Adopted:
    """A process that is not our child (the watchdog's view of the launcher's children): ``poll`` and ``wait``
    as for ``subprocess.Popen``, from ``/proc``; exit codes are not known and read as 0."""

    def __init__(self, pid: int):
        self.pid = pid

    def poll(self) -> int | None:
        try:
            state = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return 0
        return 0 if state in ("Z", "X") else None

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"pid {self.pid}", timeout)
            time.sleep(0.1)
        return 0


def kill_session(proc, sig: int) -> None:
    """``sig`` to the session (process group) that ``proc`` leads; nothing if it is gone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _end(proc, grace: float) -> None:
    """Wait up to ``grace`` s for ``proc`` to end, then SIGTERM, then SIGKILL its session."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            kill_session(proc, sig)
    proc.wait()


def stop(ipi, workers: list, sockets: list[Path], grace: float) -> None:
    """Stop i-PI softly (``grace`` s), then ``workers``; remove ``sockets`` and i-PI's shared memory."""
    if ipi is not None and ipi.poll() is None:
        kill_session(ipi, signal.SIGTERM)
        try:
            ipi.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            kill_session(ipi, signal.SIGKILL)
            ipi.wait()
    for proc in workers:
        if proc.poll() is None:
            _end(proc, WORKER_GRACE_S)  # i-PI's EXIT (or its closed socket) ends them
        kill_session(proc, signal.SIGKILL)  # anything the worker left in its session (MPI ranks)
    if ipi is not None:
        kill_session(ipi, signal.SIGKILL)
        remove_segments(ipi.pid)
    for path in sockets:
        Path(path).unlink(missing_ok=True)


class Watchdog:
    """The launcher's end of the pipe to its watchdog process."""

    def __init__(self, run_dir: Path):
        read, self._write = os.pipe()
        # a session of its own: Ctrl-C at the terminal or a kill of the launcher's process group does not reach it
        self.proc = subprocess.Popen([sys.executable, "-m", "qmmm_driver.reaper", str(run_dir)], stdin=read,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        os.close(read)

    def tell(self, line: str) -> None:
        try:
            os.write(self._write, (line + "\n").encode())
        except BrokenPipeError:  # the watchdog was killed: the launcher goes on without it
            pass

    def dismiss(self) -> None:
        """The launcher stopped everything itself: the watchdog exits."""
        self.tell("done")
        os.close(self._write)
        self.proc.wait()


def watch(run_dir: Path, lines) -> int:
    """The watchdog: read the launcher's lines until the pipe closes; if it closed without ``done``, stop."""
    ipi, workers, sockets = None, [], []
    for line in lines:
        kind, _, value = line.strip().partition(" ")
        if kind == "done":
            return 0
        if kind == "ipi":
            ipi = Adopted(int(value))
        elif kind == "worker":
            workers.append(Adopted(int(value)))
        elif kind == "socket":
            sockets.append(Path(value))
    with open(run_dir / "watchdog.log", "a") as log:
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} qmmm-driver launch watchdog: the launcher is gone; stopping "
              f"i-PI (it writes RESTART) and {len(workers)} workers", file=log, flush=True)
        stop(ipi, workers, sockets, WATCHDOG_GRACE_S)
        print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} qmmm-driver launch watchdog: stopped; continue with "
              f"qmmm-driver launch --restart --run-dir {run_dir}", file=log, flush=True)
    return 1


if __name__ == "__main__":
    for _sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # it ends by itself once its job is done
        signal.signal(_sig, signal.SIG_IGN)
    sys.exit(watch(Path(sys.argv[1]), sys.stdin))
