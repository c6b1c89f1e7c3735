"""Covalent QM/MM boundaries: hydrogen link atoms and the redistributed-charge scheme.

For every bond between a QM atom Q1 and an MM atom M1 (a *cut bond*) the QM
region, as the model and the reference calculation see it, gets a hydrogen L on
the Q1-M1 line:

    r_L = r_Q1 + g (r_M1 - r_Q1),    g = d0(Q1-H) / d0(Q1-M1)

with standard bond lengths (:data:`LINK_BOND`, :data:`SINGLE_BOND`; for C-C, g =
1.090 / 1.526 = 0.714). L is not a particle of the simulation: i-PI, OpenMM and
the frame files never see it. Its force goes to Q1 and M1 by the chain rule,
``F_Q1 += (1 - g) F_L`` and ``F_M1 += g F_L``, so that the total force stays
exactly minus the gradient.

MM charges at the boundary (redistributed charge, RC): the charge of M1 is
removed from the MM point charges the QM region sees and spread evenly over M1's
other MM neighbours (the M2 atoms), so that the QM density sees no charge 1 A
from its link hydrogen and the MM point charges keep their total. The frame's
``mm_charge`` holds the redistributed charges (:func:`redistribute_charges`), so
that labelling, training and the driver all use the same; the MM force field
keeps its own charges for MM-MM electrostatics.

Which bonds are cut is the per-atom integer array ``qm_link`` of a frame: on an
MM atom M1, the index of its QM partner Q1; -1 on every other atom.
"""

from __future__ import annotations

import numpy as np

from .errors import InputError

#: Q1-H bond lengths (A) of the link hydrogen, by the element of Q1
LINK_BOND = {"C": 1.090, "N": 1.010, "O": 0.960, "S": 1.336}
#: single-bond lengths (A) of the cut bond, by the elements of Q1 and M1 (either order)
SINGLE_BOND = {("C", "C"): 1.526, ("C", "N"): 1.449, ("C", "O"): 1.410, ("C", "S"): 1.810, ("N", "N"): 1.450,
               ("N", "O"): 1.410, ("O", "O"): 1.460, ("C", "Si"): 1.860}
#: a cut bond shorter than this fraction of its single-bond length is a double or aromatic bond
SHORTEST = 0.93
#: the force-field charges of the QM atoms must sum to an integer within this (e), else a charged group is split
CHARGE_TOLERANCE = 0.15


class BoundaryError(InputError):
    """A QM selection whose cut bonds the link-atom scheme cannot handle; the message names the atoms."""


def single_bond(q1: str, m1: str) -> float:
    length = SINGLE_BOND.get((q1, m1), SINGLE_BOND.get((m1, q1)))
    if length is None or q1 not in LINK_BOND:
        known = ", ".join(f"{a}-{b}" for a, b in SINGLE_BOND if a in LINK_BOND)
        raise BoundaryError(f"no link-atom parameters for a cut {q1}-{m1} bond (known: {known})")
    return length


def g_factor(q1: str, m1: str) -> float:
    """Where the link hydrogen sits on the Q1-M1 bond: ``d0(Q1-H) / d0(Q1-M1)``."""
    return LINK_BOND[q1] / single_bond(q1, m1)


