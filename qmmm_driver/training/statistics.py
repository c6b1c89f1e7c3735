"""Statistics of the training frames that set the model's fixed scales (stored in the model file)."""

from __future__ import annotations

import numpy as np
import torch

from ..domain import fit_domain
from ..nn.multipoles import taylor_tensors
from .data import FrameSet, with_links


def fit_statistics(model, sets: list[FrameSet], rows_of: list[torch.Tensor]) -> dict:
    """Set the scales of ``model`` from the training rows of ``sets``; returns them for the model's metadata.

    - ``env_scale[l]``: root mean square of |T_l| over the QM atoms (T_0 relative to its
      mean over the QM region for a gauge-invariant model): unit-size inputs;
    - ``energy_shift``: per-element reference energies, least squares on the frame
      energies minus the exact ``Q_QM <V>`` term;
    - ``energy_scale``: root mean square of the QM force components;
    - ``avg_neighbors``/``short_neighbors``: mean number of QM neighbours within the
      message-passing cutoff, of MM charges within the short-range cutoff.
    """
    s = model.settings
    K, n_elem = model.K, len(s.elements)
    sq, n_atoms, neighbours, short = np.zeros(K + 1), 0, 0.0, 0.0
    counts, targets, forces = [], [], []
    for fs, rows in zip(sets, rows_of):
        if not len(rows):
            continue
        b = fs.select(rows)
        qm = with_links(b, b.qm, b.near_pos)
        env = b.far[..., :(K + 1) ** 2] + taylor_tensors(qm, b.near_pos, b.near_charge, K)
        mean_v = env[:, :, 0].mean(dim=1)
        if s.gauge_invariant:
            env = torch.cat([env[:, :, :1] - mean_v[:, None, None], env[:, :, 1:]], dim=2)
        for l in range(K + 1):
            sq[l] += float((env[..., l * l:(l + 1) ** 2] ** 2).sum())
        n_atoms += qm.shape[0] * qm.shape[1]
        d = torch.cdist(qm, qm)
        neighbours += float(((d < s.cutoff) & (d > 0)).sum())
        short += float((torch.cdist(qm, b.near_pos[:, :b.n_short]) < s.short_range_cutoff).sum())
        counts.append(torch.nn.functional.one_hot(b.species, n_elem).sum(dim=1).double().numpy())
        targets.append((b.energy - (b.total_charge * mean_v if s.gauge_invariant else 0.0)).numpy())
        forces.append(b.qm_forces.reshape(-1).numpy())
    counts, targets = np.concatenate(counts), np.concatenate(targets)
    shift = np.linalg.solve(counts.T @ counts + 1e-8 * np.eye(n_elem), counts.T @ targets)
    force_rms = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    with torch.no_grad():
        model.env_scale.copy_(torch.as_tensor(np.sqrt(sq / n_atoms) + 1e-12))
        model.energy_shift.copy_(torch.as_tensor(shift))
        model.energy_scale.fill_(max(force_rms, 1e-4))
        model.avg_neighbors.fill_(max(neighbours / n_atoms, 1.0))
        model.short_neighbors.fill_(max(short / n_atoms, 1.0))
    return {"env_scale": model.env_scale.tolist(), "energy_shift": shift.tolist(),
            "energy_scale": float(model.energy_scale), "avg_neighbors": float(model.avg_neighbors),
            "short_neighbors": float(model.short_neighbors)}


def training_domain(model, sets: list[FrameSet], rows_of: list[torch.Tensor]) -> dict:
    """The QM geometries of the training rows of ``sets`` as :func:`~qmmm_driver.domain.fit_domain` records
    them (link hydrogens included), for the model's metadata."""
    def frames():
        for fs, rows in zip(sets, rows_of):
            if len(rows):
                b = fs.select(rows)
                yield with_links(b, b.qm, b.near_pos).numpy(), b.species.numpy()
    return fit_domain(frames(), model.elements, model.settings.cutoff)
