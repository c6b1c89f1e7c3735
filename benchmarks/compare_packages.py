"""Two or more compiled packages (of the same model, or each of its own with --models), timed in turn in one
process: the package alone and the whole evaluator call (presentation, package, forces), one structure per call,
one thread.

The system is the shipped water example cut to the QM water and the ~700 MM charges within 12 A (the issue's
"one model call"). The packages are called alternately, call by call, so that a busy or noisy machine slows
them alike; each reports the median, the 10th percentile and the fastest call, and how far its energy and
forces are from the first package's.

    qmmm-driver compile --model qmmm_driver/models/water/model.pt --n-qm 3 --out plain.pt2
    qmmm-driver compile --model qmmm_driver/models/water/model.pt --n-qm 3 --tune --out tuned.pt2
    python benchmarks/compare_packages.py plain.pt2 tuned.pt2 [--calls 2000]
    python benchmarks/compare_packages.py old.pt2 new.pt2 --models old.pt new.pt   # packages of two models

Writes benchmarks/results/compare_packages.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
from machine import describe  # noqa: E402


def summary(seconds: list[float]) -> dict:
    ms = 1000.0 * np.asarray(seconds)
    return {"median_ms": float(np.median(ms)), "p10_ms": float(np.percentile(ms, 10)), "min_ms": float(ms.min())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packages", nargs="+", type=Path, help="compiled packages of the shipped water model")
    p.add_argument("--models", nargs="+", type=Path, default=None,
                   help="the model file of each package, in the same order (default: the shipped water model for all)")
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "compare_packages.json")
    args = p.parse_args()
    if args.models is not None and len(args.models) != len(args.packages):
        p.error(f"--models names {len(args.models)} model files for {len(args.packages)} packages")

    import torch

    from ipi_pimd import cluster_system
    from qmmm_driver.evaluator import ModelEvaluator, load
    from qmmm_driver.launcher import MODELS
    from qmmm_driver.nn.compile import load_compiled
    from qmmm_driver.structures import QMMMStructure

    torch.set_num_threads(1)
    structure = QMMMStructure.read(cluster_system(Path(tempfile.mkdtemp())))
    models = [load(m) for m in args.models or [MODELS / "water" / "model.pt"] * len(args.packages)]
    runners = [load_compiled(path, m.checksum, structure.n_qm, "cpu", torch.float32)
               for path, m in zip(args.packages, models)]
    evaluators = [ModelEvaluator(m, structure, "cpu", torch.float32, compiled=r) for m, r in zip(models, runners)]
    pos = structure.positions[None]

    captured = {}
    run = runners[0]._run
    runners[0]._run = lambda inputs: (captured.setdefault("inputs", [t.clone() for t in inputs]), run(inputs))[1]
    reference = evaluators[0].compute(pos)
    runners[0]._run = run
    inputs = captured["inputs"]  # what the evaluator hands the package

    results = {"machine": describe(),
               "system": f"{structure.n_atoms} atoms, {structure.n_qm} QM", "threads": 1, "calls": args.calls,
               "packages": {}}
    alone = [[] for _ in runners]
    whole = [[] for _ in runners]
    for _ in range(20):  # warm-up
        for r, ev in zip(runners, evaluators):
            r(*inputs)
            ev.compute(pos)
    for _ in range(args.calls):
        for k, (r, ev) in enumerate(zip(runners, evaluators)):
            t = time.perf_counter()
            r(*inputs)
            alone[k].append(time.perf_counter() - t)
            t = time.perf_counter()
            ev.compute(pos)
            whole[k].append(time.perf_counter() - t)
    for path, ev, a, w in zip(args.packages, evaluators, alone, whole):
        res = ev.compute(pos)
        entry = {"package": summary(a), "evaluator_call": summary(w),
                 "max_energy_difference_hartree": float(np.abs(res.energy - reference.energy).max()),
                 "max_force_difference_hartree_per_bohr": float(np.abs(res.forces - reference.forces).max())}
        results["packages"][str(path)] = entry
        print(f"{path}: package alone median {entry['package']['median_ms']:.3f} ms (p10 "
              f"{entry['package']['p10_ms']:.3f}, fastest {entry['package']['min_ms']:.3f}); evaluator call median "
              f"{entry['evaluator_call']['median_ms']:.3f} ms (fastest {entry['evaluator_call']['min_ms']:.3f}); "
              f"|dE| {entry['max_energy_difference_hartree']:.1e} Ha")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
