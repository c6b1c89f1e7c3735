"""The one evaluation path: positions of a QM/MM system in, energy, forces, virial and extras out.

The i-PI worker, the ASE calculator and ``qmmm-driver evaluate`` all call
:meth:`Evaluator.compute`, so they cannot disagree. Inputs and outputs are in
atomic units (Bohr, Hartree, e); cells are rows of lattice vectors.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from torch.profiler import record_function

from .embedding import Embedding, Presented
from .model import QMMMModel
from .system import InvalidSystem, QMMMSystem


class NonFiniteResult(RuntimeError):
    """The model produced NaN or infinite energies or forces."""


@dataclass
class Results:
    """Results for a batch of B frames of N atoms (atomic units, float64)."""

    energy: np.ndarray          # [B] Hartree
    forces: np.ndarray          # [B, N, 3] Hartree/Bohr, on every atom
    virial: np.ndarray          # [B, 3, 3] Hartree, sum_i F_i (x) r_i
    qm_charges: np.ndarray      # [B, n_qm] e
    dipole: np.ndarray          # [B, 3] e*Bohr, about the QM centre of mass
    n_mm_embedded: np.ndarray   # [B] MM atoms inside the cutoff

    def extras(self, b: int, system: QMMMSystem) -> dict:
        """The i-PI ``extras`` dictionary of frame ``b``."""
        return {
            "qm_charges": self.qm_charges[b].tolist(),
            "dipole": self.dipole[b].tolist(),
            "qm_indices": system.qm_indices.tolist(),
            "n_mm_embedded": int(self.n_mm_embedded[b]),
            "units": "atomic (e, e*bohr)",
        }


def species_of(model: QMMMModel, system: QMMMSystem) -> list[int]:
    """Index of each QM atom's element in the model's element list."""
    known = model.elements
    out = []
    for atom, symbol in zip(system.qm_indices, system.qm_symbols):
        if symbol not in known:
            raise InvalidSystem(
                f"QM atom {int(atom)} of {system.source} is {symbol}, which the model does not know "
                f"(its elements: {', '.join(known)})"
            )
        out.append(known.index(symbol))
    return out


def run_model(model: QMMMModel, p: Presented, species: torch.Tensor, total_charge: torch.Tensor,
              dtype: torch.dtype, embedding: Embedding | None = None, coupling: float = 1.0,
              create_graph: bool = False):
    """Model outputs and energy gradients for presented frames.

    Positions are taken relative to each frame's first QM atom (exact by
    translation invariance, and kind to float32). MM charges are switched by
    ``embedding`` (periodic systems) and scaled by ``coupling``. Returns
    ``(outputs, qm_pos, mm_pos, dE/dqm_pos, dE/dmm_pos)`` with the positions as
    the model saw them; ``create_graph`` keeps the graph for training on forces.
    """
    B = p.n_frames
    count = torch.bincount(p.qm_frame, minlength=B)
    origin = p.qm_pos[torch.cumsum(count, 0) - count]  # first QM atom of each frame (frame-major order)
    qm = (p.qm_pos - origin[p.qm_frame]).to(dtype).requires_grad_(True)
    mm = (p.mm_pos - origin[p.mm_frame]).to(dtype).requires_grad_(True)
    with record_function("qmmm:forward"):
        charges = embedding.effective_charges(p, qm, mm) if embedding is not None else p.mm_charge
        charges = charges.to(dtype) * coupling
        out = model(species, qm, p.qm_frame, mm, charges, p.mm_frame, total_charge, B)
    with record_function("qmmm:backward"):
        g_qm, g_mm = torch.autograd.grad(out["energy"].sum(), [qm, mm], create_graph=create_graph,
                                         allow_unused=True)
    if g_mm is None:
        g_mm = torch.zeros_like(mm)
    return out, qm, mm, g_qm, g_mm


class Evaluator:
    """Evaluates ``model`` on configurations of ``system`` on one device.

    ``dtype`` is the model's precision (float32 or float64); the embedding and
    the energies are always float64. ``coupling`` scales every MM charge (the
    QM-MM electrostatic coupling strength, 1 by default).
    """

    def __init__(self, model: QMMMModel, system: QMMMSystem, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, coupling: float = 1.0):
        self.device = torch.device(device)
        self.dtype = dtype
        self.model = model.to(self.device, dtype).eval()
        self.system = system
        self.coupling = float(coupling)
        s = model.settings
        self.embedding = Embedding(system, s.mm_switch_on, s.mm_switch_off, self.device, torch.float64)
        self.species = torch.as_tensor(species_of(model, system), device=self.device)
        self.total_charge = float(system.qm_charge)

    def present(self, positions: np.ndarray, cells: np.ndarray | None) -> Presented:
        pos = torch.as_tensor(np.asarray(positions, dtype=np.float64), device=self.device)
        if pos.ndim == 2:
            pos = pos[None]
        if pos.shape[1] != self.system.n_atoms:
            self.system.check_atoms(pos.shape[1])
        cell_t = None
        if cells is not None and self.system.periodic:
            cell_t = torch.as_tensor(np.asarray(cells, dtype=np.float64), device=self.device).reshape(-1, 3, 3)
        return self.embedding.present(pos, cell_t)

    def compute(self, positions: np.ndarray, cells: np.ndarray | None = None) -> Results:
        """Evaluate frames ``positions`` [B, N, 3] (or [N, 3]) with ``cells`` [B, 3, 3] (Bohr)."""
        with record_function("qmmm:present"):
            p = self.present(positions, cells)
        B = p.n_frames
        total = torch.full((B,), self.total_charge, device=self.device)
        out, qm, mm, g_qm, g_mm = run_model(self.model, p, self.species.repeat(B), total, self.dtype,
                                            self.embedding, self.coupling)
        with record_function("qmmm:assemble"):
            return self._assemble(p, out, qm, mm, g_qm.double(), g_mm.double())

    def _assemble(self, p: Presented, out: dict, qm, mm, g_qm, g_mm) -> Results:
        """Forces on the original atoms, virials and extras, on the host (float64)."""
        B = p.n_frames
        n = self.system.n_atoms
        forces = torch.zeros(B * n, 3, device=self.device, dtype=torch.float64)
        forces.index_add_(0, p.qm_frame * n + p.qm_atom, -g_qm)
        forces.index_add_(0, p.mm_frame * n + p.mm_atom, -g_mm)
        virial = torch.zeros(B, 3, 3, device=self.device, dtype=torch.float64)
        virial.index_add_(0, p.qm_frame, -g_qm[:, :, None] * qm.detach().double()[:, None, :])
        virial.index_add_(0, p.mm_frame, -g_mm[:, :, None] * mm.detach().double()[:, None, :])

        res = Results(
            energy=out["energy"].detach().cpu().numpy(),
            forces=forces.reshape(B, n, 3).cpu().numpy(),
            virial=virial.cpu().numpy(),
            qm_charges=out["charges"].detach().double().reshape(B, -1).cpu().numpy(),
            dipole=out["dipole"].detach().double().cpu().numpy(),
            n_mm_embedded=torch.bincount(p.mm_frame, minlength=B).cpu().numpy(),
        )
        self._check_finite(res, p)
        return res

    def _check_finite(self, res: Results, p: Presented) -> None:
        bad = ~(np.isfinite(res.energy) & np.isfinite(res.forces).all(axis=(1, 2)) & np.isfinite(res.virial).all(axis=(1, 2)))
        if not bad.any():
            return
        b = int(np.flatnonzero(bad)[0])
        detail = ""
        qm = p.qm_pos[p.qm_frame == b]
        mm = p.mm_pos[p.mm_frame == b]
        if mm.numel():
            d = torch.cdist(qm, mm)
            k = int(torch.argmin(d))
            i, j = divmod(k, mm.shape[0])
            atom_i = int(p.qm_atom[p.qm_frame == b][i])
            atom_j = int(p.mm_atom[p.mm_frame == b][j])
            detail = f"; closest QM-MM pair: atoms {atom_i} and {atom_j} at {float(d.flatten()[k]):.3f} bohr"
        raise NonFiniteResult(f"the model gave a non-finite energy or force for frame {b}{detail}")
