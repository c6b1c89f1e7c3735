"""Displaced-cation frames for the SN2 training set: a cation end-on to a chloride, moved along their axis.

In every sampled end-on frame the cation sits at its own contact distance from
the chloride (Mg2+ 2.6-2.7 A, Sr2+ 3.0-3.1, Ba2+ 3.1-3.2), with its own hydration
shell, so distance and shell always come together. A model trained on such
frames is right at each cation's own distance and wrong off it: moving the
cation of a training frame along the chloride-cation axis to 2.5 or 3.4 A
(0.3-0.6 A from where it was sampled) gave energy errors of 10-295 meV against
the reference, where at its sampled place the error was a few meV (README, "Off
the sampled distance", which also says what training on these frames did). This
script takes the training frames (``split.json`` beside it, ``train``) of the
end-on files and moves the cation nearest a chlorine, alone, along the
chlorine-cation axis to a random distance in ``--range`` (A), so that distance
and shell vary apart. Frames with no cation within ``CONTACT_A`` of a chlorine,
or where the moved cation would come closer than ``MIN_CLEARANCE_A`` to another
QM atom, are skipped. The result is unlabelled; label it with `qmmm-driver label`.

    python examples/sn2/displaced_cations.py --out displaced.extxyz --frames 160
    qmmm-driver label displaced.extxyz --out examples/sn2/data/sn2_displaced.extxyz --spread
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from ase.data import atomic_numbers

from qmmm_driver.mm.systems import IONS
from qmmm_driver.structures import QMMMStructure, augmented, write_structures
from qmmm_driver.training.data import split_frames
from qmmm_driver.units import ANGSTROM_TO_BOHR

HERE = Path(__file__).resolve().parent
SOURCES = ("data/sn2_end_on.extxyz.xz", "data/sn2_end_on2.extxyz.xz")
CATIONS = {atomic_numbers[element] for _, element, charge in IONS.values() if charge > 0}  # those of `sample --ion`
CHLORINE = 17
CONTACT_A = 3.6  # a cation this close to a chlorine is in contact with it
MIN_CLEARANCE_A = 2.0  # moved cation vs every QM atom but the chlorine


def displace(frame: QMMMStructure, distance_A: float) -> QMMMStructure | None:
    """A copy of ``frame`` with the cation nearest a QM chlorine moved along their axis to ``distance_A``.

    None if no cation touches a chlorine or the moved one would come within MIN_CLEARANCE_A of another QM atom.
    """
    z, pos = frame.numbers, frame.positions
    cations = [i for i in frame.mm_indices if z[i] in CATIONS]
    chlorines = [i for i in frame.qm_indices if z[i] == CHLORINE]
    if not cations or not chlorines:
        return None
    d = np.linalg.norm(pos[cations][:, None] - pos[chlorines][None], axis=-1)
    k, c = np.unravel_index(np.argmin(d), d.shape)
    if d[k, c] > CONTACT_A * ANGSTROM_TO_BOHR:
        return None
    ion, cl = cations[k], chlorines[c]
    new = pos.copy()
    new[ion] = pos[cl] + (pos[ion] - pos[cl]) / d[k, c] * distance_A * ANGSTROM_TO_BOHR
    to_qm = np.linalg.norm(new[frame.qm_indices] - new[ion], axis=1) / ANGSTROM_TO_BOHR
    if to_qm[frame.qm_indices != cl].min() < MIN_CLEARANCE_A:
        return None
    return frame.moved(new, environment="displaced cation", ion_distance=round(float(to_qm.min()), 4),
                       augmented=f"{frame.symbols[ion]} {ion} moved from {d[k, c] / ANGSTROM_TO_BOHR:.2f} to "
                                 f"{distance_A:.2f} A of Cl {cl}")


def training_frames(split: Path) -> list[QMMMStructure]:
    """The training frames of the end-on files (SOURCES) in the run split ``split``."""
    files = json.loads(split.read_text())["files"]
    per_file = split_frames(split, "train", [split.parent / f for f in files])
    return [s for name, frames in zip(files, per_file) if name in SOURCES for s in frames]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--split", type=Path, default=HERE / "split.json",
                   help="the run split whose training frames of the end-on files are moved")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--frames", type=int, default=160)
    p.add_argument("--range", default="2.45:3.45", help="the cation-chlorine distance of each frame, LO:HI in A")
    p.add_argument("--seed", type=int, default=171)
    args = p.parse_args()
    lo, hi = (float(x) for x in args.range.split(":"))
    rng = np.random.default_rng(args.seed)
    made = augmented(training_frames(args.split), lambda frame: displace(frame, rng.uniform(lo, hi)),
                     args.frames, rng)
    write_structures(args.out, made)
    print(f"wrote {len(made)} displaced-cation frames to {args.out}")


if __name__ == "__main__":
    main()
