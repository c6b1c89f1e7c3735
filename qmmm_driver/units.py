"""Units: the one internal convention and the conversions at the edges.

Inside qmmm-driver every quantity is in Hartree atomic units: lengths in Bohr,
energies in Hartree, charges in elementary charges, forces in Hartree/Bohr.
This is also what i-PI sends and expects over its socket, so the hot path does
no conversion at all. Files (extended XYZ frames, ASE) use eV and Angstrom and
are converted where they are read or written; reports use meV and meV/Angstrom.
"""

from ase import units as _ase

#: Angstrom per Bohr.
BOHR = float(_ase.Bohr)
#: eV per Hartree.
HARTREE = float(_ase.Hartree)

ANGSTROM_TO_BOHR = 1.0 / BOHR
BOHR_TO_ANGSTROM = BOHR
EV_TO_HARTREE = 1.0 / HARTREE
HARTREE_TO_EV = HARTREE
#: (eV/Angstrom) -> (Hartree/Bohr)
EV_PER_A_TO_HARTREE_PER_BOHR = BOHR / HARTREE
#: (Hartree/Bohr) -> (eV/Angstrom)
HARTREE_PER_BOHR_TO_EV_PER_A = HARTREE / BOHR
#: e*Bohr -> e*Angstrom (dipoles)
E_BOHR_TO_E_ANGSTROM = BOHR
#: one femtosecond in atomic units of time
FEMTOSECOND = 1.0 / (_ase._aut * 1e15)
