"""QM/MM systems built with OpenMM: a QM solute in a box of solvent, optionally with an ion.

A :class:`Solute` is the molecule(s) holding the QM region, as an OpenMM
topology with its force-field files (the Lennard-Jones that its MM neighbours
feel; the QM atoms' charges matter only in MM sampling); its QM atoms are all
of it or a part (a side chain: cut bonds get link atoms). :func:`build_setup` solvates it in a cubic box of
water (TIP3P), methanol, acetonitrile, acetone or DMSO (OPLS-AA, ``qmmm_driver/data/*.xml``),
optionally with one ion of amber14's set. The resulting :class:`MMSetup` gives
the OpenMM ``System`` (for sampling and for the MM worker), the
:class:`~qmmm_driver.structures.QMMMStructure` the driver uses (MM charges from
the force field, molecules from residues), and the files an i-PI run starts
from (PDB for OpenMM, extended XYZ for i-PI and the driver).
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from ..structures import QMMMStructure
from .forcefield import create_system, force_field_charges, read_pdb

DATA = resources.files("qmmm_driver") / "data"
WATER_XML = "amber14/tip3p.xml"


@dataclass(frozen=True)
class Solvent:
    """A liquid the QM region can be sampled in: residue, force field, number density and one molecule."""

    name: str
    label: str                    # how frames name its force field ("sampler" info key)
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


def _two_methyls(c1, c2):
    """Atoms C1, H11-H13, C2, H21-H23 of two methyl groups on a centre at the origin (H at 109.5 degrees from it)."""
    atoms = []
    for k, c in ((1, c1), (2, c2)):
        atoms.append((f"C{k}", "C", *c))
        atoms += [(f"H{k}{j + 1}", "H", *h) for j, h in enumerate(_tetrahedral_h(c, c, 1.09, 70.5))]
    return tuple(atoms)


def _acetone_atoms():
    c, o = np.zeros(3), np.array([0.0, 0.0, 1.229])
    t = np.radians(121.8)  # O=C-CH3; CH3-C-CH3 116.4
    c1, c2 = 1.522 * np.array([np.sin(t), 0.0, np.cos(t)]), 1.522 * np.array([-np.sin(t), 0.0, np.cos(t)])
    return (("C", "C", *c), ("O", "O", *o), *_two_methyls(c1, c2))


def _dmso_atoms():
    s, o = np.zeros(3), np.array([0.0, 0.0, 1.53])
    # pyramidal sulfur: O=S-C 107 degrees, C-S-C 96 degrees, the carbons symmetric about the xz plane
    z, y = np.cos(np.radians(107.0)), np.sin(np.radians(48.0))
    x = np.sqrt(1.0 - z * z - y * y)
    return (("S", "S", *s), ("O", "O", *o), *_two_methyls(1.79 * np.array([x, y, z]), 1.79 * np.array([x, -y, z])))


def _nitromethane_atoms():
    n, c = np.zeros(3), np.array([0.0, 0.0, -1.49])
    t = np.radians(180.0 - 117.5)  # C-N-O 117.5 degrees, O-N-O 125, planar
    o1, o2 = 1.225 * np.array([np.sin(t), 0.0, np.cos(t)]), 1.225 * np.array([-np.sin(t), 0.0, np.cos(t)])
    h = _tetrahedral_h(c, c, 1.09, 75.0)  # H-C-N 105 degrees
    return (("N", "N", *n), ("O1", "O", *o1), ("O2", "O", *o2), ("C", "C", *c), ("H1", "H", *h[0]),
            ("H2", "H", *h[1]), ("H3", "H", *h[2]))


#: Solvents of ``qmmm-driver sample --solvent``: densities at 298 K (g/cm^3 -> molecules/A^3).
SOLVENTS = {
    "water": Solvent("water", "TIP3P (amber14)", "HOH", None, 0.997 * 0.6022 / 18.015, ()),
    "methanol": Solvent("methanol", "OPLS-AA methanol", "MOH", str(DATA / "methanol.xml"), 0.787 * 0.6022 / 32.042,
                        _methanol_atoms()),
    "acetonitrile": Solvent("acetonitrile", "OPLS-AA acetonitrile", "ACN", str(DATA / "acetonitrile.xml"),
                            0.777 * 0.6022 / 41.053, _acetonitrile_atoms()),
    "acetone": Solvent("acetone", "OPLS-AA acetone", "DMK", str(DATA / "acetone.xml"), 0.784 * 0.6022 / 58.080,
                       _acetone_atoms()),
    "dmso": Solvent("dmso", "OPLS-AA DMSO", "DMS", str(DATA / "dmso.xml"), 1.100 * 0.6022 / 78.133, _dmso_atoms()),
    "nitromethane": Solvent("nitromethane", "OPLS-AA nitromethane", "NIM", str(DATA / "nitromethane.xml"),
                            1.131 * 0.6022 / 61.040, _nitromethane_atoms()),
}

#: Ions of ``qmmm-driver sample --ion``: residue/atom name in amber14/tip3p.xml, element, charge (e).
IONS = {
    "Li+": ("LI", "Li", 1), "Na+": ("NA", "Na", 1), "K+": ("K", "K", 1), "Rb+": ("RB", "Rb", 1),
    "Cs+": ("CS", "Cs", 1),
    "Mg2+": ("MG", "Mg", 2), "Ca2+": ("CA", "Ca", 2), "Zn2+": ("ZN", "Zn", 2), "Sr2+": ("SR", "Sr", 2),
    "Ba2+": ("BA", "Ba", 2),
    "F-": ("F", "F", -1), "Cl-": ("CL", "Cl", -1), "Br-": ("BR", "Br", -1),
}

def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    q /= np.linalg.norm(q)
    a, b, c, d = q
    return np.array([
        [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
        [2 * (b * c + a * d), a * a - b * b + c * c - d * d, 2 * (c * d - a * b)],
        [2 * (b * d - a * c), 2 * (c * d + a * b), a * a - b * b - c * c + d * d]])



@dataclass
class Solute:
    """The solute: an OpenMM topology (one or more residues, with bonds), positions (A) and the force-field
    files that describe it; ``qm`` are its QM atoms (default: all of them). A QM region that is part of a
    molecule (a side chain) cuts bonds, which get link atoms (:mod:`qmmm_driver.boundary`); ``charge`` is the
    QM region's total charge."""

    name: str
    topology: object                      # openmm.app.Topology
    positions: np.ndarray                 # [n, 3] Angstrom
    forcefield: list[str]                 # OpenMM force-field files beyond amber14/tip3p.xml
    charge: int = 0
    multiplicity: int = 1
    qm: np.ndarray | None = None

    @classmethod
    def residue(cls, name: str, residue: str, atoms: list[tuple[str, str]], positions: np.ndarray,
                bonds: list[tuple[int, int]], forcefield: list[str], charge: int = 0, multiplicity: int = 1):
        """A QM solute of one residue: (atom name, element) pairs, positions (A) and bonds."""
        from openmm import app

        top = app.Topology()
        res = top.addResidue(residue, top.addChain())
        made = [top.addAtom(n, app.element.Element.getBySymbol(e), res) for n, e in atoms]
        for a, b in bonds:
            top.addBond(made[a], made[b])
        return cls(name, top, np.asarray(positions, dtype=float), list(forcefield), charge, multiplicity)

    @property
    def qm_indices(self) -> np.ndarray:
        return np.arange(self.topology.getNumAtoms()) if self.qm is None else np.asarray(self.qm, dtype=np.int64)


