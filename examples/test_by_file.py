"""Test-split errors of a trained model, file by file (environment by environment).

    python examples/test_by_file.py examples/water qmmm_driver/models/water/model.pt

Reads EXAMPLE/split.json (written by `qmmm-driver train`), evaluates the model on the test frames of each
training file on the driver's own path, prints one line per file and writes EXAMPLE/test_by_file.json.
"""

import json
import sys
from pathlib import Path

from qmmm_driver.evaluator import load
from qmmm_driver.files import write_atomically
from qmmm_driver.training.data import split_frames
from qmmm_driver.training.metrics import evaluate_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR


def split_test_frames(example: Path) -> dict:
    """The test frames of EXAMPLE/split.json, file by file (files without test frames left out)."""
    split_file = example / "split.json"
    names = json.loads(split_file.read_text())["files"]
    selected = split_frames(split_file, "test", [example / f for f in names])
    return {f: frames for f, frames in zip(names, selected) if frames}


def main() -> None:
    example, model = Path(sys.argv[1]), load(sys.argv[2])
    out = {}
    for f, frames in split_test_frames(example).items():
        m, _ = evaluate_structures(model, frames, 6.0 * ANGSTROM_TO_BOHR)
        s = m.summary()
        out[f] = s
        print(f"{f:40s} n={s['n_frames']:4d} E MAE {s['energy_mae_meV']:6.2f} MSE {s['energy_mean_signed_meV']:+6.2f} "
              f"F {s['force_mae_meV_per_A']:6.2f}", flush=True)
    write_atomically(example / "test_by_file.json", json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
