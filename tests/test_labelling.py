"""PySCF reference labels: forces equal finite differences (QM and MM atoms), resumable runs, failures,
torn and killed writes, no scratch files left behind."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace

import numpy as np
import pytest

from qmmm_driver.labelling import label_file, label_frame
from qmmm_driver.structures import QMMMStructure, complete_frames, read_structures, write_structures

from conftest import water_cluster


def small_frame(n_mm=4, seed=1):
    return QMMMStructure.from_atoms(water_cluster(n_mm=n_mm, seed=seed))


@pytest.fixture(scope="module")
def labelled():
    from pyscf import lib

    lib.num_threads(1)
    frame = small_frame()
    return frame, label_frame(frame)


def _energy(frame, atom, comp, h):
    moved = replace(frame, positions=frame.positions.copy())
    moved.positions[atom, comp] += h
    return label_frame(moved).energy


@pytest.mark.parametrize("atom,comp", [(1, 2), (4, 0)])  # a QM hydrogen, an MM hydrogen
def test_forces_equal_finite_differences(labelled, atom, comp):
    frame, lab = labelled
    h = 2e-3  # Bohr
    fd = -(_energy(frame, atom, comp, h) - _energy(frame, atom, comp, -h)) / (2 * h)
    assert lab.forces[atom, comp] == pytest.approx(fd, abs=2e-5, rel=1e-3)
    assert abs(fd) > 1e-4  # the check has teeth


def test_label_contents(labelled):
    frame, lab = labelled
    qm = frame.qm
    assert lab.qm_charges[qm].sum() == pytest.approx(0.0, abs=1e-6)
    assert np.all(lab.qm_charges[~qm] == 0)
    assert lab.qm_charges[0] < -0.3 and lab.qm_charges[1] > 0.1  # O negative, H positive (IAO)
    assert "B3LYP/6-31+g*" in lab.info["reference"] and lab.info["qm_charges_scheme"] == "iao"
    assert -76.6 < lab.energy < -76.3  # Hartree: a water molecule at B3LYP
    # Newton's third law over all atoms: the QM/MM energy is translation invariant
    assert np.abs(lab.forces.sum(axis=0)).max() < 1e-4


def test_resume_torn_file_and_failed_frames(tmp_path):
    from pyscf import lib

    lib.num_threads(1)
    frames = [small_frame(n_mm=2, seed=s) for s in (1, 2, 3)]
    bad = QMMMStructure(numbers=np.array([8, 1]), positions=np.array([[0.0, 0, 0], [1.8, 0, 0]]),
                        qm=np.array([True, True]), mm_charge=np.zeros(2))  # OH with multiplicity 1: impossible
    source = tmp_path / "in.extxyz"
    write_structures(source, [frames[0], bad, frames[1], frames[2]])
    out = tmp_path / "out.extxyz"
    assert label_file(source, out, limit=2, progress=False) == (1, 1)
    failed = json.loads((tmp_path / "out.extxyz.failed.json").read_text())
    assert list(failed) == ["1"] and "multiplicity" in failed["1"]
    with open(out, "a") as fh:  # a run killed while writing leaves a torn frame
        fh.write("57\nProperties=species:S:1:pos:R:3 energy=1.0\nO 0.0 0.0\n")
    assert label_file(source, out, progress=False) == (2, 0)
    done = read_structures(out, require_labels=True)
    assert sorted(f.info["source_index"] for f in done) == [0, 2, 3]
    assert label_file(source, out, progress=False) == (0, 0)


def test_spread_order_is_a_fixed_permutation(tmp_path, monkeypatch):
    """--spread labels a reproducible shuffled subset first, and resuming completes the rest."""
    import qmmm_driver.labelling as lab

    monkeypatch.setattr(lab, "label_frame", fake_label)
    source = tmp_path / "in.extxyz"
    write_structures(source, [small_frame(n_mm=1, seed=s) for s in range(6)])
    out = tmp_path / "out.extxyz"
    assert label_file(source, out, limit=3, progress=False, spread=True) == (3, 0)
    first = [f.info["source_index"] for f in read_structures(out)]
    assert first == np.random.default_rng(0).permutation(6)[:3].tolist() and first != [0, 1, 2]
    assert label_file(source, out, progress=False, spread=True) == (3, 0)
    assert sorted(f.info["source_index"] for f in read_structures(out)) == list(range(6))


def fake_label(frame, *args, **kwargs):
    """A stand-in for the SCF where the file handling, not PySCF, is under test."""
    out = replace(frame, energy=-1.0, forces=np.full_like(frame.positions, 0.123456789))
    out.density = None
    return out


def test_a_last_line_cut_inside_a_number_is_not_read_as_a_shorter_number(tmp_path, monkeypatch):
    import qmmm_driver.labelling as lab

    monkeypatch.setattr(lab, "label_frame", fake_label)
    source = tmp_path / "in.extxyz"
    write_structures(source, [small_frame(n_mm=1, seed=s) for s in range(3)])
    out = tmp_path / "out.extxyz"
    assert label_file(source, out, progress=False) == (3, 0)
    data = out.read_bytes()
    out.write_bytes(data[:-4])  # "... 0.123457\n" -> "... 0.123": a valid, wrong number without its newline
    assert label_file(source, out, progress=False) == (1, 0)  # the cut frame is labelled again
    frames = read_structures(out)
    assert [f.info["source_index"] for f in frames] == [0, 1, 2]
    assert out.read_bytes() == data


def test_kill_during_the_repair_of_a_torn_file_loses_no_frame(tmp_path):
    """kill -9 at random moments while `qmmm-driver label` rewrites a 398-frame output with a torn last frame:
    the file always holds every complete frame (the rewrite goes aside, fsync, rename)."""
    frames = [small_frame(n_mm=20, seed=s % 7) for s in range(398)]
    for k, f in enumerate(frames):
        f.info["source_index"] = k
    labelled = [replace(f, energy=-1.0, forces=np.zeros_like(f.positions)) for f in frames]
    source, out = tmp_path / "in.extxyz", tmp_path / "out.extxyz"
    write_structures(source, frames[:1] * 399)
    full = tmp_path / "full.extxyz"
    write_structures(full, labelled, decimals=6)
    body = full.read_bytes()
    rng = np.random.default_rng(0)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    for attempt in range(6):
        out.write_bytes(body + b"93\nProperties=species:S:1:pos:R:3 energy=1.0\nO 0.0 0.")  # a torn 399th frame
        proc = subprocess.Popen([sys.executable, "-m", "qmmm_driver.cli", "label", str(source), "--out", str(out),
                                 "--threads", "1"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        time.sleep(float(rng.uniform(0.5, 4.0)))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        size, count = complete_frames(out)
        assert count >= 398 and out.read_bytes()[:len(body)] == body, (attempt, count)
    assert label_file(source, out, limit=0, progress=False) == (0, 0)  # a later run clears killed rewrites
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.extxyz")]


def test_no_scratch_files_are_left_behind(tmp_path, monkeypatch):
    import tempfile

    from pyscf import lib

    lib.num_threads(1)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "scratch"))
    (tmp_path / "scratch").mkdir()
    (tmp_path / "scratch" / "qmmm-driver-label-999999999").mkdir()  # left by a killed run (no such process)
    source = tmp_path / "in.extxyz"
    write_structures(source, [small_frame(n_mm=2)])
    assert label_file(source, tmp_path / "out.extxyz", progress=False) == (1, 0)
    assert list((tmp_path / "scratch").iterdir()) == []
