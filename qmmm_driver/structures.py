"""The one QM/MM configuration type, its validation, and extended-XYZ input/output.

A :class:`QMMMStructure` is one configuration in atomic units (Bohr, Hartree,
e): all atoms, which of them are QM, the MM point charges, the QM region's
charge and multiplicity, the cell of a periodic system (none for a cluster),
the charge groups of the MM atoms and, for labelled data, the reference energy,
forces, QM charges and dipole. The worker's system file, training frames and
labelled frames are all structures.

Files follow ``shared/conventions/qmmm-frames.md``: extended XYZ in eV,
Angstrom and e, per-atom ``qm`` (0/1) and ``mm_charge``; labels through ASE's
single-point calculator; ``qm_total_charge``/``qm_multiplicity`` in the info.
qmmm-driver adds three optional items, all readable by any extended-XYZ reader:

- ``molecule`` (per-atom integer): the charge groups that the periodic
  embedding switches as a whole (without it, covalent connectivity defines them);
- ``qm_link`` (per-atom integer): covalent bonds cut by the QM/MM boundary; on an
  MM atom M1 bonded to a QM atom Q1, the index of Q1, -1 on every other atom
  (link hydrogens, see :mod:`qmmm_driver.boundary`);
- ``qm_dipole`` (info, e A): the reference QM dipole about the QM centre of mass
  (with link hydrogens, those included).

The QM selection of a worker may also be given as 0-based indices and inclusive
ranges, e.g. ``"0-5,9"``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .errors import InputError
from .files import write_atomically
from .units import (ANGSTROM_TO_BOHR, BOHR, E_BOHR_TO_E_ANGSTROM, EV_PER_A_TO_HARTREE_PER_BOHR, EV_TO_HARTREE,
                    HARTREE, HARTREE_PER_BOHR_TO_EV_PER_A)


class StructureError(InputError):
    """A structure, frame file or QM selection that cannot describe a QM/MM configuration."""


#: ``info`` keys that ``qmmm-driver label`` writes with the labels: they describe the labels, not the frame
LABEL_INFO = ("reference", "qm_charges_scheme", "source_index")


def parse_selection(text: str, n_atoms: int) -> np.ndarray:
    """Parse ``"0-5,9,12-14"`` (0-based, inclusive ranges) into sorted indices."""
    indices: list[int] = []
    for token in str(text).replace(" ", "").split(","):
        if not token:
            continue
        try:
            if "-" in token[1:]:
                cut = token.index("-", 1)
                start, stop = int(token[:cut]), int(token[cut + 1:])
            else:
                start = stop = int(token)
        except ValueError as err:
            raise StructureError(f"cannot read QM selection token '{token}': use 0-based indices and "
                                 "inclusive ranges such as '0-5,9'") from err
        if stop < start:
            raise StructureError(f"QM selection range '{token}' runs backwards (write {stop}-{start})")
        indices.extend(range(start, stop + 1))
    if not indices:
        raise StructureError(f"QM selection '{text}' selects no atom")
    arr = np.array(sorted(set(indices)), dtype=np.int64)
    bad = arr[(arr < 0) | (arr >= n_atoms)]
    if bad.size:
        raise StructureError(f"QM selection '{text}' names atom {int(bad[0])}, but the system has "
                             f"{n_atoms} atoms (valid indices 0-{n_atoms - 1})")
    return arr


def find_molecules(numbers: np.ndarray, positions_A: np.ndarray, cell_A: np.ndarray | None) -> np.ndarray:
    """Molecule index of every atom from covalent connectivity (ASE natural cutoffs, minimum image)."""
    from ase import Atoms
    from ase.neighborlist import natural_cutoffs, neighbor_list
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    atoms = Atoms(numbers=numbers, positions=positions_A, cell=cell_A, pbc=cell_A is not None)
    n = len(atoms)
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.1))
    _, labels = connected_components(coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n)), directed=False)
    return labels.astype(np.int64)


@dataclass
class QMMMStructure:
    """One QM/MM configuration in atomic units (Bohr, Hartree, e); arrays run over all atoms."""

    numbers: np.ndarray                   # [N] atomic numbers
    positions: np.ndarray                 # [N, 3] Bohr
    qm: np.ndarray                        # [N] bool
    mm_charge: np.ndarray                 # [N] e, 0 on QM atoms
    qm_total_charge: int = 0
    qm_multiplicity: int = 1
    cell: np.ndarray | None = None        # [3, 3] lattice vectors as rows, Bohr; None: a cluster
    molecule: np.ndarray | None = None    # [N] charge groups (from the 'molecule' array), or None
    qm_link: np.ndarray | None = None     # [N] on an MM atom bonded to QM atom Q1: Q1; else -1 (cut bonds)
    energy: float | None = None           # Hartree
    forces: np.ndarray | None = None      # [N, 3] Hartree/Bohr
    qm_charges: np.ndarray | None = None  # [N] e, 0 on MM atoms
    dipole: np.ndarray | None = None      # [3] e Bohr about the QM centre of mass
    info: dict = field(default_factory=dict)
    source: str = "<memory>"

    def __post_init__(self):
        where = self.source
        n = len(self.numbers)
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(n, 3)
        self.qm = np.asarray(self.qm).reshape(-1)
        if n == 0:
            raise StructureError(f"{where}: the structure has no atoms")
        bad = np.flatnonzero((self.qm != 0) & (self.qm != 1))
        if bad.size:
            raise StructureError(f"{where}: 'qm' of atom {int(bad[0])} is {self.qm[bad[0]]}, must be 0 or 1")
        self.qm = self.qm.astype(bool)
        if not self.qm.any():
            raise StructureError(f"{where}: the QM region is empty (no atom has qm = 1)")
        bad = np.flatnonzero(~np.isfinite(self.positions).all(axis=1))
        if bad.size:
            raise StructureError(f"{where}: position of atom {int(bad[0])} is not finite")
        charge = np.asarray(self.mm_charge, dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(charge))
        if bad.size:
            raise StructureError(f"{where}: mm_charge of atom {int(bad[0])} is {charge[bad[0]]}")
        self.mm_charge = np.where(self.qm, 0.0, charge)
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
            if abs(np.linalg.det(self.cell)) < 1e-6:
                raise StructureError(f"{where}: the periodic cell has no volume")
        if self.qm_link is not None:
            self.qm_link = np.asarray(self.qm_link, dtype=np.int64).reshape(-1)
            self._check_links()
        if self.molecule is not None:
            self.molecule = np.asarray(self.molecule, dtype=np.int64).reshape(-1)
            self._check_whole_qm_molecules(self.molecule, "its 'molecule' array")
        if self.energy is not None:
            if self.forces is None:
                raise StructureError(f"{where}: the frame has an energy but no forces")
            self.forces = np.asarray(self.forces, dtype=np.float64).reshape(n, 3)
            bad = np.flatnonzero(~np.isfinite(self.forces).all(axis=1))
            if not np.isfinite(self.energy) or bad.size:
                raise StructureError(f"{where}: non-finite label (energy or force on atom "
                                     f"{int(bad[0]) if bad.size else '-'})")

    def _check_links(self) -> None:
        where = self.source
        n = self.n_atoms
        bad = np.flatnonzero((self.qm_link < -1) | (self.qm_link >= n))
        if bad.size:
            raise StructureError(f"{where}: 'qm_link' of atom {int(bad[0])} is {self.qm_link[bad[0]]}, not an atom index")
        m1 = np.flatnonzero(self.qm_link >= 0)
        if self.qm[m1].any():
            a = int(m1[self.qm[m1]][0])
            raise StructureError(f"{where}: atom {a} is QM but has a 'qm_link' partner; links go on the MM atoms of cut bonds")
        if (~self.qm[self.qm_link[m1]]).any():
            a = int(m1[~self.qm[self.qm_link[m1]]][0])
            raise StructureError(f"{where}: 'qm_link' of MM atom {a} names atom {int(self.qm_link[a])}, which is not QM")

    def _check_whole_qm_molecules(self, molecule: np.ndarray, origin: str) -> None:
        cut = np.flatnonzero(~self.qm & np.isin(molecule, molecule[self.qm]))
        if cut.size and self.qm_link is not None:  # molecules cut at declared links are allowed
            linked = molecule[self.qm_link >= 0]
            cut = cut[~np.isin(molecule[cut], linked)]
        if cut.size:
            a = int(cut[0])
            qm_mate = int(np.flatnonzero(self.qm & (molecule == molecule[a]))[0])
            raise StructureError(
                f"{self.source}: MM atom {a} is in the same molecule as QM atom {qm_mate} ({origin}); the QM region "
                "must be made of whole molecules: select every atom of that molecule as QM")

    def moved(self, positions: np.ndarray, **info) -> "QMMMStructure":
        """A copy at ``positions`` (Bohr) without labels, for augmented frames to be labelled afresh: the energy,
        forces, charges, dipole and the labels' ``info`` (:data:`LABEL_INFO`) belong to the old positions.
        ``info`` is added to the frame's own."""
        kept = {k: v for k, v in self.info.items() if k not in LABEL_INFO}
        return replace(self, positions=positions, energy=None, forces=None, qm_charges=None, dipole=None,
                       info={**kept, **info})

    # ---- derived quantities
    @property
    def n_atoms(self) -> int:
        return len(self.numbers)

    @property
    def qm_indices(self) -> np.ndarray:
        return np.flatnonzero(self.qm)

    @property
    def mm_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.qm)

    @property
    def n_qm(self) -> int:
        return int(self.qm.sum())

    @property
    def periodic(self) -> bool:
        return self.cell is not None

    @property
    def labelled(self) -> bool:
        return self.energy is not None and self.forces is not None

    @property
    def links(self) -> np.ndarray:
        """The cut bonds as [n_links, 2] atom indices (Q1, M1), in M1 order."""
        if self.qm_link is None:
            return np.zeros((0, 2), dtype=np.int64)
        m1 = np.flatnonzero(self.qm_link >= 0)
        return np.stack([self.qm_link[m1], m1], axis=1)

    @property
    def link_g(self) -> np.ndarray:
        """The g factor of every link (:func:`qmmm_driver.boundary.g_factor`)."""
        from .boundary import g_factor

        symbols = self.symbols
        return np.array([g_factor(symbols[q1], symbols[m1]) for q1, m1 in self.links], dtype=np.float64)

    @property
    def symbols(self) -> list[str]:
        from ase.data import chemical_symbols

        return [chemical_symbols[int(z)] for z in self.numbers]

    @property
    def qm_symbols(self) -> list[str]:
        symbols = self.symbols
        return [symbols[i] for i in self.qm_indices]

    def mm_molecules(self) -> np.ndarray:
        """Charge group of every MM atom (aligned with ``mm_indices``), renumbered 0..n-1.

        From the ``molecule`` array, else from covalent connectivity (periodic
        systems; a QM region bonded to MM atoms is refused), else one group
        (a cluster uses every charge as given).
        """
        cached = self.__dict__.get("_mm_molecules")
        if cached is not None:
            return cached
        if self.molecule is not None:
            mol = self.molecule
        elif self.periodic:
            mol = find_molecules(self.numbers, self.positions * BOHR, self.cell * BOHR)
            self._check_whole_qm_molecules(mol, "covalent connectivity; or give a 'molecule' array")
        else:
            mol = np.zeros(self.n_atoms, dtype=np.int64)
        groups = np.unique(mol[self.mm_indices], return_inverse=True)[1].astype(np.int64)
        self.__dict__["_mm_molecules"] = groups
        return groups

    def check_atoms(self, n_atoms: int, symbols=None, origin: str = "i-PI") -> None:
        """Refuse a configuration whose atom count (or elements) differ from this structure."""
        if n_atoms != self.n_atoms:
            raise StructureError(f"{origin} sent {n_atoms} atoms but the system file {self.source} has "
                                 f"{self.n_atoms}; both must list the same atoms in the same order")
        if symbols is not None:
            for i, (a, b) in enumerate(zip(symbols, self.symbols)):
                if a != b:
                    raise StructureError(f"atom {i} is {a} in {origin} but {b} in the system file {self.source}; "
                                         "both must list the same atoms in the same order")

    # ---- ASE
    def to_atoms(self):
        """The structure as ``ase.Atoms`` in the exchange format (eV, Angstrom)."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions * BOHR)
        if self.cell is not None:
            atoms.cell = self.cell * BOHR
            atoms.pbc = True
        atoms.set_array("qm", self.qm.astype(np.int64))
        atoms.set_array("mm_charge", self.mm_charge.copy())
        if self.molecule is not None:
            atoms.set_array("molecule", self.molecule.copy())
        if self.qm_link is not None:
            atoms.set_array("qm_link", self.qm_link.copy())
        if self.qm_charges is not None:
            atoms.set_array("qm_charges", np.where(self.qm, self.qm_charges, 0.0))
        atoms.info.update(self.info)
        atoms.info["qm_total_charge"] = int(self.qm_total_charge)
        atoms.info["qm_multiplicity"] = int(self.qm_multiplicity)
        if self.dipole is not None:
            atoms.info["qm_dipole"] = np.asarray(self.dipole) * E_BOHR_TO_E_ANGSTROM
        if self.labelled:
            atoms.calc = SinglePointCalculator(atoms, energy=self.energy * HARTREE,
                                               forces=self.forces * HARTREE_PER_BOHR_TO_EV_PER_A)
        return atoms

    @classmethod
    def from_atoms(cls, atoms, source: str = "<memory>", qm: str | None = None) -> "QMMMStructure":
        """Read (and check) one ``ase.Atoms`` of the exchange format; ``qm`` overrides its 'qm' array."""
        n = len(atoms)
        if n == 0:
            raise StructureError(f"{source}: the frame has no atoms")
        if qm is not None:
            flags = np.zeros(n, dtype=np.int64)
            flags[parse_selection(qm, n)] = 1
        elif "qm" in atoms.arrays:
            flags = np.asarray(atoms.arrays["qm"]).reshape(-1)
        else:
            raise StructureError(f"{source}: no per-atom 'qm' array and no QM selection given; add a 'qm' "
                                 "column (1 for QM atoms, 0 for MM) or pass --qm '0-5'")
        if "mm_charge" not in atoms.arrays:
            raise StructureError(f"{source}: no per-atom 'mm_charge' array (MM point charges in e, 0 on QM "
                                 "atoms); write it with ase: atoms.set_array('mm_charge', charges)")
        pbc = np.asarray(atoms.get_pbc())
        if pbc.any() and not pbc.all():
            raise StructureError(f"{source}: partly periodic cells are not supported (pbc={pbc.tolist()})")
        info = dict(atoms.info)
        kwargs = {}
        if "qm_dipole" in info:
            kwargs["dipole"] = np.asarray(info.pop("qm_dipole"), dtype=np.float64).reshape(3) / E_BOHR_TO_E_ANGSTROM
        if "qm_charges" in atoms.arrays:
            kwargs["qm_charges"] = np.asarray(atoms.arrays["qm_charges"], dtype=np.float64).reshape(-1)
        results = atoms.calc.results if atoms.calc is not None else {}
        if "energy" in results:  # the single-point results as read (not recomputed for changed positions)
            kwargs["energy"] = float(results["energy"]) * EV_TO_HARTREE
            if "forces" in results:
                kwargs["forces"] = np.asarray(results["forces"]) * EV_PER_A_TO_HARTREE_PER_BOHR
        for key in ("pbc", "Lattice"):
            info.pop(key, None)
        return cls(
            numbers=atoms.numbers, positions=atoms.get_positions() * ANGSTROM_TO_BOHR, qm=flags,
            mm_charge=np.asarray(atoms.arrays["mm_charge"], dtype=np.float64),
            qm_total_charge=int(info.pop("qm_total_charge", 0)), qm_multiplicity=int(info.pop("qm_multiplicity", 1)),
            cell=atoms.cell.array * ANGSTROM_TO_BOHR if pbc.all() else None,
            molecule=np.asarray(atoms.arrays["molecule"]) if "molecule" in atoms.arrays else None,
            qm_link=np.asarray(atoms.arrays["qm_link"]) if "qm_link" in atoms.arrays else None,
            info=info, source=source, **kwargs)

    @classmethod
    def read(cls, path: str | Path, qm: str | None = None) -> "QMMMStructure":
        """The first frame of an extended-XYZ file (a worker's system file)."""
        return read_structures(path, index="0", qm=qm)[0]


# --------------------------------------------------------------------------- files

def augmented(source: list[QMMMStructure], make, count: int, rng: np.random.Generator) -> list[QMMMStructure]:
    """Up to ``count`` frames ``make(frame)`` (None: skipped) of ``source`` frames taken in ``rng``'s random order:
    the loop of the scripts that make training frames by moving atoms of labelled ones (with
    :meth:`QMMMStructure.moved`)."""
    made: list[QMMMStructure] = []
    for i in rng.permutation(len(source)):
        frame = make(source[i])
        if frame is not None:
            made.append(frame)
        if len(made) == count:
            break
    return made


def augmentation_script(description: str, source: Path, count: int, lengths: str, seed: int, make,
                        what: str) -> None:
    """The command line of an example script that makes training frames by moving atoms of labelled ones:
    ``--source`` (frames), ``--out``, ``--frames`` (how many), ``--range LO:HI`` (A; each frame draws a length
    from it) and ``--seed``; ``make(frame, length_A, rng)`` gives the moved frame or None (see :func:`augmented`),
    ``what`` names the frames in the closing line."""
    import argparse

    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=source)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=count)
    p.add_argument("--range", default=lengths, help="the length each moved frame gets, LO:HI in A")
    p.add_argument("--seed", type=int, default=seed)
    args = p.parse_args()
    lo, hi = (float(x) for x in args.range.split(":"))
    rng = np.random.default_rng(args.seed)
    made = augmented(read_structures(args.source), lambda frame: make(frame, rng.uniform(lo, hi), rng),
                     args.frames, rng)
    write_structures(args.out, made)
    print(f"wrote {len(made)} {what} frames to {args.out}")


