"""ML/MM dynamics of a serine side chain cut from its backbone (link atom at CA-CB), against references.

    python examples/serine/md.py [--steps 20000]      # all four parts below (about an hour on 2 cores)
    python examples/serine/md.py --analyse-only        # re-plot from the run directories

1. ML/MM: ``qmmm-driver launch md-nvt --example examples/serine`` (i-PI, 0.5 fs, SVR 300 K): the model for the
   side chain CH2-OH with its link hydrogen, OpenMM (ff14SB, flexible TIP3P) for everything else; the atoms
   of the side-chain dihedrals every 10 steps, the whole system every 100.
2. Force-field reference: as many steps of plain ff14SB (OpenMM, Langevin 300 K, 0.5 fs, flexible) from the
   same start.
3. PySCF on the ML/MM trajectory: every ``--label-every``-th whole-system frame as the cluster frame the model
   sees, labelled like the training data (B3LYP/6-31+G*); the model's errors on its own trajectory.
4. NVE: ``qmmm-driver launch nve --example examples/serine``: drift of i-PI's conserved quantity.

Writes examples/serine/md.png and examples/serine/md.json.
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

from qmmm_driver.launcher import TEMPLATES

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DIHEDRALS = {"chi1": ("N", "CA", "CB", "OG"), "chi2": ("CA", "CB", "OG", "HG")}
ATOMS = ("N", "CA", "CB", "OG", "HG")
FORCEFIELD = ["amber14-all.xml", "amber14/tip3p.xml"]


def serine_atoms() -> dict[str, int]:
    """Indices of the serine's named atoms in examples/serine/system.pdb."""
    from openmm import app

    top = app.PDBFile(str(HERE / "system.pdb")).topology
    return {a.name: a.index for a in top.atoms() if a.residue.name == "SER"}


def dihedral(p: np.ndarray) -> np.ndarray:
    """Dihedral angles (degrees) of [..., 4, 3] positions."""
    b1, b2, b3 = p[..., 1, :] - p[..., 0, :], p[..., 2, :] - p[..., 1, :], p[..., 3, :] - p[..., 2, :]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    y = np.linalg.norm(b2, axis=-1) * np.einsum("...i,...i", b1, n2)
    return np.degrees(np.arctan2(y, np.einsum("...i,...i", n1, n2)))