def water_solute() -> Solute:
    """One water (TIP3P geometry), QM."""
    pos = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])
    return Solute.residue("water", "HOH", [("O", "O"), ("H1", "H"), ("H2", "H")], pos, [(0, 1), (0, 2)], [])


def solute_from_pdb(pdb: str | Path, forcefield: list[str], charge: int, multiplicity: int = 1,
                    qm: str | None = None) -> Solute:
    """A solute read from a PDB file (its residues and CONECT bonds as OpenMM reads them) with the force-field
    files that describe it; ``qm`` selects the QM atoms ('0-5,9', 0-based within the file; default all)."""
    from openmm import unit

    from ..structures import parse_selection

    top = read_pdb(pdb)  # refuses a missing or malformed file, naming it
    pos = np.asarray(top.positions.value_in_unit(unit.angstrom))
    selected = None if qm is None else parse_selection(qm, len(pos))
    return Solute(Path(pdb).stem, top.topology, pos, [str(f) for f in forcefield], charge, multiplicity, selected)


def molecules_of(n: int, bonds: list[tuple[int, int]]) -> np.ndarray:
    """Molecule index of every atom: the connected components of the bonds."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    i, j = (np.array(x, dtype=np.int64) for x in zip(*bonds)) if bonds else (np.zeros(0, int), np.zeros(0, int))
    return connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)[1].astype(np.int64)


@dataclass
class MMSetup:
    """An OpenMM model of a QM/MM system (positions in nm, as OpenMM keeps them); the solute's atoms come first,
    then the ion (if any), then the solvent."""

    name: str
    topology: object
    positions: np.ndarray
    forcefield_files: list[str]
    qm_indices: np.ndarray
    qm_charge: int
    multiplicity: int = 1
    ion_index: int | None = None   # the MM ion of an ion environment
    solvent: str = "water"

    def create_system(self):
        """Flexible (no constraints) OpenMM System with PME electrostatics."""
        return create_system(self.topology, self.forcefield_files, periodic=True)

    def relaxed(self, cutoff_A: float = 7.0, iterations: int = 300) -> "MMSetup":
        """A copy with the packing overlaps removed by OpenMM's minimiser (one CPU thread, PME with a ``cutoff_A``
        real-space cutoff); the QM atoms stay where they are, since their internal terms are the model's."""
        import dataclasses

        import openmm
        from openmm import unit

        system = create_system(self.topology, self.forcefield_files, periodic=True, cutoff_A=cutoff_A, switch_A=None)
        for i in self.qm_indices:  # massless particles do not move
            system.setParticleMass(int(i), 0.0)
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("CPU"),
                             {"Threads": "1"})
        ctx.setPositions(self.positions * unit.nanometer)
        openmm.LocalEnergyMinimizer.minimize(ctx, 10.0, iterations)
        positions = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.nanometer)
        return dataclasses.replace(self, positions=np.asarray(positions))

    def box_nm(self) -> np.ndarray:
        from openmm import unit

        vecs = self.topology.getPeriodicBoxVectors()
        return np.array([[v[k].value_in_unit(unit.nanometer) for k in range(3)] for v in vecs])

    def structure(self, positions_nm: np.ndarray | None = None) -> QMMMStructure:
        """The periodic system as a :class:`QMMMStructure`: molecules from the bonds, cut bonds as link atoms
        with the MM charges redistributed (:mod:`qmmm_driver.boundary`)."""
        from ..boundary import boundary_from_bonds
        from ..units import ANGSTROM_TO_BOHR

        pos = self.positions if positions_nm is None else positions_nm
        n = self.topology.getNumAtoms()
        qm = np.zeros(n, dtype=bool)
        qm[self.qm_indices] = True
        bonds = [(b[0].index, b[1].index) for b in self.topology.bonds()]
        symbols = [a.element.symbol for a in self.topology.atoms()]
        links, mm_charge = boundary_from_bonds(symbols, pos * 10.0, qm, bonds,
                                               force_field_charges(self.create_system()), f"{self.name}: ")
        return QMMMStructure(
            numbers=np.array([a.element.atomic_number for a in self.topology.atoms()]),
            positions=pos * 10.0 * ANGSTROM_TO_BOHR, qm=qm, mm_charge=mm_charge,
            qm_total_charge=self.qm_charge, qm_multiplicity=self.multiplicity,
            cell=self.box_nm() * 10.0 * ANGSTROM_TO_BOHR, molecule=molecules_of(n, bonds), qm_link=links,
            source=f"{self.name} (OpenMM setup)")

    def write(self, directory: str | Path) -> dict[str, Path]:
        """Write ``system.pdb`` (OpenMM) and ``system.extxyz`` (i-PI and the driver) to ``directory``."""
        from openmm import app, unit

        from ..structures import write_structures

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        pdb = directory / "system.pdb"
        with open(pdb, "w") as fh:
            app.PDBFile.writeFile(self.topology, self.positions * unit.nanometer, fh, keepIds=True)
        xyz = directory / "system.extxyz"
        write_structures(xyz, [self.structure()])
        return {"pdb": pdb, "extxyz": xyz}


