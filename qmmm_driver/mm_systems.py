"""The example QM/MM systems, built with OpenMM: a QM water in water, and Cl- + CH3Cl in water.

Each builder returns an :class:`MMSetup`: an OpenMM topology and positions, the
force-field files, and the QM atoms. From it come the OpenMM ``System`` (for
sampling and for the MM part of the dynamics), the :class:`QMMMSystem` the
driver uses (MM charges from the force field, molecules from residues), and
the files an i-PI run starts from (PDB for OpenMM, extended XYZ for i-PI and
the driver).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from .system import QMMMSystem

SN2_XML = str(resources.files("qmmm_driver") / "data" / "sn2_solute.xml")
WATER_XML = "amber14/tip3p.xml"

#: C-Cl equilibrium distance and bond-order length scale (Angstrom) of the SN2 reference path
SN2_D0 = 1.80
SN2_A = 0.75
#: angle (degrees) between C-H and C->Cl1 in CH3-Cl1 (the umbrella); 90 at the transition state
SN2_UMBRELLA = 108.5
SN2_CH = 1.08
#: charges of C, H, H, H, Cl1, Cl2 in the reactant CH3-Cl1 + Cl2- (for MM sampling only)
SN2_REACTANT_CHARGES = np.array([-0.18, 0.11, 0.11, 0.11, -0.15, -1.0])


def sn2_bond_orders(xi: float) -> tuple[float, float]:
    """Bond orders n1, n2 (n1 + n2 = 1) of C-Cl1 and C-Cl2 at ``xi = d(C-Cl1) - d(C-Cl2)`` (A)."""
    n1 = 1.0 / (1.0 + np.exp(xi / SN2_A))
    return n1, 1.0 - n1


def sn2_geometry(xi: float) -> np.ndarray:
    """Reference geometry (A) of C, H1-3, Cl1, Cl2 at reaction coordinate ``xi``.

    A bond-order-conservation path: ``n = exp(-(d - d0)/a)`` with ``n1 + n2 = 1``
    gives both C-Cl distances; the CH3 umbrella angle moves linearly with
    ``n1 - n2`` from 108.5 (bonded to Cl1) through 90 to 71.5 degrees.
    """
    n1, n2 = sn2_bond_orders(xi)
    d1 = SN2_D0 - SN2_A * np.log(n1)
    d2 = SN2_D0 - SN2_A * np.log(n2)
    theta = np.radians(90.0 + (SN2_UMBRELLA - 90.0) * (n1 - n2))
    pos = np.zeros((6, 3))
    for k in range(3):
        phi = 2 * np.pi * k / 3
        pos[1 + k] = SN2_CH * np.array([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)])
    pos[4] = [0.0, 0.0, d1]
    pos[5] = [0.0, 0.0, -d2]
    return pos


def sn2_xi(positions: np.ndarray) -> np.ndarray:
    """Reaction coordinate d(C-Cl1) - d(C-Cl2) (same length unit) of [..., 6+, 3] positions (C, H, H, H, Cl1, Cl2)."""
    p = np.asarray(positions)
    return np.linalg.norm(p[..., 4, :] - p[..., 0, :], axis=-1) - np.linalg.norm(p[..., 5, :] - p[..., 0, :], axis=-1)


def sn2_charges(xi: float) -> np.ndarray:
    """Solute charges interpolated between reactant and product by bond order (MM sampling only)."""
    n1, n2 = sn2_bond_orders(xi)
    product = SN2_REACTANT_CHARGES[[0, 1, 2, 3, 5, 4]]
    return n1 * SN2_REACTANT_CHARGES + n2 * product


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])


@dataclass
class MMSetup:
    """An OpenMM model of a QM/MM system (positions in nm, as OpenMM keeps them)."""

    name: str
    topology: object
    positions: np.ndarray
    forcefield_files: list[str]
    qm_indices: np.ndarray
    qm_charge: int

    def forcefield(self):
        from openmm import app

        return app.ForceField(*self.forcefield_files)

    def create_system(self, cutoff_nm: float = 1.0):
        """Flexible (no constraints) OpenMM System with PME electrostatics."""
        from openmm import app, unit

        return self.forcefield().createSystem(
            self.topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff_nm * unit.nanometer,
            constraints=None, rigidWater=False, removeCMMotion=False)

    def box_nm(self) -> np.ndarray:
        from openmm import unit

        vecs = self.topology.getPeriodicBoxVectors()
        return np.array([[v[k].value_in_unit(unit.nanometer) for k in range(3)] for v in vecs])

    def charges(self) -> np.ndarray:
        """Per-atom force-field charges (e)."""
        import openmm
        from openmm import unit

        system = self.create_system()
        nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
        return np.array([nb.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
                         for i in range(system.getNumParticles())])

    def molecules(self) -> np.ndarray:
        return np.array([a.residue.index for a in self.topology.atoms()], dtype=np.int64)

    def symbols(self) -> list[str]:
        return [a.element.symbol for a in self.topology.atoms()]

    def atoms(self, positions_nm: np.ndarray | None = None):
        """The system as a periodic ``ase.Atoms`` of the frame convention (plus ``molecule``)."""
        from ase import Atoms

        pos = self.positions if positions_nm is None else positions_nm
        atoms = Atoms(symbols=self.symbols(), positions=pos * 10.0, cell=self.box_nm() * 10.0, pbc=True)
        qm = np.zeros(len(atoms), dtype=np.int64)
        qm[self.qm_indices] = 1
        atoms.set_array("qm", qm)
        atoms.set_array("mm_charge", np.where(qm == 1, 0.0, self.charges()))
        atoms.set_array("molecule", self.molecules())
        atoms.info["qm_total_charge"] = self.qm_charge
        atoms.info["qm_multiplicity"] = 1
        return atoms

    def qmmm_system(self) -> QMMMSystem:
        return QMMMSystem.from_atoms(self.atoms(), source=f"{self.name} (OpenMM setup)")

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write ``system.pdb`` (OpenMM) and ``system.extxyz`` (i-PI and the driver) to ``directory``."""
        import ase.io
        from openmm import app, unit

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        pdb = directory / "system.pdb"
        with open(pdb, "w") as fh:
            app.PDBFile.writeFile(self.topology, self.positions * unit.nanometer, fh, keepIds=True)
        xyz = directory / "system.extxyz"
        ase.io.write(xyz, self.atoms(), format="extxyz")
        return {"pdb": pdb, "extxyz": xyz}


