"""``qmmm-driver train CONFIG``: fit the model to labelled frames (the config: :mod:`.config`).

Outputs in ``[training] output``: ``model.pt`` (best validation loss, weights
averaged over steps, with test and transfer metrics in its metadata),
``checkpoint.pt`` (resume with ``--resume``), ``split.json``, ``history.json``,
``test_metrics.json`` and ``learning_curve.png``.
"""

from __future__ import annotations

import io
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..nn import QMMMModel
from ..nn.io import ModelFileError, load_model, save_model
from ..nn.settings import PARAMETER_FREE
from ..files import write_atomically
from ..structures import read_structures
from ..units import ANGSTROM_TO_BOHR, HARTREE
from .config import TrainConfig
from .data import batches, elements_of, prepare, rows_in, split_indices
from .loss import loss_terms, predict, total_loss
from .metrics import Metrics, evaluate_structures
from .statistics import fit_statistics, training_domain


def _save_checkpoint(path: Path, state: dict) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomically(path, buffer.getvalue())


class Trainer:
    """One training run: data, model, optimiser, the epoch loop, checkpoints and the final scores."""

    def __init__(self, cfg: TrainConfig, resume: bool = False, progress: bool = True):
        from ..parallel import select_device

        self.cfg, self.opts, self.progress = cfg, cfg.training, progress
        self.out = cfg.path(self.opts.output)
        self.out.mkdir(parents=True, exist_ok=True)
        self.device = select_device(self.opts.device)
        self.dtype = {"float32": torch.float32, "float64": torch.float64}[self.opts.dtype]
        if self.opts.threads > 0:
            torch.set_num_threads(self.opts.threads)
        torch.manual_seed(self.opts.seed)
        self.rng = np.random.default_rng(self.opts.seed)
        self._load_data(resume)
        self._build()
        self.history: list[dict] = []
        self.best, self.best_epoch, self.start_epoch, self.step = math.inf, -1, 0, 0
        self.stage2_active = False
        if resume:
            self._restore()

    # ---- setup
    def _load_data(self, resume: bool) -> None:
        """Frames, split and training tensors. split.json numbers frames as they are in the files (all of
        them, in the order of 'files'), so that ``qmmm-driver evaluate --split`` finds them; frames left out by
        ``max_energy_above_median`` are in no part. ``self.split`` numbers the frames that are kept."""
        cfg = self.cfg
        frames, kept, counts, weights = [], [], [], []
        for name in cfg.data.files:
            these = read_structures(cfg.path(name), require_labels=True)
            weights += [float(cfg.data.weights.get(name, 1.0))] * len(these)
            keep = np.ones(len(these), dtype=bool)
            if cfg.data.max_energy_above_median > 0:
                keep = self._within_energy_limit(these, name, cfg.data.max_energy_above_median)
            kept += (len(frames) + np.flatnonzero(keep)).tolist()
            frames += these
            counts.append(len(these))
        self.structures = [frames[i] for i in kept]
        split_file = self.out / "split.json"
        if resume and split_file.exists():
            in_files = json.loads(split_file.read_text())
        else:
            in_files = self._new_split(counts, kept)
            write_atomically(split_file, json.dumps({"files": cfg.data.files, **in_files}))
        position = {k: p for p, k in enumerate(kept)}
        self.split = {part: [position[k] for k in in_files[part] if k in position]
                      for part in ("train", "validation", "test")}
        self.settings = cfg.settings(elements_of(self.structures))
        self.loss_radius = cfg.data.mm_force_radius * ANGSTROM_TO_BOHR
        short = self.settings.short_range_cutoff if self.settings.short_range else 0.0
        self.sets = prepare(self.structures, self.settings.elements, self.settings.env_order,
                            max(self.loss_radius, short), self.loss_radius, short, [weights[i] for i in kept])
        self.rows = {name: rows_in(self.sets, self.split[name]) for name in ("train", "validation", "test")}

    @staticmethod
    def _within_energy_limit(frames: list, name: str, limit_eV: float) -> np.ndarray:
        """Which frames of one file have an energy at most ``limit_eV`` above the file's median."""
        from tqdm import tqdm

        energy = np.array([f.energy for f in frames]) * HARTREE
        keep = energy - np.median(energy) <= limit_eV
        if not keep.all():
            tqdm.write(f"{name}: left out {int((~keep).sum())} of {len(frames)} frames more than {limit_eV:g} eV "
                       f"above the file's median energy (max_energy_above_median)")
        return keep

    def _new_split(self, counts: list[int], kept: list[int]) -> dict[str, list[int]]:
        """Train/validation/test frames (numbered as in the files; only ``kept`` ones): at random with the seed,
        or, with ``keep_split``, the frames of the files of an earlier run's split.json where they were (so that
        a fine-tuned model is never tested on frames its starting model trained on) and the frames of the
        other files at random."""
        data = self.cfg.data
        fractions = tuple(data.split)
        n_old, parts = 0, {"train": [], "validation": [], "test": []}
        if data.keep_split:
            path = self.cfg.path(data.keep_split)
            try:
                old = json.loads(path.read_text())
                old_files, parts = list(old["files"]), {k: list(old[k]) for k in parts}
            except (OSError, ValueError, KeyError, TypeError) as err:
                raise InputError(f"[data] keep_split: cannot read a split from {path}: {err}") from None
            if data.files[:len(old_files)] != old_files:
                raise InputError(f"[data] keep_split: {path} splits the files {old_files}; 'files' must start "
                                 f"with them, in that order (it starts with {data.files[:len(old_files)]})")
            n_old = sum(counts[:len(old_files)])
            listed = sorted(sum(parts.values(), []))
            if len(set(listed)) != len(listed) or (listed and not 0 <= listed[0] <= listed[-1] < n_old):
                raise InputError(f"[data] keep_split: {path} does not split the {n_old} frames its files hold "
                                 f"now (were frames added to them?)")
            kept_set = set(kept)
            parts = {k: [i for i in v if i in kept_set] for k, v in parts.items()}
        new = [k for k in kept if k >= n_old]
        if new:
            chosen = split_indices(len(new), fractions, data.seed)
            parts = {k: parts[k] + [new[i] for i in chosen[k]] for k in parts}
        return parts

    def _build(self) -> None:
        if self.opts.init:
            self.model, self.stats = self._initial_model(self.cfg.path(self.opts.init))
        else:
            self.model = QMMMModel(self.settings)
            self.stats = fit_statistics(self.model, self.sets, self.rows["train"])
        self.stats["domain"] = training_domain(self.model, self.sets, self.rows["train"])  # fine-tuning widens it
        self.model = self.model.to(self.device, self.dtype)
        self.ema = QMMMModel(self.settings).to(self.device, self.dtype)
        self.ema.load_state_dict(self.model.state_dict())
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.opts.lr, amsgrad=True)
        self.scheduler = self._new_scheduler()

    def _initial_model(self, path: Path) -> tuple[QMMMModel, dict]:
        """The model of ``[training] init`` (fine-tuning): its weights and its training statistics, kept."""
        try:
            model = load_model(path)
        except ModelFileError as err:
            raise InputError(f"[training] init: {err}") from err
        mine, theirs = self.settings.to_dict(), model.settings.to_dict()
        differ = {k: (mine[k], theirs[k]) for k in mine if mine[k] != theirs[k]}
        if list(differ) == ["n_layers"] and mine["n_layers"] > theirs["n_layers"]:
            from tqdm import tqdm

            model = model.deepened(mine["n_layers"])
            tqdm.write(f"[training] init: {path} has {theirs['n_layers']} interaction blocks, [model] asks for "
                       f"{mine['n_layers']}: the new blocks go before the last with zero output weights, so "
                       f"training starts from exactly that model")
            differ = {}
        switched = {k: a for k, (a, b) in differ.items() if k in PARAMETER_FREE}
        if switched:
            from tqdm import tqdm

            model = model.with_settings(**switched)
            tqdm.write(f"[training] init: {path} fine-tuned with {switched} (terms without weights: training "
                       f"starts from the same weights)")
            differ = {k: v for k, v in differ.items() if k not in switched}
        if differ:
            detail = "; ".join(f"{k}: config {a!r}, model {b!r}" for k, (a, b) in differ.items())
            raise InputError(f"[training] init: {path} was trained with other model settings ({detail}); give "
                             f"[model] the settings of the model to fine-tune")
        return model, {**model.metadata.get("statistics", {}), "init": str(path)}

    def _new_scheduler(self):
        return torch.optim.lr_scheduler.ReduceLROnPlateau(self.optimizer, factor=self.opts.lr_factor,
                                                          patience=self.opts.lr_patience, min_lr=self.opts.min_lr)

    def _restore(self) -> None:
        path = self.out / "checkpoint.pt"
        if not path.exists():
            raise InputError(f"--resume: no checkpoint at {path}")
        ckpt = torch.load(path, map_location=self.device, weights_only=True)
        self.model.load_state_dict(ckpt["model"])
        self.ema.load_state_dict(ckpt["ema"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.stage2_active = bool(ckpt.get("stage2_active", False))
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.history = json.loads(ckpt["history"])
        self.best, self.best_epoch, self.start_epoch = ckpt["best"], ckpt["best_epoch"], ckpt["epoch"] + 1
        self.step = ckpt["step"]
        self.rng = np.random.default_rng(self.opts.seed + self.start_epoch)

    # ---- one epoch
    def _weights(self, epoch: int, bar):
        stage2 = self.cfg.stage2
        if stage2 is None or epoch < stage2.start_epoch:
            return self.cfg.loss
        if not self.stage2_active:  # entering stage 2: new loss scale, so a new best and a new plateau count
            self.stage2_active = True
            if stage2.lr > 0:
                for group in self.optimizer.param_groups:
                    group["lr"] = min(group["lr"], stage2.lr)
            self.best = math.inf
            self.scheduler = self._new_scheduler()
            bar.write(f"epoch {epoch}: stage 2, loss weights {stage2.weights(self.cfg.loss).__dict__}, "
                      f"lr {self.optimizer.param_groups[0]['lr']:.1e}")
        return stage2.weights(self.cfg.loss)

    def _update_ema(self) -> None:
        decay = min(self.opts.ema_decay, (1.0 + self.step) / (10.0 + self.step))  # warm-up: early steps count fully
        with torch.no_grad():
            for pe, pm in zip(self.ema.parameters(), self.model.parameters()):
                pe.mul_(decay).add_(pm.detach(), alpha=1.0 - decay)

    def train_epoch(self, weights) -> float:
        self.model.train()
        total, n = 0.0, 0
        for batch in batches(self.sets, self.rows["train"], self.opts.batch_size, self.rng, self.device):
            self.optimizer.zero_grad(set_to_none=True)
            loss = total_loss(loss_terms(predict(self.model, batch, create_graph=True), batch), weights)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 10.0)
            self.optimizer.step()
            self.step += 1
            self._update_ema()
            total += float(loss.detach())
            n += 1
        return total / max(n, 1)

    def validate(self, weights) -> tuple[float, Metrics]:
        metrics, total, n = Metrics(), 0.0, 0
        for batch in batches(self.sets, self.rows["validation"], self.opts.batch_size, device=self.device):
            pred = predict(self.ema, batch, create_graph=False)
            total += float(total_loss(loss_terms(pred, batch), weights).detach())
            n += 1
            metrics.add_frames(pred["energy"].detach().cpu(), batch.energy.cpu(),
                               pred["qm_forces"].detach().double().cpu(), batch.qm_forces.cpu())
        return total / max(n, 1), metrics

    # ---- the run
    def run(self) -> dict:
        from tqdm import tqdm

        started = time.time() - 60.0 * (self.history[-1]["minutes"] if self.history else 0.0)
        bar = tqdm(range(self.start_epoch, self.opts.epochs), desc="training", unit="epoch",
                   disable=not self.progress, initial=self.start_epoch, total=self.opts.epochs)
        model_path = self.out / "model.pt"
        try:
            stop_reason = self._epochs(bar, started, model_path)
        except KeyboardInterrupt:  # Ctrl-C or a stop signal: the epochs done so far are on disk, resumable
            self._write_history()
            raise
        finally:
            bar.close()
        return self.finish(model_path, stop_reason)

    def _epochs(self, bar, started: float, model_path: Path) -> str:
        """Train over ``bar``'s epochs, saving the best model and a checkpoint after each; returns why it
        stopped."""
        for epoch in bar:
            weights = self._weights(epoch, bar)
            epoch_started = time.time()
            train_loss = self.train_epoch(weights)
            val_loss, val = self.validate(weights)
            self.scheduler.step(val_loss)
            record = {"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss,
                      "lr": self.optimizer.param_groups[0]["lr"], "val_energy_mae_meV": val.mae("energy"),
                      "val_force_mae_meV_per_A": val.mae("forces"), "epoch_seconds": time.time() - epoch_started,
                      "minutes": (time.time() - started) / 60.0}
            self.history.append(record)
            if val_loss < self.best:
                self.best, self.best_epoch = val_loss, epoch
                save_model(self.ema, model_path, metadata={"config": self.cfg.as_dict(), "epoch": epoch,
                                                           "statistics": self.stats})
            bar.set_postfix(loss=f"{train_loss:.3g}", val_E=f"{record['val_energy_mae_meV']:.2f}meV",
                            val_F=f"{record['val_force_mae_meV_per_A']:.1f}meV/A", lr=f"{record['lr']:.1e}")
            _save_checkpoint(self.out / "checkpoint.pt", {
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "stage2_active": self.stage2_active, "history": json.dumps(self.history), "best": self.best,
                "best_epoch": self.best_epoch, "epoch": epoch, "step": self.step})
            if epoch - self.best_epoch >= self.opts.patience:
                return f"early stop: no validation improvement for {self.opts.patience} epochs"
            if record["minutes"] >= self.opts.max_minutes:
                return f"time budget of {self.opts.max_minutes} min reached"
        return "epochs done"

    def _write_history(self) -> None:
        """``history.json`` and ``learning_curve.png`` of the epochs run so far."""
        from ..plots import learning_curve

        if self.history:
            write_atomically(self.out / "history.json", json.dumps(self.history, indent=1))
            learning_curve(self.history, self.out / "learning_curve.png")

    def finish(self, model_path: Path, stop_reason: str) -> dict:
        """Score the best model on the test split and the transfer sets; write the metrics and plots."""
        self._write_history()
        if not model_path.exists():
            raise InputError(f"no model was saved in {self.out} (no epoch ran)")
        best = load_model(model_path, self.device)
        test, _ = evaluate_structures(best, [self.structures[i] for i in self.split["test"]], self.loss_radius,
                                      self.device, self.dtype)
        summary = {**test.summary(), "best_epoch": self.best_epoch, "epochs_run": len(self.history),
                   "seconds_per_epoch": float(np.median([h["epoch_seconds"] for h in self.history])),
                   "stop": stop_reason, "transfer": {}}
        for name in self.cfg.data.transfer:
            frames = read_structures(self.cfg.path(name), require_labels=True)
            metrics, _ = evaluate_structures(best, frames, self.loss_radius, self.device, self.dtype)
            summary["transfer"][name] = metrics.summary()
        write_atomically(self.out / "test_metrics.json", json.dumps(summary, indent=1))
        save_model(best, model_path, metadata={**best.metadata, "test_metrics": summary})
        return {"model": str(model_path), "test": summary, "history": self.history}


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True) -> dict:
    """Train as configured; returns the test metrics and output paths."""
    return Trainer(cfg, resume, progress).run()
