"""The MM half of QM/MM dynamics: an OpenMM System holding exactly what the model does not.

The model worker gives the QM energy in the field of the MM point charges (QM
internal + QM-MM electrostatics). This module builds the OpenMM System for
everything else and nothing more:

- flexible (no constraints, no rigid water), PME for MM-MM electrostatics in a
  periodic cell (Lennard-Jones cut at ``cutoff`` with a switch from
  ``switch_distance``), no cutoff for a cluster;
- QM atoms carry no charge (their electrostatics are the model's);
- every QM-QM nonbonded pair is removed (an exception with zero charge product
  and zero epsilon), and bonded terms whose atoms are all QM are switched off
  (zero force constant);
- QM-MM Lennard-Jones stays; MM-MM terms stay as the force field gives them; a QM hydrogen that the force
  field leaves without Lennard-Jones (TIP3P's, most amber hydrogens on O and N) gets ``QM_HYDROGEN_LJ``, as QM/MM
  codes give their QM hydrogens: nothing else keeps one off an MM charge it is hydrogen-bonded to, whose
  point-charge attraction grows without bound as they meet (16-bead PIMD of the water example pulled a QM
  hydrogen onto the acceptor oxygen and blew up);
- no long-range dispersion correction (at constant volume it is a constant,
  and it would average over QM-QM pairs too).

Covalent bonds across the boundary must be declared cut (``links``: the QM/MM
atom pairs that carry link hydrogens, :mod:`qmmm_driver.boundary`): then the
bonded terms that span the boundary stay on the MM side (the model holds only
QM-QM terms) and the boundary's nonbonded exceptions (1-2, 1-3, 1-4 pairs) keep
their Lennard-Jones part but lose their Coulomb part (QM-MM electrostatics are
the model's). Any other bond, angle, torsion or exclusion linking a QM atom to
an MM atom is an error. Forces that cannot be
checked for QM atoms (custom nonbonded forces, implicit solvent, LJ-PME, virtual
sites, constraints) are refused with a message naming them.

:class:`OpenMMEvaluator` serves the System to :class:`~qmmm_driver.ipi.client.IPIClient`:
positions and cells in Bohr in, energies in Hartree and forces in Hartree/Bohr
out. OpenMM's nm and kJ/mol are converted here and nowhere else. OpenMM gives
no virial, so the virial sent to i-PI is zero: constant-pressure runs are not
supported with the MM worker.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from ase import units as _ase_units

from ..errors import InputError
from ..units import BOHR, HARTREE

#: nm per Bohr (OpenMM lengths are nm).
BOHR_TO_NM = BOHR / 10.0
#: kJ/mol per Hartree (OpenMM energies are kJ/mol).
HARTREE_TO_KJ_PER_MOL = HARTREE / (_ase_units.kJ / _ase_units.mol)
#: (kJ/mol/nm) -> (Hartree/Bohr)
KJ_PER_MOL_NM_TO_HARTREE_PER_BOHR = BOHR_TO_NM / HARTREE_TO_KJ_PER_MOL

#: default Lennard-Jones/real-space cutoff and switch start (Angstrom)
DEFAULT_CUTOFF_A = 10.0
DEFAULT_SWITCH_A = 9.0


class MMSetupError(InputError):
    """An MM force field, topology or QM selection the MM worker cannot serve."""


class NonFiniteMM(RuntimeError):
    """OpenMM produced NaN or infinite energies or forces."""


def atom_label(topology, index: int) -> str:
    """``atom 4 (H1 of HOH 2)`` for messages (residue ids as in the PDB)."""
    atom = next(itertools.islice(topology.atoms(), int(index), None))
    return f"atom {int(index)} ({atom.name} of {atom.residue.name} {atom.residue.id})"


# --------------------------------------------------------------------------- building


def read_pdb(path):
    """``openmm.app.PDBFile`` of ``path`` (topology and positions), with a clear error."""
    from openmm import app

    path = Path(path)
    if not path.is_file():
        raise MMSetupError(f"PDB file {path} does not exist")
    try:
        pdb = app.PDBFile(str(path))
    except Exception as err:  # OpenMM raises several kinds on malformed files
        raise MMSetupError(f"cannot read PDB file {path}: {err}") from err
    return pdb


def create_system(topology, forcefield_files=None, serialized=None, periodic: bool = True,
                  cutoff_A: float = DEFAULT_CUTOFF_A, switch_A: float | None = DEFAULT_SWITCH_A):
    """The unmodified flexible OpenMM System: from force-field files or a serialized System."""
    import openmm
    from openmm import app, unit

    n = topology.getNumAtoms()
    if serialized is not None:
        path = Path(serialized)
        if not path.is_file():
            raise MMSetupError(f"serialized System {path} does not exist")
        try:
            system = openmm.XmlSerializer.deserialize(path.read_text())
        except Exception as err:
            raise MMSetupError(f"cannot read the OpenMM System in {path}: {err}") from err
        if system.getNumParticles() != n:
            raise MMSetupError(f"serialized System {path} has {system.getNumParticles()} particles but the "
                               f"PDB has {n} atoms; both must list the same atoms in the same order")
        return system
    files = [str(f) for f in forcefield_files]
    try:
        forcefield = app.ForceField(*files)
    except Exception as err:
        raise MMSetupError(f"cannot read force field {' '.join(files)}: {err}") from err
    if not cutoff_A > 0:
        raise MMSetupError(f"cutoff {cutoff_A} A must be positive")
    if switch_A and not 0 < switch_A < cutoff_A:
        raise MMSetupError(f"switch distance {switch_A} A must lie between 0 and the cutoff {cutoff_A} A "
                           "(0: no switch)")
    kwargs = dict(constraints=None, rigidWater=False, removeCMMotion=False)
    if periodic:
        kwargs.update(nonbondedMethod=app.PME, nonbondedCutoff=cutoff_A / 10.0 * unit.nanometer)
        if switch_A:
            kwargs["switchDistance"] = switch_A / 10.0 * unit.nanometer
    else:
        kwargs["nonbondedMethod"] = app.NoCutoff
    try:
        return forcefield.createSystem(topology, **kwargs)
    except Exception as err:
        raise MMSetupError(f"force field {' '.join(files)} cannot describe the PDB topology: {err}") from err


def check_flexible(system, topology, source: str) -> None:
    """Refuse constraints and virtual sites: i-PI moves every atom freely."""
    if system.getNumConstraints():
        a, b, _ = system.getConstraintParameters(0)
        raise MMSetupError(f"{source} has {system.getNumConstraints()} constraints (e.g. {atom_label(topology, a)} - "
                           f"{atom_label(topology, b)}); build it flexible (constraints=None, rigidWater=False)")
    from openmm import unit

    for i in range(system.getNumParticles()):
        if system.isVirtualSite(i) or system.getParticleMass(i).value_in_unit(unit.dalton) == 0:
            raise MMSetupError(f"{source}: {atom_label(topology, i)} is a virtual site or massless; "
                               "i-PI cannot move such particles (use a force field without virtual sites)")


# --------------------------------------------------------------------------- removing what the model gives

def _bonded_table():
    """Bonded force types: (atoms per term, count method, getter, how to switch a term off or None)."""
    import openmm

    return {
        openmm.HarmonicBondForce: (
            2, "getNumBonds", "getBondParameters",
            lambda f, i, p: f.setBondParameters(i, *p[:2], p[2], 0.0)),
        openmm.HarmonicAngleForce: (
            3, "getNumAngles", "getAngleParameters",
            lambda f, i, p: f.setAngleParameters(i, *p[:3], p[3], 0.0)),
        openmm.PeriodicTorsionForce: (
            4, "getNumTorsions", "getTorsionParameters",
            lambda f, i, p: f.setTorsionParameters(i, *p[:4], p[4], p[5], 0.0)),
        openmm.RBTorsionForce: (
            4, "getNumTorsions", "getTorsionParameters",
            lambda f, i, p: f.setTorsionParameters(i, *p[:4], 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)),
        # terms of these cannot be switched off generically: all-QM terms are refused
        openmm.CustomBondForce: (2, "getNumBonds", "getBondParameters", None),
        openmm.CustomAngleForce: (3, "getNumAngles", "getAngleParameters", None),
        openmm.CustomTorsionForce: (4, "getNumTorsions", "getTorsionParameters", None),
        openmm.CMAPTorsionForce: (None, "getNumTorsions", "getTorsionParameters", None),
    }


def _term_atoms(kind, nat, params) -> list[int]:
    import openmm

    if kind is openmm.CMAPTorsionForce:  # (map, a1..a4, b1..b4)
        return [int(a) for a in params[1:9]]
    return [int(a) for a in params[:nat]]


@dataclass
class Removed:
    """What :func:`remove_qm_terms` changed (counts for the log)."""

    charges: int = 0
    qm_pairs: int = 0
    bonded: dict = field(default_factory=dict)
    boundary_terms: int = 0       # bonded terms spanning a cut bond, kept
    boundary_exceptions: int = 0  # QM-MM exceptions whose Coulomb part was removed
    hydrogen_lj: int = 0          # QM hydrogens given QM_HYDROGEN_LJ

    def summary(self) -> str:
        bonded = " + ".join(f"{n} {k}" for k, n in self.bonded.items() if n) or "no"
        text = f"{self.charges} QM charges zeroed; removed {self.qm_pairs} QM-QM pairs and {bonded} bonded terms"
        if self.hydrogen_lj:
            text += f"; {self.hydrogen_lj} QM hydrogens given Lennard-Jones (QM_HYDROGEN_LJ)"
        if self.boundary_terms or self.boundary_exceptions:
            text += (f"; kept {self.boundary_terms} bonded terms across cut bonds, {self.boundary_exceptions} "
                     "boundary exceptions without Coulomb")
        return text


def _spans_error(topology, kind: str, atoms, qm_mask) -> MMSetupError:
    qm = next(a for a in atoms if qm_mask[a])
    mm = next(a for a in atoms if not qm_mask[a])
    return MMSetupError(
        f"{kind} links QM {atom_label(topology, qm)} to MM {atom_label(topology, mm)}, and that bond is not "
        "declared cut: select every atom of the molecule as QM, or cut the bond with a link atom (the "
        "'qm_link' array of the system file)")


def _across_a_cut(atoms, qm_mask, cut: set) -> bool:
    """A term spanning the boundary is allowed when it contains a declared cut bond (QM atom, MM atom)."""
    qm = [a for a in atoms if qm_mask[a]]
    mm = [a for a in atoms if not qm_mask[a]]
    return any((q, m) in cut for q in qm for m in mm)


#: Lennard-Jones (sigma nm, epsilon kJ/mol) of a QM hydrogen that has none: CHARMM's TIP3P hydrogen
#: (Rmin/2 = 0.2245 A, epsilon = 0.046 kcal/mol). Against a TIP3P oxygen: +0.5 eV at 1.3 A, +14 eV at 1.0 A,
#: under 1 meV beyond 1.7 A, where hydrogen bonds sit.
QM_HYDROGEN_LJ = (2 * 0.02245 / 2 ** (1 / 6), 0.046 * 4.184)


def remove_qm_terms(system, topology, qm_indices, links=(), hydrogen_lj=QM_HYDROGEN_LJ) -> Removed:
    """Modify ``system`` in place so that it holds no QM charge and no QM-QM term; bonded terms across the
    declared cut bonds ``links`` (pairs of QM atom, MM atom) stay, any other QM-MM bonded term is an error.
    QM hydrogens without Lennard-Jones get ``hydrogen_lj`` (sigma nm, epsilon kJ/mol; None: left as they are)."""
    import openmm

    n = system.getNumParticles()
    qm_mask = np.zeros(n, dtype=bool)
    qm_mask[np.asarray(qm_indices, dtype=np.int64)] = True
    qm = [int(i) for i in np.flatnonzero(qm_mask)]
    cut = {(int(q), int(m)) for q, m in links}
    out = Removed()

    for bond in topology.bonds():
        a, b = bond[0].index, bond[1].index
        if qm_mask[a] != qm_mask[b] and ((a, b) if qm_mask[a] else (b, a)) not in cut:
            raise _spans_error(topology, "a bond of the topology", (a, b), qm_mask)

    table = _bonded_table()
    drop = []
    for k, force in enumerate(system.getForces()):
        kind = type(force)
        name = kind.__name__
        if isinstance(force, openmm.CMMotionRemover):
            drop.append(k)  # i-PI owns the dynamics (fixcom)
        elif isinstance(force, openmm.NonbondedForce):
            _strip_nonbonded(force, topology, qm_mask, qm, cut, out, hydrogen_lj)
        elif kind in table:
            nat, count, getter, switch_off = table[kind]
            removed = 0
            for i in range(getattr(force, count)()):
                params = getattr(force, getter)(i)
                atoms = _term_atoms(kind, nat, params)
                flags = qm_mask[atoms]
                if flags.all():
                    if switch_off is None:
                        raise MMSetupError(f"{name} term {i} acts on QM atoms only ({atom_label(topology, atoms[0])}, "
                                           "...); the MM worker can switch off only standard bonded terms")
                    switch_off(force, i, params)
                    removed += 1
                elif flags.any():
                    if not _across_a_cut(atoms, qm_mask, cut):
                        raise _spans_error(topology, f"{name} term {i}", atoms, qm_mask)
                    out.boundary_terms += 1  # spans a cut bond: the MM side's
            out.bonded[name] = removed
        else:
            raise MMSetupError(
                f"the MM System contains a {name}, which the MM worker does not support: it cannot tell which "
                "of its interactions involve QM atoms (supported: NonbondedForce, harmonic bonds and angles, "
                "periodic and RB torsions, custom bonded forces and CMAP acting on MM atoms only)")
    for k in reversed(drop):
        system.removeForce(k)
    return out


def _strip_nonbonded(force, topology, qm_mask, qm, cut: set, out: Removed, hydrogen_lj) -> None:
    import openmm

    if force.getNonbondedMethod() == openmm.NonbondedForce.LJPME:
        raise MMSetupError("NonbondedForce uses LJPME, whose reciprocal-space dispersion would include QM-QM pairs; "
                           "use PME (Lennard-Jones with a cutoff)")
    for i in range(force.getNumParticleParameterOffsets()):
        _, atom, *_ = force.getParticleParameterOffset(i)
        if qm_mask[atom]:
            raise MMSetupError(f"NonbondedForce has a parameter offset on QM {atom_label(topology, atom)}; "
                               "QM charges must stay zero")
    for i in range(force.getNumExceptionParameterOffsets()):
        a, b = force.getExceptionParameters(force.getExceptionParameterOffset(i)[1])[:2]
        if qm_mask[a] or qm_mask[b]:
            raise MMSetupError(f"NonbondedForce has a parameter offset on an exception of QM "
                               f"{atom_label(topology, a if qm_mask[a] else b)}; QM-QM pairs must stay removed")
    near_cut = _within_three_bonds(topology, cut)
    for k in range(force.getNumExceptions()):
        a, b, _, sigma, epsilon = force.getExceptionParameters(k)
        if qm_mask[a] != qm_mask[b]:
            if (min(a, b), max(a, b)) not in near_cut:
                raise _spans_error(topology, f"NonbondedForce exception {k} (a 1-2, 1-3 or 1-4 pair)", (a, b), qm_mask)
            force.setExceptionParameters(k, a, b, 0.0, sigma, epsilon)  # Lennard-Jones stays, Coulomb is the model's
            out.boundary_exceptions += 1
    atoms = list(topology.atoms())
    for i in qm:
        _, sigma, epsilon = force.getParticleParameters(i)
        element = atoms[i].element
        if hydrogen_lj is not None and element is not None and element.symbol == "H" and \
                epsilon.value_in_unit(epsilon.unit) == 0.0:
            sigma, epsilon = hydrogen_lj
            out.hydrogen_lj += 1
        force.setParticleParameters(i, 0.0, sigma, epsilon)  # QM-MM Lennard-Jones stays
        out.charges += 1
    for x, a in enumerate(qm):
        for b in qm[x + 1:]:
            force.addException(a, b, 0.0, 0.1, 0.0, replace=True)  # no QM-QM pair at all
            out.qm_pairs += 1
    force.setUseDispersionCorrection(False)


def _within_three_bonds(topology, cut: set) -> set:
    """Pairs of atoms (i < j) at most three bonds apart along a path through a cut bond: the exceptions a
    force field makes across the boundary."""
    if not cut:
        return set()
    neighbours: dict[int, set] = {}
    for bond in topology.bonds():
        a, b = bond[0].index, bond[1].index
        neighbours.setdefault(a, set()).add(b)
        neighbours.setdefault(b, set()).add(a)

    def reach(start: int, avoid: int) -> dict[int, int]:
        """Atoms within two bonds of ``start`` (not through ``avoid``) and their distance in bonds."""
        found, frontier = {start: 0}, [start]
        for depth in (1, 2):
            frontier = [b for a in frontier for b in neighbours.get(a, ()) if b != avoid and b not in found]
            found.update({b: depth for b in frontier})
        return found

    out = set()
    for q, m in cut:
        side_m = reach(m, q)
        for a, da in reach(q, m).items():
            out.update((min(a, b), max(a, b)) for b, db in side_m.items() if da + db + 1 <= 3)
    return out


def force_field_charges(system) -> np.ndarray:
    """Per-atom charges (e) of the System's NonbondedForce (zeros without one)."""
    import openmm
    from openmm import unit

    charges = np.zeros(system.getNumParticles())
    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            for i in range(len(charges)):
                charges[i] = force.getParticleParameters(i)[0].value_in_unit(unit.elementary_charge)
    return charges


