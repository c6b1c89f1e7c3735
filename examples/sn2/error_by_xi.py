"""Where along the reaction the SN2 model's test error sits: energy errors of the test split binned by |xi|.

    python examples/sn2/error_by_xi.py qmmm_driver/models/sn2/model.pt

xi = d(C-Cl1) - d(C-Cl2) (A): near 0 at the transition state, beyond 1.3 A where one chloride is free and
solvated on its own. Reads examples/sn2/split.json (written by `qmmm-driver train`), evaluates the model on the
test frames of every file on the driver's own path, prints MAE (mean signed error) in meV and QM-force MAE in
meV/A per bin, and writes examples/sn2/error_by_xi.json.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from test_by_file import split_test_frames  # noqa: E402

from solute import xi_of
from qmmm_driver.evaluator import load
from qmmm_driver.files import write_atomically
from qmmm_driver.training.metrics import evaluate_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR, BOHR_TO_ANGSTROM

BINS = [(0.0, 0.3), (0.3, 0.8), (0.8, 1.3), (1.3, np.inf)]  # |xi|, A


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="model file (.pt)")
    args = p.parse_args()
    model = load(args.model)
    frames = [s for selected in split_test_frames(HERE).values() for s in selected]
    xi = np.array([xi_of(s.positions[s.qm_indices] * BOHR_TO_ANGSTROM) for s in frames])
    metrics, _ = evaluate_structures(model, frames, 6.0 * ANGSTROM_TO_BOHR)
    energy = np.concatenate(metrics.errors["energy"])  # meV, one per frame
    forces = metrics.errors["forces"]  # meV/A, the QM force components of each frame
    out = {}
    for lo, hi in BINS:
        rows = np.flatnonzero((np.abs(xi) >= lo) & (np.abs(xi) < hi))
        if not len(rows):
            continue
        key = f"{lo}-{hi}" if np.isfinite(hi) else f">{lo}"
        out[key] = {"n_frames": len(rows), "energy_mae_meV": float(np.abs(energy[rows]).mean()),
                    "energy_mean_signed_meV": float(energy[rows].mean()),
                    "force_mae_meV_per_A": float(np.abs(np.concatenate([forces[i] for i in rows])).mean())}
        s = out[key]
        print(f"|xi| {key:>8s} A  n={s['n_frames']:3d}  E MAE {s['energy_mae_meV']:6.2f} "
              f"({s['energy_mean_signed_meV']:+6.2f}) meV  F {s['force_mae_meV_per_A']:6.1f} meV/A")
    write_atomically(HERE / "error_by_xi.json", json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
