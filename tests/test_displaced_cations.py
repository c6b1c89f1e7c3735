"""examples/sn2/displaced_cations.py: the cation in contact moves alone, along its chlorine axis, to the distance asked."""

import numpy as np
import pytest

from qmmm_driver.structures import read_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import REPO, load_example

DATA = REPO / "examples" / "sn2" / "data"


def test_the_cation_moves_alone_along_the_chlorine_axis():
    script = load_example("examples/sn2/displaced_cations.py")
    frame = read_structures(DATA / "sn2_end_on.extxyz.xz", index="0")[0]
    new = script.displace(frame, 2.8)
    assert new is not None
    moved = np.flatnonzero(np.any(new.positions != frame.positions, axis=1))
    assert len(moved) == 1 and frame.numbers[moved[0]] in script.CATIONS
    ion = moved[0]
    chlorines = [i for i in frame.qm_indices if frame.numbers[i] == script.CHLORINE]
    cl = min(chlorines, key=lambda i: np.linalg.norm(frame.positions[i] - frame.positions[ion]))
    assert np.linalg.norm(new.positions[ion] - new.positions[cl]) / ANGSTROM_TO_BOHR == pytest.approx(2.8)
    np.testing.assert_allclose(np.cross(frame.positions[ion] - frame.positions[cl],
                                        new.positions[ion] - frame.positions[cl]), 0.0, atol=1e-9)
    assert new.energy is None and new.forces is None
    assert new.info["environment"] == "displaced cation"
    assert new.info["ion_distance"] == pytest.approx(
        np.linalg.norm(new.positions[frame.qm_indices] - new.positions[ion], axis=1).min() / ANGSTROM_TO_BOHR, abs=1e-4)


def test_frames_without_a_cation_in_contact_or_with_a_qm_atom_in_the_way_are_skipped():
    script = load_example("examples/sn2/displaced_cations.py")
    bulk = read_structures(DATA / "sn2_bulk.extxyz.xz", index="0")[0]
    assert script.displace(bulk, 2.8) is None
    frame = read_structures(DATA / "sn2_end_on.extxyz.xz", index="0")[0]
    target = script.displace(frame, 3.0)
    ion = np.flatnonzero(np.any(target.positions != frame.positions, axis=1))[0]
    hydrogen = next(i for i in frame.qm_indices if frame.numbers[i] == 1)
    crowded = frame.positions.copy()
    crowded[hydrogen] = target.positions[ion] + [1.5 * ANGSTROM_TO_BOHR, 0.0, 0.0]  # inside the clearance
    assert script.displace(frame.moved(crowded), 3.0) is None


def test_only_training_frames_of_the_end_on_files_are_sources():
    script = load_example("examples/sn2/displaced_cations.py")
    frames = script.training_frames(REPO / "examples" / "sn2" / "split.json")
    assert frames and all(s.info.get("ion_end_on_deg") is not None for s in frames)
    ends = [read_structures(DATA / name.removeprefix("data/")) for name in script.SOURCES]
    assert len(frames) < sum(map(len, ends))  # the validation and test frames are left out
