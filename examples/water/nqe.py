"""Nuclear quantum effects on a QM water in MM water: classical MD against PIMD.

Runs `inputs/md-nvt.xml` (classical, 1 bead) and `inputs/pimd.xml` (16 beads,
PILE-L) with the shipped model through `qmmm-driver launch`, records the QM
water's atoms every few steps, and compares the O-H distance distributions
(all beads for PIMD): zero-point motion lengthens and broadens the bond.

    python examples/water/nqe.py                       # run both, then analyse (tens of minutes on 2 cores)
    python examples/water/nqe.py --analyse-only        # re-plot from the run directories

Writes examples/water/nqe.png and examples/water/nqe.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QM = (0, 1, 2)  # O, H, H of the QM water in system.extxyz


def prepare(template: str, steps: int, nbeads: int, stride: int, target: Path) -> Path:
    """The template with ``steps``, ``nbeads`` and the QM atoms' bead positions in the properties."""
    root = ET.parse(REPO / "inputs" / template).getroot()
    root.find("total_steps").text = f" {steps} "
    for init in root.iter("initialize"):
        init.set("nbeads", str(nbeads))
    out = root.find("output")
    for traj in out.findall("trajectory"):  # whole-system frames are not needed here
        out.remove(traj)
    props = ", ".join(f"atom_x_path{{angstrom}}(atom={a})" for a in QM)
    ET.SubElement(out, "properties", stride=str(stride), filename="qm").text = f" [ step, {props} ] "
    if nbeads > 1:
        for ff in root.iter("ffsocket"):
            if ff.get("name") == "qmmm":  # all beads in one request: one batched model evaluation
                ET.SubElement(ff, "batch_size").text = str(nbeads)
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target)
    return target


def launch(xml: Path, run_dir: Path, workers: int) -> None:
    cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", str(HERE),
           "--run-dir", str(run_dir), "--workers", str(workers)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def oh_distances(run_dir: Path, nbeads: int, discard: float) -> np.ndarray:
    """All O-H distances (A) of all beads after discarding the first fraction ``discard`` of the run."""
    data = np.loadtxt(run_dir / "simulation.qm", ndmin=2)
    data = data[int(len(data) * discard):]
    xyz = data[:, 1:].reshape(len(data), len(QM), nbeads, 3)  # atom_x_path: bead-major x, y, z per atom
    o, h1, h2 = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    return np.concatenate([np.linalg.norm(h1 - o, axis=-1).ravel(), np.linalg.norm(h2 - o, axis=-1).ravel()])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--md-steps", type=int, default=8000, help="classical steps of 0.5 fs (default 8000)")
    p.add_argument("--pimd-steps", type=int, default=8000, help="PIMD steps of 0.25 fs (default 8000)")
    p.add_argument("--beads", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--discard", type=float, default=0.2, help="fraction discarded as equilibration")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "nqe-water")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()

    md_dir, pimd_dir = args.runs / "md", args.runs / "pimd"
    if not args.analyse_only:
        launch(prepare("md-nvt.xml", args.md_steps, 1, 4, args.runs / "md.xml"), md_dir, args.workers)
        launch(prepare("pimd.xml", args.pimd_steps, args.beads, 4, args.runs / "pimd.xml"), pimd_dir, args.workers)

    classical = oh_distances(md_dir, 1, args.discard)
    quantum = oh_distances(pimd_dir, args.beads, args.discard)
    stats = {name: {"mean_A": float(d.mean()), "std_A": float(d.std()), "samples": int(d.size)}
             for name, d in (("classical", classical), ("pimd", quantum))}
    stats["pimd_beads"] = args.beads
    stats["md_ps"] = args.md_steps * 0.5e-3
    stats["pimd_ps"] = args.pimd_steps * 0.25e-3

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0.75, 1.25, 101)
    for name, d, color in (("classical MD", classical, "C0"), (f"PIMD, {args.beads} beads", quantum, "C3")):
        ax.hist(d, bins=bins, density=True, histtype="stepfilled", alpha=0.35, color=color,
                label=f"{name}: {d.mean():.4f} ± {d.std():.4f} Å")
        ax.hist(d, bins=bins, density=True, histtype="step", color=color)
    ax.set_xlabel("O–H distance of the QM water (Å)")
    ax.set_ylabel("probability density (1/Å)")
    ax.set_title("QM water in MM water, 300 K: nuclear quantum effects")
    ax.legend(fontsize=9)
    fig.tight_layout()
    fig.savefig(HERE / "nqe.png", dpi=120)
    (HERE / "nqe.json").write_text(json.dumps(stats, indent=1))
    for name in ("classical", "pimd"):
        s = stats[name]
        print(f"{name:9s}: r(OH) = {s['mean_A']:.4f} A, width {s['std_A']:.4f} A ({s['samples']} samples)")
    print(f"wrote {HERE / 'nqe.png'} and {HERE / 'nqe.json'}")


if __name__ == "__main__":
    main()