def min_image_distances(points: np.ndarray, others: np.ndarray, box_A: float) -> np.ndarray:
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
        if len(occupied_A) and min_image_distances(site[None], np.asarray(occupied_A).reshape(-1, 3),
                                                    box_A).min() < clearance + 1.0:
            continue
        best, best_gap = None, -1.0
        for _ in range(tries):
            mol = template @ random_rotation(rng).T + site + rng.uniform(-0.2, 0.2, 3)
            gap = min_image_distances(mol, taken, box_A).min() if len(taken) else np.inf
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
    bonds = _template_bonds(solvent)
    for mol in _pack(solvent, occupied, box_A, rng):
        res = top.addResidue(solvent.residue, chain)
        by_name = {name: top.addAtom(name, app.element.Element.getBySymbol(el), res) for name, el, *_ in solvent.atoms}
        for a, b in bonds:
            top.addBond(by_name[a], by_name[b])
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


def build_setup(solute: Solute, box_A: float = 26.0, seed: int = 0, ion: str | None = None,
                solvent: str = "water", ion_distance_A: float = 4.5) -> MMSetup:
    """Solvate ``solute`` (randomly oriented, at the centre) in a cubic box of ``box_A`` Angstrom of ``solvent``;
    ``ion`` (a name of :data:`IONS`) adds that MM ion ``ion_distance_A`` from the solute's centre."""
    from openmm import unit

    if solvent not in SOLVENTS:
        raise ValueError(f"unknown solvent '{solvent}' (known: {', '.join(SOLVENTS)})")
    if ion is not None and ion not in IONS:
        raise ValueError(f"unknown ion '{ion}' (known: {', '.join(IONS)})")
    rng = np.random.default_rng(seed)
    centre = np.full(3, box_A / 2.0)
    files = list(dict.fromkeys([WATER_XML, *solute.forcefield]))
    if SOLVENTS[solvent].forcefield is not None:
        files.append(SOLVENTS[solvent].forcefield)
    local = solute.positions - solute.positions.mean(axis=0)
    positions = (local @ random_rotation(rng).T + centre) / 10.0
    ions = []
    if ion is not None:
        direction = rng.normal(size=3)
        ions.append((ion, centre + ion_distance_A * direction / np.linalg.norm(direction)))
    modeller = _solvate(solute.topology, positions, files, box_A, ions, SOLVENTS[solvent], rng)
    n_solute = solute.topology.getNumAtoms()
    return MMSetup(name=solute.name, topology=modeller.topology,
                   positions=np.array(modeller.positions.value_in_unit(unit.nanometer)), forcefield_files=files,
                   qm_indices=solute.qm_indices, qm_charge=solute.charge, multiplicity=solute.multiplicity,
                   ion_index=n_solute if ion is not None else None, solvent=solvent)
