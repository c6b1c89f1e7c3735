"""``qmmm-driver train CONFIG``: fit the model to labelled frames.

The config is a TOML file (paths relative to it, lengths in Angstrom)::

    [data]
    files = ["data/water_bulk.extxyz.xz"]   # labelled cluster frames
    split = [0.8, 0.1, 0.1]                  # train / validation / test, by frame
    seed = 0
    mm_force_radius = 6.0                    # MM forces within this distance of a QM atom enter the loss

    [model]                                  # ModelSettings; elements default to those in the data
    env_order = 3
    features = [32, 16, 8, 4]

    [loss]                                   # weights of mean square errors in eV, eV/A, e, e A
    energy = 1.0
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
    max_minutes = 60                         # wall-clock budget
    threads = 0                              # CPU threads (0: torch's default)
    device = "auto"                          # auto, cpu, cuda, cuda:N
    dtype = "float32"
    seed = 0

    [stage2]                                 # optional: a second stage, e.g. energy-weighted fine tuning
    start_epoch = 100                        # from this epoch on, these loss weights and learning rate
    lr = 0.001
    energy = 1000.0

Outputs in ``output``: ``model.pt`` (best validation, EMA weights, with test
metrics in its metadata), ``checkpoint.pt`` (resume with ``--resume``),
``split.json``, ``history.json``, ``test_metrics.json``, ``learning_curve.png``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError, read_toml
from ..frames import Frame, read_frames
from ..model import ModelSettings, QMMMModel
from ..model.io import save_model
from ..units import ANGSTROM_TO_BOHR
from .data import collate, elements_of, split_indices
from .loss import LossWeights, Metrics, loss_terms, predict, total_loss
from .stats import fit_statistics


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


@dataclass
class DataOptions:
    files: list[str] = field(default_factory=list)
    split: list[float] = field(default_factory=lambda: [0.8, 0.1, 0.1])
    seed: int = 0
    mm_force_radius: float = 6.0


@dataclass
class Stage2:
    """From ``start_epoch`` on: new loss weights (unset ones kept) and a new learning rate (0 keeps it)."""

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
    if len(cfg.data.split) != 3:
        raise InputError(f"{path} [data]: split must be [train, validation, test] fractions")
    if cfg.training.dtype not in ("float32", "float64"):
        raise InputError(f"{path} [training]: dtype must be float32 or float64")
    try:
        ModelSettings.from_dict({**cfg.model, "elements": cfg.model.get("elements", ["H"])}, lengths_in_angstrom=True)
    except (TypeError, ValueError) as err:
        raise InputError(f"{path} [model]: {err}") from err
    return cfg


def batches(frames: list[Frame], indices: list[int], size: int, elements, radius: float, rng=None):
    order = list(indices)
    if rng is not None:
        rng.shuffle(order)
    for start in range(0, len(order), size):
        yield collate([frames[i] for i in order[start:start + size]], elements, radius)


def evaluate_frames(model, frames: list[Frame], indices: list[int], elements, radius: float, device,
                    batch_size: int = 8) -> tuple[Metrics, dict]:
    """Metrics (and per-frame predictions for plots) of ``model`` on ``frames[indices]``."""
    metrics = Metrics()
    pairs = {"energy": [], "forces": [], "charges": []}
    for batch in batches(frames, indices, batch_size, elements, radius):
        batch = batch.to(device)
        pred = predict(model, batch, create_graph=False)
        metrics.update(pred, batch)
        pairs["energy"].append(np.stack([pred["energy"].detach().cpu().numpy(), batch.energy.cpu().numpy()], 1))
        pairs["forces"].append(np.stack([pred["qm_forces"].detach().double().cpu().numpy().ravel(),
                                         batch.qm_forces.cpu().numpy().ravel()], 1))
        if batch.qm_charges is not None:
            pairs["charges"].append(np.stack([pred["charges"].detach().double().cpu().numpy(),
                                              batch.qm_charges.cpu().numpy()], 1))
    return metrics, {k: np.concatenate(v) for k, v in pairs.items() if v}


def _save_checkpoint(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured; returns the test metrics and output paths."""
    from tqdm import tqdm

    from ..parallel import select_device
    from ..plots import learning_curve

    opts = cfg.training
    out = cfg.path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    device = select_device(opts.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[opts.dtype]
    if opts.threads > 0:
        torch.set_num_threads(opts.threads)
    torch.manual_seed(opts.seed)
    rng = np.random.default_rng(opts.seed)

    frames: list[Frame] = []
    for name in cfg.data.files:
        frames += read_frames(cfg.path(name), require_labels=True)
    split_file = out / "split.json"
    if resume and split_file.exists():
        split = json.loads(split_file.read_text())
    else:
        split = split_indices(len(frames), tuple(cfg.data.split), cfg.data.seed)
        split_file.write_text(json.dumps({"files": cfg.data.files, **split}))
    radius = cfg.data.mm_force_radius * ANGSTROM_TO_BOHR

    settings = ModelSettings.from_dict({**cfg.model, "elements": cfg.model.get("elements", elements_of(frames))},
                                       lengths_in_angstrom=True)
    model = QMMMModel(settings)
    stats = fit_statistics(model, [frames[i] for i in split["train"]])
    model = model.to(device, dtype)
    ema = QMMMModel(settings).to(device, dtype)  # (a deepcopy would carry e3nn's compiled constants)
    ema.load_state_dict(model.state_dict())
    optimizer = torch.optim.Adam(model.parameters(), lr=opts.lr, amsgrad=True)
    scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, factor=opts.lr_factor,
                                                           patience=opts.lr_patience, min_lr=opts.min_lr)
    history: list[dict] = []
    best, best_epoch, start_epoch, step = math.inf, -1, 0, 0
    ckpt_path = out / "checkpoint.pt"
    if resume:
        if not ckpt_path.exists():
            raise InputError(f"--resume: no checkpoint at {ckpt_path}")
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
        model.load_state_dict(ckpt["model"])
        ema.load_state_dict(ckpt["ema"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        history = json.loads(ckpt["history"])
        best, best_epoch, start_epoch = ckpt["best"], ckpt["best_epoch"], ckpt["epoch"] + 1
        step = ckpt["step"]
        rng = np.random.default_rng(opts.seed + start_epoch)

    elements = settings.elements
    val_batches = [b.to(device) for b in batches(frames, split["validation"], opts.batch_size, elements, radius)]
    started = time.time()
    model_path = out / "model.pt"
    bar = tqdm(range(start_epoch, opts.epochs), desc="training", unit="epoch", disable=not progress,
               initial=start_epoch, total=opts.epochs)
    stop_reason = "epochs done"
    weights = cfg.loss
    for epoch in bar:
        if cfg.stage2 is not None and epoch >= cfg.stage2.start_epoch and weights is cfg.loss:
            weights = cfg.stage2.weights(cfg.loss)
            if cfg.stage2.lr > 0:  # stage 2 caps the learning rate
                for group in optimizer.param_groups:
                    group["lr"] = min(group["lr"], cfg.stage2.lr)
            if best_epoch < cfg.stage2.start_epoch:  # entering stage 2 (not resuming inside it): new loss scale
                best = math.inf
                scheduler.best, scheduler.num_bad_epochs = math.inf, 0
            bar.write(f"epoch {epoch}: stage 2, loss weights {weights.__dict__}, "
                      f"lr {optimizer.param_groups[0]['lr']:.1e}")
        model.train()
        train_sum, n_batches = 0.0, 0
        for batch in batches(frames, split["train"], opts.batch_size, elements, radius, rng):
            batch = batch.to(device)
            optimizer.zero_grad(set_to_none=True)
            loss = total_loss(loss_terms(predict(model, batch, create_graph=True), batch), weights)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 10.0)
            optimizer.step()
            step += 1
            decay = min(opts.ema_decay, (1.0 + step) / (10.0 + step))  # warm-up: early steps count fully
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)
            train_sum += float(loss.detach())
            n_batches += 1
        val_metrics, val_loss = Metrics(), 0.0
        for batch in val_batches:
            pred = predict(ema, batch, create_graph=False)
            val_loss += float(total_loss(loss_terms(pred, batch), weights).detach())
            val_metrics.update(pred, batch)
        val_loss /= max(len(val_batches), 1)
        scheduler.step(val_loss)
        lr = optimizer.param_groups[0]["lr"]
        record = {"epoch": epoch, "train_loss": train_sum / max(n_batches, 1), "val_loss": val_loss, "lr": lr,
                  "val_energy_mae_meV": val_metrics.mae("energy"), "val_force_mae_meV_per_A": val_metrics.mae("forces"),
                  "minutes": (time.time() - started) / 60.0}
        history.append(record)
        if val_loss < best:
            best, best_epoch = val_loss, epoch
            save_model(ema, model_path, metadata={"config": cfg.as_dict(), "epoch": epoch, "statistics": stats,
                                                  "validation": val_metrics.summary()})
        bar.set_postfix(loss=f"{record['train_loss']:.3g}", val_E=f"{record['val_energy_mae_meV']:.2f}meV",
                        val_F=f"{record['val_force_mae_meV_per_A']:.1f}meV/A", lr=f"{lr:.1e}")
        _save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema.state_dict(),
                                     "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                     "history": json.dumps(history), "best": best, "best_epoch": best_epoch,
                                     "epoch": epoch, "step": step})
        if epoch - best_epoch >= opts.patience:
            stop_reason = f"early stop: no validation improvement for {opts.patience} epochs"
            break
        if record["minutes"] >= opts.max_minutes:
            stop_reason = f"time budget of {opts.max_minutes} min reached"
            break
    bar.close()
    (out / "history.json").write_text(json.dumps(history, indent=1))
    learning_curve(history, out / "learning_curve.png")

    from ..model.io import load_model, read_model_file

    best_model = load_model(model_path, device).to(dtype)
    test, pairs = evaluate_frames(best_model, frames, split["test"], elements, radius, device, opts.batch_size)
    summary = {**test.summary(), "best_epoch": best_epoch, "epochs_run": len(history), "stop": stop_reason}
    (out / "test_metrics.json").write_text(json.dumps(summary, indent=1))
    metadata = read_model_file(model_path)["metadata"]
    metadata["test_metrics"] = summary
    save_model(best_model, model_path, metadata=metadata)
    return {"model": str(model_path), "test": summary, "history": history}

