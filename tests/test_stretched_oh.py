"""examples/water/stretched_oh.py: one hydrogen of the QM water moves along its O-H bond to the length asked."""

import numpy as np
import pytest

from qmmm_driver.launcher import MODELS
from qmmm_driver.structures import read_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import load_example


def test_one_hydrogen_moves_along_its_bond():
    script = load_example("examples/water/stretched_oh.py")
    frame = read_structures(MODELS / "water" / "system.extxyz")[0]
    rng = np.random.default_rng(0)
    made = [f for f in (script.stretch_oh(frame, 1.6, rng) for _ in range(6)) if f is not None]
    assert made, "no frame could be made from the example system"
    qm = frame.qm_indices
    oxygen = qm[frame.numbers[qm] == 8][0]
    for new in made:
        moved = np.flatnonzero(np.any(new.positions != frame.positions, axis=1))
        assert len(moved) == 1 and moved[0] in qm and new.numbers[moved[0]] == 1
        h = moved[0]
        assert np.linalg.norm(new.positions[h] - new.positions[oxygen]) / ANGSTROM_TO_BOHR == pytest.approx(1.6)
        before, after = frame.positions[h] - frame.positions[oxygen], new.positions[h] - new.positions[oxygen]
        np.testing.assert_allclose(np.cross(before, after), 0.0, atol=1e-9)  # along the bond
        assert new.energy is None and "reference" not in new.info