def _uncompressed(path: Path):
    """``path`` itself, or the decompressed text of a .xz/.gz/.bz2 file in memory.

    ASE reads compressed files too, but seeks through them frame by frame, which
    costs minutes for a thousand frames; decompressing once costs a second.
    """
    import bz2
    import gzip
    import io
    import lzma

    opener = {".xz": lzma.open, ".gz": gzip.open, ".bz2": bz2.open}.get(path.suffix)
    if opener is None:
        return path
    with opener(path, "rt") as fh:
        return io.StringIO(fh.read())


def read_structures(path: str | Path, index: str = ":", require_labels: bool = False,
                    qm: str | None = None) -> list[QMMMStructure]:
    """Read frames of the exchange format; errors name the file and frame."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise StructureError(f"frame file {path} does not exist")
    try:
        images = ase.io.read(_uncompressed(path), index=index, format="extxyz")
    except Exception as err:  # ASE raises many kinds on malformed files
        raise StructureError(f"cannot read {path} as extended XYZ: {err}") from err
    if not isinstance(images, list):
        images = [images]
    out = []
    for k, atoms in enumerate(images):
        structure = QMMMStructure.from_atoms(atoms, source=f"{path} frame {k}" if index != "0" else str(path), qm=qm)
        if require_labels and not structure.labelled:
            raise StructureError(f"{path} frame {k} has no energy/forces labels")
        out.append(structure)
    if not out:
        raise StructureError(f"{path} holds no frame")
    return out


def _round_atom_lines(text: str, decimals: int) -> str:
    """Round the per-atom numbers of extended-XYZ ``text`` to ``decimals`` (comment lines untouched)."""
    lines = text.splitlines()
    out, k = [], 0
    while k < len(lines):
        n = int(lines[k])
        out += lines[k:k + 2]
        for line in lines[k + 2:k + 2 + n]:
            out.append(" ".join(f"{float(t):.{decimals}f}" if "." in t else t for t in line.split()))
        k += n + 2
    return "\n".join(out) + "\n"


def structures_text(structures: list[QMMMStructure], decimals: int | None = None) -> str:
    """The extended-XYZ text of ``structures``; ``decimals`` rounds per-atom numbers (A, e, eV/A)."""
    import io

    import ase.io

    buf = io.StringIO()
    ase.io.write(buf, [s.to_atoms() for s in structures], format="extxyz")
    text = buf.getvalue()
    return _round_atom_lines(text, decimals) if decimals is not None else text


def write_structures(path: str | Path, structures: list[QMMMStructure], append: bool = False,
                     decimals: int | None = None) -> None:
    """Write frames in the exchange format.

    A new file is written atomically (:func:`write_atomically`). Appending
    writes all frames in one write followed by fsync, so an interrupted run
    leaves at most one torn frame at the end, which :func:`complete_frames`
    detects.
    """
    text = structures_text(structures, decimals)
    path = Path(path)
    if not append:
        write_atomically(path, text)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())


def complete_frames(path: str | Path) -> tuple[int, int]:
    """Byte length and count of the complete frames at the start of an extended-XYZ file.

    A frame is complete when its atom-count line, comment line and all atom
    lines are there, each ending in a newline, with as many columns as the
    first atom line of that frame: a write cut inside a number (no final
    newline) or between lines is a torn frame, not a shorter number.
    """
    data = Path(path).read_bytes()
    pos, count = 0, 0
    while pos < len(data):
        end = data.find(b"\n", pos)
        if end < 0:
            break
        try:
            n = int(data[pos:end])
        except ValueError:
            break
        cursor, ok, width = end + 1, True, None
        for k in range(n + 1):  # comment line and atom lines
            stop = data.find(b"\n", cursor)
            if stop < 0:
                ok = False
                break
            if k > 0:
                columns = len(data[cursor:stop].split())
                width = columns if width is None else width
                if columns != width or columns < 4:
                    ok = False
                    break
            cursor = stop + 1
        if not ok:
            break
        pos, count = cursor, count + 1
    return pos, count
