"""``qmmm-driver evaluate``: errors of a model on labelled frames (meV, meV/A, e), on the driver's own path."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model file")
    parser.add_argument("--data", required=True, type=Path, nargs="+", help="labelled frames (extended XYZ)")
    parser.add_argument("--split", type=Path, default=None,
                        help="split.json of a training run: evaluate only its --subset frames")
    parser.add_argument("--subset", default="test", choices=["train", "validation", "test"])
    parser.add_argument("--mm-radius", type=float, default=6.0,
                        help="MM forces of atoms within this distance (A) of a QM atom are scored (default 6)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--json", action="store_true", help="print one JSON object (null where a label is missing)")
    parser.add_argument("--parity", type=Path, default=None, help="write a parity plot (PNG) here")


def _fmt(value, spec: str) -> str:
    return "       n/a" if value is None else format(value, spec)


def main(args: argparse.Namespace) -> int:
    import torch

    from ..evaluator import load
    from ..parallel import select_device
    from ..plots import parity
    from ..structures import read_structures
    from ..training.data import split_frames
    from ..training.metrics import evaluate_structures
    from ..units import ANGSTROM_TO_BOHR

    device = select_device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = load(args.model, device)
    if args.split is not None:
        frames = [s for selected in split_frames(args.split, args.subset, args.data) for s in selected]
    else:
        frames = [s for path in args.data for s in read_structures(path, require_labels=True)]
    metrics, pairs = evaluate_structures(model, frames, args.mm_radius * ANGSTROM_TO_BOHR, device, dtype,
                                         progress=not args.json)
    summary = metrics.summary()
    if args.parity is not None:
        parity(pairs, args.parity, title=f"{args.model.name} on {len(frames)} frames")
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"frames: {summary['n_frames']}")
    print(f"energy      MAE {_fmt(summary['energy_mae_meV'], '10.3f')} meV      RMSE "
          f"{_fmt(summary['energy_rmse_meV'], '10.3f')} meV    mean signed {_fmt(summary['energy_mean_signed_meV'], '+10.3f')} meV")
    print(f"QM forces   MAE {_fmt(summary['force_mae_meV_per_A'], '10.2f')} meV/A    RMSE "
          f"{_fmt(summary['force_rmse_meV_per_A'], '10.2f')} meV/A")
    print(f"MM forces   MAE {_fmt(summary['mm_force_mae_meV_per_A'], '10.2f')} meV/A    RMSE "
          f"{_fmt(summary['mm_force_rmse_meV_per_A'], '10.2f')} meV/A  (within {args.mm_radius} A of the QM region)")
    print(f"QM charges  MAE {_fmt(summary['charge_mae_e'], '10.4f')} e")
    if summary["frames_outside_domain"]:
        print(f"outside the training domain: {summary['frames_outside_domain']} frames (by up to "
              f"{summary['largest_excursion_A']:.2f} A; README, 'Training domain')")
    if args.parity is not None:
        print(f"parity plot: {args.parity}")
    return 0
