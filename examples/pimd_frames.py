"""Path-integral bead frames for a shipped model's training set: the geometries the main job visits.

Both shipped models were trained on classical MD frames. The beads of a 16-bead PIMD (`qmmm-driver launch`,
zero-point motion) leave that range within the first steps: the QM water's hydrogens come 1.17-1.87 A apart
(training: 1.26-1.83 A), the SN2 solute's methyl hydrogens within 2.00 A of a chlorine (training: 2.05 A and
beyond), and each such run logs the model's extrapolation warning (README, "Training domain"). This script
runs that PIMD (template `pimd-contracted`, the shipped model and system of ``--example``, a thermostat seed
of its own) and cuts, every ``--stride`` steps after the first ``--discard``, ``--per-step`` beads chosen at
random as the cluster frames the model sees (whole molecules at the nearest image of the QM region, switched
between the model's r_on and r_off). The result is unlabelled; label it with `qmmm-driver label`.

Every run starts from the shipped ``system.extxyz`` unless ``--start DIR`` names another equilibrated start
(``system.extxyz`` and ``system.pdb``, as ``qmmm-driver sample --system-dir DIR`` or ``examples/sn2/sample.py
--system-dir DIR`` write them): runs of 0.25-0.4 ps from one start all see nearly the same solvent.

    python examples/pimd_frames.py --out pimd.extxyz --steps 1600 --seed 7
    qmmm-driver label pimd.extxyz --out examples/water/data/water_pimd.extxyz --threads 2
    python examples/pimd_frames.py --example sn2 --out sn2_pimd.extxyz --steps 1000 --seed 8
    python examples/sn2/sample.py --out start30.extxyz --frames 1 --windows=-2.0:-2.0:1 --seed 30 --system-dir start30
    python examples/pimd_frames.py --example sn2 --start start30 --out sn2_pimd.extxyz --steps 1600 --seed 30
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from qmmm_driver.launcher import MODELS, TEMPLATES, Example

TEMPLATE = "pimd-contracted.xml"


def prepare(steps: int, stride: int, seed: int, target: Path) -> Path:
    """The PIMD template with ``steps``, the thermostat ``seed`` and every bead's positions each ``stride`` steps."""
    root = ET.parse(TEMPLATES / TEMPLATE).getroot()
    root.find("total_steps").text = f" {steps} "
    root.find("prng/seed").text = f" {seed} "
    out = root.find("output")
    for traj in out.findall("trajectory"):
        if traj.text.strip() == "positions":
            traj.set("stride", str(stride))
        else:
            out.remove(traj)
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target)
    return target


def example_with_start(example: str, start: Path, target: Path) -> Path:
    """An example directory ``target`` whose ``example.toml`` runs the shipped ``example``'s model and force field
    on the system files of ``start`` (absolute paths)."""
    shipped = Example.find(example)
    files = {"system": start / "system.extxyz", "pdb": start / "system.pdb"}
    for path in files.values():
        if not path.is_file():
            sys.exit(f"--start {start}: no {path.name} there (write one with `qmmm-driver sample --system-dir`)")
    target.mkdir(parents=True, exist_ok=True)
    # JSON strings and lists of strings are TOML too (the same escapes), so json.dumps quotes every value
    values = {"model": str(shipped.model), "system": str(files["system"].resolve()),
              "pdb": str(files["pdb"].resolve()), "forcefield": shipped.forcefield, "mm_options": shipped.mm_options}
    (target / "example.toml").write_text("".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items()))
    return target


def bead_frames(run_dir: Path, example: str, discard: int, per_step: int, seed: int,
                system_file: Path | None = None) -> list:
    """``per_step`` beads, chosen at random (``seed``), of every stored step after ``discard`` of a run of the
    shipped ``example`` (started from ``system_file``, default the shipped one), as cluster frames (Bohr)."""
    import ase.io

    from qmmm_driver.embedding import Embedding
    from qmmm_driver.evaluator import load
    from qmmm_driver.ipi.outputs import STEP_MARK, files_of, output_specs
    from qmmm_driver.structures import QMMMStructure
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    settings = load(MODELS / example / "model.pt").settings
    system = QMMMStructure.read(system_file or MODELS / example / "system.extxyz")
    embedding = Embedding(system, settings.mm_switch_on, settings.mm_switch_off)
    # the run's one trajectory (prepare() keeps only the positions), a file per bead, i-PI's backups left out
    spec = next(s for s in output_specs(ET.parse(run_dir / "input.xml").getroot()) if s.kind == "trajectory")
    beads = [ase.io.read(f, index=":") for f in files_of(run_dir, spec)]
    steps = [int(STEP_MARK.search(a.info["ipi_comment"].encode()).group(1)) for a in beads[0]]
    rng, frames = np.random.default_rng(seed), []
    for k, step in enumerate(steps):
        if step < discard:
            continue
        for b in sorted(rng.choice(len(beads), size=per_step, replace=False)):
            info = {"system": example, "environment": "PIMD bead", "solvent": "water", "ion": "none",
                    "seed": seed, "step": step, "bead": int(b), "nbeads": len(beads), "temperature": 300.0,
                    "start": "shipped" if system_file is None else system_file.parent.name}
            frames.append(embedding.cluster(beads[b][k].positions * ANGSTROM_TO_BOHR, system.cell, info=info))
    return frames


def main() -> None:
    from qmmm_driver.structures import write_structures

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="unlabelled frames (extended XYZ)")
    p.add_argument("--steps", type=int, default=1000, help="PIMD steps of 0.25 fs (default 1000)")
    p.add_argument("--stride", type=int, default=25, help="steps between stored bead positions (default 25)")
    p.add_argument("--discard", type=int, default=200, help="steps before the first frame (default 200)")
    p.add_argument("--per-step", type=int, default=4, help="beads taken from each stored step (default 4)")
    p.add_argument("--seed", type=int, default=7, help="i-PI's thermostat seed and the bead choice (default 7)")
    p.add_argument("--example", choices=sorted(d.parent.name for d in MODELS.glob("*/model.pt")), default="water",
                   help="shipped model and system to run (default water)")
    p.add_argument("--start", type=Path, default=None,
                   help="directory of an equilibrated start (system.extxyz, system.pdb; default: the shipped one)")
    p.add_argument("--run-dir", type=Path, default=Path("runs/pimd-frames"))
    args = p.parse_args()
    if args.run_dir.exists():
        sys.exit(f"{args.run_dir} exists: give --run-dir a new folder (its trajectory would be appended to)")
    xml = prepare(args.steps, args.stride, args.seed, args.run_dir.with_suffix(".xml"))
    example = args.example
    if args.start is not None:
        example = str(example_with_start(args.example, args.start, args.run_dir.with_suffix(".example")))
    cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", example,
           "--run-dir", str(args.run_dir), "--no-progress"]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    frames = bead_frames(args.run_dir, args.example, args.discard, args.per_step, args.seed,
                         None if args.start is None else args.start / "system.extxyz")
    write_structures(args.out, frames)
    print(f"{len(frames)} frames -> {args.out}")


if __name__ == "__main__":
    main()
