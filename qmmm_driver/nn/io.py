"""The model file: settings, training statistics, weights and metadata in one checked file.

The file is a ``torch.save`` archive holding only tensors and plain Python
values, read back with ``torch.load(weights_only=True)``, so loading a model
never unpickles code. A SHA-256 checksum of the settings and every weight is
stored in the header and verified on loading: a corrupted file is refused.
"""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import torch

from ..files import write_atomically
from .model import QMMMModel
from .settings import ModelSettings

FORMAT = "qmmm-driver-model"
VERSION = 2
UNITS = {"length": "bohr", "energy": "hartree", "charge": "e"}


class ModelFileError(ValueError):
    """A model file that cannot be read as a qmmm-driver model (the message says why)."""


def weights_checksum(settings: dict, state_dict: dict[str, torch.Tensor]) -> str:
    """SHA-256 of the settings (as sorted JSON) and of every tensor's name, dtype, shape and bytes."""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def save_model(model: QMMMModel, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model`` (settings, statistics, weights, checksum) and JSON-like ``metadata`` atomically."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    settings = model.settings.to_dict()
    payload = {"format": FORMAT, "version": VERSION, "units": dict(UNITS), "settings": settings,
               "state_dict": state, "metadata": metadata or {}, "checksum": weights_checksum(settings, state)}
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return write_atomically(path, buffer.getvalue())


def read_model_file(path: str | Path) -> dict:
    """Load and check the raw contents of a model file (format, version, units, checksum)."""
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    if not zipfile.is_zipfile(path):
        raise ModelFileError(f"{path} is not a readable qmmm-driver model file (not a torch archive)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refuses code; a damaged archive fails its CRC
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ModelFileError(f"{path} is not a readable qmmm-driver model file: it is damaged or holds objects "
                             f"that are not tensors or plain values, which qmmm-driver refuses to unpickle "
                             f"({first})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ModelFileError(f"{path} is not a qmmm-driver model file (no '{FORMAT}' header)")
    if payload.get("version") != VERSION:
        raise ModelFileError(
            f"{path} has model format version {payload.get('version')}, but this qmmm-driver reads version "
            f"{VERSION} (version 2 made the model gauge invariant); retrain the model, or use the qmmm-driver "
            "release that wrote it")
    if payload.get("units") != UNITS:
        raise ModelFileError(f"{path} declares units {payload.get('units')}, expected {UNITS}")
    try:
        checksum = weights_checksum(payload["settings"], payload["state_dict"])
    except (KeyError, TypeError, AttributeError, RuntimeError) as err:
        raise ModelFileError(f"{path}: settings or weights are missing or malformed ({err})") from err
    if checksum != payload.get("checksum"):
        raise ModelFileError(f"{path} is corrupted: its weights do not match the checksum in its header "
                             "(the file was damaged after it was written); use an intact copy")
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
    model.checksum = payload["checksum"]
    return model.to(device).eval()
