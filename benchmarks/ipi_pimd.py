"""i-PI PIMD throughput: qmmm-driver against i-PI's own floor and its stock Python driver.

For each example system (water, sn2) and bead count (1, 8, 32) the same i-PI
input (PIMD, PILE-L, the model forcefield only) runs with three clients of its
socket, measured in the same run:

- `dummy`: i-PI's `i-pi-py_driver -m dummy` (zero forces): the floor of i-PI itself;
- `stock`: i-PI's `i-pi-py_driver -m custom` hosting the same model (benchmarks/stock_pes.py);
- `qmmm-driver`: `qmmm-driver run`, with all beads in one batched request.

Steps per second are timed between the first and last of the measured steps
(start-up excluded). A second table runs qmmm-driver with 1, 2 and 4 workers.

    python benchmarks/ipi_pimd.py                    # full sweep
    python benchmarks/ipi_pimd.py --quick            # water, 8 beads only

Prints tables and writes JSON (default benchmarks/results/ipi_pimd.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmmm_driver.launch import last_step  # noqa: E402

INPUT = """<simulation verbosity='low'>
  <output prefix='sim'> <properties stride='1' filename='out'> [ step, potential ] </properties> </output>
  <total_steps> {steps} </total_steps>
  <ffsocket name='qmmm' mode='unix' pbc='false'> <address>{address}</address> {batch} </ffsocket>
  <system>
    <initialize nbeads='{beads}'> <file mode='ase'> {system} </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities> </initialize>
    <forces> <force forcefield='qmmm'/> </forces>
    <motion mode='dynamics'> <dynamics mode='nvt'> <timestep units='femtosecond'> 0.25 </timestep>
      <thermostat mode='pile_l'> <tau units='femtosecond'> 100 </tau> </thermostat> </dynamics> </motion>
    <ensemble> <temperature units='kelvin'> 300 </temperature> </ensemble>
  </system>
</simulation>
"""


def model_for(example: Path, work: Path) -> Path:
    """The example's shipped model, or an untrained model of the same size (timing only)."""
    if (example / "model.pt").exists():
        return example / "model.pt"
    import ase.io
    import torch

    from qmmm_driver.model import ModelSettings, QMMMModel
    from qmmm_driver.model.io import save_model

    atoms = ase.io.read(example / "system.extxyz")
    elements = sorted({atoms[i].symbol for i in range(len(atoms)) if atoms.arrays["qm"][i] == 1})
    torch.manual_seed(0)
    model = QMMMModel(ModelSettings(elements=elements))
    with torch.no_grad():
        model.energy_scale.fill_(1e-3)  # mild forces: the run must stay stable for a few steps
    return save_model(model, work / f"{example.name}-untrained.pt")


def client(kind: str, address: str, model: Path, system: Path) -> list[str]:
    if kind == "dummy":
        return ["i-pi-py_driver", "-u", "-a", address, "-m", "dummy"]
    if kind == "stock":
        return ["i-pi-py_driver", "-u", "-a", address, "-m", "custom", "-P", str(REPO / "benchmarks" / "stock_pes.py"),
                "-o", f"model={model},system={system}"]
    return [sys.executable, "-m", "qmmm_driver.cli", "run", "--model", str(model), "--system", str(system),
            "--unix", address]


def measure(kind: str, example: Path, model: Path, beads: int, steps: int, warmup: int, workers: int,
            work: Path) -> float:
    """Steps per second of one i-PI PIMD run served by ``workers`` clients of ``kind``."""
    run = work / f"{example.name}-{kind}-{beads}-{workers}-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    address = f"bench{uuid.uuid4().hex[:10]}"
    batch = f"<batch_size> {max(1, beads // workers)} </batch_size>" if kind == "qmmm-driver" and beads > 1 else ""
    (run / "input.xml").write_text(INPUT.format(steps=steps + warmup, address=address, batch=batch, beads=beads,
                                                system=example / "system.extxyz"))
    env = dict(os.environ, OMP_NUM_THREADS="1")  # same threading for every client: one per process
    log = open(run / "log", "wb")
    procs = [subprocess.Popen(["i-pi", "input.xml"], cwd=run, stdout=log, stderr=subprocess.STDOUT)]
    try:
        while not Path("/tmp/ipi_" + address).exists():
            time.sleep(0.05)
        for _ in range(workers):
            procs.append(subprocess.Popen(client(kind, address, model, example / "system.extxyz"), cwd=run,
                                          stdout=log, stderr=subprocess.STDOUT, env=env))
        t0 = None
        while procs[0].poll() is None:
            step = last_step(run, ["sim.out"]) or 0
            if t0 is None and step >= warmup:
                t0, s0 = time.perf_counter(), step
            time.sleep(0.01)
        t1 = time.perf_counter()
        final = last_step(run, ["sim.out"])
        if procs[0].returncode != 0 or t0 is None or final is None:
            raise RuntimeError(f"{kind} run failed; see {run / 'log'}")
        return (final - s0) / (t1 - t0)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()
        Path("/tmp/ipi_" + address).unlink(missing_ok=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--systems", default="water,sn2")
    p.add_argument("--beads", default="1,8,32")
    p.add_argument("--workers", default="1,2,4", help="worker counts for the scaling table")
    p.add_argument("--steps", type=int, default=40, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="water, 8 beads, 1-2 workers")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ipi_pimd.json")
    args = p.parse_args()
    if args.quick:
        args.systems, args.beads, args.workers = "water", "8", "1,2"
    work = Path(tempfile.mkdtemp(prefix="qmmm-bench-"))
    results = {"machine": platform.platform(), "cpus": os.cpu_count(), "runs": [], "workers": []}
    try:
        print(f"{'system':7s} {'beads':>5s} {'dummy':>9s} {'stock':>9s} {'qmmm-drv':>9s} {'drv/dummy':>9s} "
              f"{'drv/stock':>9s}   (steps/s)")
        for name in args.systems.split(","):
            example = REPO / "examples" / name
            model = model_for(example, work)
            for beads in map(int, args.beads.split(",")):
                rates = {k: measure(k, example, model, beads, args.steps, args.warmup, 1, work)
                         for k in ("dummy", "stock", "qmmm-driver")}
                results["runs"].append({"system": name, "beads": beads, **rates})
                print(f"{name:7s} {beads:5d} {rates['dummy']:9.2f} {rates['stock']:9.2f} {rates['qmmm-driver']:9.2f} "
                      f"{rates['qmmm-driver'] / rates['dummy']:9.2f} {rates['qmmm-driver'] / rates['stock']:9.2f}",
                      flush=True)
        name = args.systems.split(",")[0]
        example = REPO / "examples" / name
        model = model_for(example, work)
        beads = max(map(int, args.beads.split(",")))
        print(f"\n{name}, {beads} beads: qmmm-driver workers")
        base = None
        for n in map(int, args.workers.split(",")):
            rate = measure("qmmm-driver", example, model, beads, args.steps, args.warmup, n, work)
            base = base or rate
            results["workers"].append({"system": name, "beads": beads, "workers": n, "steps_per_s": rate})
            print(f"  {n} worker(s): {rate:7.2f} steps/s  ({rate / base:.2f} x one worker)", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
