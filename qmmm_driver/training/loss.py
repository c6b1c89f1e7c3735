"""Predictions on batches, the training loss and the error metrics (reported in meV, meV/A, e)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..evaluator import run_model
from ..units import BOHR, HARTREE
from .data import Batch

EV_PER_A = HARTREE / BOHR  # (Hartree/Bohr) -> (eV/A)


def predict(model, batch: Batch, create_graph: bool = True, dtype: torch.dtype | None = None) -> dict:
    """Energy, forces on QM and MM atoms, charges and dipole of a batch (atomic units)."""
    dtype = dtype or next(model.parameters()).dtype
    out, _, _, g_qm, g_mm = run_model(model, batch.presented, batch.species, batch.total_charge.to(dtype),
                                      dtype, create_graph=create_graph)
    return {"energy": out["energy"], "qm_forces": -g_qm, "mm_forces": -g_mm,
            "charges": out["charges"], "dipole": out["dipole"]}


@dataclass
class LossWeights:
    """Weights of the loss terms; each term is a mean square error in eV, eV/A, e and e A."""

    energy: float = 1.0        # per-QM-atom energy error, eV
    forces: float = 1.0        # QM forces, eV/A
    mm_forces: float = 1.0     # MM forces within the loss radius, eV/A
    charges: float = 0.1       # QM charges, e
    dipole: float = 0.1        # QM dipole, e A


def loss_terms(pred: dict, batch: Batch) -> dict[str, torch.Tensor]:
    """Mean square errors in eV-based units (energy per QM atom)."""
    terms = {}
    de = (pred["energy"] - batch.energy) / batch.n_qm * HARTREE
    terms["energy"] = (de**2).mean()
    terms["forces"] = (((pred["qm_forces"].double() - batch.qm_forces) * EV_PER_A) ** 2).mean()
    if bool(batch.mm_near.any()):
        dm = (pred["mm_forces"].double() - batch.mm_forces)[batch.mm_near] * EV_PER_A
        terms["mm_forces"] = (dm**2).mean()
    if batch.qm_charges is not None:
        terms["charges"] = ((pred["charges"].double() - batch.qm_charges) ** 2).mean()
    if batch.dipole is not None:
        terms["dipole"] = (((pred["dipole"].double() - batch.dipole) * BOHR) ** 2).mean()
    return terms


def total_loss(terms: dict[str, torch.Tensor], weights: LossWeights) -> torch.Tensor:
    return sum(getattr(weights, name) * value for name, value in terms.items())


class Metrics:
    """Accumulates absolute and squared errors over batches."""

    KEYS = ("energy", "forces", "mm_forces", "charges", "dipole")

    def __init__(self):
        self.abs = {k: 0.0 for k in self.KEYS}
        self.sq = {k: 0.0 for k in self.KEYS}
        self.count = {k: 0 for k in self.KEYS}
        self.n_frames = 0

    def _add(self, key: str, err: torch.Tensor) -> None:
        err = err.detach().double().reshape(-1)
        self.abs[key] += float(err.abs().sum())
        self.sq[key] += float((err**2).sum())
        self.count[key] += err.numel()

    def update(self, pred: dict, batch: Batch) -> None:
        self.n_frames += batch.presented.n_frames
        self._add("energy", (pred["energy"] - batch.energy) * HARTREE * 1000.0)
        self._add("forces", (pred["qm_forces"].double() - batch.qm_forces) * EV_PER_A * 1000.0)
        if bool(batch.mm_near.any()):
            self._add("mm_forces", (pred["mm_forces"].double() - batch.mm_forces)[batch.mm_near] * EV_PER_A * 1000.0)
        if batch.qm_charges is not None:
            self._add("charges", pred["charges"].double() - batch.qm_charges)
        if batch.dipole is not None:
            # dipole vector errors, per component, in e A
            self._add("dipole", (pred["dipole"].double() - batch.dipole) * BOHR)

    def mae(self, key: str) -> float:
        return self.abs[key] / self.count[key] if self.count[key] else float("nan")

    def rmse(self, key: str) -> float:
        return (self.sq[key] / self.count[key]) ** 0.5 if self.count[key] else float("nan")

    def summary(self) -> dict:
        """The metrics of ``qmmm-driver evaluate --json``."""
        return {
            "n_frames": self.n_frames,
            "energy_mae_meV": self.mae("energy"),
            "energy_rmse_meV": self.rmse("energy"),
            "force_mae_meV_per_A": self.mae("forces"),
            "force_rmse_meV_per_A": self.rmse("forces"),
            "mm_force_mae_meV_per_A": self.mae("mm_forces"),
            "mm_force_rmse_meV_per_A": self.rmse("mm_forces"),
            "charge_mae_e": self.mae("charges"),
            "dipole_mae_eA": self.mae("dipole"),
        }
