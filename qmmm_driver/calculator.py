"""ASE calculator for the QM/MM model (eV, Angstrom, e), on the driver's evaluation path."""

from __future__ import annotations

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from .evaluator import ModelEvaluator, load
from .nn import QMMMModel
from .structures import QMMMStructure
from .units import ANGSTROM_TO_BOHR, E_BOHR_TO_E_ANGSTROM, HARTREE, HARTREE_PER_BOHR_TO_EV_PER_A

DTYPES = {"float32": torch.float32, "float64": torch.float64}
#: per-atom arrays and info keys that define the QM/MM system (besides numbers, cell and pbc)
SYSTEM_ARRAYS = ("qm", "mm_charge", "molecule")
SYSTEM_INFO = ("qm_total_charge", "qm_multiplicity")


class QMMMCalculator(Calculator):
    """Energy of the QM region in the MM charges' potential, forces on all atoms.

    The atoms carry the ``qm`` and ``mm_charge`` arrays of the frame convention
    (``qm_total_charge`` in ``atoms.info``, 0 if absent; optional ``molecule``).
    Results: ``energy`` (eV), ``forces`` (eV/A, QM and MM atoms), ``charges``
    (QM charges on QM atoms, 0 on MM atoms), ``qm_charges`` (QM atoms only),
    ``dipole`` (e A, about the QM centre of mass) and, for periodic cells,
    ``stress`` (eV/A^3). Any change of these arrays or info keys, like a change
    of positions, cell or atoms, invalidates the results.
    """

    implemented_properties = ["energy", "free_energy", "forces", "charges", "dipole", "stress"]

    def __init__(self, model: str | QMMMModel, device: str = "cpu", dtype: str = "float32",
                 coupling: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.model = load(model, device) if not isinstance(model, QMMMModel) else model
        self.device, self.dtype, self.params = device, DTYPES[dtype], {"coupling": float(coupling)}
        self._evaluator: ModelEvaluator | None = None
        self._system_key = None

    @staticmethod
    def _key(atoms) -> tuple:
        arrays = tuple(np.asarray(atoms.arrays[k]).tobytes() if k in atoms.arrays else None for k in SYSTEM_ARRAYS)
        info = tuple(atoms.info.get(k) for k in SYSTEM_INFO)
        return (atoms.numbers.tobytes(), tuple(atoms.pbc), arrays, info)

    def check_state(self, atoms, tol=1e-15):
        changes = super().check_state(atoms, tol)
        if self.atoms is not None and self._key(atoms) != self._key(self.atoms):
            changes.append("qmmm_system")  # charges, QM selection, groups, total charge
        return changes

    def _evaluator_for(self, atoms) -> ModelEvaluator:
        key = self._key(atoms)
        if key != self._system_key:
            structure = QMMMStructure.from_atoms(atoms, source="ase.Atoms")
            self._evaluator = ModelEvaluator(self.model, structure, self.device, self.dtype)
            self._system_key = key
        return self._evaluator

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes):
        super().calculate(atoms, properties, system_changes)
        ev = self._evaluator_for(self.atoms)
        cell = self.atoms.cell.array * ANGSTROM_TO_BOHR if ev.structure.periodic else None
        res = ev.compute(self.atoms.positions * ANGSTROM_TO_BOHR, cell, self.params)
        charges = np.zeros(len(self.atoms))
        charges[ev.structure.qm_indices] = res.qm_charges[0]
        energy = float(res.energy[0]) * HARTREE
        self.results = {"energy": energy, "free_energy": energy,
                        "forces": res.forces[0] * HARTREE_PER_BOHR_TO_EV_PER_A, "charges": charges,
                        "qm_charges": res.qm_charges[0].copy(), "dipole": res.dipole[0] * E_BOHR_TO_E_ANGSTROM}
        if ev.structure.periodic:
            self.results["stress"] = full_3x3_to_voigt_6_stress(-res.virial[0] * HARTREE / self.atoms.get_volume())
