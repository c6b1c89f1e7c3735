"""qmmm-driver: an i-PI driver for the equivariant multiscale ML QM/MM potential.

Internal units are Hartree atomic units (see :mod:`qmmm_driver.units`). The
public names below are imported on first use, so that the command line starts
without loading torch when it does not need it.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "QMMMCalculator": "calculator",
    "Evaluator": "evaluator",
    "ModelSettings": "model",
    "QMMMModel": "model",
    "QMMMSystem": "system",
    "load_model": "model.io",
    "save_model": "model.io",
}
__all__ = list(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'qmmm_driver' has no attribute '{name}'")
