"""The QM/MM structure and the exchange format: units at the file boundary, compressed files, one validator
with clear errors, QM selections, whole molecules, torn and atomic writes."""

import lzma

import ase.io
import numpy as np
import pytest
from ase.calculators.singlepoint import SinglePointCalculator

from qmmm_driver.structures import (LABEL_INFO, QMMMStructure, StructureError, augmented, complete_frames,
                                    parse_selection, read_structures, structures_text, write_structures)

from conftest import water_box, water_cluster


def labelled_atoms():
    atoms = water_cluster(n_mm=3)
    forces = np.random.default_rng(0).normal(size=(len(atoms), 3))
    atoms.calc = SinglePointCalculator(atoms, energy=-2078.5, forces=forces)
    return atoms, forces


def test_units_at_the_boundary(tmp_path):
    atoms, forces = labelled_atoms()
    s = QMMMStructure.from_atoms(atoms)
    assert s.energy == pytest.approx(-2078.5 / 27.211386024367243)
    assert np.allclose(s.positions, atoms.positions / 0.5291772105638411)
    assert np.allclose(s.forces, forces * 0.5291772105638411 / 27.211386024367243)
    write_structures(tmp_path / "f.extxyz", [s])
    back = read_structures(tmp_path / "f.extxyz")[0]
    assert back.energy == pytest.approx(s.energy, abs=1e-12)
    assert np.allclose(back.forces, s.forces, atol=1e-12) and np.array_equal(back.qm, s.qm)
    plain = ase.io.read(tmp_path / "f.extxyz")  # plain ASE reads the same numbers, in eV and Angstrom
    assert plain.get_potential_energy() == pytest.approx(-2078.5) and np.allclose(plain.get_forces(), forces)


def test_a_moved_copy_drops_the_labels_and_their_info():
    atoms, _ = labelled_atoms()
    atoms.info.update(reference="b3lyp/6-31+g*", qm_charges_scheme="iao", source_index=7, environment="bulk")
    s = QMMMStructure.from_atoms(atoms)
    pos = s.positions + 0.1
    m = s.moved(pos, augmented="shifted")
    assert m.energy is None and m.forces is None and m.qm_charges is None and m.dipole is None
    assert m.info == {**{k: v for k, v in s.info.items() if k not in LABEL_INFO}, "augmented": "shifted"}
    assert "environment" in m.info and not set(LABEL_INFO) & set(m.info)
    assert np.array_equal(m.positions, pos) and np.array_equal(m.mm_charge, s.mm_charge)
    assert s.energy is not None and s.info["source_index"] == 7  # the original is untouched


def test_augmented_frames_skip_refusals_and_stop_at_the_count():
    source = [QMMMStructure.from_atoms(labelled_atoms()[0]) for _ in range(6)]
    for k, s in enumerate(source):
        s.info["k"] = k
    made = augmented(source, lambda f: None if f.info["k"] % 2 else f.moved(f.positions, made_from=f.info["k"]), 2,
                     np.random.default_rng(4))
    assert len(made) == 2 and all(m.info["made_from"] % 2 == 0 for m in made)
    again = augmented(source, lambda f: None if f.info["k"] % 2 else f.moved(f.positions, made_from=f.info["k"]), 2,
                      np.random.default_rng(4))
    assert [m.info["made_from"] for m in made] == [m.info["made_from"] for m in again]  # the seed fixes the order


def test_compressed_files_read_like_plain_ones(tmp_path):
    frames = [QMMMStructure.from_atoms(labelled_atoms()[0]) for _ in range(3)]
    write_structures(tmp_path / "f.extxyz", frames, decimals=6)
    (tmp_path / "f.extxyz.xz").write_bytes(lzma.compress((tmp_path / "f.extxyz").read_bytes()))
    plain, packed = read_structures(tmp_path / "f.extxyz"), read_structures(tmp_path / "f.extxyz.xz")
    assert len(packed) == 3 and all(np.array_equal(a.forces, b.forces) for a, b in zip(plain, packed))


