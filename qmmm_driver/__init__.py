"""qmmm-driver: an i-PI driver for the equivariant multiscale ML QM/MM potential.

Internal units are Hartree atomic units (see :mod:`qmmm_driver.units`).
"""

from .calculator import QMMMCalculator
from .evaluator import Evaluator
from .model import ModelSettings, QMMMModel
from .model.io import load_model, save_model
from .system import QMMMSystem

__version__ = "0.1.0"
__all__ = ["QMMMCalculator", "Evaluator", "ModelSettings", "QMMMModel", "QMMMSystem", "load_model", "save_model"]