def _solvate(topology, positions_nm, ff_files, box_A: float, ions: list[tuple[str, np.ndarray]]):
    from openmm import Vec3, app, unit

    modeller = app.Modeller(topology, positions_nm * unit.nanometer)
    for name, where in ions:
        top = app.Topology()
        res = top.addResidue(name.upper()[:2], top.addChain())
        top.addAtom(name.upper()[:2], app.element.Element.getBySymbol(name), res)
        modeller.add(top, np.asarray(where)[None] / 10.0 * unit.nanometer)
    modeller.addSolvent(app.ForceField(*ff_files), boxSize=Vec3(*([box_A / 10.0] * 3)) * unit.nanometer,
                        model="tip3p", neutralize=False)
    return modeller


def build_setup(name: str, box_A: float = 26.0, seed: int = 0, ion: bool = False) -> MMSetup:
    """Build the ``water`` or ``sn2`` system in a cubic box of ``box_A`` Angstrom.

    The QM region (a water, or Cl- + CH3Cl at the reactant) sits at the box
    centre; ``ion`` adds an MM Na+ 4.5 A from it (the transfer environments).
    """
    from openmm import app

    rng = np.random.default_rng(seed)
    centre = np.full(3, box_A / 2.0)
    top = app.Topology()
    res = top.addResidue("HOH" if name == "water" else "SN2", top.addChain())
    E = app.element.Element.getBySymbol
    if name == "water":
        local = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
        atoms = [top.addAtom(n, E(e), res) for n, e in (("O", "O"), ("H1", "H"), ("H2", "H"))]
        top.addBond(atoms[0], atoms[1])
        top.addBond(atoms[0], atoms[2])
        files, qm_charge = [WATER_XML], 0
    elif name == "sn2":
        local = sn2_geometry(-1.4)
        names = (("C", "C"), ("H1", "H"), ("H2", "H"), ("H3", "H"), ("CL1", "Cl"), ("CL2", "Cl"))
        atoms = [top.addAtom(n, E(e), res) for n, e in names]
        for k in (1, 2, 3):
            top.addBond(atoms[0], atoms[k])
        files, qm_charge = [WATER_XML, SN2_XML], -1
    else:
        raise ValueError(f"unknown example system '{name}' (known: water, sn2)")
    local = (local - local.mean(axis=0)) @ random_rotation(rng).T
    positions = (local + centre) / 10.0
    ions = []
    if ion:
        direction = rng.normal(size=3)
        ions.append(("Na", centre + 4.5 * direction / np.linalg.norm(direction)))
    modeller = _solvate(top, positions, files, box_A, ions)
    from openmm import unit

    pos = np.array(modeller.positions.value_in_unit(unit.nanometer))
    n_qm = len(local)
    return MMSetup(name=name, topology=modeller.topology, positions=pos, forcefield_files=files,
                   qm_indices=np.arange(n_qm), qm_charge=qm_charge)

