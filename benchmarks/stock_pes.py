"""The model hosted by i-PI's stock Python driver (`i-pi-py_driver -m custom -P stock_pes.py`).

The benchmark baseline for qmmm-driver's own client: same model, same
evaluation path, but i-PI's generic driver loop, one structure per call.
Options: ``-o model=MODEL.pt,system=SYSTEM.extxyz``.
"""

import json

from ipi.pes.dummy import Dummy_driver

__DRIVER_NAME__ = "qmmm_stock"
__DRIVER_CLASS__ = "StockQMMM"


class StockQMMM(Dummy_driver):
    def __init__(self, model, system, *args, **kwargs):
        from qmmm_driver.evaluator import Evaluator
        from qmmm_driver.model.io import load_model
        from qmmm_driver.system import QMMMSystem

        self.system = QMMMSystem.read(system)
        self.ev = Evaluator(load_model(model), self.system)
        super().__init__(*args, **kwargs)

    def compute_structure(self, cell, pos):
        res = self.ev.compute(pos.reshape(1, -1, 3), cell.T.reshape(1, 3, 3))
        return res.energy[0], res.forces[0].reshape(pos.shape), res.virial[0], json.dumps(res.extras(0, self.system))
