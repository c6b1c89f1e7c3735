"""``qmmm-driver train``: the command line of :mod:`qmmm_driver.training.trainer` (see there for the config)."""

from __future__ import annotations

import argparse
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", type=Path, help="training config (TOML)")
    parser.add_argument("--resume", action="store_true", help="continue from OUTPUT/checkpoint.pt")
    parser.add_argument("--device", default=None, help="override [training] device")
    parser.add_argument("--max-minutes", type=float, default=None, help="override [training] max_minutes")
    parser.add_argument("--epochs", type=int, default=None, help="override [training] epochs")
    parser.add_argument("--output", default=None, help="override [training] output directory")


def main(args: argparse.Namespace) -> int:
    from .trainer import load_config, train

    cfg = load_config(args.config, {"device": args.device, "max_minutes": args.max_minutes,
                                    "epochs": args.epochs, "output": args.output})
    result = train(cfg, resume=args.resume)
    t = result["test"]
    print(f"model: {result['model']}")
    print(f"test ({t['n_frames']} frames): energy MAE {t['energy_mae_meV']:.3f} meV, QM force MAE "
          f"{t['force_mae_meV_per_A']:.2f} meV/A, MM force MAE {t['mm_force_mae_meV_per_A']:.2f} meV/A, "
          f"charge MAE {t['charge_mae_e']:.4f} e  [{t['stop']}]")
    return 0
