"""The training config (TOML; paths relative to it, lengths in Angstrom)::

    [data]
    files = ["data/water_bulk.extxyz.xz"]    # labelled cluster frames, split into train/validation/test
    transfer = ["data/water_k.extxyz.xz"]    # optional: frames never trained on, scored at the end
    split = [0.8, 0.1, 0.1]                  # train / validation / test, by frame
    seed = 0
    mm_force_radius = 6.0                    # MM forces within this distance of a QM atom enter the loss
    keep_split = ""                          # optional: an earlier run's split.json; its files (the first of
                                             # 'files') keep their split, the others are split with the seed
    max_energy_above_median = 0.0            # eV, optional: leave out frames this far above their file's
                                             # median energy (very distorted frames of a large --qm-noise)
    weights = {"data/stretched.extxyz.xz" = 0.3}   # optional: a file's frames count this much in the loss
                                             # (default 1), e.g. frames far from equilibrium whose large
                                             # forces would otherwise dominate it

    [model]                                  # ModelSettings (qmmm_driver.nn.settings); elements from the data
    env_order = 3
    channels = 32
    short_range = true
    polarizability = true

    [loss]                                   # weights of mean square errors in eV, eV/A, e, e A
    energy = 1.0                             # (energy per QM atom)
    forces = 1.0
    mm_forces = 1.0
    charges = 0.1
    dipole = 0.1

    [training]
    output = "runs/water"                    # checkpoints, model.pt, split.json, metrics, plots
    epochs = 300
    batch_size = 8
    lr = 0.005
    lr_factor = 0.5                          # on validation plateau of lr_patience epochs
    lr_patience = 10
    min_lr = 1e-5
    patience = 40                            # early stopping
    ema_decay = 0.99                         # exponential moving average of weights (with warm-up)
    max_minutes = 60                         # wall-clock budget of the whole run (--resume included)
    threads = 0                              # CPU threads (0: torch's default)
    device = "auto"                          # auto, cpu, cuda, cuda:N
    dtype = "float32"
    seed = 0
    init = ""                                # optional: start from this model file's weights and statistics
                                             # (fine-tuning on new data; its settings must equal [model]'s, but
                                             # for a larger n_layers, which deepens it: QMMMModel.deepened)

    [stage2]                                 # optional: a second stage, e.g. energy-weighted fine tuning
    start_epoch = 100                        # from this epoch on, these loss weights and learning rate
    lr = 0.001
    energy = 1000.0
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

from ..errors import InputError, read_toml
from ..nn.settings import ModelSettings
from .loss import LossWeights


@dataclass
class TrainingOptions:
    output: str = "runs/model"
    epochs: int = 300
    batch_size: int = 8
    lr: float = 5e-3
    lr_factor: float = 0.5
    lr_patience: int = 10
    min_lr: float = 1e-5
    patience: int = 40
    ema_decay: float = 0.99
    max_minutes: float = 60.0
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    threads: int = 0
    init: str = ""


@dataclass
class DataOptions:
    files: list[str] = field(default_factory=list)
    transfer: list[str] = field(default_factory=list)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    mm_force_radius: float = 6.0
    keep_split: str = ""
    max_energy_above_median: float = 0.0
    weights: dict[str, float] = field(default_factory=dict)


@dataclass
class Stage2:
    """From ``start_epoch`` on: new loss weights (unset ones kept) and a learning-rate cap (0: none)."""

    start_epoch: int = 0
    lr: float = 0.0
    energy: float | None = None
    forces: float | None = None
    mm_forces: float | None = None
    charges: float | None = None
    dipole: float | None = None

    def weights(self, base: LossWeights) -> LossWeights:
        return LossWeights(**{k: (getattr(self, k) if getattr(self, k) is not None else v)
                              for k, v in base.__dict__.items()})


@dataclass
class TrainConfig:
    data: DataOptions
    model: dict
    loss: LossWeights
    training: TrainingOptions
    base: Path
    stage2: Stage2 | None = None

    def path(self, name: str) -> Path:
        p = Path(name)
        return p if p.is_absolute() else (self.base / p)

    def settings(self, elements: list[str]) -> ModelSettings:
        """The model settings (lengths converted to Bohr), elements and masses from the data unless given."""
        from ase.data import atomic_masses, atomic_numbers

        values = dict(self.model)
        values.setdefault("elements", elements)
        values.setdefault("masses", [float(atomic_masses[atomic_numbers[e]]) for e in values["elements"]])
        return ModelSettings.from_dict(values, lengths_in_angstrom=True)

    def as_dict(self) -> dict:
        out = {"data": self.data.__dict__, "model": self.model, "loss": self.loss.__dict__,
               "training": self.training.__dict__}
        if self.stage2 is not None:
            out["stage2"] = self.stage2.__dict__
        return out


def _section(cls, values: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def load_config(path: str | Path, overrides: dict | None = None) -> TrainConfig:
    """Read and check a training config; ``overrides`` replace ``[training]`` values."""
    path = Path(path)
    raw = read_toml(path, f"training config {path} does not exist")
    unknown = sorted(set(raw) - {"data", "model", "loss", "training", "stage2"})
    if unknown:
        raise InputError(f"{path}: unknown section(s) {unknown}; sections: data, model, loss, training, stage2")
    training = dict(raw.get("training", {}))
    training.update({k: v for k, v in (overrides or {}).items() if v is not None})
    cfg = TrainConfig(
        data=_section(DataOptions, raw.get("data", {}), f"{path} [data]"),
        model=dict(raw.get("model", {})),
        loss=_section(LossWeights, raw.get("loss", {}), f"{path} [loss]"),
        training=_section(TrainingOptions, training, f"{path} [training]"),
        base=path.parent,
        stage2=_section(Stage2, raw["stage2"], f"{path} [stage2]") if "stage2" in raw else None,
    )
    if not cfg.data.files:
        raise InputError(f"{path} [data]: 'files' lists no labelled frames")
    for name, weight in cfg.data.weights.items():
        if name not in cfg.data.files:
            raise InputError(f"{path} [data] weights: {name!r} is not one of 'files' ({', '.join(cfg.data.files)})")
        if not (isinstance(weight, (int, float)) and weight >= 0):
            raise InputError(f"{path} [data] weights: the weight of {name!r} must be a number >= 0, got {weight!r}")
    if len(cfg.data.split) != 3:
        raise InputError(f"{path} [data]: split must be [train, validation, test] fractions")
    if cfg.training.dtype not in ("float32", "float64"):
        raise InputError(f"{path} [training]: dtype must be float32 or float64")
    try:
        cfg.settings(cfg.model.get("elements", ["H"]))
    except (TypeError, ValueError) as err:
        raise InputError(f"{path} [model]: {err}") from err
    return cfg
