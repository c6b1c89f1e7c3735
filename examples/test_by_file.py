"""Test-split errors of a trained model, file by file (environment by environment).

    python examples/test_by_file.py examples/water qmmm_driver/models/water/model.pt

Reads EXAMPLE/split.json (written by `qmmm-driver train`), evaluates the model on the test frames of each
training file on the driver's own path, prints one line per file and writes EXAMPLE/test_by_file.json.
"""

import json
import sys
from pathlib import Path
from qmmm_driver.evaluator import load
from qmmm_driver.structures import read_structures
from qmmm_driver.training.metrics import evaluate_structures
from qmmm_driver.units import ANGSTROM_TO_BOHR
ex = Path(sys.argv[1]); model = load(sys.argv[2])
split = json.loads((ex / "split.json").read_text())
test = set(split["test"]); start = 0; out = {}
for f in split["files"]:
    frames = read_structures(ex / f, require_labels=True)
    sel = [frames[i - start] for i in range(start, start + len(frames)) if i in test]
    start += len(frames)
    if sel:
        m, _ = evaluate_structures(model, sel, 6.0 * ANGSTROM_TO_BOHR)
        s = m.summary(); out[f] = s
        print(f"{f:40s} n={s['n_frames']:4d} E MAE {s['energy_mae_meV']:6.2f} MSE {s['energy_mean_signed_meV']:+6.2f} F {s['force_mae_meV_per_A']:6.2f}", flush=True)
(ex / "test_by_file.json").write_text(json.dumps(out, indent=1))
