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

DATA = resources.files("qmmm_driver") / "data"
SN2_XML = str(DATA / "sn2_solute.xml")
WATER_XML = "amber14/tip3p.xml"


@dataclass(frozen=True)
class Solvent:
    """A liquid the QM region can be sampled in: residue, force field, number density and one molecule."""

    name: str
    residue: str
    forcefield: str | None        # added to amber14/tip3p.xml (None: water itself)
    per_A3: float                 # molecules per cubic Angstrom at 300 K
    atoms: tuple                  # (atom name, element, x, y, z in A) of one molecule


def _tetrahedral_h(centre, axis, r, angle_deg, phase=0.0):
    """Three H at distance ``r`` from ``centre``, each at ``angle_deg`` from ``axis``."""
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    ref = np.array([1.0, 0.0, 0.0]) if abs(axis[0]) < 0.9 else np.array([0.0, 1.0, 0.0])
    u = np.cross(axis, ref)
    u /= np.linalg.norm(u)
    v = np.cross(axis, u)
    t = np.radians(angle_deg)
    return [np.asarray(centre) + r * (np.cos(t) * axis + np.sin(t) * (np.cos(p) * u + np.sin(p) * v))
            for p in phase + 2 * np.pi * np.arange(3) / 3]


def _methanol_atoms():
    c, o = np.zeros(3), np.array([1.41, 0.0, 0.0])
    h = _tetrahedral_h(c, -o, 1.09, 70.5)
    theta = np.radians(108.5)
    ho = o + 0.945 * np.array([-np.cos(theta), np.sin(theta), 0.0])
    return (("C", "C", *c), ("H1", "H", *h[0]), ("H2", "H", *h[1]), ("H3", "H", *h[2]), ("O", "O", *o),
            ("HO", "H", *ho))


def _acetonitrile_atoms():
    c1, c2, n = np.zeros(3), np.array([0.0, 0.0, 1.47]), np.array([0.0, 0.0, 2.627])
    h = _tetrahedral_h(c1, -c2, 1.09, 71.5)
    return (("C1", "C", *c1), ("H1", "H", *h[0]), ("H2", "H", *h[1]), ("H3", "H", *h[2]), ("C2", "C", *c2),
            ("N", "N", *n))


#: Solvents of ``qmmm-driver sample --solvent``: densities at 298 K (g/cm^3 -> molecules/A^3).
SOLVENTS = {
    "water": Solvent("water", "HOH", None, 0.997 * 0.6022 / 18.015, ()),
    "methanol": Solvent("methanol", "MOH", str(DATA / "methanol.xml"), 0.787 * 0.6022 / 32.042,
                        _methanol_atoms()),
    "acetonitrile": Solvent("acetonitrile", "ACN", str(DATA / "acetonitrile.xml"), 0.777 * 0.6022 / 41.053,
                            _acetonitrile_atoms()),
}

#: Ions of ``qmmm-driver sample --ion``: residue/atom name in amber14/tip3p.xml, element, charge (e).
IONS = {
    "Li+": ("LI", "Li", 1), "Na+": ("NA", "Na", 1), "K+": ("K", "K", 1),
    "Mg2+": ("MG", "Mg", 2), "Ca2+": ("CA", "Ca", 2), "Zn2+": ("ZN", "Zn", 2),
    "F-": ("F", "F", -1), "Cl-": ("CL", "Cl", -1), "Br-": ("BR", "Br", -1),
}

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
    ion_index: int | None = None   # the MM ion of an ion environment
    solvent: str = "water"

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


def _min_image_distances(points: np.ndarray, others: np.ndarray, box_A: float) -> np.ndarray:
    """Distances [len(points), len(others)] in a cubic periodic box (Angstrom)."""
    d = points[:, None, :] - others[None, :, :]
    d -= box_A * np.round(d / box_A)
    return np.linalg.norm(d, axis=-1)


def _pack(solvent: Solvent, occupied_A: np.ndarray, box_A: float, rng: np.random.Generator,
          clearance: float = 2.3, contact: float = 1.7, tries: int = 30) -> list[np.ndarray]:
    """Molecules of ``solvent`` (A) at its liquid density on a jittered grid, randomly oriented.

    Grid sites within ``clearance`` of the solute or ion atoms (``occupied_A``) stay empty; each molecule
    takes the first of ``tries`` orientations whose atoms keep ``contact`` from those already placed.
    The MD that follows (minimisation, equilibration) relaxes the rest.
    """
    template = np.array([a[2:] for a in solvent.atoms], dtype=float)
    template -= template.mean(axis=0)
    n_target = int(round(solvent.per_A3 * box_A**3))
    side = int(np.ceil(n_target ** (1.0 / 3.0)))
    spacing = box_A / side
    grid = (np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3) + 0.5) * spacing
    grid = grid[rng.permutation(len(grid))[:n_target]]
    placed: list[np.ndarray] = []
    taken = np.asarray(occupied_A, dtype=float).reshape(-1, 3)
    for site in grid:
        if len(occupied_A) and _min_image_distances(site[None], np.asarray(occupied_A).reshape(-1, 3),
                                                     box_A).min() < clearance + 1.0:
            continue
        best, best_gap = None, -1.0
        for _ in range(tries):
            mol = template @ random_rotation(rng).T + site + rng.uniform(-0.2, 0.2, 3)
            gap = _min_image_distances(mol, taken, box_A).min() if len(taken) else np.inf
            if gap > best_gap:
                best, best_gap = mol, gap
            if gap >= contact:
                break
        placed.append(best)
        taken = np.concatenate([taken, best])
    return placed


