"""Bad input to ``qmmm-driver run``: each gets a clear message and a non-zero exit, never a hang.

Failures that happen before any connection run as concurrent subprocesses
(one module fixture); the others talk to a real i-PI.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time

import pytest
import torch

import numpy as np

from conftest import (CLUSTER_BOX, IPI_PREFIX, WORKER_CMD, ipi_input, served_counts, water_box,
                      water_cluster, write_frame)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again: nothing listens there


@pytest.fixture(scope="module")
def early_failures(tmp_path_factory, tiny_model_file):
    """Run every worker that must fail before serving, all at once; name -> (rc, output, context)."""
    d = tmp_path_factory.mktemp("early")
    good = write_frame(water_cluster(), d / "good.extxyz", box=CLUSTER_BOX)
    bare = water_cluster()
    del bare.arrays["qm"], bare.arrays["mm_charge"]
    bare_file = write_frame(bare, d / "bare.extxyz", box=CLUSTER_BOX)
    text_model = d / "notes.pt"
    text_model.write_text("this is not a model\n")
    payload = torch.load(tiny_model_file, weights_only=True)
    payload["version"] = 99
    future_model = d / "future.pt"
    torch.save(payload, future_model)
    absent = f"qmt_absent_{time.time_ns()}"
    port = _free_port()
    box = water_box()
    box.set_array("molecule", np.repeat(np.arange(len(box) // 3), 3))
    box_file = write_frame(box, d / "box.extxyz")
    stale = f"qmt_stale_{time.time_ns()}"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # a socket file nobody listens on
    leftover.bind(IPI_PREFIX + stale)
    leftover.close()

    cases = {
        "no_qm": (["--model", tiny_model_file, "--system", bare_file, "--unix", absent], {}),
        "no_mm_charge": (["--model", tiny_model_file, "--system", bare_file, "--qm", "0-2", "--unix", absent], {}),
        "qm_range": (["--model", tiny_model_file, "--system", good, "--qm", "0-2,500", "--unix", absent], {}),
        "text_model": (["--model", text_model, "--system", good, "--unix", absent], {}),
        "future_model": (["--model", future_model, "--system", good, "--unix", absent], {}),
        "absent_unix": (["--model", tiny_model_file, "--system", good, "--unix", absent,
                         "--connect-timeout", "1"], {"name": absent}),
        "refused_inet": (["--model", tiny_model_file, "--system", good, "--address", "127.0.0.1",
                          "--port", port, "--connect-timeout", "1"], {"port": port}),
        "shm_inet": (["--model", tiny_model_file, "--system", good, "--address", "127.0.0.1", "--port", port,
                      "--shm"], {}),
        "half_molecule": (["--model", tiny_model_file, "--system", box_file, "--qm", "0-1", "--unix", absent], {}),
        "backwards": (["--model", tiny_model_file, "--system", good, "--qm", "5-2", "--unix", absent], {}),
        "no_connections": (["--model", tiny_model_file, "--system", good, "--unix", absent, "--connections", "0"],
                           {}),
        "stale_socket": (["--model", tiny_model_file, "--system", good, "--unix", stale, "--connect-timeout", "1"],
                         {"name": stale}),
    }
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    running = {}
    for name, (args, ctx) in cases.items():
        running[name] = (subprocess.Popen(WORKER_CMD + [str(a) for a in args], stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, env=env, cwd=d, text=True,
                                          start_new_session=True), ctx)
    results = {}
    try:
        for name, (p, ctx) in running.items():
            out, _ = p.communicate(timeout=120)
            results[name] = (p.returncode, out, {**ctx, "good": good, "bare": bare_file, "box": box_file,
                                                 "text_model": text_model, "future_model": future_model})
    finally:
        for p, _ in running.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
        os.unlink(IPI_PREFIX + stale)
    return results


def _check(early_failures, name, *phrases):
    rc, out, ctx = early_failures[name]
    assert rc == 2, out
    assert "qmmm-driver run: error:" in out, out
    for phrase in phrases:
        assert phrase.format(**ctx) in out, out
    assert "Traceback" not in out, out
    assert served_counts(out) == [(0, 0)], out


def test_system_without_qm(early_failures):
    _check(early_failures, "no_qm", "{bare}: no per-atom 'qm' array", "--qm")


def test_system_without_mm_charge(early_failures):
    _check(early_failures, "no_mm_charge", "{bare}: no per-atom 'mm_charge' array")


def test_qm_selection_out_of_range(early_failures):
    _check(early_failures, "qm_range", "QM selection '0-2,500' names atom 500, but the system has 93 atoms")


def test_model_file_is_text(early_failures):
    _check(early_failures, "text_model", "{text_model} is not a readable qmmm-driver model file")


def test_model_file_wrong_version(early_failures):
    _check(early_failures, "future_model", "{future_model} has model format version 99", "reads version 2")


def test_absent_unix_socket(early_failures):
    _check(early_failures, "absent_unix", f"no i-PI server at unix:{IPI_PREFIX}{{name}} after 1 s",
           "the socket file does not exist", '<ffsocket mode="unix"><address>{name}</address>',
           f'sockets_prefix="{IPI_PREFIX}"')


def test_refused_inet_socket(early_failures):
    _check(early_failures, "refused_inet", "no i-PI server at inet:127.0.0.1:{port} after 1 s", "refused",
           '<ffsocket mode="inet"><address>127.0.0.1</address><port>{port}</port>')


def test_shared_memory_needs_a_unix_socket(early_failures):
    _check(early_failures, "shm_inet", "--shm goes with --unix NAME")


def test_connections_must_be_positive(early_failures):
    _check(early_failures, "no_connections", "--connections 0: give 1 to 256")


def test_half_a_molecule_as_qm_is_refused(early_failures):
    _check(early_failures, "half_molecule", "{box}: MM atom 2 is in the same molecule as QM atom 0",
           "select every atom of that molecule as QM")


def test_backwards_selection_is_named(early_failures):
    _check(early_failures, "backwards", "QM selection range '5-2' runs backwards")


def test_stale_socket_file_is_named(early_failures):
    _check(early_failures, "stale_socket", f"the socket file {IPI_PREFIX}{{name}} exists but no i-PI listens on it",
           "Remove it")


def test_non_finite_positions_from_ipi_exit_4(tmp_path, tiny_model_file):
    """A NaN on an MM atom of a periodic system (far or near): the worker sends nothing and exits 4."""
    from qmmm_driver.ipi.client import GETFORCE, INIT, POSDATA, STATUS
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    box = water_box()
    frame = write_frame(box, tmp_path / "box.extxyz")
    name = f"qmt_nan_{time.time_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(IPI_PREFIX + name)
    server.listen(1)
    server.settimeout(120)  # a worker that dies before connecting fails the test instead of hanging it
    worker = subprocess.Popen(WORKER_CMD + ["--model", str(tiny_model_file), "--system", str(frame), "--unix", name],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        conn, _ = server.accept()
        with conn:
            pos = box.positions * ANGSTROM_TO_BOHR
            pos[40, 1] = np.nan  # an MM atom far from the QM water (beyond the cutoff in some image)
            h = box.cell.array.T * ANGSTROM_TO_BOHR
            conn.sendall(STATUS)
            conn.recv(12)
            conn.sendall(INIT + np.int32(0).tobytes() + np.int32(1).tobytes() + b" ")
            conn.sendall(POSDATA + h.tobytes() + np.linalg.inv(h).tobytes() + np.int32(len(box)).tobytes()
                         + pos.tobytes() + GETFORCE)
            out, _ = worker.communicate(timeout=120)
            conn.settimeout(5)
            try:
                reply = conn.recv(12)
            except OSError:
                reply = b""
    finally:
        if worker.poll() is None:
            worker.kill()
        server.close()
        os.unlink(IPI_PREFIX + name)
    assert worker.returncode == 4, out
    assert "position of MM atom 40 in frame 0 is not finite" in out and reply == b"", out


# --------------------------------------------------------------------------- with a real i-PI


def _data_lines(path) -> int:
    """Steps i-PI has written to a properties file so far."""
    if not path.exists():
        return 0
    return sum(1 for line in path.read_text().splitlines() if line.strip() and not line.startswith("#"))


def test_atom_count_mismatch(procs, tmp_path, tiny_model_file):
    """i-PI simulates 93 atoms, the worker's system file has 63: refused, nothing sent back."""
    ipi_frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    small = write_frame(water_cluster(n_mm=20), tmp_path / "small.extxyz", box=CLUSTER_BOX)
    name = procs.socket_name()
    ipi = procs.start_ipi(ipi_input(name, ipi_frame.name, steps=5, trajectories=False))
    procs.wait_socket(name, ipi)
    worker = procs.start_worker(["--model", tiny_model_file, "--system", small, "--unix", name])
    rc = procs.finish(worker, 90)
    out = procs.log(worker)
    assert rc == 2, out
    assert f"error: i-PI sent 93 atoms but the system file {small} has 63" in out, out
    assert served_counts(out) == [(0, 0)], out
    # i-PI never received a result: no step was completed
    assert _data_lines(tmp_path / "sim.out") == 0


