"""Frames with the hydroxyl hydrogen pushed along its hydrogen bond, for training (to be labelled with PySCF).

Plain sampling (and Gaussian QM noise) rarely stretches the O-H bond of the side chain towards the water
oxygen it donates to, so a model trained on it can find a false minimum there: the proton moves onto the
MM water, whose point charge attracts it without the repulsion of a real molecule (the first ML/MM run of
this example did exactly that after 0.13 ps; PySCF puts the same path 1-1.6 eV uphill). This script takes
frames (labelled or not), finds the nearest MM oxygen of each hydroxyl hydrogen (the acceptor, within
2.6 A; else the bond direction) and moves the hydrogen towards it by a random 0.05-0.5 A, labels dropped.

    python examples/serine/hydroxyl_frames.py examples/serine/data/ser_water_a.extxyz.xz runs/ser_hbond.extxyz
    qmmm-driver label runs/ser_hbond.extxyz --out runs/ser_hbond_labelled.extxyz
"""

from __future__ import annotations

import argparse

import numpy as np

from qmmm_driver.structures import read_structures, write_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR


def pushed(frame, rng, oxygen: int, hydrogen: int, reach_A: float = 2.6):
    """``frame`` with QM atom ``hydrogen`` moved from QM atom ``oxygen`` towards its acceptor; labels dropped."""
    pos = frame.positions.copy()
    o, h = pos[frame.qm_indices[oxygen]], pos[frame.qm_indices[hydrogen]]
    mm_o = [i for i in frame.mm_indices if frame.numbers[i] == 8 and frame.mm_charge[i] < 0]
    d = np.linalg.norm(pos[mm_o] - h, axis=1)
    target = pos[mm_o[int(np.argmin(d))]] if len(d) and d.min() < reach_A * ANGSTROM_TO_BOHR else 2 * h - o
    direction = (target - h) / np.linalg.norm(target - h)
    shift_A = rng.uniform(0.05, 0.5)
    pos[frame.qm_indices[hydrogen]] = h + direction * shift_A * ANGSTROM_TO_BOHR
    return frame.moved(pos, hydroxyl_push_A=round(shift_A, 4))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("frames", help="frames of the serine example (extxyz, .xz allowed)")
    p.add_argument("out", help="frames to label (extxyz)")
    p.add_argument("--count", type=int, default=40, help="frames to write (every k-th input frame)")
    p.add_argument("--oxygen", type=int, default=3, help="position of OG among the QM atoms")
    p.add_argument("--hydrogen", type=int, default=4, help="position of HG among the QM atoms")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    frames = read_structures(args.frames)
    if not frames:
        raise SystemExit(f"{args.frames}: no frames")
    first = frames[0]
    if first.numbers[first.qm_indices[args.oxygen]] != 8 or first.numbers[first.qm_indices[args.hydrogen]] != 1:
        raise SystemExit(f"{args.frames}: QM atoms {args.oxygen} and {args.hydrogen} are not O and H "
                         f"({first.qm_symbols}); give --oxygen and --hydrogen")
    rng = np.random.default_rng(args.seed)
    step = max(len(frames) // args.count, 1)
    out = [pushed(f, rng, args.oxygen, args.hydrogen) for f in frames[::step][:args.count]]
    write_structures(args.out, out)
    print(f"wrote {len(out)} frames to {args.out}")


if __name__ == "__main__":
    main()
