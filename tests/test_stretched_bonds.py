"""examples/sn2/stretched_bonds.py: both C-Cl bonds grow by the same amount along their axes, nothing else moves."""

import numpy as np
import pytest

from qmmm_driver.launcher import MODELS
from qmmm_driver.structures import read_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import load_example


def test_both_bonds_grow_along_their_axes():
    script = load_example("examples/sn2/stretched_bonds.py")
    frame = read_structures(MODELS / "sn2" / "system.extxyz")[0]
    c, cls = script.CARBON, list(script.CHLORINES)
    before = np.linalg.norm(frame.positions[cls] - frame.positions[c], axis=1)
    new = script.stretch(frame, 2.9)
    assert new is not None
    after = np.linalg.norm(new.positions[cls] - new.positions[c], axis=1)
    assert after.min() / ANGSTROM_TO_BOHR == pytest.approx(2.9)
    np.testing.assert_allclose(after - before, after[0] - before[0])  # same growth: xi unchanged
    for cl in cls:  # each chlorine moved along its own C-Cl axis
        axis = frame.positions[cl] - frame.positions[c]
        step = new.positions[cl] - frame.positions[cl]
        np.testing.assert_allclose(np.cross(axis, step), 0.0, atol=1e-9)
    moved = np.flatnonzero(np.any(new.positions != frame.positions, axis=1))
    assert sorted(moved) == cls
    assert new.energy is None and "reference" not in new.info
    assert script.stretch(frame, before.min() / ANGSTROM_TO_BOHR - 0.1) is None  # never shortens