def test_unknown_ffsocket_parameter(procs, tmp_path, tiny_model_file):
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    name = procs.socket_name()
    ipi = procs.start_ipi(ipi_input(name, frame.name, steps=5, trajectories=False,
                                    parameters="{coupling: 0.5, cutoff: 3}"))
    procs.wait_socket(name, ipi)
    worker = procs.start_worker(["--model", tiny_model_file, "--system", frame, "--unix", name])
    rc = procs.finish(worker, 90)
    out = procs.log(worker)
    assert rc == 2, out
    assert "unknown parameter(s) ['cutoff'] in the <parameters> of the i-PI <ffsocket>" in out, out
    assert "coupling" in out.split("unknown parameter")[1], out  # names what is supported


def test_ipi_dies_without_exit(procs, tmp_path, tiny_model_file):
    """i-PI killed mid-run: the worker says so and exits non-zero instead of waiting forever."""
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    name = procs.socket_name()
    ipi = procs.start_ipi(ipi_input(name, frame.name, steps=100000, dt_fs=0.1, trajectories=False))
    procs.wait_socket(name, ipi)
    worker = procs.start_worker(["--model", tiny_model_file, "--system", frame, "--unix", name])
    props = tmp_path / "sim.out"
    procs.wait_for(lambda: _data_lines(props) >= 3, "i-PI to complete 3 steps", timeout=90, procs=[ipi, worker])
    procs.kill(ipi, signal.SIGKILL)
    rc = procs.finish(worker, 30)
    out = procs.log(worker)
    assert rc == 3, out
    assert "i-PI closed the connection without sending EXIT" in out, out
    (served, _), = served_counts(out)
    assert served >= 3, out
