"""``qmmm-driver train CONFIG``: fit the model to labelled frames (see :mod:`qmmm_driver.training.loop`)."""

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


def _fmt(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def main(args: argparse.Namespace) -> int:
    from ..training.config import load_config
    from ..training.loop import train

    cfg = load_config(args.config, {"device": args.device, "max_minutes": args.max_minutes,
                                    "epochs": args.epochs, "output": args.output})
    result = train(cfg, resume=args.resume)
    t = result["test"]
    print(f"model: {result['model']}")
    print(f"test ({t['n_frames']} frames): energy MAE {_fmt(t['energy_mae_meV'], '.3f')} meV (mean signed "
          f"{_fmt(t['energy_mean_signed_meV'], '+.3f')}), QM force MAE {_fmt(t['force_mae_meV_per_A'], '.2f')} meV/A, "
          f"MM force MAE {_fmt(t['mm_force_mae_meV_per_A'], '.2f')} meV/A, charge MAE "
          f"{_fmt(t['charge_mae_e'], '.4f')} e  [{t['stop']}]")
    for name, m in t["transfer"].items():
        print(f"transfer {name} ({m['n_frames']} frames): energy MAE {_fmt(m['energy_mae_meV'], '.3f')} meV "
              f"(mean signed {_fmt(m['energy_mean_signed_meV'], '+.3f')}), QM force MAE "
              f"{_fmt(m['force_mae_meV_per_A'], '.2f')} meV/A")
    return 0
