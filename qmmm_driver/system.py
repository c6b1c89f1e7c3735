"""The QM/MM system: what a worker knows beyond the positions i-PI sends.

A system is read from one frame of the exchange format
(``shared/conventions/qmmm-frames.md``): all atoms in i-PI's order, a per-atom
``qm`` flag (1 QM, 0 MM) and ``mm_charge`` (e), with ``qm_total_charge`` and
``qm_multiplicity`` in the frame info. The QM selection may also be given as a
string of 0-based indices and inclusive ranges, e.g. ``"0-5,9"``.

MM atoms are grouped into molecules (charge groups) that the embedding switches
on and off as a whole. The grouping comes from an optional integer per-atom
array ``molecule``; without it, covalent connectivity (ASE natural cutoffs,
minimum image) defines the molecules of a periodic system. Clusters use every
charge as given and need no grouping.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import InputError


class InvalidSystem(InputError):
    """A system file or QM selection that cannot describe a QM/MM system."""


def parse_selection(text: str, n_atoms: int) -> np.ndarray:
    """Parse ``"0-5,9,12-14"`` (0-based, inclusive ranges) into sorted indices."""
    indices: list[int] = []
    for token in str(text).replace(" ", "").split(","):
        if not token:
            continue
        try:
            if "-" in token[1:]:
                cut = token.index("-", 1)
                start, stop = int(token[:cut]), int(token[cut + 1 :])
                if stop < start:
                    raise InvalidSystem(f"QM selection range '{token}' runs backwards")
                indices.extend(range(start, stop + 1))
            else:
                indices.append(int(token))
        except ValueError as err:
            raise InvalidSystem(
                f"cannot read QM selection token '{token}': use 0-based indices and "
                "inclusive ranges such as '0-5,9'"
            ) from err
    if not indices:
        raise InvalidSystem(f"QM selection '{text}' selects no atom")
    arr = np.array(sorted(set(indices)), dtype=np.int64)
    bad = arr[(arr < 0) | (arr >= n_atoms)]
    if bad.size:
        raise InvalidSystem(
            f"QM selection '{text}' names atom {int(bad[0])}, but the system has "
            f"{n_atoms} atoms (valid indices 0-{n_atoms - 1})"
        )
    return arr


def find_molecules(atoms) -> np.ndarray:
    """Molecule index of every atom from covalent connectivity (minimum image)."""
    from ase.neighborlist import natural_cutoffs, neighbor_list
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    n = len(atoms)
    i, j = neighbor_list("ij", atoms, natural_cutoffs(atoms, mult=1.1))
    graph = coo_matrix((np.ones(len(i)), (i, j)), shape=(n, n))
    _, labels = connected_components(graph, directed=False)
    return labels.astype(np.int64)


@dataclass(frozen=True)
class QMMMSystem:
    """Fixed description of a QM/MM system, in i-PI's atom order.

    Attributes are numpy arrays over all atoms unless named ``qm_*``/``mm_*``.
    ``mm_charges`` are in elementary charges, aligned with ``mm_indices``.
    ``molecules`` gives each MM atom's molecule, renumbered 0..n_mol-1 and
    aligned with ``mm_indices``.
    """

    symbols: tuple[str, ...]
    numbers: np.ndarray
    masses: np.ndarray
    qm_indices: np.ndarray
    mm_indices: np.ndarray
    mm_charges: np.ndarray
    molecules: np.ndarray
    qm_charge: int
    multiplicity: int
    periodic: bool
    source: str = "<memory>"

    @property
    def n_atoms(self) -> int:
        return len(self.symbols)

    @property
    def n_qm(self) -> int:
        return len(self.qm_indices)

    @property
    def n_mm(self) -> int:
        return len(self.mm_indices)

    @property
    def qm_symbols(self) -> list[str]:
        return [self.symbols[i] for i in self.qm_indices]

    @classmethod
    def from_atoms(cls, atoms, qm: str | None = None, source: str = "<memory>",
                   qm_charge: int | None = None, multiplicity: int | None = None) -> "QMMMSystem":
        """Build the system from an ``ase.Atoms`` carrying the convention's arrays.

        ``qm`` (a selection string) overrides the ``qm`` array of the frame.
        """
        n = len(atoms)
        if n == 0:
            raise InvalidSystem(f"{source}: the frame has no atoms")
        if qm is not None:
            qm_idx = parse_selection(qm, n)
        elif "qm" in atoms.arrays:
            flags = np.asarray(atoms.arrays["qm"]).reshape(-1)
            bad = np.flatnonzero((flags != 0) & (flags != 1))
            if bad.size:
                raise InvalidSystem(
                    f"{source}: per-atom array 'qm' must be 0 or 1, atom {int(bad[0])} has {flags[bad[0]]}"
                )
            qm_idx = np.flatnonzero(flags == 1).astype(np.int64)
        else:
            raise InvalidSystem(
                f"{source}: no per-atom 'qm' array and no QM selection given; add a 'qm' "
                "column (1 for QM atoms, 0 for MM) or pass --qm '0-5'"
            )
        if qm_idx.size == 0:
            raise InvalidSystem(f"{source}: the QM region is empty")
        if "mm_charge" not in atoms.arrays:
            raise InvalidSystem(
                f"{source}: no per-atom 'mm_charge' array (MM point charges in e, 0 on QM atoms); "
                "write it with ase: atoms.set_array('mm_charge', charges)"
            )
        charges = np.asarray(atoms.arrays["mm_charge"], dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(charges))
        if bad.size:
            raise InvalidSystem(f"{source}: mm_charge of atom {int(bad[0])} is {charges[bad[0]]}")
        positions = atoms.get_positions()
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        if bad.size:
            raise InvalidSystem(f"{source}: position of atom {int(bad[0])} is not finite")

        mm_mask = np.ones(n, dtype=bool)
        mm_mask[qm_idx] = False
        mm_idx = np.flatnonzero(mm_mask).astype(np.int64)

        periodic = bool(np.all(atoms.get_pbc()))
        if np.any(atoms.get_pbc()) and not periodic:
            raise InvalidSystem(f"{source}: partly periodic cells are not supported (pbc={atoms.get_pbc()})")

        if "molecule" in atoms.arrays:
            mol_all = np.asarray(atoms.arrays["molecule"], dtype=np.int64).reshape(-1)
        elif not periodic:
            mol_all = np.zeros(n, dtype=np.int64)  # clusters use every charge: no groups needed
        else:
            mol_all = find_molecules(atoms)
            cut = np.flatnonzero(np.isin(mol_all[mm_idx], mol_all[qm_idx]))
            if cut.size:
                a = int(mm_idx[cut[0]])
                raise InvalidSystem(
                    f"{source}: MM atom {a} ({atoms[a].symbol}) is covalently bound to the QM region; "
                    "the QM region must be made of whole molecules (or give a 'molecule' array)"
                )
        _, molecules = np.unique(mol_all[mm_idx], return_inverse=True)

        info = atoms.info
        if qm_charge is None:
            qm_charge = int(info.get("qm_total_charge", 0))
        if multiplicity is None:
            multiplicity = int(info.get("qm_multiplicity", 1))
        return cls(
            symbols=tuple(atoms.get_chemical_symbols()),
            numbers=atoms.get_atomic_numbers().astype(np.int64),
            masses=atoms.get_masses().astype(np.float64),
            qm_indices=qm_idx,
            mm_indices=mm_idx,
            mm_charges=charges[mm_idx].copy(),
            molecules=molecules.astype(np.int64),
            qm_charge=int(qm_charge),
            multiplicity=int(multiplicity),
            periodic=periodic,
            source=source,
        )

    @classmethod
    def read(cls, path: str | Path, qm: str | None = None, **kwargs) -> "QMMMSystem":
        """Read the system from the first frame of an extended-XYZ file."""
        import ase.io

        path = Path(path)
        if not path.is_file():
            raise InvalidSystem(f"system file {path} does not exist")
        try:
            atoms = ase.io.read(path, index=0)
        except Exception as err:  # ASE raises many kinds on malformed files
            raise InvalidSystem(f"cannot read system file {path}: {err}") from err
        return cls.from_atoms(atoms, qm=qm, source=str(path), **kwargs)

    def check_atoms(self, n_atoms: int, symbols=None, origin: str = "i-PI") -> None:
        """Refuse a configuration whose atom count (or elements) differ from the system."""
        if n_atoms != self.n_atoms:
            raise InvalidSystem(
                f"{origin} sent {n_atoms} atoms but the system file {self.source} has "
                f"{self.n_atoms}; both must list the same atoms in the same order"
            )
        if symbols is not None:
            for i, (a, b) in enumerate(zip(symbols, self.symbols)):
                if a != b:
                    raise InvalidSystem(
                        f"atom {i} is {a} in {origin} but {b} in the system file {self.source}; "
                        "both must list the same atoms in the same order"
                    )
