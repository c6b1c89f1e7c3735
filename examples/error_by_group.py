"""Errors of a model on labelled frames, grouped by a key of the frames' info (the sampling trajectory, the ion).

    python examples/error_by_group.py qmmm_driver/models/sn2/model.pt examples/sn2/data/sn2_acetonitrile*.extxyz.xz
    python examples/error_by_group.py qmmm_driver/models/sn2/model.pt examples/sn2/data/sn2_end_on2.extxyz.xz --by ion

``--by seed`` (the default) groups by sampling trajectory: frames of one trajectory are correlated, so a mean
signed error over one trajectory says less about a medium or an ion than the spread between trajectories does.
Prints one line per group and one for all frames (energy MAE and mean signed error in meV, QM-force MAE in meV/A).
"""

import argparse

from qmmm_driver.evaluator import load
from qmmm_driver.structures import read_structures
from qmmm_driver.training.metrics import Metrics, evaluate_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR


def line(name: str, metrics: Metrics) -> str:
    s = metrics.summary()
    return (f"{name:24s} n={s['n_frames']:4d} E MAE {s['energy_mae_meV']:6.2f} MSE {s['energy_mean_signed_meV']:+6.2f} "
            f"F {s['force_mae_meV_per_A']:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model")
    p.add_argument("data", nargs="+", help="labelled frames (extended XYZ)")
    p.add_argument("--by", default="seed", help="the info key to group by (default: seed)")
    args = p.parse_args()
    model = load(args.model)
    frames = [s for f in args.data for s in read_structures(f, require_labels=True)]
    groups: dict[str, list] = {}
    for s in frames:
        groups.setdefault(str(s.info.get(args.by, "-")), []).append(s)
    everything = Metrics()
    for name in sorted(groups):
        metrics = evaluate_structures(model, groups[name], 6.0 * ANGSTROM_TO_BOHR)[0]
        print(line(f"{args.by} {name}", metrics), flush=True)
        everything.extend(metrics)
    print(line("all", everything))


if __name__ == "__main__":
    main()
