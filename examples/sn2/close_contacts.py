"""Close-contact frames for the SN2 training set: water pushed against the solute.

ML/MM umbrella sampling with a model trained only on OpenMM configurations found
a hole: a water oxygen 2.2-2.6 A from the methyl carbon (closer than any
OpenMM frame) made the model energy drop by eV and the run blow up. This script
adds such contacts to the data: from frames spread over the reaction coordinate
it takes the water nearest to the carbon (or to a methyl hydrogen) and moves it
rigidly, along the line joining them, to a random distance inside the range
the training frames lacked. Frames where the moved water overlaps another atom
are skipped. The result is unlabelled; label it with `qmmm-driver label`.

    python examples/sn2/close_contacts.py --out contacts.extxyz --frames 80
    qmmm-driver label contacts.extxyz --out examples/sn2/data/sn2_contacts.extxyz --spread
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from qmmm_driver.structures import QMMMStructure, augmented, read_structures, write_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR

HERE = Path(__file__).resolve().parent
# QM atom (index in the frame), O-atom distance range (A), probability
TARGETS = (("C", 0, (2.3, 3.0), 0.6), ("H", None, (2.0, 2.6), 0.4))
MIN_CLEARANCE_A = 1.6  # moved water vs every other atom


def push_water(frame: QMMMStructure, rng: np.random.Generator) -> QMMMStructure | None:
    """A copy of ``frame`` with one water moved against the solute, or None if it would overlap."""
    z = frame.numbers
    qm, mm = frame.qm_indices, frame.mm_indices
    probs = np.array([t[3] for t in TARGETS])
    _, fixed, (lo, hi), _ = TARGETS[rng.choice(len(TARGETS), p=probs)]
    target = fixed if fixed is not None else int(rng.choice([i for i in qm if z[i] == 1]))
    oxygens = [i for i in mm if z[i] == 8 and i + 2 < len(z) and z[i + 1] == 1 == z[i + 2]]
    d = np.linalg.norm(frame.positions[oxygens] - frame.positions[target], axis=1)
    o = oxygens[int(np.argmin(d))]
    u = (frame.positions[o] - frame.positions[target]) / d.min()
    shift = frame.positions[target] + u * rng.uniform(lo, hi) * ANGSTROM_TO_BOHR - frame.positions[o]
    pos = frame.positions.copy()
    pos[o:o + 3] += shift
    others = np.setdiff1d(np.arange(len(pos)), [o, o + 1, o + 2, target])
    gap = np.linalg.norm(pos[o:o + 3, None] - pos[None, others], axis=-1).min()
    if gap < MIN_CLEARANCE_A * ANGSTROM_TO_BOHR:
        return None
    reached = np.linalg.norm(pos[o] - pos[target]) / ANGSTROM_TO_BOHR
    return frame.moved(pos, environment="close contact",
                       augmented=f"water {o} pushed to {reached:.2f} A of QM atom {target}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", type=Path, default=HERE / "data" / "sn2_bulk.extxyz.xz")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=80)
    p.add_argument("--seed", type=int, default=11)
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    made = augmented(read_structures(args.source), lambda frame: push_water(frame, rng), args.frames, rng)
    write_structures(args.out, made)
    print(f"wrote {len(made)} close-contact frames to {args.out}")


if __name__ == "__main__":
    main()
