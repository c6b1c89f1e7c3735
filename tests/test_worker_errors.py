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

from conftest import (CLUSTER_BOX, IPI_PREFIX, WORKER_CMD, ipi_input, served_counts,
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
            results[name] = (p.returncode, out, {**ctx, "good": good, "bare": bare_file,
                                                 "text_model": text_model, "future_model": future_model})
    finally:
        for p, _ in running.values():
            if p.poll() is None:
                p.kill()
                p.wait(10)
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
    _check(early_failures, "future_model", "{future_model} has model format version 99", "reads version 1")


def test_absent_unix_socket(early_failures):
    _check(early_failures, "absent_unix", f"no i-PI server at unix:{IPI_PREFIX}{{name}} after 1 s",
           "the socket file does not exist", '<ffsocket mode="unix"><address>{name}</address>',
           f'sockets_prefix="{IPI_PREFIX}"')


def test_refused_inet_socket(early_failures):
    _check(early_failures, "refused_inet", "no i-PI server at inet:127.0.0.1:{port} after 1 s", "refused",
           '<ffsocket mode="inet"><address>127.0.0.1</address><port>{port}</port>')


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
    assert "unknown parameter 'cutoff' in the <parameters> of the i-PI <ffsocket>" in out, out
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
