"""Umbrella restraint on ``xi = d(A-B) - d(A-C)`` as an i-PI in-process potential (``<ffdirect pes='custom'>``).

Used as a bias, so that i-PI reports it apart from the physical potential::

    <ffdirect name='umbrella-0'>
      <pes>custom</pes>
      <pes_path>/path/to/qmmm_driver/umbrella.py</pes_path>
      <parameters>{atoms: 0 4 5, xi0: -1.0, k: 5.0}</parameters>
    </ffdirect>
    ...
    <ensemble> <bias> <force forcefield='umbrella-0'/> </bias> </ensemble>

``atoms`` are the 0-based indices of A, B and C (for the SN2 example: C, Cl1,
Cl2); ``xi0`` is in Angstrom and ``k`` in eV/A^2 (bias ``k/2 (xi - xi0)^2``).
Optionally ``k_wall`` (eV/A^2) and ``wall`` (A, default 0.3) add a flat-bottom
collinearity wall ``k_wall/2 max(0, delta - wall)^2`` on ``delta = d(A-B) +
d(A-C) - d(B-C)`` (zero when B-A-C is straight): xi alone does not stop B and C
from meeting with A far from both, a region no training frame covers.
Optionally ``k_bond`` (eV/A^2) and ``bond`` (A, default 2.5) add a flat-bottom
wall ``k_bond/2 max(0, m - bond)^2`` on the shorter of d(A-B) and d(A-C),
smoothed where the two are equal: ``m = (dAB + dAC)/2 - sqrt(xi^2/4 + s^2) + s``
with s = 0.05 A (m is within s of the shorter distance and equals it at xi = 0).
xi alone leaves d(A-B) + d(A-C) free: at the transition state both distances
can grow together, breaking A away from B and C, another region outside the
path a model is trained on.
The extras carry ``xi`` (A) so that ``extras_bias`` trajectories record the
reaction coordinate at every stride. i-PI's positions are in Bohr, energies in
Hartree: the conversion happens here, at the edge.
"""

from __future__ import annotations

import json

import numpy as np
from ipi.pes.dummy import Dummy_driver

from qmmm_driver.units import ANGSTROM_TO_BOHR, BOHR, EV_TO_HARTREE

__DRIVER_NAME__ = "qmmm_umbrella"
__DRIVER_CLASS__ = "DistanceDifferenceUmbrella"


def distance_and_gradient(pos: np.ndarray, i: int, j: int) -> tuple[float, np.ndarray]:
    """``|r_j - r_i|`` and its gradient with respect to all positions."""
    d = pos[j] - pos[i]
    r = np.linalg.norm(d)
    grad = np.zeros_like(pos)
    grad[j] += d / r
    grad[i] -= d / r
    return r, grad


def xi_and_gradient(pos: np.ndarray, a: int, b: int, c: int) -> tuple[float, np.ndarray]:
    """``xi = |r_b - r_a| - |r_c - r_a|`` and its gradient with respect to all positions."""
    (dab, gab), (dac, gac) = distance_and_gradient(pos, a, b), distance_and_gradient(pos, a, c)
    return dab - dac, gab - gac


def collinearity_and_gradient(pos: np.ndarray, a: int, b: int, c: int) -> tuple[float, np.ndarray]:
    """``delta = |r_b - r_a| + |r_c - r_a| - |r_c - r_b|`` (0 for a straight B-A-C) and its gradient."""
    (dab, gab), (dac, gac), (dbc, gbc) = (distance_and_gradient(pos, *p) for p in ((a, b), (a, c), (b, c)))
    return dab + dac - dbc, gab + gac - gbc


BOND_SMOOTHING_A = 0.05


def shorter_distance_and_gradient(pos: np.ndarray, a: int, b: int, c: int,
                                  s: float) -> tuple[float, np.ndarray]:
    """The shorter of ``|r_b - r_a|`` and ``|r_c - r_a|``, smoothed over ``s`` where they meet, and its gradient."""
    (dab, gab), (dac, gac) = distance_and_gradient(pos, a, b), distance_and_gradient(pos, a, c)
    xi = dab - dac
    root = np.sqrt(0.25 * xi * xi + s * s)
    m = 0.5 * (dab + dac) - root + s
    return m, 0.5 * (gab + gac) - (0.25 * xi / root) * (gab - gac)


class DistanceDifferenceUmbrella(Dummy_driver):
    """Harmonic restraint ``k/2 (xi - xi0)^2`` on a difference of two distances."""

    def __init__(self, atoms="0 4 5", xi0=0.0, k=5.0, k_wall=0.0, wall=0.3, k_bond=0.0, bond=2.5, *args, **kwargs):
        kwargs.pop("verbosity", None)
        try:
            self.a, self.b, self.c = (int(x) for x in str(atoms).replace(",", " ").split())
        except ValueError as err:
            raise ValueError(f"umbrella: 'atoms' must be three indices A B C, got '{atoms}'") from err
        try:
            xi0, k, k_wall, wall, k_bond, bond = (float(x) for x in (xi0, k, k_wall, wall, k_bond, bond))
        except ValueError as err:
            raise ValueError(f"umbrella: xi0, k, k_wall, wall, k_bond and bond must be numbers, got "
                             f"xi0={xi0!r} k={k!r} k_wall={k_wall!r} wall={wall!r} k_bond={k_bond!r} "
                             f"bond={bond!r}") from err
        self.xi0 = xi0 * ANGSTROM_TO_BOHR
        self.k = k * EV_TO_HARTREE * BOHR**2  # eV/A^2 -> Hartree/Bohr^2
        self.k_wall = k_wall * EV_TO_HARTREE * BOHR**2
        self.wall = wall * ANGSTROM_TO_BOHR
        self.k_bond = k_bond * EV_TO_HARTREE * BOHR**2
        self.bond = bond * ANGSTROM_TO_BOHR
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):
        pos = np.asarray(pos).reshape(-1, 3)
        xi, grad = xi_and_gradient(pos, self.a, self.b, self.c)
        dev = xi - self.xi0
        energy = 0.5 * self.k * dev * dev
        forces = -self.k * dev * grad
        if self.k_wall > 0.0:
            delta, dgrad = collinearity_and_gradient(pos, self.a, self.b, self.c)
            over = max(0.0, delta - self.wall)
            energy += 0.5 * self.k_wall * over * over
            forces -= self.k_wall * over * dgrad
        if self.k_bond > 0.0:
            m, mgrad = shorter_distance_and_gradient(pos, self.a, self.b, self.c, BOND_SMOOTHING_A * ANGSTROM_TO_BOHR)
            over = max(0.0, m - self.bond)
            energy += 0.5 * self.k_bond * over * over
            forces -= self.k_bond * over * mgrad
        extras = json.dumps({"xi": xi / ANGSTROM_TO_BOHR, "xi0": self.xi0 / ANGSTROM_TO_BOHR})
        return energy, forces, np.zeros((3, 3)), extras
