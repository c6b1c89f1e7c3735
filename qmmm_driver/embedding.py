"""How the MM environment is presented to the model (electrostatic embedding scheme).

Cluster (a system without a periodic cell): every MM charge, as given.

Periodic cell (orthorhombic or triclinic, as i-PI sends it):

1. The QM region is made whole (minimum image about its first atom) and its
   geometric centre ``c_QM`` is taken.
2. Each MM molecule (charge group) is made whole about its first atom and moved,
   as a whole, to the periodic image whose geometric centre ``c_m`` is nearest
   to ``c_QM``.
3. Molecules with ``d_m = |c_m - c_QM| >= r_off`` are dropped; the charges of the
   others are scaled by the switch ``S(d_m)``: 1 below ``r_on``, 0 at ``r_off``, and
   ``1 - 10x^3 + 15x^4 - 6x^5`` with ``x = (d - r_on)/(r_off - r_on)`` between, so that
   energy, forces and their first derivatives stay continuous when a molecule
   crosses the cutoff. Whole molecules are switched together, so a neutral
   molecule never contributes a net charge.

The cell must be wider than ``2 r_off`` in every direction, which makes a
rounded fractional coordinate the exact minimum image for every vector that
matters. ``S`` depends on positions, so it is evaluated inside the autograd
graph (:func:`effective_charges`); image choice and culling are integer
decisions made without gradients.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .system import QMMMSystem
from .units import ANGSTROM_TO_BOHR

#: Default switching radii in Angstrom (the model file stores its own, in Bohr).
DEFAULT_R_ON_A = 10.0
DEFAULT_R_OFF_A = 12.0


class CellError(InputError):
    """A periodic cell that cannot be used with the embedding cutoff."""


def switch(d: torch.Tensor, r_on: float, r_off: float) -> torch.Tensor:
    """C2-continuous switch: 1 for d <= r_on, 0 for d >= r_off."""
    x = ((d - r_on) / (r_off - r_on)).clamp(0.0, 1.0)
    return 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)


def cell_widths(cells: torch.Tensor) -> torch.Tensor:
    """Perpendicular widths [B, 3] of cells given as rows of lattice vectors [B, 3, 3]."""
    volume = torch.linalg.det(cells).abs()
    widths = []
    for i, j in ((1, 2), (2, 0), (0, 1)):
        widths.append(volume / torch.linalg.cross(cells[:, i], cells[:, j]).norm(dim=-1))
    return torch.stack(widths, dim=-1)


def image_shift(vec: torch.Tensor, cells: torch.Tensor, inv_cells: torch.Tensor) -> torch.Tensor:
    """Lattice vector to add to ``vec`` [B, n, 3] to get its minimum image (exact below half the cell width)."""
    frac = torch.bmm(vec, inv_cells)
    return -torch.bmm(torch.round(frac), cells)


@dataclass
class Presented:
    """QM and MM atoms of a batch of frames as the model sees them (atomic units).

    ``qm_atom``/``mm_atom`` index the atoms of the original configuration so
    that gradients can be scattered back; ``group`` numbers the MM molecules
    of all frames (``None`` for clusters, whose charges are not switched).
    """

    qm_pos: torch.Tensor
    qm_frame: torch.Tensor
    qm_atom: torch.Tensor
    mm_pos: torch.Tensor
    mm_charge: torch.Tensor
    mm_frame: torch.Tensor
    mm_atom: torch.Tensor
    n_frames: int
    group: torch.Tensor | None = None
    n_groups: int = 0


class Embedding:
    """Presents configurations of one :class:`QMMMSystem` to the model.

    ``r_on``/``r_off`` are in Bohr. Index tensors are built once per system and
    device; :meth:`present` is vectorised over a batch of frames (beads).
    """

    def __init__(self, system: QMMMSystem, r_on: float, r_off: float,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64):
        if not 0.0 < r_on < r_off:
            raise ValueError(f"switching radii must satisfy 0 < r_on < r_off, got {r_on}, {r_off}")
        self.system = system
        self.r_on, self.r_off = float(r_on), float(r_off)
        self.device, self.dtype = torch.device(device), dtype
        as_long = dict(device=self.device, dtype=torch.long)
        self.qm_idx = torch.as_tensor(system.qm_indices, **as_long)
        self.mm_idx = torch.as_tensor(system.mm_indices, **as_long)
        self.mm_charge = torch.as_tensor(system.mm_charges, device=self.device, dtype=dtype)
        mol = np.asarray(system.molecules)
        self.n_mol = int(mol.max()) + 1 if mol.size else 0
        self.mol = torch.as_tensor(mol, **as_long)
        # first MM atom (position in the MM list) of every molecule = its anchor
        first = np.full(self.n_mol, -1, dtype=np.int64)
        for k in range(len(mol) - 1, -1, -1):
            first[mol[k]] = k
        self.anchor = torch.as_tensor(first[mol], **as_long) if mol.size else self.mol
        self.mol_size = torch.bincount(self.mol, minlength=self.n_mol).to(dtype) if mol.size else None

    def present(self, positions: torch.Tensor, cells: torch.Tensor | None = None) -> Presented:
        """Present frames ``positions`` [B, N, 3] (Bohr) with cells [B, 3, 3] (rows, Bohr).

        ``cells`` is ignored for a cluster system.
        """
        positions = positions.to(self.device, self.dtype)
        B = positions.shape[0]
        nq = self.qm_idx.numel()
        frames = torch.arange(B, device=self.device)
        qm = positions[:, self.qm_idx]
        mm = positions[:, self.mm_idx]
        if not self.system.periodic or self.n_mol == 0:
            nm = self.mm_idx.numel()
            return Presented(
                qm_pos=qm.reshape(-1, 3), qm_frame=frames.repeat_interleave(nq),
                qm_atom=self.qm_idx.repeat(B), mm_pos=mm.reshape(-1, 3),
                mm_charge=self.mm_charge.repeat(B), mm_frame=frames.repeat_interleave(nm),
                mm_atom=self.mm_idx.repeat(B), n_frames=B)
        if cells is None:
            raise CellError(f"system {self.system.source} is periodic but no cell was given")
        cells = cells.to(self.device, self.dtype)
        widths = cell_widths(cells)
        if bool((widths <= 2.0 * self.r_off).any()):
            raise CellError(
                f"the periodic cell is too small for the MM cutoff: its narrowest width is "
                f"{float(widths.min()) / ANGSTROM_TO_BOHR:.2f} A but must exceed 2*r_off = "
                f"{2 * self.r_off / ANGSTROM_TO_BOHR:.2f} A"
            )
        with torch.no_grad():
            inv = torch.linalg.inv(cells)
            qm = qm + image_shift(qm - qm[:, :1], cells, inv)
            centre = qm.mean(dim=1, keepdim=True)
            mm = mm + image_shift(mm - mm[:, self.anchor], cells, inv)
            cent = torch.zeros(B, self.n_mol, 3, device=self.device, dtype=self.dtype)
            cent.index_add_(1, self.mol, mm)
            cent = cent / self.mol_size[None, :, None]
            shift = image_shift(cent - centre, cells, inv)
            dist = (cent + shift - centre).norm(dim=-1)
            keep_b, keep_m = torch.nonzero(dist < self.r_off, as_tuple=True)
            # all atoms of kept molecules, frame-major
            mol_key = keep_b * self.n_mol + keep_m
            atom_key = (frames[:, None] * self.n_mol + self.mol[None, :]).reshape(-1)
            lookup = torch.full((B * self.n_mol,), -1, device=self.device, dtype=torch.long)
            lookup[mol_key] = torch.arange(mol_key.numel(), device=self.device)
            group_all = lookup[atom_key]
            sel = torch.nonzero(group_all >= 0, as_tuple=True)[0]
            sel_b = sel // self.mm_idx.numel()
            sel_k = sel % self.mm_idx.numel()
            group = group_all[sel]
            mm_pos = (mm + shift[:, self.mol])[sel_b, sel_k]
        return Presented(
            qm_pos=qm.reshape(-1, 3), qm_frame=frames.repeat_interleave(nq),
            qm_atom=self.qm_idx.repeat(B), mm_pos=mm_pos, mm_charge=self.mm_charge[sel_k],
            mm_frame=sel_b, mm_atom=self.mm_idx[sel_k], n_frames=B,
            group=group, n_groups=int(mol_key.numel()))

    def effective_charges(self, p: Presented, qm_pos: torch.Tensor, mm_pos: torch.Tensor) -> torch.Tensor:
        """MM charges scaled by the molecule switch, differentiable in the positions."""
        return effective_charges(p, qm_pos, mm_pos, self.r_on, self.r_off)


def effective_charges(p: Presented, qm_pos: torch.Tensor, mm_pos: torch.Tensor,
                      r_on: float, r_off: float) -> torch.Tensor:
    """``q * S(|c_m - c_QM|)`` for every presented MM atom (``q`` for clusters)."""
    if p.group is None:
        return p.mm_charge
    dev, dt = mm_pos.device, mm_pos.dtype
    qm_count = torch.bincount(p.qm_frame, minlength=p.n_frames).to(dt)
    centre = torch.zeros(p.n_frames, 3, device=dev, dtype=dt).index_add(0, p.qm_frame, qm_pos)
    centre = centre / qm_count[:, None]
    size = torch.bincount(p.group, minlength=p.n_groups).to(dt)
    cent = torch.zeros(p.n_groups, 3, device=dev, dtype=dt).index_add(0, p.group, mm_pos)
    cent = cent / size[:, None]
    group_frame = torch.zeros(p.n_groups, device=dev, dtype=torch.long).index_copy(0, p.group, p.mm_frame)
    d = (cent - centre[group_frame]).norm(dim=-1)
    return p.mm_charge * switch(d, r_on, r_off)[p.group]
