"""One force call for a batch of beads: a shipped model in a large MM environment, eager and compiled.

The GPU case of the speed issue: the shipped SN2 model (Cl- + CH3Cl, 6 QM atoms), 32 beads, 20 000 MM point
charges (TIP3P charges at water density in a sphere around the solute). One call is
``ModelEvaluator.compute`` on all beads at once, as the socket client makes it: presentation of the MM
environment (switching, near atoms), the model's energy and gradients, forces on every atom. Timed as the
median of ``--repeats`` calls after warm-up (``torch.cuda.synchronize`` around each call on a GPU); the
eager model first, then (``--compile``) the potential compiled for the device by ``qmmm-driver compile``'s
code path, timed the same way in the same run.

    python benchmarks/batch_call.py --device cuda --compile          # the issue's case, on a GPU
    python benchmarks/batch_call.py --example water --beads 1 --mm 700

Writes benchmarks/results/batch_call-<device>.json (with the machine and the card).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402

from qmmm_driver.launcher import MODELS  # noqa: E402
from qmmm_driver.units import ANGSTROM_TO_BOHR  # noqa: E402

TIP3P = np.array([-0.834, 0.417, 0.417])


def solute_in_charges(example: str, n_mm: int, seed: int = 0):
    """The example's QM region in a sphere of ``n_mm`` MM point charges at water density (0.1 atoms/A^3)."""
    from qmmm_driver.structures import QMMMStructure

    system = QMMMStructure.read(MODELS / example / "system.extxyz")
    qm_pos = system.positions[system.qm] / ANGSTROM_TO_BOHR
    centre = qm_pos.mean(axis=0)
    r_in = np.linalg.norm(qm_pos - centre, axis=1).max() + 2.5
    r_out = (r_in**3 + n_mm / 0.1 * 3 / (4 * np.pi)) ** (1 / 3)
    rng = np.random.default_rng(seed)
    u = rng.normal(size=(n_mm, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = (r_in**3 + rng.random(n_mm) * (r_out**3 - r_in**3)) ** (1 / 3)
    pos = np.vstack([qm_pos, centre + u * r[:, None]]) * ANGSTROM_TO_BOHR
    n_qm = len(qm_pos)
    return QMMMStructure(numbers=np.concatenate([system.numbers[system.qm], np.full(n_mm, 1)]), positions=pos,
                         qm=np.arange(n_qm + n_mm) < n_qm,
                         mm_charge=np.concatenate([np.zeros(n_qm), np.tile(TIP3P, n_mm // 3 + 1)[:n_mm]]),
                         qm_total_charge=system.qm_total_charge, source=f"{example} in {n_mm} charges")


def timed(evaluator, frames: np.ndarray, repeats: int, cuda: bool) -> float:
    import torch

    for _ in range(3):  # warm-up: allocations, kernels, autotuned code paths
        evaluator.compute(frames)
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        evaluator.compute(frames)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return 1000.0 * float(np.median(times))


def main() -> None:
    import torch

    from qmmm_driver.evaluator import ModelEvaluator, load
    from qmmm_driver.nn.compile import compile_model, compiled_path, load_compiled

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--example", default="sn2", choices=sorted(d.name for d in MODELS.iterdir() if d.is_dir()))
    p.add_argument("--beads", type=int, default=32)
    p.add_argument("--mm", type=int, default=20000, help="MM point charges")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--compile", action="store_true", help="also compile the potential and time it")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype)
    model_path = MODELS / args.example / "model.pt"
    model = load(model_path, device)
    structure = solute_in_charges(args.example, args.mm)
    rng = np.random.default_rng(1)
    frames = structure.positions + rng.normal(scale=0.02, size=(args.beads, *structure.positions.shape))
    result = {"example": args.example, "beads": args.beads, "n_qm": structure.n_qm, "n_mm": args.mm,
              "device": str(device), "dtype": args.dtype, "machine": describe(),
              "card": torch.cuda.get_device_name(device) if cuda else describe(),
              "torch": torch.__version__, "threads": args.threads}
    eager = ModelEvaluator(model, structure, device, dtype)
    result["eager_ms"] = timed(eager, frames, args.repeats, cuda)
    print(f"{args.example}, {args.beads} beads, {structure.n_qm} QM atoms, {args.mm} MM charges on {result['card']}")
    print(f"  eager:    {result['eager_ms']:8.2f} ms per call ({result['eager_ms'] / args.beads:.3f} ms per bead)")
    if args.compile:
        path = compiled_path(model_path, structure.n_qm, device, dtype)
        started = time.time()
        if not path.exists():
            compile_model(model, model.checksum, structure.n_qm, path, device, dtype)
        result["compile_s"] = time.time() - started
        runner = load_compiled(path, model.checksum, structure.n_qm, device, dtype)
        compiled = ModelEvaluator(model, structure, device, dtype, compiled=runner)
        result["compiled_ms"] = timed(compiled, frames, args.repeats, cuda)
        ref, got = eager.compute(frames), compiled.compute(frames)
        result["compiled_max_force_diff"] = float(np.abs(ref.forces - got.forces).max())
        print(f"  compiled: {result['compiled_ms']:8.2f} ms per call ({result['compiled_ms'] / args.beads:.3f} "
              f"ms per bead; compiled in {result['compile_s']:.0f} s)")
    out = args.out or REPO / "benchmarks" / "results" / f"batch_call-{device.type}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
