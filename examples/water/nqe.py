"""Nuclear quantum effects on a QM water in MM water: classical MD against PIMD.

Runs the templates `md-nvt` (classical, 1 bead), `pimd` (16 beads, PILE-L) and
`pimd-contracted` (the same PIMD with the MM nonbonded forces on a ring polymer
contracted to 4 beads) with the shipped model through `qmmm-driver launch`,
records the QM water's atoms every few steps, and compares the O-H distance
distributions (all beads for PIMD): zero-point motion lengthens and broadens
the bond; the contraction should leave it as it is.

    python examples/water/nqe.py                       # run both, then analyse (tens of minutes on 2 cores)
    python examples/water/nqe.py --analyse-only        # re-plot from the run directories

Writes examples/water/nqe.png and examples/water/nqe.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

from qmmm_driver.launcher import TEMPLATES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
QM = (0, 1, 2)  # O, H, H of the QM water in system.extxyz


def prepare(template: str, steps: int, nbeads: int, stride: int, target: Path) -> Path:
    """The template with ``steps``, ``nbeads`` and the QM atoms' bead positions in the properties."""
    root = ET.parse(TEMPLATES / template).getroot()
    root.find("total_steps").text = f" {steps} "
    for init in root.iter("initialize"):
        init.set("nbeads", str(nbeads))
    out = root.find("output")
    for traj in out.findall("trajectory"):  # whole-system frames are not needed here
        out.remove(traj)
    props = ", ".join(f"atom_x_path{{angstrom}}(atom={a})" for a in QM)
    ET.SubElement(out, "properties", stride=str(stride), filename="qm").text = f" [ step, {props} ] "
    target.parent.mkdir(parents=True, exist_ok=True)
    ET.ElementTree(root).write(target)
    return target


def launch(xml: Path, run_dir: Path, workers: int) -> float:
    """Run ``xml`` with the shipped water model; returns the wall-clock seconds."""
    cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", "water",
           "--run-dir", str(run_dir), "--workers", str(workers)]
    print("$", " ".join(cmd), flush=True)
    started = time.time()
    subprocess.run(cmd, check=True)
    return time.time() - started


def oh_distances(run_dir: Path, nbeads: int, discard: float) -> np.ndarray:
    """All O-H distances (A) of all beads after discarding the first fraction ``discard`` of the run."""
    # columns: step, then per QM atom its beads' x, y, z (i-PI's read_output keeps only the first value of a
    # property that writes several, so the file is read as a plain table)
    data = np.loadtxt(run_dir / "simulation.qm", ndmin=2)[:, 1:]
    data = data[int(len(data) * discard):]
    xyz = data.reshape(len(data), len(QM), nbeads, 3)
    o, h1, h2 = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    return np.concatenate([np.linalg.norm(h1 - o, axis=-1), np.linalg.norm(h2 - o, axis=-1)], axis=1)  # [frame, .]


def standard_error(per_frame: np.ndarray) -> float:
    """Standard error of the mean O-H distance, counting only statistically independent frames (pymbar)."""
    from pymbar import timeseries

    series = per_frame.mean(axis=1)
    return float(series.std() / np.sqrt(len(series) / timeseries.statistical_inefficiency(series)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--md-steps", type=int, default=8000, help="classical steps of 0.5 fs (default 8000)")
    p.add_argument("--pimd-steps", type=int, default=8000, help="PIMD steps of 0.25 fs, each run (default 8000)")
    p.add_argument("--beads", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--discard", type=float, default=0.2, help="fraction discarded as equilibration")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "nqe-water")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()

    dirs = {"classical": args.runs / "md", "pimd": args.runs / "pimd", "pimd_contracted": args.runs / "pimd-contracted"}
    wall = {}
    if not args.analyse_only:
        wall["classical"] = launch(prepare("md-nvt.xml", args.md_steps, 1, 4, args.runs / "md.xml"),
                                   dirs["classical"], args.workers)
        for name, template in (("pimd", "pimd.xml"), ("pimd_contracted", "pimd-contracted.xml")):
            wall[name] = launch(prepare(template, args.pimd_steps, args.beads, 4, args.runs / template), dirs[name],
                                args.workers)
        (args.runs / "wall_seconds.json").write_text(json.dumps(wall))
    elif (args.runs / "wall_seconds.json").exists():
        wall = json.loads((args.runs / "wall_seconds.json").read_text())
    frames = {name: oh_distances(d, 1 if name == "classical" else args.beads, args.discard) for name, d in dirs.items()}
    dist = {name: f.ravel() for name, f in frames.items()}
    stats = {name: {"mean_A": float(d.mean()), "std_A": float(d.std()), "samples": int(d.size),
                    "mean_standard_error_A": standard_error(frames[name]), "wall_seconds": wall.get(name)}
             for name, d in dist.items()}
    classical, quantum, contracted = dist["classical"], dist["pimd"], dist["pimd_contracted"]
    hist = [np.histogram(d, np.linspace(0.75, 1.25, 101), density=True)[0] for d in (quantum, contracted)]
    stats["contraction_error"] = {
        "mean_A": float(contracted.mean() - quantum.mean()), "std_A": float(contracted.std() - quantum.std()),
        "histogram_overlap": float(np.minimum(*hist).sum() * 0.005),  # 1 = identical distributions
        "mean_difference_error_A": float(np.hypot(stats["pimd"]["mean_standard_error_A"],
                                                  stats["pimd_contracted"]["mean_standard_error_A"]))}
    stats["pimd_beads"] = args.beads
    stats["md_ps"] = args.md_steps * 0.5e-3
    stats["pimd_ps"] = args.pimd_steps * 0.25e-3

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bins = np.linspace(0.75, 1.25, 101)
    for name, d, color in (("classical MD", classical, "C0"), (f"PIMD, {args.beads} beads", quantum, "C3"),
                           ("PIMD, MM nonbonded on 4 beads", contracted, "C2")):
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
    for name in ("classical", "pimd", "pimd_contracted"):
        s = stats[name]
        print(f"{name:15s}: r(OH) = {s['mean_A']:.4f} +- {s['mean_standard_error_A']:.4f} A, width {s['std_A']:.4f} A "
              f"({s['samples']} samples, {s['wall_seconds'] or 0:.0f} s)")
    print(f"wrote {HERE / 'nqe.png'} and {HERE / 'nqe.json'}")


if __name__ == "__main__":
    main()
