"""Energy and gradients of a batch of frames: the unit that runs at every force call, eager or compiled.

:class:`Potential` wraps a :class:`~qmmm_driver.nn.model.QMMMModel` into one
function of plain tensors: QM positions, MM positions and charges, the indices of
the MM atoms near the QM region, species and total charges in; the energy, its
gradients with respect to QM positions, MM positions and MM charges, and the QM
charges and dipole out. The MM charges are an input of their own so that a
caller can chain their dependence on positions (the switch of a periodic
embedding) outside. The same module is what ``qmmm-driver compile`` exports
ahead of time (:mod:`qmmm_driver.nn.compile`).
"""

from __future__ import annotations

import torch

from .model import QMMMModel
from .multipoles import taylor_tensors


class Potential(torch.nn.Module):
    """``forward(species, qm, mm, charge, near, near_mask, total_charge)`` for B frames:

    - ``species`` [B, n] (long), ``qm`` [B, n, 3] (Bohr), ``total_charge`` [B] (e);
    - ``mm`` [B, M, 3] (Bohr), ``charge`` [B, M] (e; padding atoms carry 0);
    - ``near`` [B, m] (long) indices into the M axis of the MM atoms that may lie within
      the short-range cutoff of a QM atom, ``near_mask`` [B, m] 1 for real entries, 0 for padding.

    Returns ``(energy [B] float64, dE/dqm [B, n, 3], dE/dmm [B, M, 3], dE/dcharge [B, M],
    charges [B, n], dipole [B, 3])``, detached.
    """

    def __init__(self, model: QMMMModel):
        super().__init__()
        self.model = model

    def forward(self, species: torch.Tensor, qm: torch.Tensor, mm: torch.Tensor, charge: torch.Tensor,
                near: torch.Tensor, near_mask: torch.Tensor, total_charge: torch.Tensor):
        with torch.enable_grad():
            qm = qm.detach().requires_grad_(True)
            mm = mm.detach().requires_grad_(True)
            charge = charge.detach().requires_grad_(True)
            env = taylor_tensors(qm, mm, charge, self.model.K)
            near_pos = torch.gather(mm, 1, near[..., None].expand(-1, -1, 3))
            near_charge = torch.gather(charge, 1, near) * near_mask
            out = self.model(species, qm, env, total_charge, near_pos, near_charge)
            g_qm, g_mm, g_q = torch.autograd.grad(out["energy"].sum(), [qm, mm, charge])
        return (out["energy"].detach(), g_qm, g_mm, g_q, out["charges"].detach(), out["dipole"].detach())
