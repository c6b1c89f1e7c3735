"""Statistics of the training data that set the model's fixed scales (stored in the model file)."""

from __future__ import annotations

import ase.data
import numpy as np
import torch

from ..environment import frame_pairs, taylor_tensors
from ..frames import Frame


def fit_statistics(model, frames: list[Frame]) -> dict:
    """Set ``env_scale``, ``energy_shift``, ``energy_scale`` and ``avg_neighbors`` of ``model`` from ``frames``.

    - env_scale[l]: root mean square of |T_l| over the QM atoms (unit-size inputs);
    - energy_shift: per-element reference energies by least squares on the frame energies;
    - energy_scale: root mean square of the QM force components (NequIP-style output scale);
    - avg_neighbors: mean number of QM neighbours within the message-passing cutoff.
    """
    elements = model.elements
    K = model.K
    sq = np.zeros(K + 1)
    n_atoms = 0
    neighbours = 0
    counts = np.zeros((len(frames), len(elements)))
    energies = np.zeros(len(frames))
    forces = []
    for k, f in enumerate(frames):
        qm, mm = f.qm_indices, f.mm_indices
        qm_pos = torch.as_tensor(f.positions[qm])
        mm_pos = torch.as_tensor(f.positions[mm])
        i, j = frame_pairs(torch.zeros(len(qm), dtype=torch.long), torch.zeros(len(mm), dtype=torch.long), 1)
        t = taylor_tensors(qm_pos, mm_pos, torch.as_tensor(f.mm_charge[mm]), i, j, K).numpy()
        for l in range(K + 1):
            sq[l] += (t[:, l * l:(l + 1) ** 2] ** 2).sum()
        n_atoms += len(qm)
        d = torch.cdist(qm_pos, qm_pos)
        neighbours += int(((d < model.settings.cutoff) & (d > 0)).sum())
        for z in f.numbers[qm]:
            counts[k, elements.index(ase.data.chemical_symbols[int(z)])] += 1
        energies[k] = f.energy
        forces.append(f.forces[qm].reshape(-1))
    ridge = 1e-8 * np.eye(len(elements))
    shift = np.linalg.solve(counts.T @ counts + ridge, counts.T @ energies)
    force_rms = float(np.sqrt(np.mean(np.concatenate(forces) ** 2)))
    with torch.no_grad():
        model.env_scale.copy_(torch.as_tensor(np.sqrt(sq / n_atoms) + 1e-12))
        model.energy_shift.copy_(torch.as_tensor(shift))
        model.energy_scale.fill_(max(force_rms, 1e-4))
        model.avg_neighbors.fill_(max(neighbours / n_atoms, 1.0))
    return {"env_scale": model.env_scale.tolist(), "energy_shift": shift.tolist(),
            "energy_scale": float(model.energy_scale), "avg_neighbors": float(model.avg_neighbors)}
