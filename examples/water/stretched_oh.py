"""Stretched O-H frames for the water training set: one O-H of the QM water longer than any sampled frame has.

The frames of `qmmm-driver sample` keep the QM water near its equilibrium: no
O-H beyond 1.24 A. Sixteen-bead PIMD spreads the beads by zero-point motion and
one reached 1.50 A, where the shipped model's energy turns over (it falls by
eV where the true one keeps rising) and the run blew up. This script takes
labelled frames and moves one hydrogen of the QM water along its O-H bond to a
random length in ``--range`` (A); frames where the moved hydrogen comes closer
than 1.5 A to an MM atom are skipped. The result is unlabelled; label it with
`qmmm-driver label`.

    python examples/water/stretched_oh.py --out stretched_oh.extxyz --frames 120
    qmmm-driver label stretched_oh.extxyz --out examples/water/data/water_stretched_oh.extxyz --spread
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmmm_driver.structures import QMMMStructure, augmentation_script
from qmmm_driver.units import ANGSTROM_TO_BOHR

HERE = Path(__file__).resolve().parent
MIN_CLEARANCE_A = 1.5  # moved hydrogen vs every MM atom


def stretch_oh(frame: QMMMStructure, length_A: float, rng: np.random.Generator) -> QMMMStructure | None:
    """A copy of ``frame`` with one O-H of its QM water (chosen at random) ``length_A`` long, or None if the moved
    hydrogen would come within MIN_CLEARANCE_A of an MM atom."""
    qm = frame.qm_indices
    oxygen = int(qm[frame.numbers[qm] == 8][0])
    hydrogen = int(rng.choice(qm[frame.numbers[qm] == 1]))
    pos = frame.positions.copy()
    axis = pos[hydrogen] - pos[oxygen]
    pos[hydrogen] = pos[oxygen] + axis / np.linalg.norm(axis) * length_A * ANGSTROM_TO_BOHR
    gap = np.linalg.norm(pos[frame.mm_indices] - pos[hydrogen], axis=1).min()
    if gap < MIN_CLEARANCE_A * ANGSTROM_TO_BOHR:
        return None
    return frame.moved(pos, environment="stretched O-H", augmented=f"O-H of atom {hydrogen} at {length_A:.3f} A")


def main() -> None:
    augmentation_script(__doc__, HERE / "data" / "water_bulk.extxyz.xz", 120, "1.2:1.8", 17, stretch_oh,
                        "stretched O-H")


if __name__ == "__main__":
    main()
