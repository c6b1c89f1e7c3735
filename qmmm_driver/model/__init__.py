"""The equivariant multiscale QM/MM model, its settings and its file format."""

from .network import QMMMModel
from .settings import ModelSettings

__all__ = ["QMMMModel", "ModelSettings"]
