"""How the MM environment is presented to the model (the electrostatic embedding scheme).

Cluster (a structure without a periodic cell): every MM charge, as given.

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
matters. ``S`` depends on positions, so :meth:`Presented.charges` evaluates it
inside the autograd graph; image choice and culling are integer decisions made
without gradients.

Frames are presented dense: ``[B, n_qm, 3]`` QM positions and ``[B, M, 3]`` MM
positions padded to the largest count of the batch with zero-charge atoms far
away (``mm_atom`` = -1), which contribute exactly nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .errors import InputError
from .nn.blocks import switch
from .structures import QMMMStructure
from .units import ANGSTROM_TO_BOHR

#: Default switching radii in Angstrom (a model file stores its own, in Bohr).
DEFAULT_R_ON_A = 10.0
DEFAULT_R_OFF_A = 12.0
#: Where padding MM atoms sit (Bohr from the origin): zero charge, far from everything.
PADDING_DISTANCE = 1.0e6


class CellError(InputError):
    """A periodic cell that cannot be used with the embedding cutoff."""


class NonFiniteInput(RuntimeError):
    """Positions or a cell with NaN or infinite entries (a blown-up run)."""


def cell_widths(cells: torch.Tensor) -> torch.Tensor:
    """Perpendicular widths [B, 3] of cells given as rows of lattice vectors [B, 3, 3]."""
    volume = torch.linalg.det(cells).abs()
    widths = [volume / torch.linalg.cross(cells[:, i], cells[:, j]).norm(dim=-1) for i, j in ((1, 2), (2, 0), (0, 1))]
    return torch.stack(widths, dim=-1)


def image_shift(vec: torch.Tensor, cells: torch.Tensor, inv_cells: torch.Tensor) -> torch.Tensor:
    """Lattice vector to add to ``vec`` [B, n, 3] to get its minimum image (exact below half the cell width)."""
    return -torch.bmm(torch.round(torch.bmm(vec, inv_cells)), cells)


def pad_by_frame(values: torch.Tensor, frame: torch.Tensor, n_frames: int, fill) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-item ``values`` [n, ...] (sorted by frame) as ``[n_frames, max_per_frame, ...]`` padded with
    ``fill``; also returns each frame's item count."""
    count = torch.bincount(frame, minlength=n_frames)
    slot = torch.arange(frame.numel(), device=frame.device) - (torch.cumsum(count, 0) - count)[frame]
    width = int(count.max()) if frame.numel() else 0
    out = values.new_full((n_frames, width) + tuple(values.shape[1:]), fill)
    return out.index_put((frame, slot), values), count


@dataclass
class Presented:
    """A batch of frames as the model sees them (atomic units, float64).

    ``qm_pos`` [B, n_qm, 3]; ``mm_pos`` [B, M, 3], ``mm_charge`` [B, M] (force-field
    charges, before switching) and ``mm_atom`` [B, M] (index in the structure, -1
    for padding). Periodic frames carry each MM atom's molecule ``group`` [B, M]
    (numbered within its frame, padding in a group of its own) and the radii of
    the switch.
    """

    qm_pos: torch.Tensor
    mm_pos: torch.Tensor
    mm_charge: torch.Tensor
    mm_atom: torch.Tensor
    group: torch.Tensor | None = None
    n_groups: int = 0
    r_on: float = 0.0
    r_off: float = 0.0
    m1_pos: torch.Tensor | None = None   # [B, n_links, 3] the MM partners of cut bonds, at the image of their Q1

    @property
    def n_frames(self) -> int:
        return self.qm_pos.shape[0]

    def charges(self, qm_pos: torch.Tensor, mm_pos: torch.Tensor) -> torch.Tensor:
        """MM charges scaled by their molecule's switch, differentiable in the positions ([B, M])."""
        if self.group is None:
            return self.mm_charge.to(mm_pos.dtype)
        B, M = self.group.shape
        n_groups = self.n_groups
        flat = (self.group + n_groups * torch.arange(B, device=mm_pos.device)[:, None]).flatten()
        real = (self.mm_atom >= 0).to(mm_pos.dtype).flatten()
        total = torch.zeros(B * n_groups, 3, device=mm_pos.device, dtype=mm_pos.dtype)
        total = total.index_add(0, flat, mm_pos.flatten(0, 1) * real[:, None])
        size = torch.zeros(B * n_groups, device=mm_pos.device, dtype=mm_pos.dtype).index_add(0, flat, real)
        centroid = total / size.clamp(min=1.0)[:, None]
        d = (centroid[flat].view(B, M, 3) - qm_pos.mean(dim=1, keepdim=True)).norm(dim=-1)
        return self.mm_charge.to(mm_pos.dtype) * switch(d, self.r_on, self.r_off)


