"""The model as a PES of i-PI's own Python driver, batched (``i-pi-py_driver -m custom``).

    i-pi-py_driver -u -a ADDRESS -m custom -P qmmm_driver/ipi/pes.py \
        -o model=model.pt,system=system.extxyz[,device=cpu,dtype=float32,coupling=1.0]

A PES class in i-PI's style (``ipi/pes/*.py``): ``compute_structure(cell, pos)``
for one structure and ``compute(cells, positions)`` overridden for the batches
i-PI sends when its ``<ffsocket>`` has a ``<batch_size>``, so that a batch is one
evaluation of the model. It runs the same :class:`~qmmm_driver.evaluator.ModelEvaluator`
(compiled model included) as ``qmmm-driver run``: this is the fair baseline of
``benchmarks/ipi_pimd.py``, the best i-PI's own driver can do with this model.
i-PI's positions, cells and forces are in atomic units, as the evaluator's.
"""

from __future__ import annotations

import json

import numpy as np
from ipi.pes.dummy import Dummy_driver

__DRIVER_NAME__ = "qmmm"
__DRIVER_CLASS__ = "QMMMPes"


class QMMMPes(Dummy_driver):
    """The qmmm-driver model for ``i-pi-py_driver``."""

    def __init__(self, model, system, device="cpu", dtype="float32", coupling=1.0, compiled="auto", *args, **kwargs):
        import torch

        # absolute imports: i-PI's driver loads this file by path, outside its package
        from qmmm_driver.evaluator import ModelEvaluator, load
        from qmmm_driver.nn.compile import CompiledModelError, compiled_path, load_compiled
        from qmmm_driver.structures import QMMMStructure

        self.structure = QMMMStructure.read(system)
        dtype = {"float32": torch.float32, "float64": torch.float64}[dtype]
        model_ = load(model, device)
        runner = None
        path = compiled_path(model, self.structure.n_qm, device, dtype)
        if compiled == "auto" and path.is_file():
            try:
                runner = load_compiled(path, model_.checksum, self.structure.n_qm, device, dtype)
            except CompiledModelError:
                runner = None
        self.ev = ModelEvaluator(model_, self.structure, device, dtype, compiled=runner)
        self.params = {"coupling": float(coupling)}
        super().__init__(*args, **kwargs)

    def _evaluate(self, cells, positions):
        pos = np.asarray(positions, dtype=np.float64).reshape(len(cells), -1, 3)
        res = self.ev.compute(pos, np.stack([np.asarray(c).T for c in cells]), self.params)
        return [(res.energy[b], res.forces[b].reshape(np.shape(positions[b])), res.virial[b],
                 json.dumps(res.extras(b, self.structure))) for b in range(len(cells))]

    def compute_structure(self, cell, pos):
        return self._evaluate([cell], [pos])[0]

    def compute(self, cell, pos):
        if isinstance(cell, list):  # a batch: one evaluation for all structures
            return self._evaluate(cell, pos)
        return self.compute_structure(cell, pos)
