"""What a batch scheduler sends at the end of a job (SIGTERM) or a closed terminal (SIGHUP) stops every
command like Ctrl-C: exit status 128 + the signal, a line saying so, no half-written file and no process left
behind. (The launcher's own case, with i-PI writing RESTART, is in test_launch.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import CLUSTER_BOX, WORKER_CMD, water_cluster, write_frame

CLI = [sys.executable, "-m", "qmmm_driver.cli"]


def _session_processes(sid: int) -> list[int]:
    """Live (not zombie) processes of the session ``sid``."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # fields: state, ppid, pgrp, session
            pids.append(int(stat.parent.name))
    return pids


def _stop_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 120.0) -> str:
    """Send ``sig`` to ``proc`` once ``ready()`` holds; its stderr."""
    deadline = time.time() + timeout
    while not ready():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, "the command never got to the point to stop it at"
        time.sleep(0.2)
    proc.send_signal(sig)
    try:
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return err


def test_a_stopped_compile_leaves_nothing(tmp_path, tiny_model_file):
    """Stopped by SIGHUP (handled as SIGTERM is) while it traces the model: no package (and no half-written one)
    beside the model, no process of its session left (inductor's compile workers included)."""
    sig = signal.SIGHUP
    model = tmp_path / "tiny.pt"
    model.write_bytes(tiny_model_file.read_bytes())
    proc = subprocess.Popen(CLI + ["compile", "--model", str(model), "--n-qm", "3"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    out: list[str] = []

    def compiling() -> bool:  # the command has said it is compiling: torch is loaded and tracing
        out.append(os.read(proc.stdout.fileno(), 4096).decode())
        return "this takes minutes" in "".join(out)

    err = _stop_when(proc, compiling, sig)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"qmmm-driver compile: stopped by {signal.Signals(sig).name}" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pt"]
    deadline = time.time() + 10
    while _session_processes(proc.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert _session_processes(proc.pid) == []


def test_a_stopped_worker_writes_its_exit_line(tmp_path, tiny_model_file):
    """A worker waiting for i-PI and stopped by SIGTERM says so in its last line and exits with 143."""
    frame = write_frame(water_cluster(), tmp_path / "frame.extxyz", box=CLUSTER_BOX)
    proc = subprocess.Popen(WORKER_CMD + ["--model", str(tiny_model_file), "--system", str(frame), "--unix",
                                          f"qmt_never_{time.time_ns()}", "--connect-timeout", "120"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines: list[str] = []

    def waiting() -> bool:  # the model is loaded and the worker waits for the socket
        lines.append(os.read(proc.stderr.fileno(), 4096).decode())
        return "socket" in "".join(lines)

    err = _stop_when(proc, waiting, signal.SIGTERM)
    err = "".join(lines) + err
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    assert "served 0 structures in 0 requests; stopped by SIGTERM" in err, err
    assert "Traceback" not in err