def _solvate(topology, positions_nm, ff_files, box_A: float, ions: list[tuple[str, np.ndarray]],
             solvent: Solvent, rng: np.random.Generator):
    from openmm import Vec3, app, unit

    modeller = app.Modeller(topology, positions_nm * unit.nanometer)
    for name, where in ions:
        residue, element, _ = IONS[name]
        top = app.Topology()
        res = top.addResidue(residue, top.addChain())
        top.addAtom(residue, app.element.Element.getBySymbol(element), res)
        modeller.add(top, np.asarray(where)[None] / 10.0 * unit.nanometer)
    box = Vec3(*([box_A / 10.0] * 3)) * unit.nanometer
    if solvent.forcefield is None:
        modeller.addSolvent(app.ForceField(*ff_files), boxSize=box, model="tip3p", neutralize=False)
        return modeller
    occupied = np.asarray(modeller.positions.value_in_unit(unit.angstrom))
    top = app.Topology()
    chain = top.addChain()
    positions = []
    for mol in _pack(solvent, occupied, box_A, rng):
        res = top.addResidue(solvent.residue, chain)
        atoms = [top.addAtom(name, app.element.Element.getBySymbol(el), res) for name, el, *_ in solvent.atoms]
        by_name = {a.name: a for a in atoms}
        for bond in _template_bonds(solvent):
            top.addBond(by_name[bond[0]], by_name[bond[1]])
        positions.append(mol)
    modeller.add(top, np.concatenate(positions) / 10.0 * unit.nanometer)
    modeller.topology.setPeriodicBoxVectors([Vec3(box_A / 10.0, 0, 0), Vec3(0, box_A / 10.0, 0),
                                             Vec3(0, 0, box_A / 10.0)] * unit.nanometer)
    return modeller


def _template_bonds(solvent: Solvent) -> list[tuple[str, str]]:
    """Bonds of one solvent molecule, read from its force-field residue template."""
    import xml.etree.ElementTree as ET

    root = ET.parse(solvent.forcefield).getroot()
    res = next(r for r in root.iter("Residue") if r.get("name") == solvent.residue)
    return [(b.get("atomName1"), b.get("atomName2")) for b in res.iter("Bond")]


def build_setup(name: str, box_A: float = 26.0, seed: int = 0, ion: str | None = None,
                solvent: str = "water", ion_distance_A: float = 4.5) -> MMSetup:
    """Build the ``water`` or ``sn2`` system in a cubic box of ``box_A`` Angstrom of ``solvent``.

    The QM region (a water, or Cl- + CH3Cl at the reactant) sits at the box
    centre; ``ion`` (a name of :data:`IONS`) adds that MM ion ``ion_distance_A``
    from its centre.
    """
    from openmm import app

    if solvent not in SOLVENTS:
        raise ValueError(f"unknown solvent '{solvent}' (known: {', '.join(SOLVENTS)})")
    if ion is not None and ion not in IONS:
        raise ValueError(f"unknown ion '{ion}' (known: {', '.join(IONS)})")
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
    if SOLVENTS[solvent].forcefield is not None:
        files = files + [SOLVENTS[solvent].forcefield]
    local = (local - local.mean(axis=0)) @ random_rotation(rng).T
    positions = (local + centre) / 10.0
    ions = []
    if ion is not None:
        direction = rng.normal(size=3)
        ions.append((ion, centre + ion_distance_A * direction / np.linalg.norm(direction)))
    modeller = _solvate(top, positions, files, box_A, ions, SOLVENTS[solvent], rng)
    from openmm import unit

    pos = np.array(modeller.positions.value_in_unit(unit.nanometer))
    n_qm = len(local)
    return MMSetup(name=name, topology=modeller.topology, positions=pos, forcefield_files=files,
                   qm_indices=np.arange(n_qm), qm_charge=qm_charge,
                   ion_index=n_qm if ion is not None else None, solvent=solvent)
