"""``qmmm-driver label``: reference labels with PySCF (see :mod:`qmmm_driver.labelling`)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from ..errors import InputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("frames", type=Path, help="unlabelled frames (extended XYZ)")
    parser.add_argument("--out", type=Path, required=True, help="labelled frames (appended; rerun to resume)")
    parser.add_argument("--xc", default="b3lyp", help="exchange-correlation functional (default b3lyp)")
    parser.add_argument("--basis", default="6-31+g*", help="basis set (default 6-31+g*)")
    parser.add_argument("--no-density-fit", action="store_true", help="exact Coulomb/exchange instead of density fitting")
    parser.add_argument("--conv-tol", type=float, default=1e-10, help="SCF energy convergence, Hartree (default 1e-10)")
    parser.add_argument("--threads", type=int, default=None, help="PySCF threads (default: all cores)")
    parser.add_argument("--limit", type=int, default=None, help="label at most this many new frames")
    parser.add_argument("--spread", action="store_true",
                        help="label frames in a fixed shuffled order, so that an unfinished run is an unbiased "
                             "subset of the file (e.g. covers every umbrella window); resuming keeps the order")
    parser.add_argument("--decimals", type=int, default=6,
                        help="decimals of per-atom numbers in the output (default 6: 1e-6 A, e, eV/A)")


def main(args: argparse.Namespace) -> int:
    from pyscf import lib

    from ..labelling import label_file

    lib.num_threads(args.threads or os.cpu_count())
    if args.out.resolve() == args.frames.resolve():
        raise InputError("--out must differ from the input frames")
    n_ok, n_bad = label_file(args.frames, args.out, args.xc, args.basis, not args.no_density_fit,
                             args.conv_tol, args.limit, args.decimals, spread=args.spread)
    print(f"labelled {n_ok} frames into {args.out}; {n_bad} failed")
    return 0