class WholeMolecules:
    """Makes every molecule whole again after i-PI wrapped its atoms into the cell one by one (``pbc='true'``).

    Molecules are the connected components of the topology's bonds; each atom is
    moved to the periodic image nearest the atom it hangs from in a breadth-first
    tree of its molecule, level by level (a few vectorised steps: two for water).
    Bonded terms and nonbonded exceptions then see whole molecules, as OpenMM
    assumes. ``complete`` is False when some bonded term of the System links atoms
    the topology does not connect; the caller then makes OpenMM use minimum images
    instead (:func:`use_periodic_images`, about 15% slower).
    """

    def __init__(self, topology, system):
        from collections import deque

        n = topology.getNumAtoms()
        neighbours = [[] for _ in range(n)]
        for bond in topology.bonds():
            a, b = bond[0].index, bond[1].index
            neighbours[a].append(b)
            neighbours[b].append(a)
        parent, depth, component = np.full(n, -1), np.zeros(n, dtype=int), np.full(n, -1)
        for root in range(n):
            if component[root] >= 0:
                continue
            component[root] = root
            queue = deque([root])
            while queue:
                a = queue.popleft()
                for b in neighbours[a]:
                    if component[b] < 0:
                        component[b], parent[b], depth[b] = root, a, depth[a] + 1
                        queue.append(b)
        self.levels = [(np.flatnonzero(depth == d), parent[depth == d]) for d in range(1, depth.max() + 1)]
        self.complete = all(len(set(component[atoms])) == 1 for atoms in _bonded_atom_sets(system))

    def apply(self, positions: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """``positions`` [N, 3] with every molecule whole, in the cell given by lattice ``rows`` (same unit)."""
        pos = np.array(positions, dtype=np.float64)
        inv = np.linalg.inv(rows)
        for child, parent in self.levels:
            d = pos[child] - pos[parent]
            pos[child] -= np.round(d @ inv) @ rows
        return pos


def _bonded_atom_sets(system):
    """The atoms of every bonded term and nonbonded exception of ``system``."""
    import openmm

    table = _bonded_table()
    for force in system.getForces():
        kind = type(force)
        if kind in table:
            nat, count, getter, _ = table[kind]
            for i in range(getattr(force, count)()):
                yield _term_atoms(kind, nat, getattr(force, getter)(i))
        elif isinstance(force, openmm.NonbondedForce):
            for k in range(force.getNumExceptions()):
                yield list(force.getExceptionParameters(k)[:2])


def use_periodic_images(system) -> None:
    """Bonded terms and nonbonded exceptions of a periodic System by minimum image (see :class:`WholeMolecules`)."""
    import openmm

    for force in system.getForces():
        if isinstance(force, openmm.NonbondedForce):
            force.setExceptionsUsePeriodicBoundaryConditions(True)
        elif hasattr(force, "setUsesPeriodicBoundaryConditions"):
            force.setUsesPeriodicBoundaryConditions(True)


#: The MM terms a socket may ask for (``<parameters>{terms: ...}</parameters>``) -> OpenMM force groups.
TERMS = {"all": {0, 1}, "bonded": {0}, "nonbonded": {1}}


def mm_terms(value) -> str:
    """``terms`` parameter: all, bonded or nonbonded."""
    value = str(value).strip()
    if value not in TERMS:
        raise ValueError(f"terms must be one of {', '.join(TERMS)}")
    return value


# --------------------------------------------------------------------------- platform


def select_platform(spec: str, local_rank: int = 0, threads: int = 0):
    """OpenMM platform and properties for ``--device``: ``auto``, ``cpu``, ``reference``, ``cuda`` or ``cuda:N``.

    ``auto`` takes CUDA when OpenMM has the platform and a GPU is present
    (``cuda:(local_rank % n_gpus)``), the CPU platform otherwise; ``reference``
    is OpenMM's double-precision reference platform (validation, slow).
    """
    import openmm

    from ..parallel import DeviceError, select_device, threads_per_worker

    spec = (spec or "auto").strip().lower()
    names = [openmm.Platform.getPlatform(i).getName() for i in range(openmm.Platform.getNumPlatforms())]
    cpu = ("CPU", {"Threads": str(threads_per_worker(threads))})
    if spec == "reference":
        return "Reference", {}
    if spec == "cpu" or (spec == "auto" and "CUDA" not in names):
        return cpu
    if spec != "auto" and "CUDA" not in names:
        raise DeviceError(f"--device {spec}: OpenMM has no CUDA platform here (platforms: {', '.join(names)}); "
                          "use --device cpu or auto")
    device = select_device(spec, local_rank)  # GPU count and index, as the model worker picks them
    if device.type != "cuda":
        return cpu
    return "CUDA", {"DeviceIndex": str(device.index), "Precision": "mixed"}


# --------------------------------------------------------------------------- evaluation


def reduced_box(rows: np.ndarray) -> np.ndarray:
    """Lattice rows [3, 3] (a along x, b in the xy plane) in OpenMM's reduced form (same lattice)."""
    a, b, c = (np.array(r, dtype=np.float64) for r in rows)
    c = c - np.round(c[1] / b[1]) * b
    c = c - np.round(c[0] / a[0]) * a
    b = b - np.round(b[0] / a[0]) * a
    return np.stack([a, b, c])


@dataclass
class MMResults:
    """MM energies and forces of B frames (atomic units); the virial is zero (OpenMM gives none)."""

    energy: np.ndarray   # [B] Hartree
    forces: np.ndarray   # [B, N, 3] Hartree/Bohr
    virial: np.ndarray   # [B, 3, 3] zeros

    def extras(self, b: int, structure) -> dict:
        """Nothing: an empty extras string keeps i-PI's ``raw`` extras those of the model worker."""
        return {}


class OpenMMEvaluator:
    """Evaluates an OpenMM System for :class:`~qmmm_driver.ipi.client.IPIClient` (Bohr and Hartree).

    Follows :class:`~qmmm_driver.evaluator.Evaluator`. ``periodic``: the cell
    of every request sets OpenMM's box vectors, and molecules that i-PI wrapped
    into the cell atom by atom are made whole first. One parameter, ``terms``,
    selects what a forcefield gives: ``all`` (default), ``bonded`` (bonds,
    angles, torsions: fast, intramolecular) or ``nonbonded`` (Lennard-Jones and
    electrostatics: intermolecular, slowly varying), so that a PIMD input can
    evaluate the nonbonded part on a contracted ring polymer
    (``<force forcefield='mm_nonbonded' nbeads='4'/>``) and the bonded part on
    every bead.
    """

    parameters = {"terms": (mm_terms, "all", "which MM terms: all, bonded (intramolecular) or nonbonded "
                                           "(intermolecular; worth a contracted ring polymer)")}

    def __init__(self, system, structure, platform: str = "CPU", properties: dict | None = None,
                 periodic: bool = True, topology=None):
        import openmm
        from openmm import unit

        self.structure = structure
        self.n_atoms = system.getNumParticles()
        self.periodic = bool(periodic)
        self.cutoff_nm = None
        self.whole = None
        if self.periodic:
            whole = WholeMolecules(topology, system) if topology is not None else None
            if whole is not None and whole.complete:
                self.whole = whole
            else:
                use_periodic_images(system)
            self.cutoff_nm = max((f.getCutoffDistance().value_in_unit(unit.nanometer) for f in system.getForces()
                                  if hasattr(f, "getCutoffDistance") and f.usesPeriodicBoundaryConditions()),
                                 default=None)
        for force in system.getForces():  # group 1: nonbonded (direct and reciprocal space), 0: all the rest
            force.setForceGroup(1 if isinstance(force, openmm.NonbondedForce) else 0)
        self.context = openmm.Context(system, openmm.VerletIntegrator(0.001),
                                      openmm.Platform.getPlatformByName(platform), dict(properties or {}))
        self.platform = self.context.getPlatform().getName()

    def _set_box(self, rows_bohr: np.ndarray) -> None:
        import openmm

        box = reduced_box(np.asarray(rows_bohr, dtype=np.float64) * BOHR_TO_NM)
        widths = np.abs(np.linalg.det(box)) / np.linalg.norm(np.cross(box[[1, 2, 0]], box[[2, 0, 1]]), axis=1)
        if self.cutoff_nm is not None and widths.min() < 2 * self.cutoff_nm:
            raise MMSetupError(
                f"the cell from i-PI is {widths.min() * 10:.3f} A wide, less than twice the MM cutoff "
                f"({self.cutoff_nm * 10:.3f} A); use a larger cell or a smaller --cutoff")
        self.context.setPeriodicBoxVectors(*(openmm.Vec3(*v) for v in box))

    def compute(self, positions: np.ndarray, cells: np.ndarray | None = None, params=None) -> MMResults:
        """Energy and forces of frames ``positions`` [B, N, 3] (Bohr) in cells [B, 3, 3] (rows, Bohr)."""
        import openmm
        from openmm.unit import kilojoule_per_mole as KJ_PER_MOL, nanometer as NM

        groups = TERMS[(params or {}).get("terms", "all")]
        pos = np.asarray(positions, dtype=np.float64).reshape(-1, self.n_atoms, 3)
        B = pos.shape[0]
        energy = np.empty(B)
        forces = np.empty((B, self.n_atoms, 3))
        for b in range(B):
            frame = pos[b]
            if self.periodic and cells is not None:
                self._set_box(cells[b])
                if self.whole is not None:
                    frame = self.whole.apply(frame, np.asarray(cells[b], dtype=np.float64))
            if not np.isfinite(frame).all():
                a = int(np.flatnonzero(~np.isfinite(frame).all(axis=1))[0])
                raise NonFiniteMM(f"position of atom {a} in frame {b} is not finite: the dynamics has blown up")
            try:
                self.context.setPositions(frame * BOHR_TO_NM)
                state = self.context.getState(getEnergy=True, getForces=True, groups=groups)
            except openmm.OpenMMException as err:
                if "NaN" in str(err) or "nan" in str(err):
                    raise NonFiniteMM(f"OpenMM refused frame {b}: {err}") from err
                raise MMSetupError(f"OpenMM cannot evaluate frame {b}: {err}") from err
            energy[b] = state.getPotentialEnergy().value_in_unit(KJ_PER_MOL) / HARTREE_TO_KJ_PER_MOL
            forces[b] = state.getForces(asNumpy=True).value_in_unit(KJ_PER_MOL / NM) * KJ_PER_MOL_NM_TO_HARTREE_PER_BOHR
        bad = ~(np.isfinite(energy) & np.isfinite(forces).all(axis=(1, 2)))
        if bad.any():
            b = int(np.flatnonzero(bad)[0])
            raise NonFiniteMM(f"OpenMM gave a non-finite MM energy or force for frame {b}")
        return MMResults(energy=energy, forces=forces, virial=np.zeros((B, 3, 3)))
