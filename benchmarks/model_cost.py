"""Cost of one model evaluation (energy + forces on all atoms): time and peak memory.

Sweeps the QM size (3..50 atoms), the MM size (100..100 000 point charges) and the
batch size (frames evaluated together), each against the smallest case measured
in the same run, and fits the growth exponent (time ~ N^a). The eager model (a
compiled one is specialised to one QM size; see profile_call.py and ipi_pimd.py). Every configuration
runs in a fresh subprocess so that its peak memory is its own (CPU: peak resident
memory above the process after warm-up; GPU: torch's peak allocated memory).

    python benchmarks/model_cost.py                 # default sweeps, CPU
    python benchmarks/model_cost.py --device cuda --out results.json

Prints tables and writes JSON (default benchmarks/results/model_cost-<device>.json).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from machine import describe

WATER = np.array([[0.0, 0.0, 0.0], [0.9572, 0.0, 0.0], [-0.2400, 0.9266, 0.0]])


def make_atoms(n_qm: int, n_mm: int, seed: int = 0):
    """A QM cluster of waters (n_qm atoms, multiple of 3) inside a sphere of MM point charges."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    n_w = max(1, n_qm // 3)
    side = int(np.ceil(n_w ** (1 / 3)))
    grid = np.stack(np.meshgrid(*[np.arange(side)] * 3, indexing="ij"), -1).reshape(-1, 3)[:n_w] * 3.1
    qm_pos = np.concatenate([WATER + g for g in grid])
    qm_radius = np.linalg.norm(qm_pos - qm_pos.mean(0), axis=1).max() + 2.5
    # MM charges uniformly in a shell at water density (0.1 atoms/A^3) outside the QM cluster
    r_out = (qm_radius**3 + n_mm / 0.1 * 3 / (4 * np.pi)) ** (1 / 3)
    u = rng.normal(size=(n_mm, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = (qm_radius**3 + rng.random(n_mm) * (r_out**3 - qm_radius**3)) ** (1 / 3)
    mm_pos = qm_pos.mean(0) + u * r[:, None]
    symbols = ["O", "H", "H"] * n_w + ["X"] * n_mm
    atoms = Atoms(symbols=[s if s != "X" else "He" for s in symbols], positions=np.vstack([qm_pos, mm_pos]))
    qm = np.zeros(len(atoms), dtype=np.int64)
    qm[: 3 * n_w] = 1
    atoms.set_array("qm", qm)
    charges = np.zeros(len(atoms))
    charges[3 * n_w:] = np.tile([-0.834, 0.417, 0.417], n_mm // 3 + 1)[:n_mm]
    atoms.set_array("mm_charge", charges)
    return atoms


def measure(n_qm: int, n_mm: int, batch: int, device: str, dtype: str, repeats: int) -> dict:
    """Run in a subprocess: time and peak memory of one evaluation of ``batch`` frames."""
    import torch

    from qmmm_driver.evaluator import ModelEvaluator
    from qmmm_driver.nn import ModelSettings, QMMMModel
    from qmmm_driver.structures import QMMMStructure
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    torch.manual_seed(0)
    model = QMMMModel(ModelSettings(elements=["H", "O"], masses=[1.008, 15.999]))
    atoms = make_atoms(n_qm, n_mm)
    ev = ModelEvaluator(model, QMMMStructure.from_atoms(atoms), device=device,
                        dtype={"float32": torch.float32, "float64": torch.float64}[dtype])
    rng = np.random.default_rng(1)
    pos = atoms.positions * ANGSTROM_TO_BOHR
    frames = np.stack([pos + rng.normal(scale=0.01, size=pos.shape) for _ in range(batch)])
    ev.compute(frames)  # warm-up (allocations, e3nn code paths)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        ev.compute(frames)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if cuda:
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak_mb = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0, 0) / 1024
    return {"n_qm": 3 * max(1, n_qm // 3), "n_mm": n_mm, "batch": batch, "time_ms": 1000 * float(np.median(times)),
            "peak_mb": float(peak_mb)}


def run_case(args, n_qm, n_mm, batch) -> dict:
    cmd = [sys.executable, __file__, "--child", f"{n_qm},{n_mm},{batch}", "--device", args.device,
           "--dtype", args.dtype, "--repeats", str(args.repeats), "--threads", str(args.threads)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"case {n_qm},{n_mm},{batch} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def exponent(xs, ys) -> float:
    return float(np.polyfit(np.log(xs), np.log(ys), 1)[0])


def table(title: str, key: str, rows: list[dict]) -> None:
    base = rows[0]
    print(f"\n{title}")
    print(f"{key:>8} {'time (ms)':>11} {'x smallest':>11} {'peak (MB)':>10}")
    for r in rows:
        print(f"{r[key]:>8} {r['time_ms']:>11.2f} {r['time_ms'] / base['time_ms']:>11.2f} {r['peak_mb']:>10.1f}")
    xs = [r[key] for r in rows]
    big = [r for r in rows if r[key] >= xs[len(xs) // 2]]
    print(f"fitted time ~ {key}^{exponent([r[key] for r in big], [r['time_ms'] for r in big]):.2f} "
          f"(upper half of the sweep)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--qm", default="3,6,12,24,51", help="QM sizes (with 1000 MM atoms)")
    p.add_argument("--mm", default="100,1000,5000,20000,50000,100000", help="MM sizes (with 6 QM atoms)")
    p.add_argument("--batch", default="1,4,16,64", help="batch sizes (6 QM, 1500 MM atoms)")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        import torch

        if args.threads > 0:
            torch.set_num_threads(args.threads)
        n_qm, n_mm, batch = (int(x) for x in args.child.split(","))
        print(json.dumps(measure(n_qm, n_mm, batch, args.device, args.dtype, args.repeats)))
        return
    sweeps = {
        "n_qm": [run_case(args, q, 1000, 1) for q in map(int, args.qm.split(","))],
        "n_mm": [run_case(args, 6, m, 1) for m in map(int, args.mm.split(","))],
        "batch": [run_case(args, 6, 1500, b) for b in map(int, args.batch.split(","))],
    }
    print(f"machine: {describe()}, device {args.device}, {args.dtype}")
    table("QM size (1000 MM atoms, 1 frame)", "n_qm", sweeps["n_qm"])
    table("MM size (6 QM atoms, 1 frame)", "n_mm", sweeps["n_mm"])
    table("batch size (6 QM, 1500 MM atoms per frame)", "batch", sweeps["batch"])
    out = args.out or Path(__file__).parent / "results" / f"model_cost-{args.device.replace(':', '')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": args.device, "dtype": args.dtype, "machine": describe(),
                               **sweeps}, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
