"""The serine example's system: the capped dipeptide ACE-SER-NME in water, its side chain QM.

The QM region is the serine side chain CH2-OH (CB, HB2, HB3, OG, HG); the bond
CA-CB is cut, CA carries the link hydrogen's MM partner (charge redistributed to
N, HA and C, :mod:`qmmm_driver.boundary`). The peptide is built from standard
internal coordinates (NeRF: bond lengths, angles and dihedrals, right-handed
alpha-helical phi/psi), its hydrogens added by OpenMM from the amber14 (ff14SB)
templates, and it is solvated in flexible TIP3P.
"""

from __future__ import annotations

import io

import numpy as np

FORCEFIELD = ["amber14-all.xml", "amber14/tip3p.xml"]
SIDE_CHAIN = ("CB", "HB2", "HB3", "OG", "HG")


def place(a: np.ndarray, b: np.ndarray, c: np.ndarray, bond: float, angle: float, dihedral: float) -> np.ndarray:
    """Atom D bonded to C at ``bond`` (A), angle B-C-D ``angle`` and dihedral A-B-C-D ``dihedral`` (degrees)."""
    angle, dihedral = np.radians(angle), np.radians(dihedral)
    bc = (c - b) / np.linalg.norm(c - b)
    n = np.cross(b - a, bc)
    n /= np.linalg.norm(n)
    m = np.cross(n, bc)
    d = np.array([-bond * np.cos(angle), bond * np.sin(angle) * np.cos(dihedral), bond * np.sin(angle) * np.sin(dihedral)])
    return c + d[0] * bc + d[1] * m + d[2] * n


def heavy_atoms(phi: float = -60.0, psi: float = -45.0, chi1: float = -60.0) -> list[tuple[str, str, int, np.ndarray]]:
    """(residue, atom name, residue number, position in A) of the heavy atoms of ACE-SER-NME."""
    ch3 = np.zeros(3)
    c0 = np.array([1.52, 0.0, 0.0])
    o0 = c0 + 1.23 * np.array([np.cos(np.radians(121.0)), np.sin(np.radians(121.0)), 0.0]) * np.array([-1, 1, 1])
    n1 = place(o0, ch3, c0, 1.33, 116.6, 180.0)
    ca = place(ch3, c0, n1, 1.46, 121.7, 180.0)               # omega
    c1 = place(c0, n1, ca, 1.52, 111.0, phi)
    cb = place(c1, n1, ca, 1.53, 110.5, -122.5)               # L-amino acid
    og = place(n1, ca, cb, 1.43, 111.0, chi1)
    n2 = place(n1, ca, c1, 1.33, 116.2, psi)
    o1 = place(n2, ca, c1, 1.23, 120.5, 180.0)
    ch3b = place(ca, c1, n2, 1.46, 121.7, 180.0)
    return [("ACE", "CH3", 1, ch3), ("ACE", "C", 1, c0), ("ACE", "O", 1, o0), ("SER", "N", 2, n1),
            ("SER", "CA", 2, ca), ("SER", "C", 2, c1), ("SER", "O", 2, o1), ("SER", "CB", 2, cb),
            ("SER", "OG", 2, og), ("NME", "N", 3, n2), ("NME", "C", 3, ch3b)]


def peptide():
    """The capped dipeptide with hydrogens: an OpenMM Modeller."""
    from openmm import app

    lines = []
    for k, (res, name, num, pos) in enumerate(heavy_atoms(), start=1):
        element = name[0]
        lines.append(f"HETATM{k:5d} {name:<4s} {res:3s} A{num:4d}    {pos[0]:8.3f}{pos[1]:8.3f}{pos[2]:8.3f}"
                     f"  1.00  0.00          {element:>2s}")
    pdb = app.PDBFile(io.StringIO("\n".join(lines) + "\nEND\n"))
    modeller = app.Modeller(pdb.topology, pdb.positions)
    modeller.addHydrogens(app.ForceField(*FORCEFIELD))
    return modeller


def qm_indices(topology) -> list[int]:
    """The serine side chain's atoms."""
    return [a.index for a in topology.atoms() if a.residue.name == "SER" and a.name in SIDE_CHAIN]
