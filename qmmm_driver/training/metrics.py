"""Error metrics (meV, meV/A, e, e A) and the evaluation of a model on labelled frames.

:func:`evaluate_structures` runs the driver's own evaluation path
(:class:`~qmmm_driver.evaluator.ModelEvaluator`, one frame at a time) on each
frame, so the numbers ``qmmm-driver evaluate`` reports are those of the model a
worker serves. The mean signed energy error is reported beside MAE and RMSE: an
offset that is the same in every frame is a missing piece of physics, not noise.
"""

from __future__ import annotations

import warnings

import numpy as np

from ..domain import TOLERANCE, ExtrapolationWarning
from ..units import BOHR, HARTREE

EV_PER_A = HARTREE / BOHR


class Metrics:
    """Accumulates errors (prediction minus reference) over frames."""

    KEYS = ("energy", "forces", "mm_forces", "charges", "dipole")

    def __init__(self):
        self.errors = {k: [] for k in self.KEYS}
        self.n_frames = 0
        self.beyond_domain: list[float] | None = None  # per frame, Bohr beyond the training domain (0 inside)

    def add(self, key: str, error) -> None:
        self.errors[key].append(np.asarray(error, dtype=np.float64).reshape(-1))

    def add_frames(self, energy, ref_energy, qm_forces, ref_qm_forces, mm_forces=None, ref_mm_forces=None,
                   charges=None, ref_charges=None, dipole=None, ref_dipole=None) -> None:
        """Errors of frames in atomic units (energies [B], forces [.., 3], charges, dipoles e Bohr)."""
        energy = np.atleast_1d(np.asarray(energy, dtype=np.float64))
        self.n_frames += energy.size
        self.add("energy", (energy - np.asarray(ref_energy)) * HARTREE * 1000.0)
        self.add("forces", (np.asarray(qm_forces) - np.asarray(ref_qm_forces)) * EV_PER_A * 1000.0)
        if mm_forces is not None and np.size(mm_forces):
            self.add("mm_forces", (np.asarray(mm_forces) - np.asarray(ref_mm_forces)) * EV_PER_A * 1000.0)
        if charges is not None and ref_charges is not None:
            self.add("charges", np.asarray(charges) - np.asarray(ref_charges))
        if dipole is not None and ref_dipole is not None:
            self.add("dipole", (np.asarray(dipole) - np.asarray(ref_dipole)) * BOHR)

    def extend(self, other: "Metrics") -> None:
        """Add the frames of ``other`` (their errors and domain excursions) to these."""
        for key in self.KEYS:
            self.errors[key] += other.errors[key]
        self.n_frames += other.n_frames
        if other.beyond_domain is not None:
            self.beyond_domain = (self.beyond_domain or []) + other.beyond_domain

    def values(self, key: str) -> np.ndarray:
        return np.concatenate(self.errors[key]) if self.errors[key] else np.zeros(0)

    def mae(self, key: str) -> float | None:
        v = self.values(key)
        return float(np.abs(v).mean()) if v.size else None

    def rmse(self, key: str) -> float | None:
        v = self.values(key)
        return float(np.sqrt((v ** 2).mean())) if v.size else None

    def mean(self, key: str) -> float | None:
        v = self.values(key)
        return float(v.mean()) if v.size else None

    def summary(self) -> dict:
        """The metrics of ``qmmm-driver evaluate --json`` (null where a label is missing)."""
        return {
            "n_frames": self.n_frames,
            "energy_mae_meV": self.mae("energy"),
            "energy_rmse_meV": self.rmse("energy"),
            "energy_mean_signed_meV": self.mean("energy"),
            "force_mae_meV_per_A": self.mae("forces"),
            "force_rmse_meV_per_A": self.rmse("forces"),
            "mm_force_mae_meV_per_A": self.mae("mm_forces"),
            "mm_force_rmse_meV_per_A": self.rmse("mm_forces"),
            "charge_mae_e": self.mae("charges"),
            "dipole_mae_eA": self.mae("dipole"),
            # frames whose QM geometry leaves the model's training domain (qmmm_driver.domain); null: not recorded
            "frames_outside_domain": None if self.beyond_domain is None
            else int(sum(x > TOLERANCE for x in self.beyond_domain)),
            "largest_excursion_A": None if not self.beyond_domain else max(self.beyond_domain) * BOHR,
        }


def evaluate_structures(model, structures, mm_radius: float, device="cpu", dtype=None, progress: bool = False):
    """Metrics of ``model`` on labelled cluster ``structures`` (MM forces scored within ``mm_radius`` Bohr
    of a QM atom), and per-frame ``(prediction, reference)`` pairs for parity plots."""
    import torch
    from tqdm import tqdm

    from ..evaluator import ModelEvaluator

    dtype = dtype or torch.float32
    metrics = Metrics()
    pairs = {"energy": [], "forces": [], "charges": []}
    for s in tqdm(structures, desc="evaluating", unit="frame", disable=not progress):
        ev = ModelEvaluator(model, s, device, dtype)
        with warnings.catch_warnings():  # counted in the summary instead of one warning per frame
            warnings.simplefilter("ignore", ExtrapolationWarning)
            res = ev.compute(s.positions, s.cell)
        if ev.domain is not None:
            metrics.beyond_domain = (metrics.beyond_domain or []) + [ev.domain.largest]
        qm, mm = s.qm_indices, s.mm_indices
        near = mm[np.linalg.norm(s.positions[mm][:, None] - s.positions[qm][None], axis=-1).min(axis=1) < mm_radius] \
            if len(mm) else mm
        metrics.add_frames(res.energy, [s.energy], res.forces[0][qm], s.forces[qm], res.forces[0][near],
                           s.forces[near], res.qm_charges[0], None if s.qm_charges is None else s.qm_charges[qm],
                           res.dipole[0], s.dipole)
        pairs["energy"].append([[res.energy[0], s.energy]])
        pairs["forces"].append(np.stack([res.forces[0][qm].ravel(), s.forces[qm].ravel()], 1))
        if s.qm_charges is not None:
            pairs["charges"].append(np.stack([res.qm_charges[0], s.qm_charges[qm]], 1))
    return metrics, {k: np.concatenate(v) for k, v in pairs.items() if v}
