"""``qmmm-driver evaluate``: errors of a model on labelled frames (meV, meV/A, e)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .errors import InputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model file")
    parser.add_argument("--data", required=True, type=Path, nargs="+", help="labelled frames (extended XYZ)")
    parser.add_argument("--split", type=Path, default=None,
                        help="split.json of a training run: evaluate only its --subset frames")
    parser.add_argument("--subset", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--mm-radius", type=float, default=6.0,
                        help="MM forces of atoms within this distance (A) of a QM atom are scored (default 6)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--parity", type=Path, default=None, help="write a parity plot (PNG) here")


def main(args: argparse.Namespace) -> int:
    import torch

    from .frames import read_frames
    from .model.io import load_model
    from .parallel import select_device
    from .plots import parity
    from .training.trainer import evaluate_frames
    from .units import ANGSTROM_TO_BOHR

    device = select_device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = load_model(args.model, device).to(dtype)
    frames = []
    for path in args.data:
        frames += read_frames(path, require_labels=True)
    indices = list(range(len(frames)))
    if args.split is not None:
        if not args.split.is_file():
            raise InputError(f"split file {args.split} does not exist")
        indices = json.loads(args.split.read_text())[args.subset]
        if max(indices, default=-1) >= len(frames):
            raise InputError(f"{args.split} names frame {max(indices)}, but --data holds {len(frames)} frames; "
                             "pass the same files, in the same order, as the training config")
    metrics, pairs = evaluate_frames(model, frames, indices, model.elements, args.mm_radius * ANGSTROM_TO_BOHR,
                                     device, args.batch_size)
    summary = metrics.summary()
    if args.parity is not None:
        parity(pairs, args.parity, title=f"{args.model.name} on {len(indices)} frames")
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"frames: {summary['n_frames']}")
        print(f"energy      MAE {summary['energy_mae_meV']:10.3f} meV      RMSE {summary['energy_rmse_meV']:10.3f} meV")
        print(f"QM forces   MAE {summary['force_mae_meV_per_A']:10.2f} meV/A    RMSE {summary['force_rmse_meV_per_A']:10.2f} meV/A")
        print(f"MM forces   MAE {summary['mm_force_mae_meV_per_A']:10.2f} meV/A    RMSE {summary['mm_force_rmse_meV_per_A']:10.2f} meV/A"
              f"  (within {args.mm_radius} A of the QM region)")
        print(f"QM charges  MAE {summary['charge_mae_e']:10.4f} e")
        if args.parity is not None:
            print(f"parity plot: {args.parity}")
    return 0
