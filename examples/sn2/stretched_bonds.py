"""Stretched-bond frames for the SN2 training set: both C-Cl distances longer than any path frame has.

Every frame sampled along the reaction path keeps the methyl bonded: one C-Cl
distance stays under 2.4 A (at the transition state both are about 2.3 A).
Umbrella sampling at the transition state with a model trained only on such
frames found a hole there: the restraint on xi = d1 - d2 does not stop d1 and d2
growing together, the model energy did not rise when they did (it should: this
pulls a methyl cation away from two chlorides) and the window drifted to
d1 = d2 = 3.4 A and blew up. This script takes frames spread over the reaction
coordinate and lengthens both C-Cl distances by the same amount (xi unchanged),
moving each chlorine along its C-Cl axis, so that the shorter one lands at a
random value in ``--range`` (A). Frames where a moved chlorine comes closer than
1.6 A to an MM atom are skipped. The result is unlabelled; label it with
`qmmm-driver label`.

    python examples/sn2/stretched_bonds.py --out stretched.extxyz --frames 60
    qmmm-driver label stretched.extxyz --out examples/sn2/data/sn2_stretched.extxyz --spread
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from qmmm_driver.structures import QMMMStructure, augmentation_script
from qmmm_driver.units import ANGSTROM_TO_BOHR

HERE = Path(__file__).resolve().parent
CARBON, CHLORINES = 0, (4, 5)
MIN_CLEARANCE_A = 1.6  # moved chlorine vs every MM atom


def stretch(frame: QMMMStructure, shorter_A: float) -> QMMMStructure | None:
    """A copy of ``frame`` with both C-Cl distances lengthened so that the shorter is ``shorter_A``.

    None if a moved chlorine would come within MIN_CLEARANCE_A of an MM atom.
    """
    pos = frame.positions.copy()
    axes = pos[list(CHLORINES)] - pos[CARBON]
    d = np.linalg.norm(axes, axis=1)
    grow = shorter_A * ANGSTROM_TO_BOHR - d.min()
    if grow <= 0.0:
        return None
    for cl, axis, dist in zip(CHLORINES, axes, d):
        pos[cl] += axis / dist * grow
    gap = np.linalg.norm(pos[list(CHLORINES)][:, None] - pos[frame.mm_indices][None], axis=-1).min()
    if gap < MIN_CLEARANCE_A * ANGSTROM_TO_BOHR:
        return None
    new = np.linalg.norm(pos[list(CHLORINES)] - pos[CARBON], axis=1) / ANGSTROM_TO_BOHR
    return frame.moved(pos, environment="stretched C-Cl", augmented=f"both C-Cl lengthened by "
                       f"{grow / ANGSTROM_TO_BOHR:.2f} A to {new[0]:.2f} and {new[1]:.2f} A")


def main() -> None:
    augmentation_script(__doc__, HERE / "data" / "sn2_bulk.extxyz.xz", 60, "2.45:3.3", 13,
                        lambda frame, shorter_A, rng: stretch(frame, shorter_A), "stretched-bond")


if __name__ == "__main__":
    main()
