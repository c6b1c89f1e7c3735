"""Plots for users: learning curves and parity plots (PNG, matplotlib without a display)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | Path) -> Path:
    """``fig`` as a PNG at ``path``, replaced whole (a stop signal never leaves half an image), then closed."""
    from .files import write_atomically

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=110)
    plt.close(fig)
    return write_atomically(path, png.getvalue())


def learning_curve(history: list[dict], path: str | Path) -> Path:
    """Training/validation loss and validation errors against epoch."""
    plt = _pyplot()
    epochs = [h["epoch"] for h in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    axes[0].semilogy(epochs, [h["train_loss"] for h in history], label="train")
    axes[0].semilogy(epochs, [h["val_loss"] for h in history], label="validation (EMA)")
    axes[0].set_ylabel("loss")
    axes[0].legend()
    axes[1].semilogy(epochs, [h["val_energy_mae_meV"] for h in history], color="C2")
    axes[1].set_ylabel("validation energy MAE (meV)")
    axes[2].semilogy(epochs, [h["val_force_mae_meV_per_A"] for h in history], color="C3")
    axes[2].set_ylabel("validation QM force MAE (meV/Å)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(plt, fig, path)


def parity(pairs: dict[str, np.ndarray], path: str | Path, title: str = "") -> Path:
    """Predicted against reference energies (meV, relative to the mean), forces (eV/Å) and charges (e)."""
    from .units import BOHR, HARTREE

    plt = _pyplot()
    panels = []
    if "energy" in pairs:
        e = pairs["energy"] * HARTREE * 1000.0
        panels.append(("energy (meV, minus mean)", e - e[:, 1].mean(), "meV"))
    if "forces" in pairs:
        panels.append(("QM force components (eV/Å)", pairs["forces"] * HARTREE / BOHR, "eV/Å"))
    if "charges" in pairs:
        panels.append(("QM charges (e)", pairs["charges"], "e"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 4.2), squeeze=False)
    for ax, (label, data, unit) in zip(axes[0], panels):
        pred, ref = data[:, 0], data[:, 1]
        lo, hi = min(pred.min(), ref.min()), max(pred.max(), ref.max())
        ax.plot([lo, hi], [lo, hi], color="grey", lw=1)
        ax.scatter(ref, pred, s=4, alpha=0.5)
        mae = np.abs(pred - ref).mean()
        ax.set_title(f"{label}\nMAE {mae:.3g} {unit}")
        ax.set_xlabel("reference")
        ax.set_ylabel("model")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return _save(plt, fig, path)
