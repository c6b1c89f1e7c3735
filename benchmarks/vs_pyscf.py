"""One model evaluation against one PySCF reference calculation of the same frame.

For a labelled frame of each example (QM region in its MM environment), times
the reference (B3LYP/6-31+G*, density fitting, energy + forces on QM and MM
atoms, as `qmmm-driver label` computes it) and the model (energy + forces on
all atoms, `Evaluator`, float32, CPU), both in this process on one thread, and
prints the speedup.

    python benchmarks/vs_pyscf.py [--repeats 20]

Prints a table and writes JSON (default benchmarks/results/vs_pyscf.json).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="water,sn2")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "vs_pyscf.json")
    args = p.parse_args()
    import torch
    from pyscf import lib

    from qmmm_driver.evaluator import ModelEvaluator, load
    from qmmm_driver.labelling import label_frame
    from qmmm_driver.launcher import MODELS
    from qmmm_driver.nn.compile import compiled_path, load_compiled
    from qmmm_driver.structures import read_structures

    torch.set_num_threads(1)
    lib.num_threads(1)
    rows = []
    print(f"{'system':7s} {'atoms':>6s} {'PySCF (s)':>10s} {'model (ms)':>11s} {'speedup':>9s}")
    for name in args.systems.split(","):
        example = REPO / "examples" / name
        data = sorted((example / "data").glob(f"{name}_bulk.extxyz*"))
        if not data:
            print(f"{name}: no labelled frames in {example / 'data'}; skipped")
            continue
        frame = read_structures(data[0], index="0")[0]
        t = time.perf_counter()
        label_frame(frame)
        t_ref = time.perf_counter() - t
        model_path = MODELS / name / "model.pt"
        model = load(model_path)
        compiled = compiled_path(model_path, frame.n_qm, "cpu", torch.float32)
        runner = load_compiled(compiled, model.checksum, frame.n_qm, "cpu", torch.float32) if compiled.exists() else None
        ev = ModelEvaluator(model, frame, compiled=runner)
        ev.compute(frame.positions)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            ev.compute(frame.positions)
            times.append(time.perf_counter() - t)
        t_model = float(np.median(times))
        rows.append({"system": name, "atoms": len(frame.numbers), "pyscf_s": t_ref, "model_ms": 1000 * t_model,
                     "speedup": t_ref / t_model, "compiled": runner is not None})
        print(f"{name:7s} {len(frame.numbers):6d} {t_ref:10.2f} {1000 * t_model:11.2f} {t_ref / t_model:9.0f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": describe(), "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