class Embedding:
    """Presents configurations of one :class:`QMMMStructure` to the model.

    ``r_on``/``r_off`` are in Bohr. Index tensors are built once per structure and
    device; :meth:`present` is vectorised over a batch of frames (beads).
    """

    def __init__(self, structure: QMMMStructure, r_on: float, r_off: float, device: torch.device | str = "cpu"):
        if not 0.0 < r_on < r_off:
            raise ValueError(f"switching radii must satisfy 0 < r_on < r_off, got {r_on}, {r_off}")
        self.structure = structure
        self.periodic = structure.periodic
        self.r_on, self.r_off = float(r_on), float(r_off)
        self.device = torch.device(device)
        as_long = dict(device=self.device, dtype=torch.long)
        self.qm_idx = torch.as_tensor(structure.qm_indices, **as_long)
        self.mm_idx = torch.as_tensor(structure.mm_indices, **as_long)
        self.mm_charge = torch.as_tensor(structure.mm_charge[structure.mm_indices], device=self.device,
                                         dtype=torch.float64)
        mol = structure.mm_molecules() if self.periodic else np.zeros(len(structure.mm_indices), dtype=np.int64)
        self.n_mol = int(mol.max()) + 1 if mol.size else 0
        self.mol = torch.as_tensor(mol, **as_long)
        first = np.full(self.n_mol, -1, dtype=np.int64)  # first MM atom of every molecule = its anchor
        for k in range(len(mol) - 1, -1, -1):
            first[mol[k]] = k
        self.anchor = torch.as_tensor(first[mol], **as_long) if mol.size else self.mol
        self.mol_size = torch.bincount(self.mol, minlength=self.n_mol).double() if mol.size else None
        links = structure.links
        self.link_q1 = torch.as_tensor(np.searchsorted(structure.qm_indices, links[:, 0]), **as_long)
        self.link_m1 = torch.as_tensor(links[:, 1], **as_long)
        # the same indices as numpy arrays, for assembling forces on the host
        self.qm_idx_host, self.mm_idx_host = np.asarray(structure.qm_indices), np.asarray(structure.mm_indices)
        self.link_m1_host = np.asarray(links[:, 1], dtype=np.int64)

    def check_finite(self, positions: torch.Tensor, cells: torch.Tensor | None) -> None:
        """Refuse NaN or infinite coordinates, naming the first bad atom (before any atom is culled)."""
        host = positions.numpy() if positions.device.type == "cpu" else None
        if host is not None and np.isfinite(host).all() and (cells is None or np.isfinite(cells.numpy()).all()):
            return  # the usual case, checked on the host without torch's per-operation cost
        bad = ~torch.isfinite(positions).all(dim=-1)
        if bool(bad.any()):
            b, a = (int(x) for x in torch.nonzero(bad)[0])
            kind = "QM" if bool(self.structure.qm[a]) else "MM"
            raise NonFiniteInput(f"position of {kind} atom {a} in frame {b} is not finite "
                                 f"({positions[b, a].tolist()} bohr): the dynamics has blown up")
        if cells is not None and not bool(torch.isfinite(cells).all()):
            raise NonFiniteInput("the periodic cell sent with the positions is not finite")

    def present(self, positions: torch.Tensor, cells: torch.Tensor | None = None) -> Presented:
        """Present frames ``positions`` [B, N, 3] (Bohr) with cells [B, 3, 3] (rows, Bohr; ignored for clusters)."""
        positions = positions.to(self.device, torch.float64)
        self.check_finite(positions, cells if self.periodic else None)
        B = positions.shape[0]
        qm = positions[:, self.qm_idx]
        mm = positions[:, self.mm_idx]
        m1 = positions[:, self.link_m1] if self.link_m1.numel() else None
        if not self.periodic or self.n_mol == 0:
            return Presented(qm_pos=qm, mm_pos=mm, mm_charge=self.mm_charge.expand(B, -1),
                             mm_atom=self.mm_idx.expand(B, -1), m1_pos=m1)
        if cells is None:
            raise CellError(f"system {self.structure.source} is periodic but no cell was given")
        cells = cells.to(self.device, torch.float64)
        widths = cell_widths(cells)
        if bool((widths <= 2.0 * self.r_off).any()):
            raise CellError(
                f"the periodic cell is too small for the MM cutoff: its narrowest width is "
                f"{float(widths.min()) / ANGSTROM_TO_BOHR:.2f} A but must exceed 2*r_off = "
                f"{2 * self.r_off / ANGSTROM_TO_BOHR:.2f} A")
        with torch.no_grad():
            inv = torch.linalg.inv(cells)
            qm = qm + image_shift(qm - qm[:, :1], cells, inv)
            if m1 is not None:  # each cut bond's MM atom at the image next to its QM atom
                m1 = m1 + image_shift(m1 - qm[:, self.link_q1], cells, inv)
            centre = qm.mean(dim=1, keepdim=True)
            mm = mm + image_shift(mm - mm[:, self.anchor], cells, inv)
            cent = torch.zeros(B, self.n_mol, 3, device=self.device, dtype=torch.float64)
            cent = cent.index_add(1, self.mol, mm) / self.mol_size[None, :, None]
            shift = image_shift(cent - centre, cells, inv)
            keep = (cent + shift - centre).norm(dim=-1) < self.r_off                   # [B, n_mol]
            atom_keep = keep[:, self.mol]                                               # [B, n_mm]
            frame, k = torch.nonzero(atom_keep, as_tuple=True)                          # frame-major
            pos = (mm + shift[:, self.mol])[frame, k]
            far = torch.tensor([PADDING_DISTANCE, 0.0, 0.0], device=self.device, dtype=torch.float64)
            mm_pos, _ = pad_by_frame(pos, frame, B, 0.0)
            mm_atom, count = pad_by_frame(self.mm_idx[k], frame, B, -1)
            mm_charge, _ = pad_by_frame(self.mm_charge[k], frame, B, 0.0)
            group, _ = pad_by_frame(self.mol[k], frame, B, self.n_mol)
            mm_pos = torch.where((mm_atom >= 0)[..., None], mm_pos, centre + far)
        return Presented(qm_pos=qm, mm_pos=mm_pos, mm_charge=mm_charge, mm_atom=mm_atom, group=group,
                         n_groups=self.n_mol + 1, r_on=self.r_on, r_off=self.r_off, m1_pos=m1)

    def cluster(self, positions: np.ndarray, cell: np.ndarray | None = None, qm_shift: np.ndarray | None = None,
                group_scale=None, info: dict | None = None) -> QMMMStructure:
        """One configuration (Bohr) as the cluster frame the model sees: the QM atoms (moved by ``qm_shift``
        [n_qm, 3], Bohr) first, then the MM atoms the cutoff keeps at their images, with switched charges
        (times ``group_scale(n_groups)`` [n_groups], one factor per molecule), cut bonds renumbered.
        Evaluating the cluster gives the energy the driver gives for the configuration."""
        p = self.present(torch.as_tensor(positions)[None], None if cell is None else torch.as_tensor(cell)[None])
        qm_pos = p.qm_pos if qm_shift is None else p.qm_pos + torch.as_tensor(qm_shift)[None]
        real = p.mm_atom[0] >= 0
        charges = p.charges(qm_pos, p.mm_pos)
        if group_scale is not None:
            charges = charges * torch.as_tensor(group_scale(max(p.n_groups, 1)))[p.group if p.group is not None else 0]
        atoms = torch.cat([self.qm_idx, p.mm_atom[0][real]]).numpy()
        s = self.structure
        qm_link = None
        if len(s.links):  # M1 is always kept: it is bonded to a QM atom
            where = {int(a): k for k, a in enumerate(atoms)}
            qm_link = np.full(len(atoms), -1, dtype=np.int64)
            for q1, m1 in s.links:
                qm_link[where[int(m1)]] = where[int(q1)]
        n_qm = len(self.qm_idx)
        info = dict(info or {}, mm_switch_on=self.r_on / ANGSTROM_TO_BOHR, mm_switch_off=self.r_off / ANGSTROM_TO_BOHR)
        return QMMMStructure(numbers=s.numbers[atoms], positions=torch.cat([qm_pos[0], p.mm_pos[0][real]]).numpy(),
                             qm=np.arange(len(atoms)) < n_qm,
                             mm_charge=np.concatenate([np.zeros(n_qm), charges[0][real].detach().numpy()]),
                             qm_total_charge=s.qm_total_charge, qm_multiplicity=s.qm_multiplicity, qm_link=qm_link,
                             info=info, source=f"{s.source} (presented)")
