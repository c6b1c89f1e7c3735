"""PySCF reference labels: forces equal finite differences (QM and MM atoms), resumable runs, failures."""

import json

import numpy as np
import pytest

from qmmm_driver.frames import Frame, read_frames, write_frames
from qmmm_driver.labelling import label_file, label_frame

from conftest import water_cluster


def small_frame(n_mm=4, seed=1):
    return Frame.from_atoms(water_cluster(n_mm=n_mm, seed=seed))


@pytest.fixture(scope="module")
def labelled():
    from pyscf import lib

    lib.num_threads(1)
    frame = small_frame()
    return frame, label_frame(frame)


def _energy(frame, atom, comp, h):
    moved = Frame(numbers=frame.numbers, positions=frame.positions.copy(), qm=frame.qm,
                  mm_charge=frame.mm_charge)
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
    bad = Frame(numbers=np.array([8, 1]), positions=np.array([[0.0, 0, 0], [1.8, 0, 0]]),
                qm=np.array([True, True]), mm_charge=np.zeros(2))  # OH with multiplicity 1: impossible
    source = tmp_path / "in.extxyz"
    write_frames(source, [frames[0], bad, frames[1], frames[2]])
    out = tmp_path / "out.extxyz"
    assert label_file(source, out, limit=2, progress=False) == (1, 1)
    failed = json.loads((tmp_path / "out.extxyz.failed.json").read_text())
    assert list(failed) == ["1"] and "multiplicity" in failed["1"]
    with open(out, "a") as fh:  # a run killed while writing leaves a torn frame
        fh.write("57\nProperties=species:S:1:pos:R:3 energy=1.0\nO 0.0 0.0\n")
    assert label_file(source, out, progress=False) == (2, 0)
    done = read_frames(out, require_labels=True)
    assert sorted(f.info["source_index"] for f in done) == [0, 2, 3]
    assert label_file(source, out, progress=False) == (0, 0)


def test_spread_order_is_a_fixed_permutation(tmp_path, monkeypatch):
    """--spread labels a reproducible shuffled subset first, and resuming completes the rest."""
    import qmmm_driver.labelling as lab

    def fake(frame, *args, **kwargs):  # the order is under test here, not PySCF
        out = Frame(numbers=frame.numbers, positions=frame.positions, qm=frame.qm, mm_charge=frame.mm_charge,
                    energy=-1.0, forces=np.zeros_like(frame.positions))
        out.density = None
        return out

    monkeypatch.setattr(lab, "label_frame", fake)
    source = tmp_path / "in.extxyz"
    write_frames(source, [small_frame(n_mm=1, seed=s) for s in range(6)])
    out = tmp_path / "out.extxyz"
    assert label_file(source, out, limit=3, progress=False, spread=True) == (3, 0)
    first = [f.info["source_index"] for f in read_frames(out)]
    assert first == np.random.default_rng(0).permutation(6)[:3].tolist() and first != [0, 1, 2]
    assert label_file(source, out, progress=False, spread=True) == (3, 0)
    assert sorted(f.info["source_index"] for f in read_frames(out)) == list(range(6))
