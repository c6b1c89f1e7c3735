"""The training domain: recorded by training, stored in the model file, reported when a structure leaves it."""

from __future__ import annotations

import os
import socket
import subprocess
import time
import warnings

import numpy as np
import pytest

from qmmm_driver.domain import STEP, TOLERANCE, DomainCheck, ExtrapolationWarning, fit_domain, nearest_by_element
from qmmm_driver.evaluator import ModelEvaluator, load
from qmmm_driver.launcher import MODELS
from qmmm_driver.nn.io import save_model
from qmmm_driver.structures import QMMMStructure, read_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import IPI_PREFIX, REPO, WORKER_CMD, tiny_model, water_cluster, write_frame

ELEMENTS = ["H", "O"]


def water(oh1: float, oh2: float = 0.96, angle: float = 104.5) -> np.ndarray:
    """O at the origin, two H at the given distances (Bohr), as [3, 3] in the order O, H, H."""
    t = np.radians(angle)
    return np.array([[0.0, 0.0, 0.0], [oh1, 0.0, 0.0], [oh2 * np.cos(t), oh2 * np.sin(t), 0.0]])


def test_nearest_by_element_per_atom_and_element():
    pos = water(1.0, 2.0, angle=90.0)[None]
    near = nearest_by_element(pos, np.array([1, 0, 0]), 2, cutoff=10.0)[0]
    np.testing.assert_allclose(near[0], [1.0, 10.0])                 # O: nearest H at 1, no other O
    np.testing.assert_allclose(near[1], [np.sqrt(5.0), 1.0])         # H1: the other H, then O
    np.testing.assert_allclose(near[2], [np.sqrt(5.0), 2.0])
    assert nearest_by_element(pos, np.array([1, 0, 0]), 2, cutoff=1.5)[0, 2, 1] == 1.5  # counted up to the cutoff


def test_fit_domain_spans_every_frame_and_leaves_out_absent_pairs():
    frames = [(np.stack([water(1.7 + 0.05 * k, 1.8), water(1.8, 1.9 - 0.02 * k)]), np.array([1, 0, 0]))
              for k in range(3)]
    domain = fit_domain(frames, ELEMENTS, cutoff=10.0)
    assert domain["cutoff"] == 10.0
    assert set(domain["nearest"]) == {"H-O", "O-H", "H-H"}            # no O has another O
    assert domain["nearest"]["H-O"] == pytest.approx([1.7, 1.9])
    assert domain["nearest"]["O-H"] == pytest.approx([1.7, 1.8])


def test_check_reports_a_stretched_bond_once_then_only_as_it_grows():
    domain = fit_domain([(np.stack([water(r, r) for r in (1.7, 1.9)]), np.array([1, 0, 0]))], ELEMENTS, 10.0)
    seen = []
    check = DomainCheck(domain, ELEMENTS, np.array([1, 0, 0]), ["QM atom 5", "QM atom 6", "QM atom 7"], seen.append)
    assert check.check(water(1.8, 1.8)[None]) == 0.0 and not seen
    assert check.check(water(1.9 + 0.5 * TOLERANCE, 1.8)[None]) <= TOLERANCE and not seen   # within tolerance
    far = 1.9 + 2 * TOLERANCE
    assert check.check(np.stack([water(1.8, 1.8), water(far, 1.8)])) == pytest.approx(2 * TOLERANCE)
    assert len(seen) == 1
    message = seen[0]
    assert "frame 1" in message and "QM atom 6 (H)" in message and "nearest QM O" in message
    assert f"{far / ANGSTROM_TO_BOHR:.2f} A" in message and f"{1.7 / ANGSTROM_TO_BOHR:.2f}-" in message
    check.check(water(far + 0.5 * STEP, 1.8)[None])                  # grown, but by less than STEP: quiet
    assert len(seen) == 1
    check.check(water(far + 1.5 * STEP, 1.8)[None])
    assert len(seen) == 2
    check.check(water(1.8, 1.8, angle=40.0)[None])                    # H-H too near: another kind, reported
    assert len(seen) == 3 and "nearest QM H" in seen[2] and "QM atom 6 (H)" in seen[2]


def test_the_shipped_models_know_their_domain():
    water_model, sn2_model = load(MODELS / "water" / "model.pt"), load(MODELS / "sn2" / "model.pt")
    h_o = water_model.metadata["statistics"]["domain"]["nearest"]["H-O"]
    assert h_o[0] / ANGSTROM_TO_BOHR < 0.95 and 1.2 < h_o[1] / ANGSTROM_TO_BOHR < 2.0
    c_cl = sn2_model.metadata["statistics"]["domain"]["nearest"]["C-Cl"]   # the shorter C-Cl bond
    assert c_cl[0] / ANGSTROM_TO_BOHR < 1.8 and 2.3 < c_cl[1] / ANGSTROM_TO_BOHR < 2.6


