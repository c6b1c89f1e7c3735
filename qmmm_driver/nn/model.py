"""The equivariant multiscale QM/MM model (after Lei, Yagi and Sugita, JCP 160, 214109, 2024).

Energy of a QM region in the potential of MM point charges, for dense batches of
frames with the same number of QM atoms (atomic units throughout). The MM
charges enter through the Taylor tensors of their potential at each QM atom
(computed by the caller with :mod:`qmmm_driver.nn.multipoles`) and, optionally,
directly as short-range neighbours.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from e3nn import o3
from e3nn.nn import FullyConnectedNet

from .blocks import InteractionBlock, RadialBasis, degree_index, switch
from .multipoles import irregular_harmonics
from .settings import PARAMETER_FREE, PENETRATION_MAX_FACTOR, ModelSettings


def receiver_major_pairs(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """All ordered pairs (i, j), i != j, of ``n`` atoms: receiver i major, ``n - 1`` senders each.

    Static in ``n`` (no data-dependent shapes), so that the model compiles ahead of time.
    """
    i = torch.arange(n, device=device).repeat_interleave(max(n - 1, 0))
    k = torch.arange(max(n - 1, 0), device=device).repeat(n)
    return i, (i + 1 + k) % n


class QMMMModel(torch.nn.Module):
    """Equivariant message passing among QM atoms, driven by the MM potential's Taylor tensors.

    :meth:`forward` takes B frames of n QM atoms each:

    - ``species`` [B, n] (index into ``settings.elements``), ``qm_pos`` [B, n, 3] (Bohr);
    - ``env`` [B, n, (K+1)^2]: Taylor tensors of the MM potential at the QM atoms (e/Bohr^(l+1));
    - ``total_charge`` [B] (e);
    - ``near_pos`` [B, m, 3], ``near_charge`` [B, m]: MM charges that may lie within
      ``short_range_cutoff`` of a QM atom (padding: zero charge, anywhere); used
      with ``short_range`` only.

    It returns ``energy`` [B] (float64, Hartree), ``charges`` [B, n] (e, summing
    to the total charge), ``atomic_dipoles`` [B, n, 3] and ``dipole`` [B, 3]
    (e Bohr, about the QM centre of mass).
    """

    def __init__(self, settings: ModelSettings):
        super().__init__()
        if not settings.elements:
            raise ValueError("the model needs its list of QM elements (settings.elements)")
        if settings.polarizability and settings.env_order < 1:
            raise ValueError("polarizability needs the MM field: env_order >= 1")
        self.settings = s = settings
        self.K = s.env_order
        self.n_sh = (s.lmax + 1) ** 2
        silu = torch.nn.functional.silu

        self.embed = torch.nn.Linear(len(s.elements), s.channels, bias=False)
        self.edge_harmonics = o3.SphericalHarmonics(list(range(s.lmax + 1)), normalize=True,
                                                    normalization="component")
        self.basis = RadialBasis(s.cutoff, s.n_radial)
        # the first block sees only the embedding's scalars; the readout needs degrees 0 and 1 of the last
        self.blocks = torch.nn.ModuleList(
            InteractionBlock(s.lmax, self.K, s.channels, s.n_radial, s.radial_hidden, s.short_range,
                             l_in_used=0 if layer == 0 else None, l_out_used=1 if layer == s.n_layers - 1 else None)
            for layer in range(s.n_layers))
        self.layer_charges = torch.nn.ModuleList(
            torch.nn.Linear(s.channels, 1) for _ in range(s.n_layers if s.long_range else 0))
        if s.short_range:
            self.short_basis = RadialBasis(s.short_range_cutoff, s.n_radial)
            self.short_radial = FullyConnectedNet([s.n_radial, s.radial_hidden, s.channels * (s.lmax + 1)], silu)
        self.energy_head = FullyConnectedNet([s.channels, s.readout_hidden, 1], silu)
        self.charge_head = torch.nn.Linear(s.channels, 1)
        self.dipole_head = torch.nn.Linear(s.channels, 1, bias=False)
        if s.polarizability:
            self.polarizability_head = FullyConnectedNet([s.channels, s.readout_hidden, 1], silu)
        if s.penetration_width > 0:  # per element: width = penetration_width * PENETRATION_MAX_FACTOR * sigmoid(p)
            self.penetration = torch.nn.Parameter(torch.zeros(len(s.elements)))

        # statistics of the training data (set by the trainer, stored in the model file)
        self.register_buffer("env_scale", torch.ones(self.K + 1))
        self.register_buffer("energy_scale", torch.ones(()))
        self.register_buffer("avg_neighbors", torch.ones(()))
        self.register_buffer("short_neighbors", torch.ones(()))
        self.register_buffer("polarizability_scale", torch.ones(()))
        self.register_buffer("energy_shift", torch.zeros(len(s.elements), dtype=torch.float64))
        self.register_buffer("masses", torch.tensor(s.masses, dtype=torch.get_default_dtype()))
        self.register_buffer("env_degrees", degree_index(self.K), persistent=False)

    def deepened(self, n_layers: int) -> "QMMMModel":
        """This model with interaction blocks inserted before the last one, ``n_layers`` in all, that change
        nothing: their output weights (tensor products, self-interaction, short-range map) are zero, so each
        adds ``Gate(0) = 0`` to its input and the deeper model's results are exactly this one's. Training it
        starts from this model with more capacity; the new blocks' radial networks and long-range charge maps
        are freshly initialised (the torch seed decides them), which lets their gradients flow."""
        old = self.settings.n_layers
        if n_layers < old:
            raise ValueError(f"a model of {old} interaction blocks cannot be deepened to {n_layers}")
        extra, last = n_layers - old, old - 1
        deeper = QMMMModel(dataclasses.replace(self.settings, n_layers=n_layers)).to(self.energy_scale.device,
                                                                                      self.energy_scale.dtype)
        state = deeper.state_dict()
        for key, value in self.state_dict().items():
            head, _, rest = key.partition(".")
            if head in ("blocks", "layer_charges"):
                index, _, rest = rest.partition(".")
                key = f"{head}.{int(index) + extra if int(index) >= last else int(index)}.{rest}"
            state[key] = value.clone()
        silent = ("conv.weight", "env.weight", "self_linear.", "short_linear.")
        for k in range(last, last + extra):
            for key in state:
                if key.startswith(f"blocks.{k}.") and any(part in key for part in silent):
                    state[key] = torch.zeros_like(state[key])
        deeper.load_state_dict(state)
        deeper.metadata = dict(getattr(self, "metadata", {}))
        return deeper

    def with_settings(self, **changes) -> "QMMMModel":
        """This model with settings in :data:`~qmmm_driver.nn.settings.PARAMETER_FREE` changed: the same
        weights, buffers and metadata, the terms those settings add or remove computed from them."""
        other = sorted(set(changes) - set(PARAMETER_FREE))
        if other:
            raise ValueError(f"only terms without weights can be switched on a trained model ({list(PARAMETER_FREE)}),"
                             f" not {other}")
        changed = QMMMModel(dataclasses.replace(self.settings, **changes)).to(self.energy_scale.device,
                                                                            self.energy_scale.dtype)
        changed.load_state_dict(self.state_dict())
        changed.metadata = dict(getattr(self, "metadata", {}))
        return changed

    def _apply(self, fn, *args, **kwargs):
        # casts (model.float()) must not truncate the float64 reference energies
        shift = self._buffers["energy_shift"]
        super()._apply(fn, *args, **kwargs)
        self._buffers["energy_shift"] = shift.to(device=self.energy_scale.device, dtype=torch.float64)
        return self

    @property
    def elements(self) -> list[str]:
        return list(self.settings.elements)

    @staticmethod
    def _neutralise(q: torch.Tensor, total_charge: torch.Tensor) -> torch.Tensor:
        """Charges [B, n] shifted equally so that each frame sums to ``total_charge`` [B]."""
        return q + ((total_charge - q.sum(dim=1)) / q.shape[1])[:, None]

    def short_range_features(self, vec: torch.Tensor, r: torch.Tensor, near_charge: torch.Tensor) -> torch.Tensor:
        """``s_i = sum_m q_m R(r_im) Y(r_im) / <m>``: [B n, C, S], a channel-wise radial weight per degree, for
        the vectors ``vec`` [B, n, m, 3] from the QM atoms to the near MM charges and their lengths ``r``."""
        s = self.settings
        weight = self.short_radial(self.short_basis(r)) * near_charge[:, None, :, None]
        weight = weight.unflatten(-1, (s.channels, s.lmax + 1))                         # [B, n, m, C, l]
        sh = self.edge_harmonics(vec)                                                   # [B, n, m, S]
        out = torch.cat([torch.einsum("bnmc,bnms->bncs", weight[..., l], sh[..., l * l:(l + 1) ** 2])
                         for l in range(s.lmax + 1)], dim=-1)                           # sum over m per degree
        return out.flatten(0, 1) / self.short_neighbors

    def penetration_correction(self, species: torch.Tensor, vec: torch.Tensor, r: torch.Tensor,
                               near_charge: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What turns the point-charge potential [B, n] and its gradient T_1 [B, n, 3] at the QM atoms into those
        felt by a Gaussian cloud of width w per element: ``-sum_m q_m erfc(r/w)/r`` and the gradient's change
        (same layout as T_1, ``sum_m q_m u Y_1 / r^2`` for points), over the near MM charges (``vec`` [B, n, m,
        3] from the QM atoms to them, lengths ``r``)."""
        widest = self.settings.penetration_width * PENETRATION_MAX_FACTOR
        width = widest * torch.sigmoid(self.penetration)[species]                                   # [B, n]
        x = r / width[..., None]
        erfc = torch.erfc(x)
        gauss = (2.0 / math.sqrt(math.pi)) * x * torch.exp(-x * x)
        dV = -(near_charge[:, None, :] * erfc / r).sum(dim=2)
        # d/dr of erf(r/w)/r is -(erf - gauss)/r^2: T_1 goes from sum q u/r^2 to sum q u (erf - gauss)/r^2
        dT1 = -(near_charge[:, None, :, None] * ((erfc + gauss) / (r * r * r))[..., None] * vec).sum(dim=2)
        return dV, dT1

    def forward(self, species: torch.Tensor, qm_pos: torch.Tensor, env: torch.Tensor, total_charge: torch.Tensor,
                near_pos: torch.Tensor | None = None, near_charge: torch.Tensor | None = None
                ) -> dict[str, torch.Tensor]:
        s = self.settings
        B, n = species.shape
        dtype = qm_pos.dtype
        total_charge = total_charge.to(dtype)

        # the potential enters relative to its mean over the QM atoms; the mean itself exactly (Q V)
        if s.gauge_invariant:
            reference = env[:, :, 0].mean(dim=1)
            env = torch.cat([env[:, :, :1] - reference[:, None, None], env[:, :, 1:]], dim=2)

        dst, src = receiver_major_pairs(n, qm_pos.device)
        vec = qm_pos[:, src] - qm_pos[:, dst]                                     # [B, n(n-1), 3]
        r = vec.norm(dim=-1)
        edge_sh = self.edge_harmonics(vec).flatten(0, 1)
        edge_basis = self.basis(r).flatten(0, 1)
        flat_src = (src[None, :] + n * torch.arange(B, device=qm_pos.device)[:, None]).flatten()
        if s.long_range:
            lr_harm = irregular_harmonics(vec, self.K) * (1.0 - switch(r, s.lr_switch_on, s.lr_switch_off))[..., None]
        short = None
        if s.short_range:  # QM atom -> near MM charge, shared by the short-range features and penetration
            near_vec = near_pos[:, None, :, :] - qm_pos[:, :, None, :]                  # [B, n, m, 3]
            near_r = near_vec.norm(dim=-1)
            short = self.short_range_features(near_vec, near_r, near_charge)
        env_flat = env.flatten(0, 1)
        inv_scale = (1.0 / self.env_scale)[self.env_degrees]

        h = torch.zeros(B * n, s.channels, self.n_sh, device=qm_pos.device, dtype=dtype)
        h0 = self.embed(torch.nn.functional.one_hot(species.flatten(), len(s.elements)).to(dtype))
        h = torch.cat([h0[:, :, None], h[:, :, 1:]], dim=2)
        for layer, block in enumerate(self.blocks):
            layer_env = env_flat
            if s.long_range and n > 1:
                q = self._neutralise(self.layer_charges[layer](h[:, :, 0]).view(B, n), total_charge)
                lr = (lr_harm * q[:, src, None]).view(B, n, n - 1, -1).sum(dim=2)
                layer_env = layer_env + lr.flatten(0, 1)
            h = block(h, flat_src, edge_sh, edge_basis, layer_env * inv_scale, self.avg_neighbors, short)

        scalars = h[:, :, 0]
        atom_energy = (self.energy_head(scalars).squeeze(-1) * self.energy_scale).view(B, n)
        charges = self._neutralise(self.charge_head(scalars).view(B, n), total_charge)
        atomic_dipoles = self.dipole_head(h[:, :, 1:4].transpose(1, 2)).view(B, n, 3)   # l = 1 is (x, y, z)
        potential, gradient = env[:, :, 0], env[:, :, 1:4]
        if s.penetration_width > 0:
            dV, dT1 = self.penetration_correction(species, near_vec, near_r, near_charge)
            potential, gradient = potential + dV, gradient + dT1
        if s.electrostatic_baseline:
            atom_energy = atom_energy + charges * potential
            if self.K >= 1:
                atom_energy = atom_energy + (atomic_dipoles * gradient).sum(-1)
        if s.qm_electrostatics and n > 1:  # each ordered pair once: half of the pair energy on each atom
            pair = charges[:, dst] * charges[:, src] * (1.0 - switch(r, s.qq_switch_on, s.qq_switch_off)) / r
            atom_energy = atom_energy + 0.5 * pair.view(B, n, n - 1).sum(dim=2)
        if s.polarizability:
            alpha = torch.nn.functional.softplus(self.polarizability_head(scalars).view(B, n))
            atom_energy = atom_energy - 0.5 * alpha * self.polarizability_scale * (gradient ** 2).sum(-1)
        energy = atom_energy.sum(dim=1).to(torch.float64) + self.energy_shift[species].sum(dim=1)
        if s.gauge_invariant:
            energy = energy + (total_charge * reference).to(torch.float64)

        mass = self.masses[species]
        com = (qm_pos * mass[..., None]).sum(dim=1) / mass.sum(dim=1)[:, None]
        dipole = (charges[..., None] * (qm_pos - com[:, None]) + atomic_dipoles).sum(dim=1)
        return {"energy": energy, "charges": charges, "atomic_dipoles": atomic_dipoles, "dipole": dipole}
