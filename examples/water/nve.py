"""Energy conservation of the full QM/MM system (model + OpenMM) in NVE with the shipped water model.

Runs the `nve` template (0.25 fs, 300 K start) through `qmmm-driver launch`, fits
a line to i-PI's conserved quantity and reports the drift per atom per ps and
the fluctuation around the line.

    python examples/water/nve.py [--steps 4000]
    python examples/water/nve.py --analyse-only

Writes examples/water/nve.json and examples/water/nve.png.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
from ipi.scripting import read_output

from qmmm_driver.launcher import MODELS, TEMPLATES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=4000, help="NVE steps of 0.25 fs (default 4000 = 1 ps)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "nve-water")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    run_dir = args.runs / "ipi"
    if not args.analyse_only:
        root = ET.parse(TEMPLATES / "nve.xml").getroot()
        root.find("total_steps").text = f" {args.steps} "
        args.runs.mkdir(parents=True, exist_ok=True)
        ET.ElementTree(root).write(args.runs / "nve.xml")
        cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(args.runs / "nve.xml"), "--example", "water",
               "--run-dir", str(run_dir)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)
    props, _ = read_output(str(run_dir / "simulation.out"))
    import ase.io

    n_atoms = len(ase.io.read(MODELS / "water" / "system.extxyz"))
    t = props["time"]           # ps
    e = props["conserved"]      # eV
    slope, intercept = np.polyfit(t, e, 1)
    residual = e - (slope * t + intercept)
    summary = {"atoms": n_atoms, "ps": float(t[-1] - t[0]), "timestep_fs": 0.25,
               "drift_meV_per_atom_per_ps": 1000 * slope / n_atoms,
               "fluctuation_meV_per_atom": 1000 * residual.std() / n_atoms,
               "conserved_range_meV": 1000 * float(e.max() - e.min()),
               "potential_range_meV": 1000 * float(props["potential"].max() - props["potential"].min()),
               "mean_temperature_K": float(props["temperature"].mean())}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(t, 1000 * (props["potential"] - props["potential"][0]), color="grey", lw=0.8, label="potential")
    ax.plot(t, 1000 * (e - e[0]), color="C3", label="conserved")
    ax.set_xlabel("time (ps)")
    ax.set_ylabel("energy change (meV)")
    ax.set_title(f"NVE, QM water in {n_atoms // 3 - 1} MM waters: drift "
                 f"{summary['drift_meV_per_atom_per_ps']:.3f} meV/atom/ps")
    ax.legend()
    fig.tight_layout()
    fig.savefig(HERE / "nve.png", dpi=120)
    (HERE / "nve.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