def stretched(frame: QMMMStructure, length_A: float) -> np.ndarray:
    """The positions of ``frame`` with the first QM hydrogen moved along its O-H to ``length_A``."""
    qm = frame.qm_indices
    o, h = qm[frame.numbers[qm] == 8][0], qm[frame.numbers[qm] == 1][0]
    pos = frame.positions.copy()
    u = pos[h] - pos[o]
    pos[h] = pos[o] + u / np.linalg.norm(u) * length_A * ANGSTROM_TO_BOHR
    return pos


def test_the_evaluator_warns_when_the_shipped_water_model_extrapolates():
    frame = read_structures(MODELS / "water" / "system.extxyz")[0]
    ev = ModelEvaluator(load(MODELS / "water" / "model.pt"), frame)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)
        ev.compute(frame.positions, frame.cell[None])                # the shipped system: inside
    with pytest.warns(ExtrapolationWarning, match=r"QM atom \d+ \(H\) has its nearest QM O at 2\.40 A"):
        ev.compute(stretched(frame, 2.4), frame.cell[None])


def test_the_worker_logs_the_extrapolation(tmp_path):
    """A real worker on a scripted socket: the warning is one line of its log, and it still answers."""
    from qmmm_driver.ipi.client import EXIT, FORCEREADY, GETFORCE, INIT, POSDATA, STATUS

    atoms = water_cluster(n_mm=8)
    frame_path = write_frame(atoms, tmp_path / "cluster.extxyz")
    frame = QMMMStructure.from_atoms(atoms)
    model_path = tmp_path / "model.pt"
    oh = np.linalg.norm(frame.positions[1:3] - frame.positions[0], axis=1)
    domain = {"cutoff": 10.0, "nearest": {"H-O": [float(oh.min()) - 0.1, float(oh.max()) + 0.1]}}
    save_model(tiny_model(), model_path, metadata={"statistics": {"domain": domain}})
    name = f"qmt_domain_{time.time_ns()}"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(IPI_PREFIX + name)
    server.listen(1)
    server.settimeout(120)  # a worker that dies before connecting fails the test instead of hanging it
    worker = subprocess.Popen(WORKER_CMD + ["--model", str(model_path), "--system", str(frame_path),
                                            "--unix", name],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        conn, _ = server.accept()
        with conn:
            pos = stretched(frame, 1.6)
            h = np.eye(3) * 100.0
            conn.sendall(STATUS)
            conn.recv(12)
            conn.sendall(INIT + np.int32(0).tobytes() + np.int32(1).tobytes() + b" ")
            conn.sendall(POSDATA + h.tobytes() + np.linalg.inv(h).tobytes() + np.int32(len(atoms)).tobytes()
                         + pos.tobytes() + GETFORCE)
            conn.settimeout(60)
            reply = conn.recv(12, socket.MSG_WAITALL)
            conn.sendall(EXIT)
            out, _ = worker.communicate(timeout=60)
    finally:
        if worker.poll() is None:
            worker.kill()
        server.close()
        os.unlink(IPI_PREFIX + name)
    assert reply == FORCEREADY and worker.returncode == 0, out
    lines = [line for line in out.splitlines() if "extrapolating" in line]
    assert len(lines) == 1 and lines[0].startswith("qmmm-driver run: warning: the model is extrapolating"), out
    assert "nearest QM O at 1.60 A" in lines[0], out


def test_evaluate_counts_the_frames_outside_the_domain_once_each():
    from qmmm_driver.training.metrics import evaluate_structures

    model = load(MODELS / "water" / "model.pt")
    frames = read_structures(REPO / "examples/water/data/water_stretched_oh.extxyz.xz",
                             index=":8")
    largest = model.metadata["statistics"]["domain"]["nearest"]["H-O"][1]
    beyond = [max(np.linalg.norm(f.positions[f.qm_indices[1:]] - f.positions[f.qm_indices[0]], axis=1)) - largest
              for f in frames]
    assert 0 < sum(b > TOLERANCE for b in beyond) < len(frames)         # both kinds among these frames
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExtrapolationWarning)          # no warning per frame
        metrics, _ = evaluate_structures(model, frames, 6.0 * ANGSTROM_TO_BOHR)
    summary = metrics.summary()
    assert summary["frames_outside_domain"] == sum(b > TOLERANCE for b in beyond)
    assert summary["largest_excursion_A"] == pytest.approx(max(beyond) / ANGSTROM_TO_BOHR, abs=1e-6)
