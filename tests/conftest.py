"""Shared fixtures: small QM/MM systems (ASE atoms) and an untrained model with a fixed seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

TIP3P = np.array([-0.834, 0.417, 0.417])


def water_box(n_side: int = 8, spacing: float = 3.25, seed: int = 0, triclinic: bool = False) -> Atoms:
    """A periodic box of n_side**3 randomly oriented waters; the first one is QM."""
    rng = np.random.default_rng(seed)
    w = molecule("H2O")
    w.translate(-w.positions[0])
    atoms = Atoms(cell=np.eye(3) * n_side * spacing, pbc=True)
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for g in grid:
        m = w.copy()
        m.rotate(rng.uniform(0, 360), rng.normal(size=3))
        m.translate((g + rng.uniform(-0.08, 0.08, 3)) * spacing)
        atoms += m
    if triclinic:
        cell = atoms.cell.array.copy()
        cell[1] += 0.3 * cell[0]
        cell[2] += 0.2 * cell[0] - 0.25 * cell[1]
        atoms.set_cell(cell, scale_atoms=True)
    n = len(atoms)
    qm = np.zeros(n, dtype=np.int64)
    qm[:3] = 1
    atoms.set_array("qm", qm)
    atoms.set_array("mm_charge", np.where(qm == 1, 0.0, np.tile(TIP3P, n // 3)))
    atoms.info["qm_total_charge"] = 0
    atoms.info["qm_multiplicity"] = 1
    return atoms


def water_cluster(n_mm: int = 30, seed: int = 1) -> Atoms:
    """A QM water surrounded by n_mm MM waters (no cell)."""
    rng = np.random.default_rng(seed)
    atoms = molecule("H2O")
    placed = [atoms.get_center_of_mass()]
    while len(placed) <= n_mm:
        c = rng.normal(size=3) * 4.5
        if min(np.linalg.norm(c - p) for p in placed) < 2.8:
            continue
        m = molecule("H2O")
        m.rotate(rng.uniform(0, 360), rng.normal(size=3))
        m.translate(c - m.get_center_of_mass())
        atoms += m
        placed.append(c)
    n = len(atoms)
    qm = np.zeros(n, dtype=np.int64)
    qm[:3] = 1
    atoms.set_array("qm", qm)
    atoms.set_array("mm_charge", np.where(qm == 1, 0.0, np.tile(TIP3P, n // 3)))
    atoms.info["qm_total_charge"] = 0
    atoms.info["qm_multiplicity"] = 1
    return atoms


def tiny_model(elements=("H", "O"), env_order: int = 3, seed: int = 0, **kw):
    """An untrained model with fixed weights and mild, non-trivial statistics."""
    from qmmm_driver.model import ModelSettings, QMMMModel

    torch.manual_seed(seed)
    settings = ModelSettings(elements=list(elements), env_order=env_order, features=[8, 4, 2, 2],
                             n_layers=2, radial_hidden=8, readout_hidden=8, **kw)
    model = QMMMModel(settings)
    with torch.no_grad():
        model.energy_scale.fill_(0.01)
        model.avg_neighbors.fill_(2.0)
        model.env_scale.copy_(torch.tensor([0.1, 0.03, 0.01, 0.005])[: env_order + 1])
        model.energy_shift.copy_(torch.linspace(-0.5, -75.0, len(elements), dtype=torch.float64))
    return model


@pytest.fixture
def box_atoms():
    return water_box()


@pytest.fixture
def cluster_atoms():
    return water_cluster()


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    from qmmm_driver.model.io import save_model

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(tiny_model(), path, metadata={"note": "untrained test model"})
    return path
