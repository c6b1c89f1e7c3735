"""Labelled frames as training batches: flat atom lists with frame indices (atomic units)."""

from __future__ import annotations

from dataclasses import dataclass

import ase.data
import numpy as np
import torch

from ..embedding import Presented
from ..errors import InputError
from ..frames import Frame


@dataclass
class Batch:
    """Cluster frames presented to the model, with their labels (None where absent)."""

    presented: Presented
    species: torch.Tensor          # [n_qm] element index
    total_charge: torch.Tensor     # [B]
    n_qm: torch.Tensor             # [B] QM atoms per frame
    energy: torch.Tensor | None    # [B] Hartree
    qm_forces: torch.Tensor | None  # [n_qm, 3] Hartree/Bohr
    mm_forces: torch.Tensor | None  # [n_mm, 3] Hartree/Bohr
    mm_near: torch.Tensor          # [n_mm] bool: MM atom within the loss radius of a QM atom
    qm_charges: torch.Tensor | None  # [n_qm] e
    dipole: torch.Tensor | None    # [B, 3] e Bohr

    def to(self, device) -> "Batch":
        moved = {}
        for name, value in self.__dict__.items():
            if isinstance(value, torch.Tensor):
                moved[name] = value.to(device)
            elif isinstance(value, Presented):
                moved[name] = Presented(**{k: (v.to(device) if isinstance(v, torch.Tensor) else v)
                                           for k, v in value.__dict__.items()})
            else:
                moved[name] = value
        return Batch(**moved)


def elements_of(frames: list[Frame]) -> list[str]:
    """QM elements present in the frames, in order of atomic number."""
    numbers = sorted({int(z) for f in frames for z in f.numbers[f.qm]})
    return [ase.data.chemical_symbols[z] for z in numbers]


def collate(frames: list[Frame], elements: list[str], mm_radius: float = 6.0 / 0.5291772105638411) -> Batch:
    """Concatenate cluster frames into one batch; ``mm_radius`` (Bohr) marks the MM forces to fit."""
    index = {e: k for k, e in enumerate(elements)}
    qm_pos, qm_frame, species, mm_pos, mm_frame, mm_charge, near = [], [], [], [], [], [], []
    energies, qm_f, mm_f, qm_q, dip = [], [], [], [], []
    labelled = all(f.labelled for f in frames)
    has_charges = all(f.qm_charges is not None for f in frames)
    has_dipole = all(f.dipole is not None for f in frames)
    for b, f in enumerate(frames):
        if f.cell is not None:
            raise InputError("training frames must be clusters (no cell), presented as the driver presents them")
        qm, mm = f.qm_indices, f.mm_indices
        for a in qm:
            symbol = ase.data.chemical_symbols[int(f.numbers[a])]
            if symbol not in index:
                raise InputError(f"frame {b} has QM element {symbol}, which the model does not know ({elements})")
            species.append(index[symbol])
        qm_pos.append(f.positions[qm])
        mm_pos.append(f.positions[mm])
        mm_charge.append(f.mm_charge[mm])
        qm_frame.append(np.full(len(qm), b))
        mm_frame.append(np.full(len(mm), b))
        if len(mm):
            d = np.linalg.norm(f.positions[mm][:, None] - f.positions[qm][None], axis=-1).min(axis=1)
            near.append(d < mm_radius)
        if labelled:
            energies.append(f.energy)
            qm_f.append(f.forces[qm])
            mm_f.append(f.forces[mm])
        if has_charges:
            qm_q.append(f.qm_charges[qm])
        if has_dipole:
            dip.append(f.dipole)

    def cat(parts, dtype=torch.float64):
        return torch.as_tensor(np.concatenate(parts) if parts else np.zeros(0), dtype=dtype)

    n_mm = sum(len(p) for p in mm_pos)
    presented = Presented(
        qm_pos=cat(qm_pos).reshape(-1, 3), qm_frame=cat(qm_frame, torch.long),
        qm_atom=torch.zeros(0, dtype=torch.long), mm_pos=cat(mm_pos).reshape(-1, 3),
        mm_charge=cat(mm_charge), mm_frame=cat(mm_frame, torch.long), mm_atom=torch.zeros(0, dtype=torch.long),
        n_frames=len(frames))
    return Batch(
        presented=presented,
        species=torch.as_tensor(species, dtype=torch.long),
        total_charge=torch.as_tensor([f.qm_total_charge for f in frames], dtype=torch.float64),
        n_qm=torch.as_tensor([len(f.qm_indices) for f in frames], dtype=torch.float64),
        energy=torch.as_tensor(energies, dtype=torch.float64) if labelled else None,
        qm_forces=cat(qm_f).reshape(-1, 3) if labelled else None,
        mm_forces=cat(mm_f).reshape(-1, 3) if labelled else None,
        mm_near=cat(near, torch.bool) if near else torch.zeros(n_mm, dtype=torch.bool),
        qm_charges=cat(qm_q) if has_charges else None,
        dipole=torch.as_tensor(np.stack(dip), dtype=torch.float64) if has_dipole else None,
    )


def split_indices(n: int, fractions: tuple[float, float, float], seed: int) -> dict[str, list[int]]:
    """Random train/validation/test split of ``n`` frames by frame, reproducible from ``seed``."""
    if n < 3:
        raise InputError(f"need at least 3 labelled frames to split into train/validation/test, got {n}")
    total = sum(fractions)
    perm = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fractions[1] / total)))
    n_test = max(1, int(round(n * fractions[2] / total)))
    n_train = n - n_val - n_test
    if n_train < 1:
        raise InputError(f"split {fractions} leaves no training frame out of {n}")
    return {"train": sorted(perm[:n_train].tolist()), "validation": sorted(perm[n_train:n_train + n_val].tolist()),
            "test": sorted(perm[n_train + n_val:].tolist())}