def angles(xyz: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """chi1 and chi2 (degrees) from positions [frames, 3] of the named atoms."""
    return {name: dihedral(np.stack([xyz[a] for a in atoms], axis=-2)) for name, atoms in DIHEDRALS.items()}


# --------------------------------------------------------------------------- 1. ML/MM with i-PI


def launch(template: str, steps: int, run_dir: Path, side_stride: int | None) -> None:
    root = ET.parse(TEMPLATES / f"{template}.xml").getroot()
    root.find("total_steps").text = f" {steps} "
    if side_stride:
        index = serine_atoms()
        props = ", ".join(f"atom_x{{angstrom}}(atom={index[a]})" for a in ATOMS)
        ET.SubElement(root.find("output"), "properties", stride=str(side_stride), filename="side").text = \
            f" [ step, {props} ] "
    run_dir.mkdir(parents=True, exist_ok=True)
    xml = run_dir.parent / f"{run_dir.name}.xml"
    ET.ElementTree(root).write(xml)
    cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", str(HERE),
           "--run-dir", str(run_dir)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def mlmm_angles(run_dir: Path) -> dict[str, np.ndarray]:
    values, _ = read_output(str(run_dir / "simulation.side"))
    index = serine_atoms()
    return angles({a: np.atleast_2d(values[f"atom_x(atom={index[a]})"]) for a in ATOMS})


# --------------------------------------------------------------------------- 2. ff14SB reference


def reference_angles(steps: int, stride: int, out: Path) -> dict[str, np.ndarray]:
    """Plain ff14SB + flexible TIP3P from the example's start (PME, 10 A cutoff, 9 A switch, as the MM worker)."""
    if out.exists():
        return {k: v for k, v in np.load(out).items()}
    import openmm
    from openmm import app, unit
    from tqdm import tqdm

    pdb = app.PDBFile(str(HERE / "system.pdb"))
    system = app.ForceField(*FORCEFIELD).createSystem(
        pdb.topology, nonbondedMethod=app.PME, nonbondedCutoff=1.0 * unit.nanometer,
        switchDistance=0.9 * unit.nanometer, constraints=None, rigidWater=False)
    integrator = openmm.LangevinMiddleIntegrator(300 * unit.kelvin, 1 / unit.picosecond, 0.5 * unit.femtosecond)
    integrator.setRandomNumberSeed(7)
    ctx = openmm.Context(system, integrator, openmm.Platform.getPlatformByName("CPU"))
    ctx.setPositions(pdb.positions)
    ctx.setVelocitiesToTemperature(300 * unit.kelvin, 7)
    index = serine_atoms()
    rows = []
    for _ in tqdm(range(steps // stride), desc="ff14SB reference", unit="sample"):
        integrator.step(stride)
        pos = ctx.getState(getPositions=True).getPositions(asNumpy=True).value_in_unit(unit.angstrom)
        rows.append(np.array([pos[index[a]] for a in ATOMS]))
    xyz = np.array(rows)
    result = angles({a: xyz[:, k] for k, a in enumerate(ATOMS)})
    np.savez(out, **result)
    return result


# --------------------------------------------------------------------------- 3. PySCF on the ML/MM trajectory


def snapshot_errors(run_dir: Path, every: int) -> dict:
    """The model against PySCF on every ``every``-th whole-system frame of the ML/MM run."""
    import ase.io
    import torch

    from qmmm_driver.embedding import Embedding
    from qmmm_driver.evaluator import load
    from qmmm_driver.structures import QMMMStructure, read_structures, write_structures
    from qmmm_driver.training.metrics import evaluate_structures
    from qmmm_driver.units import ANGSTROM_TO_BOHR, HARTREE

    frames_file, labelled = run_dir / "snapshots.extxyz", run_dir / "snapshots_labelled.extxyz"
    if not frames_file.exists():
        model = load(HERE / "model.pt")
        system = QMMMStructure.read(HERE / "system.extxyz")
        embedding = Embedding(system, model.settings.mm_switch_on, model.settings.mm_switch_off)
        traj = ase.io.read(run_dir / "simulation.pos_0.extxyz", index=f"::{every}")
        frames = [embedding.cluster(a.positions * ANGSTROM_TO_BOHR, system.cell, info={"step": k * every})
                  for k, a in enumerate(traj[1:], start=1)]  # the start is not a trajectory frame
        write_structures(frames_file, frames)
    cmd = [sys.executable, "-m", "qmmm_driver.cli", "label", str(frames_file), "--out", str(labelled)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    model = load(HERE / "model.pt")
    metrics, pairs = evaluate_structures(model, read_structures(labelled, require_labels=True),
                                         6.0 * ANGSTROM_TO_BOHR, dtype=torch.float64)
    return {"summary": metrics.summary(), "energy_pairs_eV": (pairs["energy"] * HARTREE).tolist()}


# --------------------------------------------------------------------------- 4. NVE


def nve_drift(run_dir: Path) -> dict:
    props, _ = read_output(str(run_dir / "simulation.out"))
    import ase.io

    n_atoms = len(ase.io.read(HERE / "system.extxyz"))
    t, e = props["time"], props["conserved"]
    slope, intercept = np.polyfit(t, e, 1)
    return {"atoms": n_atoms, "ps": float(t[-1] - t[0]), "timestep_fs": 0.25,
            "drift_meV_per_atom_per_ps": 1000 * slope / n_atoms,
            "fluctuation_meV_per_atom": 1000 * float(np.std(e - (slope * t + intercept))) / n_atoms}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000, help="NVT steps of 0.5 fs for both runs (default 20000)")
    p.add_argument("--nve-steps", type=int, default=2000, help="NVE steps of 0.25 fs (default 2000)")
    p.add_argument("--label-every", type=int, default=10, help="label every k-th stored frame (default 10)")
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "serine")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    nvt, nve = args.runs / "nvt", args.runs / "nve"
    if not args.analyse_only:
        launch("md-nvt", args.steps, nvt, side_stride=10)
        launch("nve", args.nve_steps, nve, side_stride=None)
    ml = mlmm_angles(nvt)
    ref = reference_angles(args.steps, 10, args.runs / "ff14sb_angles.npz")
    snaps = snapshot_errors(nvt, args.label_every)
    summary = {"steps": args.steps, "timestep_fs": 0.5,
               "chi_mean_deg": {k: {"ML/MM": float(np.degrees(np.angle(np.exp(1j * np.radians(ml[k])).mean()))),
                                    "ff14SB": float(np.degrees(np.angle(np.exp(1j * np.radians(ref[k])).mean())))}
                                for k in DIHEDRALS},
               "pyscf_on_mlmm_trajectory": snaps["summary"], "nve": nve_drift(nve)}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    bins = np.linspace(-180, 180, 73)
    for ax, name in zip(axes[:2], DIHEDRALS):
        ax.hist(ref[name], bins=bins, density=True, alpha=0.5, color="grey", label="ff14SB (MM)")
        ax.hist(ml[name], bins=bins, density=True, histtype="step", lw=1.5, color="C3", label="ML/MM (link atom)")
        ax.set_xlabel(f"{name} ({'-'.join(DIHEDRALS[name])}) / degree")
        ax.set_ylabel("density")
        ax.legend(fontsize=8)
    e = np.array(snaps["energy_pairs_eV"]).reshape(-1, 2)
    s = summary["pyscf_on_mlmm_trajectory"]
    ax = axes[2]
    ax.scatter(e[:, 1] - e[:, 1].mean(), e[:, 0] - e[:, 1].mean(), s=12, color="C0")
    lim = np.abs(e - e[:, 1].mean()).max() * 1.1
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
    ax.set_xlabel("PySCF energy (eV, shifted)")
    ax.set_ylabel("model energy (eV, same shift)")
    ax.set_title(f"PySCF on {s['n_frames']} ML/MM frames: MAE {s['energy_mae_meV']:.0f} meV,\n"
                 f"mean signed {s['energy_mean_signed_meV']:+.0f} meV (points: one shift for both)", fontsize=9)
    fig.suptitle(f"serine side chain (QM, link atom at CA-CB) in TIP3P, {args.steps * 0.5 / 1000:g} ps each; "
                 f"NVE drift {summary['nve']['drift_meV_per_atom_per_ps']:.3f} meV/atom/ps", fontsize=10)
    fig.tight_layout()
    fig.savefig(HERE / "md.png", dpi=120)
    (HERE / "md.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
