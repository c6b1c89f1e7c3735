"""qmmm-driver: an i-PI driver for the equivariant multiscale ML QM/MM potential.

Internal units are Hartree atomic units (see :mod:`qmmm_driver.units`). The
public names below are imported on first use, so that the command line starts
without loading torch when it does not need it.
"""

import importlib

__version__ = "0.2.0"

_EXPORTS = {
    "QMMMCalculator": "calculator",
    "ModelEvaluator": "evaluator",
    "ModelSettings": "nn",
    "QMMMModel": "nn",
    "QMMMStructure": "structures",
    "read_structures": "structures",
    "write_structures": "structures",
    "load_model": "nn.io",
    "save_model": "nn.io",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qmmm_driver' has no attribute '{name}'")
