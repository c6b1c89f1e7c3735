"""The exchange format: units at the file boundary, compressed files, clear errors on bad frames."""

import lzma

import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from qmmm_driver.frames import Frame, FrameError, read_frames, write_frames

from conftest import water_cluster


def labelled_atoms():
    atoms = water_cluster(n_mm=3)
    forces = np.random.default_rng(0).normal(size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-2078.5, forces=forces)
    return atoms, forces


def test_units_at_the_boundary(tmp_path):
    atoms, forces = labelled_atoms()
    frame = Frame.from_atoms(atoms)
    assert frame.energy == pytest.approx(-2078.5 / 27.211386024367243)
    assert np.allclose(frame.positions, atoms.positions / 0.5291772105638411)
    assert np.allclose(frame.forces, forces * 0.5291772105638411 / 27.211386024367243)
    write_frames(tmp_path / "f.extxyz", [frame])
    back = read_frames(tmp_path / "f.extxyz")[0]
    assert back.energy == pytest.approx(frame.energy, abs=1e-12)
    assert np.allclose(back.forces, frame.forces, atol=1e-12) and np.array_equal(back.qm, frame.qm)
    import ase.io  # and plain ASE reads the same numbers, in eV and Angstrom

    plain = ase.io.read(tmp_path / "f.extxyz")
    assert plain.get_potential_energy() == pytest.approx(-2078.5) and np.allclose(plain.get_forces(), forces)


def test_compressed_files_read_like_plain_ones(tmp_path):
    frames = [Frame.from_atoms(labelled_atoms()[0]) for _ in range(3)]
    write_frames(tmp_path / "f.extxyz", frames, decimals=6)
    (tmp_path / "f.extxyz.xz").write_bytes(lzma.compress((tmp_path / "f.extxyz").read_bytes()))
    plain, packed = read_frames(tmp_path / "f.extxyz"), read_frames(tmp_path / "f.extxyz.xz")
    assert len(packed) == 3 and all(np.array_equal(a.forces, b.forces) for a, b in zip(plain, packed))


def test_bad_frames_are_named(tmp_path):
    atoms, _ = labelled_atoms()
    del atoms.arrays["mm_charge"]
    import ase.io

    ase.io.write(tmp_path / "nocharge.extxyz", atoms)
    with pytest.raises(FrameError, match=r"nocharge.extxyz frame 0: no per-atom 'mm_charge' array"):
        read_frames(tmp_path / "nocharge.extxyz")
    atoms, _ = labelled_atoms()
    atoms.positions[5, 1] = np.nan
    ase.io.write(tmp_path / "nan.extxyz", atoms)
    with pytest.raises(FrameError, match="position of atom 5 is not finite"):
        read_frames(tmp_path / "nan.extxyz")
    unlabelled = water_cluster(n_mm=2)
    ase.io.write(tmp_path / "raw.extxyz", unlabelled)
    with pytest.raises(FrameError, match="frame 0 has no energy/forces labels"):
        read_frames(tmp_path / "raw.extxyz", require_labels=True)
