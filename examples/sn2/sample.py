"""Unlabelled SN2 frames along the reaction coordinate: umbrella windows of OpenMM MD around a held solute.

    python examples/sn2/sample.py --out frames.extxyz --frames 85 [--windows=-2.0:2.0:17] \
        [--solvent methanol] [--ion Mg2+ --ion-distance 3.0:6.0] [--charge-noise 0.15]

In each window the solute atoms are held (k = 50 000 kJ/mol/nm^2, about 0.07 A
thermal spread per coordinate at 300 K) to the reference geometry at that xi
(``solute.geometry``), with charges interpolated between reactant and product,
while the solvent equilibrates around it (``--window-equilibrate`` ps per
window). Every option of ``qmmm-driver sample`` applies (solvent, ion, charge
noise, box, interval); ``--qm-noise`` defaults to 0 here (the windows spread
the solute).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import solute as sn2  # noqa: E402


def main(argv=None) -> int:
    from tqdm import tqdm

    from qmmm_driver.cli.sample import configure, make_sampler
    from qmmm_driver.errors import InputError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    parser.add_argument("--windows", default="-2.0:2.0:17",
                        help="umbrella windows in xi (A) as start:stop:count; write --windows=-2.0:2.0:17 (a value "
                             "starting with - needs the =)")
    parser.add_argument("--window-equilibrate", type=float, default=2.0, help="ps at each new window (default 2)")
    parser.set_defaults(qm_noise=0.0, solute="sn2")
    args = parser.parse_args(argv)
    try:
        start, stop, count = args.windows.split(":")
        windows = np.linspace(float(start), float(stop), int(count))
    except ValueError:
        raise SystemExit(f"--windows '{args.windows}' is not start:stop:count (e.g. -2.0:2.0:17)")
    per_window = np.full(len(windows), args.frames // len(windows))
    per_window[: args.frames % len(windows)] += 1

    def window(sampler, xi0: float) -> None:
        sampler.hold_qm(sn2.geometry(xi0))
        sampler.set_qm_charges(sn2.charges(xi0))

    try:
        sampler, info = make_sampler(args, sn2.solute(float(windows[0])), lambda s: window(s, float(windows[0])))
    except InputError as err:
        raise SystemExit(f"error: {err}")
    with tqdm(total=args.frames, desc="sampling sn2", unit="frame") as bar:
        for k, (xi0, n) in enumerate(zip(windows, per_window)):
            if k > 0:
                window(sampler, float(xi0))
                sampler.equilibrate(args.window_equilibrate)
            sampler.sample(args.out, n, args.interval, args.qm_noise, args.charge_noise,
                           dict(info, window_xi=round(float(xi0), 4)), bar)
    print(f"wrote {args.frames} frames to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