def check_cut_bonds(symbols: list[str], positions_A: np.ndarray, pairs: list[tuple[int, int]],
                    qm: np.ndarray, qm_charges_ff: np.ndarray | None = None, where: str = "") -> None:
    """Refuse cut bonds the scheme cannot handle, naming the atoms.

    ``pairs`` are the (Q1, M1) bonds crossing the boundary (all of them, from a
    topology): an MM atom bonded to two QM atoms, a bond shorter than a single
    bond (double or aromatic) and, given the force-field charges of the QM
    atoms, a QM region whose charge is not an integer (a charged group split in
    two) are errors.
    """
    partners: dict[int, int] = {}
    for q1, m1 in pairs:
        if m1 in partners:
            raise BoundaryError(f"{where}MM atom {m1} ({symbols[m1]}) is bonded to two QM atoms ({partners[m1]} and "
                                f"{q1}); a link atom replaces one bond of an MM atom: make atom {m1} QM too, or "
                                "move the boundary")
        partners[m1] = q1
        d = float(np.linalg.norm(positions_A[m1] - positions_A[q1]))
        try:
            ref = single_bond(symbols[q1], symbols[m1])
        except BoundaryError as err:
            raise BoundaryError(f"{where}the bond between QM atom {q1} ({symbols[q1]}) and MM atom {m1} "
                                f"({symbols[m1]}) crosses the boundary: {err}; select both atoms as QM or MM, or "
                                "cut another bond") from None
        if d < SHORTEST * ref:
            raise BoundaryError(f"{where}the cut bond between QM atom {q1} ({symbols[q1]}) and MM atom {m1} "
                                f"({symbols[m1]}) is {d:.2f} A long, shorter than a single bond ({ref:.2f} A): a double "
                                "or aromatic bond cannot carry a link atom; move the boundary to a single bond")
    if qm_charges_ff is not None and pairs:
        total = float(np.sum(qm_charges_ff[qm]))
        if abs(total - round(total)) > CHARGE_TOLERANCE:
            atoms = sorted({q1 for q1, _ in pairs})
            raise BoundaryError(f"{where}the force-field charges of the QM atoms sum to {total:+.3f} e, not an integer: "
                                f"the cut at QM atom(s) {atoms} splits a charged group; move the boundary so that "
                                "whole charge groups are QM or MM")


def redistribute_charges(charges: np.ndarray, qm: np.ndarray, links: np.ndarray,
                         bonds: list[tuple[int, int]]) -> np.ndarray:
    """MM charges with each M1's charge spread evenly over its MM neighbours (the RC scheme).

    ``qm`` flags the QM atoms, ``links`` is the ``qm_link`` array (-1 but on M1
    atoms), ``bonds`` all bonds of the system. The total MM charge is unchanged.
    """
    out = np.array(charges, dtype=np.float64)
    neighbours: dict[int, list[int]] = {}
    for a, b in bonds:
        neighbours.setdefault(a, []).append(b)
        neighbours.setdefault(b, []).append(a)
    for m1 in np.flatnonzero(np.asarray(links) >= 0):
        m2 = [k for k in neighbours.get(int(m1), []) if not qm[k] and links[k] < 0]
        if not m2:
            raise BoundaryError(f"MM atom {int(m1)} at the QM boundary has no MM neighbour (other than boundary atoms) "
                                "to take its charge")
        q = out[m1]
        out[m1] = 0.0
        out[m2] += q / len(m2)
    return out


def link_positions(positions: np.ndarray, links: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Positions [..., n_links, 3] of the link hydrogens; ``links`` [n_links, 2] holds (Q1, M1) atom indices."""
    q1, m1 = positions[..., links[:, 0], :], positions[..., links[:, 1], :]
    return q1 + g[:, None] * (m1 - q1)


def cut_bonds(bonds: list[tuple[int, int]], qm: np.ndarray) -> list[tuple[int, int]]:
    """The bonds that cross the boundary, as (QM atom, MM atom)."""
    return [(a, b) if qm[a] else (b, a) for a, b in bonds if qm[a] != qm[b]]


def boundary_from_bonds(symbols: list[str], positions_A: np.ndarray, qm: np.ndarray, bonds: list[tuple[int, int]],
                        charges: np.ndarray, where: str = "") -> tuple[np.ndarray | None, np.ndarray]:
    """The ``qm_link`` array and the MM charges (RC scheme) of a QM selection in a bonded system.

    ``charges`` are the force-field charges of all atoms; the returned MM charges
    are zero on QM atoms. Without cut bonds: ``(None, charges on MM atoms)``.
    """
    pairs = cut_bonds(bonds, qm)
    mm_charge = np.where(qm, 0.0, charges)
    if not pairs:
        return None, mm_charge
    check_cut_bonds(symbols, positions_A, pairs, qm, charges, where)
    links = np.full(len(symbols), -1, dtype=np.int64)
    for q1, m1 in pairs:
        links[m1] = q1
    return links, redistribute_charges(mm_charge, qm, links, bonds)
