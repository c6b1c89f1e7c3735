"""The SN2 example's chemistry: Cl- + CH3Cl -> ClCH3 + Cl-, its reaction coordinate and reference path.

``xi = d(C-Cl1) - d(C-Cl2)`` (A): -2 at the reactant (CH3-Cl1 ... Cl2-), +2 at
the product. The reference path conserves bond order (``n = exp(-(d - d0)/a)``
with ``n1 + n2 = 1``) and moves the CH3 umbrella with ``n1 - n2``; along it the
solute's MM charges (used only when OpenMM samples the solvent around it) are
interpolated between reactant and product. Atoms: C, H1, H2, H3, Cl1, Cl2.
"""

from __future__ import annotations

import numpy as np

from qmmm_driver.launcher import MODELS
from qmmm_driver.mm.systems import Solute

#: the solute's force field (Lennard-Jones; reactant charges for MM sampling), shipped with the SN2 model
SOLUTE_XML = str(MODELS / "sn2" / "sn2_solute.xml")

#: C-Cl equilibrium distance and bond-order length scale (Angstrom) of the reference path
D0 = 1.80
A = 0.75
#: angle (degrees) between C-H and C->Cl1 in CH3-Cl1 (the umbrella); 90 at the transition state
UMBRELLA = 108.5
CH = 1.08
#: charges of C, H, H, H, Cl1, Cl2 in the reactant CH3-Cl1 + Cl2- (for MM sampling only)
REACTANT_CHARGES = np.array([-0.18, 0.11, 0.11, 0.11, -0.15, -1.0])


def bond_orders(xi: float) -> tuple[float, float]:
    """Bond orders n1, n2 (n1 + n2 = 1) of C-Cl1 and C-Cl2 at ``xi`` (A)."""
    n1 = 1.0 / (1.0 + np.exp(xi / A))
    return n1, 1.0 - n1


def geometry(xi: float, bend_deg: float = 0.0, azimuth_deg: float = 0.0) -> np.ndarray:
    """Reference geometry (A) of C, H1-3, Cl1, Cl2 at reaction coordinate ``xi``.

    On the path the three atoms Cl1, C, Cl2 are collinear. ``bend_deg`` turns the farther chloride (Cl2 for
    ``xi < 0``, Cl1 for ``xi > 0``) off that axis by this angle about C, at its distance, towards the azimuth
    ``azimuth_deg`` (0: the plane of C, H1 and the axis): the angle Cl-C-Cl becomes 180 - ``bend_deg``, as when
    a free chloride wanders round the methyl group."""
    n1, n2 = bond_orders(xi)
    d1, d2 = D0 - A * np.log(n1), D0 - A * np.log(n2)
    theta = np.radians(90.0 + (UMBRELLA - 90.0) * (n1 - n2))
    pos = np.zeros((6, 3))
    for k in range(3):
        phi = 2 * np.pi * k / 3
        pos[1 + k] = CH * np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    pos[4] = [0.0, 0.0, d1]
    pos[5] = [0.0, 0.0, -d2]
    if bend_deg:
        far, side = (5, -1.0) if xi < 0 else (4, 1.0)
        beta, phi = np.radians(bend_deg), np.radians(azimuth_deg)
        pos[far] = np.linalg.norm(pos[far]) * np.array([np.sin(beta) * np.cos(phi), np.sin(beta) * np.sin(phi),
                                                        side * np.cos(beta)])
    return pos


def xi_of(positions: np.ndarray) -> np.ndarray:
    """Reaction coordinate (same length unit) of [..., 6+, 3] positions (C, H, H, H, Cl1, Cl2)."""
    p = np.asarray(positions)
    return np.linalg.norm(p[..., 4, :] - p[..., 0, :], axis=-1) - np.linalg.norm(p[..., 5, :] - p[..., 0, :], axis=-1)


def charges(xi: float) -> np.ndarray:
    """Solute charges interpolated between reactant and product by bond order (MM sampling only)."""
    n1, n2 = bond_orders(xi)
    return n1 * REACTANT_CHARGES + n2 * REACTANT_CHARGES[[0, 1, 2, 3, 5, 4]]


def solute(xi: float = -1.4) -> Solute:
    """Cl- + CH3Cl at ``xi`` as the QM solute (charge -1), C-H bonds in the topology."""
    names = [("C", "C"), ("H1", "H"), ("H2", "H"), ("H3", "H"), ("CL1", "Cl"), ("CL2", "Cl")]
    return Solute.residue("sn2", "SN2", names, geometry(xi), [(0, 1), (0, 2), (0, 3)], [SOLUTE_XML], charge=-1)
