"""The model file: hyperparameters, elements, units, K, cutoffs and weights in one file.

The file is a ``torch.save`` archive holding only tensors and plain Python
values, read back with ``torch.load(weights_only=True)``, so loading a model
never unpickles code.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from ..errors import InputError

from .network import QMMMModel
from .settings import ModelSettings

FORMAT = "qmmm-driver-model"
VERSION = 1
UNITS = {"length": "bohr", "energy": "hartree", "charge": "e"}


class ModelFileError(InputError):
    """A model file that cannot be read as a qmmm-driver model."""


def save_model(model: QMMMModel, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model`` (settings, statistics, weights) and JSON-like ``metadata`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {
        "format": FORMAT,
        "version": VERSION,
        "units": dict(UNITS),
        "settings": model.settings.to_dict(),
        "state_dict": state,
        "metadata": metadata or {},
    }
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)
    return path


def read_model_file(path: str | Path) -> dict:
    """Load and check the raw contents of a model file."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a readable qmmm-driver model file (not a torch archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses anything but tensors and plain values
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{path} is not a readable qmmm-driver model file: it holds objects that are not "
                             f"tensors or plain values, which qmmm-driver refuses to unpickle ({first})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a qmmm-driver model file (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise ModelFileError(
            f"{path} has model format version {payload.get('version')}, but this qmmm-driver reads "
            f"version {VERSION}; retrain the model or use the qmmm-driver release that wrote it"
        )
    if payload.get("units") != UNITS:
        raise ModelFileError(f"{path} declares units {payload.get('units')}, expected {UNITS}")
    return payload


def load_model(path: str | Path, device: str | torch.device = "cpu") -> QMMMModel:
    """Rebuild the model stored in ``path`` (weights on ``device``, in eval mode)."""
    payload = read_model_file(path)
    try:
        model = QMMMModel(ModelSettings.from_dict(payload["settings"]))
        model.load_state_dict(payload["state_dict"])
    except (KeyError, ValueError, RuntimeError, TypeError) as err:
        raise ModelFileError(f"{path}: stored settings or weights do not fit the model: {err}") from err
    model.metadata = payload.get("metadata", {})
    return model.to(device).eval()
