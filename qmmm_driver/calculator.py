"""ASE calculator for the QM/MM model (eV, Angstrom, e), sharing the driver's evaluation path."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes

from .evaluator import Evaluator
from .model import QMMMModel
from .model.io import load_model
from .system import QMMMSystem
from .units import ANGSTROM_TO_BOHR, E_BOHR_TO_E_ANGSTROM, HARTREE, HARTREE_PER_BOHR_TO_EV_PER_A

DTYPES = {"float32": torch.float32, "float64": torch.float64}


class QMMMCalculator(Calculator):
    """Energy of the QM region in the MM charges' field, forces on all atoms.

    The atoms must carry the ``qm`` and ``mm_charge`` arrays of the frame
    convention (``qm_total_charge`` in ``atoms.info``, 0 if absent). Results:
    ``energy`` (eV), ``forces`` (eV/A, QM and MM atoms), ``charges`` (QM charges
    on QM atoms, 0 on MM atoms), ``qm_charges`` (QM atoms only), ``dipole`` (e A,
    about the QM centre of mass) and, for periodic cells, ``stress``.
    """

    implemented_properties = ["energy", "free_energy", "forces", "charges", "dipole", "stress"]

    def __init__(self, model: str | QMMMModel, device: str = "cpu", dtype: str = "float32",
                 coupling: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.model = load_model(model, device) if not isinstance(model, QMMMModel) else model
        self.device, self.dtype, self.coupling = device, DTYPES[dtype], coupling
        self._evaluator: Evaluator | None = None
        self._key = None

    def _evaluator_for(self, atoms) -> Evaluator:
        key = (tuple(atoms.numbers), atoms.arrays.get("qm", np.zeros(0)).tobytes(),
               atoms.arrays.get("mm_charge", np.zeros(0)).tobytes(), tuple(atoms.pbc),
               atoms.info.get("qm_total_charge", 0))
        if key != self._key:
            system = QMMMSystem.from_atoms(atoms, source="ase.Atoms")
            self._evaluator = Evaluator(self.model, system, self.device, self.dtype, self.coupling)
            self._key = key
        return self._evaluator

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        ev = self._evaluator_for(self.atoms)
        cell = self.atoms.cell.array * ANGSTROM_TO_BOHR if ev.system.periodic else None
        res = ev.compute(self.atoms.positions * ANGSTROM_TO_BOHR, cell)
        charges = np.zeros(len(self.atoms))
        charges[ev.system.qm_indices] = res.qm_charges[0]
        self.results = {
            "energy": float(res.energy[0]) * HARTREE,
            "free_energy": float(res.energy[0]) * HARTREE,
            "forces": res.forces[0] * HARTREE_PER_BOHR_TO_EV_PER_A,
            "charges": charges,
            "qm_charges": res.qm_charges[0].copy(),
            "dipole": res.dipole[0] * E_BOHR_TO_E_ANGSTROM,
        }
        if ev.system.periodic:
            volume = self.atoms.get_volume()
            stress = -res.virial[0] * HARTREE / volume
            self.results["stress"] = stress.flat[[0, 4, 8, 5, 2, 1]]
