"""Reading and writing QM/MM frames in the exchange format (extended XYZ).

The format is ``shared/conventions/qmmm-frames.md``: positions in Angstrom,
per-atom ``qm`` (0/1) and ``mm_charge`` (e), labels ``energy`` (eV) and ``forces``
(eV/A) through ASE's single-point calculator, optional ``qm_charges`` (e) with
``info["qm_charges_scheme"]``, and ``qm_total_charge``/``qm_multiplicity``/``reference``
in the info. qmmm-driver also writes ``info["qm_dipole"]`` (e A, QM dipole about
the QM centre of mass) when the labeller computed it. In memory a
:class:`Frame` holds the same data in atomic units.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import InputError
from .units import (ANGSTROM_TO_BOHR, BOHR, E_BOHR_TO_E_ANGSTROM, EV_PER_A_TO_HARTREE_PER_BOHR,
                    EV_TO_HARTREE, HARTREE, HARTREE_PER_BOHR_TO_EV_PER_A)


class FrameError(InputError):
    """A frame file that does not follow the exchange format."""


@dataclass
class Frame:
    """One QM/MM configuration in atomic units (Bohr, Hartree, e)."""

    numbers: np.ndarray                 # [N] atomic numbers
    positions: np.ndarray               # [N, 3] Bohr
    qm: np.ndarray                      # [N] bool
    mm_charge: np.ndarray               # [N] e (0 on QM atoms)
    qm_total_charge: int = 0
    qm_multiplicity: int = 1
    cell: np.ndarray | None = None      # [3, 3] rows, Bohr; None for a cluster
    energy: float | None = None         # Hartree
    forces: np.ndarray | None = None    # [N, 3] Hartree/Bohr
    qm_charges: np.ndarray | None = None  # [N] e, 0 on MM atoms
    dipole: np.ndarray | None = None    # [3] e Bohr
    info: dict = field(default_factory=dict)

    @property
    def labelled(self) -> bool:
        return self.energy is not None and self.forces is not None

    @property
    def qm_indices(self) -> np.ndarray:
        return np.flatnonzero(self.qm)

    @property
    def mm_indices(self) -> np.ndarray:
        return np.flatnonzero(~self.qm)

    def to_atoms(self):
        """The frame as ``ase.Atoms`` in the exchange format (eV, Angstrom)."""
        from ase import Atoms
        from ase.calculators.singlepoint import SinglePointCalculator

        atoms = Atoms(numbers=self.numbers, positions=self.positions * BOHR)
        if self.cell is not None:
            atoms.cell = self.cell * BOHR
            atoms.pbc = True
        atoms.set_array("qm", self.qm.astype(np.int64))
        atoms.set_array("mm_charge", np.where(self.qm, 0.0, self.mm_charge))
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
    def from_atoms(cls, atoms, where: str = "<memory>") -> "Frame":
        """Convert (and check) one ``ase.Atoms`` of the exchange format."""
        n = len(atoms)
        for key in ("qm", "mm_charge"):
            if key not in atoms.arrays:
                raise FrameError(f"{where}: no per-atom '{key}' array (see the qmmm-frames convention)")
        qm = np.asarray(atoms.arrays["qm"]).reshape(-1)
        bad = np.flatnonzero((qm != 0) & (qm != 1))
        if bad.size:
            raise FrameError(f"{where}: 'qm' of atom {int(bad[0])} is {qm[bad[0]]}, must be 0 or 1")
        if not qm.any():
            raise FrameError(f"{where}: no QM atom (all 'qm' are 0)")
        positions = atoms.get_positions()
        bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
        if bad.size:
            raise FrameError(f"{where}: position of atom {int(bad[0])} is not finite")
        charge = np.asarray(atoms.arrays["mm_charge"], dtype=np.float64).reshape(-1)
        bad = np.flatnonzero(~np.isfinite(charge))
        if bad.size:
            raise FrameError(f"{where}: mm_charge of atom {int(bad[0])} is not finite")
        info = dict(atoms.info)
        frame = cls(
            numbers=atoms.numbers.astype(np.int64), positions=positions * ANGSTROM_TO_BOHR,
            qm=qm.astype(bool), mm_charge=np.where(qm == 1, 0.0, charge),
            qm_total_charge=int(info.pop("qm_total_charge", 0)),
            qm_multiplicity=int(info.pop("qm_multiplicity", 1)),
            cell=atoms.cell.array * ANGSTROM_TO_BOHR if all(atoms.pbc) else None,
        )
        if "qm_dipole" in info:
            frame.dipole = np.asarray(info.pop("qm_dipole"), dtype=np.float64).reshape(3) / E_BOHR_TO_E_ANGSTROM
        if "qm_charges" in atoms.arrays:
            frame.qm_charges = np.asarray(atoms.arrays["qm_charges"], dtype=np.float64).reshape(-1)
        if atoms.calc is not None and "energy" in atoms.calc.results:
            frame.energy = float(atoms.get_potential_energy()) * EV_TO_HARTREE
            if "forces" not in atoms.calc.results:
                raise FrameError(f"{where}: the frame has an energy but no forces")
            frame.forces = atoms.get_forces() * EV_PER_A_TO_HARTREE_PER_BOHR
            bad = np.flatnonzero(~np.isfinite(frame.forces).all(axis=1))
            if not np.isfinite(frame.energy) or bad.size:
                raise FrameError(f"{where}: non-finite label (energy or force on atom {int(bad[0]) if bad.size else '-'})")
        for key in ("pbc", "Lattice"):
            info.pop(key, None)
        frame.info = info
        if len(frame.numbers) != n:
            raise FrameError(f"{where}: inconsistent atom count")
        return frame


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


def read_frames(path: str | Path, index: str = ":", require_labels: bool = False) -> list[Frame]:
    """Read frames of the exchange format; errors name the file and frame."""
    import ase.io

    path = Path(path)
    if not path.is_file():
        raise FrameError(f"frame file {path} does not exist")
    try:
        images = ase.io.read(_uncompressed(path), index=index, format="extxyz")
    except Exception as err:
        raise FrameError(f"cannot read {path} as extended XYZ: {err}") from err
    if not isinstance(images, list):
        images = [images]
    frames = []
    for k, atoms in enumerate(images):
        frame = Frame.from_atoms(atoms, where=f"{path} frame {k}")
        if require_labels and not frame.labelled:
            raise FrameError(f"{path} frame {k} has no energy/forces labels")
        frames.append(frame)
    if not frames:
        raise FrameError(f"{path} holds no frame")
    return frames


def _round_atom_lines(text: str, decimals: int) -> str:
    """Round the per-atom numbers of extended-XYZ ``text`` to ``decimals`` (comment lines untouched)."""
    lines = text.splitlines()
    out, k = [], 0
    while k < len(lines):
        n = int(lines[k])
        out += lines[k : k + 2]
        for line in lines[k + 2 : k + 2 + n]:
            out.append(" ".join(f"{float(t):.{decimals}f}" if "." in t else t for t in line.split()))
        k += n + 2
    return "\n".join(out) + "\n"


def write_frames(path: str | Path, frames: list[Frame], append: bool = False, decimals: int | None = None) -> None:
    """Write frames in the exchange format; appending keeps earlier frames.

    The text of all frames goes out in one write followed by fsync, so an
    interrupted run leaves at most one torn frame at the end. ``decimals``
    rounds per-atom numbers (positions A, charges e, forces eV/A) to keep
    files compact; energies and info keep full precision.
    """
    import io
    import os

    import ase.io

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    ase.io.write(buf, [f.to_atoms() for f in frames], format="extxyz")
    text = buf.getvalue()
    if decimals is not None:
        text = _round_atom_lines(text, decimals)
    with open(path, "a" if append else "w") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
