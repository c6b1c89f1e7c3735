"""The equivariant multiscale QM/MM model (after Lei, Yagi and Sugita, JCP 160, 214109, 2024).

Energy of a QM region in the field of MM point charges, for a batch of frames
given as flat atom lists with frame indices (atomic units throughout).
"""

from __future__ import annotations

import ase.data
import torch
from e3nn import o3

from ..embedding import switch
from ..environment import degree_index, frame_pairs, mm_taylor_tensors, taylor_tensors
from .layers import BesselBasis, InteractionBlock, mlp
from .settings import ModelSettings


def per_frame_sum(values: torch.Tensor, frame: torch.Tensor, n_frames: int) -> torch.Tensor:
    """Sum per-atom ``values`` [n, ...] into frames [n_frames, ...]."""
    out = torch.zeros((n_frames,) + values.shape[1:], device=values.device, dtype=values.dtype)
    return out.index_add(0, frame, values)


class QMMMModel(torch.nn.Module):
    """Equivariant message passing among QM atoms, driven by the MM potential's Taylor tensors.

    ``forward`` returns a dict with ``energy`` [B] (float64, Hartree), ``charges``
    [n_qm] (e, summing to each frame's QM total charge), ``atomic_dipoles``
    [n_qm, 3] and ``dipole`` [B, 3] (e Bohr, about each frame's QM centre of mass).
    """

    def __init__(self, settings: ModelSettings):
        super().__init__()
        if not settings.elements:
            raise ValueError("the model needs its list of QM elements (settings.elements)")
        self.settings = settings
        s = settings
        self.K = s.env_order
        n_elem = len(s.elements)
        numbers = [ase.data.atomic_numbers[e] for e in s.elements]
        self.n_sh = (s.lmax + 1) ** 2

        self.embed = torch.nn.Linear(n_elem, s.channels, bias=False)
        self.basis = BesselBasis(s.cutoff, s.n_radial)
        self.blocks = torch.nn.ModuleList(
            InteractionBlock(s.lmax, self.K, s.channels, s.n_radial, s.radial_hidden) for _ in range(s.n_layers))
        self.layer_charges = torch.nn.ModuleList(
            torch.nn.Linear(s.channels, 1) for _ in range(s.n_layers if s.long_range else 0))
        self.energy_head = mlp([s.channels, s.readout_hidden, 1])
        self.charge_head = torch.nn.Linear(s.channels, 1)
        self.dipole_head = torch.nn.Linear(s.channels, 1, bias=False)

        # statistics of the training data (set by the trainer, stored in the model file)
        self.register_buffer("env_scale", torch.ones(self.K + 1))
        self.register_buffer("energy_scale", torch.ones(()))
        self.register_buffer("avg_neighbors", torch.ones(()))
        self.register_buffer("energy_shift", torch.zeros(n_elem, dtype=torch.float64))
        self.register_buffer("masses", torch.tensor([ase.data.atomic_masses[z] for z in numbers]))
        self.register_buffer("degrees", degree_index(self.K), persistent=False)

    def _apply(self, fn, *args, **kwargs):
        # casts (model.float()) must not truncate the float64 reference energies
        shift = self._buffers["energy_shift"]
        super()._apply(fn, *args, **kwargs)
        self._buffers["energy_shift"] = shift.to(device=self.energy_scale.device, dtype=torch.float64)
        return self

    @property
    def elements(self) -> list[str]:
        return list(self.settings.elements)

    def _neutralise(self, q: torch.Tensor, frame: torch.Tensor, total_charge: torch.Tensor,
                    count: torch.Tensor, n_frames: int) -> torch.Tensor:
        excess = (total_charge - per_frame_sum(q, frame, n_frames)) / count
        return q + excess[frame]

    def forward(self, species: torch.Tensor, qm_pos: torch.Tensor, qm_frame: torch.Tensor,
                mm_pos: torch.Tensor, mm_charge: torch.Tensor, mm_frame: torch.Tensor,
                total_charge: torch.Tensor, n_frames: int) -> dict[str, torch.Tensor]:
        s = self.settings
        dtype = qm_pos.dtype
        total_charge = total_charge.to(dtype)
        count = torch.bincount(qm_frame, minlength=n_frames).to(dtype)

        # QM-QM pairs: message-passing edges within the cutoff, all pairs for long range
        pi, pj = frame_pairs(qm_frame, qm_frame, n_frames, exclude_self=True)
        vec = qm_pos[pj] - qm_pos[pi]
        r = vec.norm(dim=-1)
        edge = torch.nonzero(r.detach() < s.cutoff, as_tuple=True)[0]
        edge_dst, edge_src = pi[edge], pj[edge]
        edge_sh = o3.spherical_harmonics(list(range(s.lmax + 1)), vec[edge], normalize=True,
                                         normalization="component")
        edge_basis = self.basis(r[edge])
        # long-range QM pairs: only those beyond lr_switch_on carry weight (none in a small QM region)
        far = torch.nonzero(r.detach() > s.lr_switch_on, as_tuple=True)[0] if s.long_range else edge[:0]
        lr_i, lr_j = pi[far], pj[far]
        lr_weight = 1.0 - switch(r[far], s.lr_switch_on, s.lr_switch_off)

        # Taylor tensors of the MM potential at every QM atom
        t_mm = mm_taylor_tensors(qm_pos, qm_frame, mm_pos, mm_charge, mm_frame, n_frames, self.K,
                                 analytic_gradient=not self.training)
        inv_scale = (1.0 / self.env_scale)[self.degrees]

        onehot = torch.nn.functional.one_hot(species, len(s.elements)).to(dtype)
        h = torch.zeros(qm_pos.shape[0], s.channels, self.n_sh, device=qm_pos.device, dtype=dtype)
        h = torch.cat([self.embed(onehot)[:, :, None], h[:, :, 1:]], dim=2)
        for layer, block in enumerate(self.blocks):
            env = t_mm
            if far.numel():
                q_layer = self._neutralise(self.layer_charges[layer](h[:, :, 0]).squeeze(-1), qm_frame,
                                           total_charge, count, n_frames)
                env = env + taylor_tensors(qm_pos, qm_pos, q_layer, lr_i, lr_j, self.K, lr_weight)
            h = block(h, edge_src, edge_dst, edge_sh, edge_basis, env * inv_scale, self.avg_neighbors)

        scalars = h[:, :, 0]
        atom_energy = self.energy_head(scalars).squeeze(-1) * self.energy_scale
        charges = self._neutralise(self.charge_head(scalars).squeeze(-1), qm_frame, total_charge, count, n_frames)
        atomic_dipoles = self.dipole_head(h[:, :, 1:4].transpose(1, 2)).squeeze(-1)  # l = 1 is (x, y, z)
        if s.electrostatic_baseline:
            atom_energy = atom_energy + charges * t_mm[:, 0]
            if self.K >= 1:
                atom_energy = atom_energy + (atomic_dipoles * t_mm[:, 1:4]).sum(-1)
        energy = per_frame_sum(atom_energy, qm_frame, n_frames).to(torch.float64)
        energy = energy + per_frame_sum(self.energy_shift[species], qm_frame, n_frames)

        mass = self.masses[species]
        com = per_frame_sum(qm_pos * mass[:, None], qm_frame, n_frames) / per_frame_sum(mass, qm_frame, n_frames)[:, None]
        dipole = per_frame_sum(charges[:, None] * (qm_pos - com[qm_frame]) + atomic_dipoles, qm_frame, n_frames)
        return {"energy": energy, "charges": charges, "atomic_dipoles": atomic_dipoles, "dipole": dipole}
