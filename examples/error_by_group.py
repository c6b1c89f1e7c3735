"""Errors of a model on labelled frames, grouped by a key of the frames' info (the sampling trajectory, the ion).

    python examples/error_by_group.py qmmm_driver/models/sn2/model.pt examples/sn2/data/sn2_acetonitrile*.extxyz.xz
    python examples/error_by_group.py qmmm_driver/models/sn2/model.pt examples/sn2/data/sn2_end_on2.extxyz.xz --by ion
    python examples/error_by_group.py qmmm_driver/models/sn2/model.pt examples/sn2/data/sn2_pimd4.extxyz.xz --by far-c-cl
    python examples/error_by_group.py qmmm_driver/models/sn2/model.pt examples/sn2/data/sn2_pimd13.extxyz.xz --by cl-c-cl
    python examples/error_by_group.py qmmm_driver/models/water/model.pt examples/water/data/water_pimd4.extxyz.xz --by block

``--by seed`` (the default) groups by sampling trajectory: frames of one trajectory are correlated, so a mean
signed error over one trajectory says less about a medium or an ion than the spread between trajectories does.
``--by far-c-cl`` groups SN2 frames by geometry instead: the longer of the two C-Cl distances of the QM region, in
bins with edges ``--edges`` (Angstrom; the default 3.5, 4.13 and 4.5 A, where 4.13 A is as far as the classical
training frames go); ``--by cl-c-cl`` by the Cl-C-Cl angle (degrees; default edges 90 and 150): 180 on the
collinear path, below 90 where a free chloride has gone round to the bound one's side. ``--by block`` cuts the
frames, in the order given (file by file, each in file order), into ``--blocks`` consecutive blocks: on the beads
of one path-integral trajectory it shows whether a signed error is spread over the run or comes from a stretch of
it. Prints one line per group and one for all frames (energy MAE and mean signed error in meV, QM-force MAE in
meV/A).
"""

import argparse

import numpy as np

from qmmm_driver.evaluator import load
from qmmm_driver.structures import read_structures
from qmmm_driver.training.metrics import Metrics, evaluate_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR


def line(name: str, metrics: Metrics) -> str:
    s = metrics.summary()
    return (f"{name:24s} n={s['n_frames']:4d} E MAE {s['energy_mae_meV']:6.2f} MSE {s['energy_mean_signed_meV']:+6.2f} "
            f"F {s['force_mae_meV_per_A']:6.2f}")


def carbon_to_chlorides(structure, key: str) -> np.ndarray:
    """The two vectors from the carbon to the chlorides of an SN2 QM region (one C, two Cl), in Angstrom."""
    qm = structure.qm_indices
    numbers, positions = structure.numbers[qm], structure.positions[qm]
    if (numbers == 6).sum() != 1 or (numbers == 17).sum() != 2:
        raise SystemExit(f"error_by_group: --by {key} needs one C and two Cl in the QM region; frame "
                         f"{structure.info.get('source_index', '?')} has elements {sorted(set(numbers.tolist()))}")
    return (positions[numbers == 17] - positions[numbers == 6][0]) / ANGSTROM_TO_BOHR


def far_c_cl(structure) -> float:
    """The longer C-Cl distance of an SN2 QM region (one C, two Cl), in Angstrom."""
    return float(np.linalg.norm(carbon_to_chlorides(structure, "far-c-cl"), axis=1).max())


def cl_c_cl(structure) -> float:
    """The Cl-C-Cl angle of an SN2 QM region, in degrees: 180 on the collinear path of the reaction, small where
    the free chloride sits beside the bound one."""
    a, b = carbon_to_chlorides(structure, "cl-c-cl")
    cosine = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.degrees(np.arccos(np.clip(cosine, -1.0, 1.0))))


#: --by key: (the quantity of a frame, its unit, default bin edges)
GEOMETRY = {"far-c-cl": (far_c_cl, "A", "3.5,4.13,4.5"), "cl-c-cl": (cl_c_cl, "deg", "90,150")}


def bin_name(value: float, edges: list[float], unit: str = "A") -> str:
    """The bin of ``value`` between sorted ``edges``, named so that names sort in the bins' order."""
    below = [e for e in edges if e <= value]
    above = [e for e in edges if e > value]
    lower = f"{below[-1]:5.2f}" if below else "     "
    upper = f"{above[0]:5.2f}" if above else "     "
    return f"{len(below)}: {lower}-{upper} {unit}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("data", nargs="+", help="labelled frames (extended XYZ)")
    p.add_argument("--by", default="seed", help="the info key to group by (default: seed), far-c-cl, cl-c-cl or block")
    p.add_argument("--edges", default=None, help="bin edges for --by far-c-cl (Angstrom, default 3.5,4.13,4.5) or "
                                                 "cl-c-cl (degrees, default 90,150)")
    p.add_argument("--blocks", type=int, default=6, help="consecutive blocks for --by block (default: %(default)s)")
    args = p.parse_args()
    geometry = GEOMETRY.get(args.by)
    if geometry:
        quantity, unit, default_edges = geometry
        edges = sorted(float(e) for e in (args.edges or default_edges).split(","))
    model = load(args.model)
    frames = [s for f in args.data for s in read_structures(f, require_labels=True)]
    if args.by == "block" and not 1 <= args.blocks <= len(frames):
        raise SystemExit(f"error_by_group: --blocks {args.blocks}: give 1 to {len(frames)} (the number of frames)")
    groups: dict[str, list] = {}
    for i, s in enumerate(frames):
        if geometry:
            key = bin_name(quantity(s), edges, unit)
        elif args.by == "block":  # near-equal consecutive blocks, named so that names sort in order
            key = f"{i * args.blocks // len(frames):0{len(str(args.blocks - 1))}d}"
        else:
            key = str(s.info.get(args.by, "-"))
        groups.setdefault(key, []).append(s)
    everything = Metrics()
    for name in sorted(groups):
        metrics = evaluate_structures(model, groups[name], 6.0 * ANGSTROM_TO_BOHR)[0]
        print(line(f"{args.by} {name}", metrics), flush=True)
        everything.extend(metrics)
    print(line("all", everything))


if __name__ == "__main__":
    main()
