"""Predictions on training batches and the loss (mean square errors in eV, eV/A, e, e A)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..nn.multipoles import linearised_tensors, taylor_tensors
from ..units import BOHR, HARTREE
from .data import FrameSet, fold_link_charges, with_links

EV_PER_A = HARTREE / BOHR  # (Hartree/Bohr) -> (eV/A)


def predict(model, batch: FrameSet, create_graph: bool = True) -> dict:
    """Energy, forces on QM and near MM atoms, charges and dipole of a batch (atomic units).

    The Taylor tensors are the far charges' (linearised in the QM displacement,
    exact to first order) plus the near charges' (exact): the same energy and
    forces as the driver's evaluation of the whole frame, link atoms included.
    """
    dtype = next(model.parameters()).dtype
    qm = batch.qm.detach().to(dtype).requires_grad_(True)
    near = batch.near_pos.detach().to(dtype).requires_grad_(True)
    near_charge = batch.near_charge.to(dtype)
    qm_all = with_links(batch, qm, near)
    env = (linearised_tensors(batch.far.to(dtype), qm_all - qm_all.detach(), model.K)
           + taylor_tensors(qm_all, near, near_charge, model.K))
    m = batch.n_short  # the short-range features need only the nearest atoms (sorted first)
    out = model(batch.species, qm_all, env, batch.total_charge.to(dtype), near[:, :m], near_charge[:, :m])
    g_qm, g_near = torch.autograd.grad(out["energy"].sum(), [qm, near], create_graph=create_graph)
    return {"energy": out["energy"], "qm_forces": -g_qm, "near_forces": -g_near,
            "charges": fold_link_charges(batch, out["charges"]), "dipole": out["dipole"]}


@dataclass
class LossWeights:
    """Weights of the loss terms; each term is a mean square error in eV, eV/A, e and e A."""

    energy: float = 1.0        # per-QM-atom energy error, eV
    forces: float = 1.0        # QM forces, eV/A
    mm_forces: float = 1.0     # MM forces within the loss radius, eV/A
    charges: float = 0.1       # QM charges, e
    dipole: float = 0.1        # QM dipole, e A


def loss_terms(pred: dict, batch: FrameSet) -> dict[str, torch.Tensor]:
    """Mean square errors in eV-based units (energy per QM atom), each frame counted with its weight."""
    n_qm = batch.qm.shape[1]
    w = batch.weight

    def mean(sq: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Weighted mean of ``sq`` [B, ...] (over the entries of ``mask`` [B, ...] only, if given)."""
        per = w.view(-1, *[1] * (sq.dim() - 1)).expand_as(sq)
        if mask is not None:
            sq, per = sq[mask], per[mask]
        return (sq * per).sum() / per.sum().clamp(min=1e-12)

    terms = {"energy": mean(((pred["energy"] - batch.energy) / n_qm * HARTREE) ** 2),
             "forces": mean(((pred["qm_forces"].double() - batch.qm_forces) * EV_PER_A) ** 2)}
    if bool(batch.near_scored.any()):
        dm = (pred["near_forces"].double() - batch.near_forces) * EV_PER_A
        terms["mm_forces"] = mean(dm ** 2, batch.near_scored[..., None].expand_as(dm))
    if batch.qm_charges is not None:
        terms["charges"] = mean((pred["charges"].double() - batch.qm_charges) ** 2)
    if batch.dipole is not None:
        terms["dipole"] = mean(((pred["dipole"].double() - batch.dipole) * BOHR) ** 2)
    return terms


def total_loss(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in terms.items())
