"""examples/sn2/close_contacts.py: the moved water lands where asked, rigid, and nothing else moves."""

import numpy as np

from qmmm_driver.launcher import MODELS
from qmmm_driver.structures import read_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import load_example


def test_pushed_water_is_rigid_and_in_range():
    script = load_example("examples/sn2/close_contacts.py")
    frame = read_structures(MODELS / "sn2" / "system.extxyz")[0]
    rng = np.random.default_rng(3)
    made = [f for f in (script.push_water(frame, rng) for _ in range(20)) if f is not None]
    assert made, "no frame could be made from the example system"
    for new in made:
        moved = np.flatnonzero(np.any(new.positions != frame.positions, axis=1))
        assert len(moved) == 3 and moved[1] == moved[0] + 1 == moved[2] - 1  # one whole water
        o = moved[0]
        assert new.numbers[o] == 8 and not new.qm[moved].any()
        shift = new.positions[moved] - frame.positions[moved]
        np.testing.assert_allclose(shift, shift[[0, 0, 0]], atol=1e-12)  # rigid translation
        target = int(new.info["augmented"].split("QM atom ")[1])
        d = np.linalg.norm(new.positions[o] - new.positions[target]) / ANGSTROM_TO_BOHR
        lo, hi = (2.3, 3.0) if new.numbers[target] == 6 else (2.0, 2.6)
        assert lo <= d <= hi
        assert new.energy is None and "reference" not in new.info  # unlabelled, no stale label metadata
        np.testing.assert_array_equal(new.mm_charge, frame.mm_charge)