def test_bad_frames_are_named(tmp_path):
    atoms, _ = labelled_atoms()
    del atoms.arrays["mm_charge"]
    ase.io.write(tmp_path / "nocharge.extxyz", atoms)
    with pytest.raises(StructureError, match=r"nocharge.extxyz frame 0: no per-atom 'mm_charge' array"):
        read_structures(tmp_path / "nocharge.extxyz")
    atoms, _ = labelled_atoms()
    atoms.positions[5, 1] = np.nan
    ase.io.write(tmp_path / "nan.extxyz", atoms)
    with pytest.raises(StructureError, match="position of atom 5 is not finite"):
        read_structures(tmp_path / "nan.extxyz")
    ase.io.write(tmp_path / "raw.extxyz", water_cluster(n_mm=2))
    with pytest.raises(StructureError, match="frame 0 has no energy/forces labels"):
        read_structures(tmp_path / "raw.extxyz", require_labels=True)
    atoms = water_cluster(n_mm=2)
    atoms.arrays["qm"][:] = 0
    with pytest.raises(StructureError, match="the QM region is empty"):
        QMMMStructure.from_atoms(atoms)


def test_selection_parsing_and_messages():
    assert parse_selection("0-2, 5,9-9", 10).tolist() == [0, 1, 2, 5, 9]
    with pytest.raises(StructureError, match="range '5-2' runs backwards"):
        parse_selection("5-2", 10)
    with pytest.raises(StructureError, match="cannot read QM selection token 'x'"):
        parse_selection("0,x", 10)
    with pytest.raises(StructureError, match="names atom 12, but the system has 10 atoms"):
        parse_selection("12", 10)


def test_a_cut_molecule_is_refused():
    """Half a water as QM, with a 'molecule' array or from connectivity: refused, naming the atom."""
    atoms = water_box()
    atoms.set_array("molecule", np.repeat(np.arange(len(atoms) // 3), 3))
    with pytest.raises(StructureError, match=r"MM atom 2 is in the same molecule as QM atom 0"):
        QMMMStructure.from_atoms(atoms, qm="0-1")
    del atoms.arrays["molecule"]
    with pytest.raises(StructureError, match=r"MM atom 2 is in the same molecule as QM atom 0 \(covalent connectivity"):
        QMMMStructure.from_atoms(atoms, qm="0-1").mm_molecules()
    assert QMMMStructure.from_atoms(atoms, qm="0-2").mm_molecules().max() == len(atoms) // 3 - 2


def test_torn_last_frame_is_detected_even_when_cut_inside_a_number(tmp_path):
    frames = [QMMMStructure.from_atoms(labelled_atoms()[0]) for _ in range(3)]
    path = tmp_path / "f.extxyz"
    write_structures(path, frames, decimals=6)
    data = path.read_bytes()
    size, count = complete_frames(path)
    assert (size, count) == (len(data), 3)
    two = len(structures_text(frames[:2], decimals=6).encode())
    for cut in (len(data) - 1, len(data) - 5, len(data) - 200):  # inside a number, inside a line, lines missing
        path.write_bytes(data[:cut])
        assert complete_frames(path) == (two, 2)


def test_writing_a_file_replaces_it_atomically(tmp_path, monkeypatch):
    """A crash while writing leaves the old file whole (the text goes to a temporary beside it first)."""
    path = tmp_path / "f.extxyz"
    write_structures(path, [QMMMStructure.from_atoms(labelled_atoms()[0])])
    before = path.read_bytes()
    import os

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        write_structures(path, [QMMMStructure.from_atoms(water_cluster(n_mm=5))])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.extxyz"]
    monkeypatch.undo()

    def stopped(*args):  # SIGTERM (raised as an interrupt) while the new text is flushed to disk
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "fsync", stopped)
    with pytest.raises(KeyboardInterrupt):
        write_structures(path, [QMMMStructure.from_atoms(water_cluster(n_mm=5))])
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.extxyz"]  # no half-written temporary left
