"""Free-energy profile of Cl- + CH3Cl -> ClCH3 + Cl- in water, by umbrella sampling driven by i-PI.

The reaction coordinate is xi = d(C-Cl1) - d(C-Cl2) (A): about -1.4 at the
reactant ion-dipole complex, 0 at the transition state, +1.4 at the product.

1. Starting structures: for every window the solute is restrained (OpenMM, the
   sampler of `qmmm-driver sample sn2`) to the reference path at xi0 while the
   water equilibrates around it.
2. One i-PI run holds all windows as independent systems, each with the ML/MM
   potential (model worker + OpenMM worker, shared) and its own umbrella bias
   k/2 (xi - xi0)^2 (`qmmm_driver/umbrella.py`, an i-PI `<ffdirect>` bias); the
   model evaluates all windows' structures in one batch per step.
3. WHAM turns the biased xi histograms into F(xi); the barrier is read off it.

    python examples/sn2/free_energy.py                 # prepare, run, analyse (about an hour on 2 cores)
    python examples/sn2/free_energy.py --analyse-only  # re-plot from the run directory

Writes examples/sn2/free_energy.png and examples/sn2/free_energy.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
KT_300 = 8.617333262e-5 * 300.0  # eV


def window_starts(xis: np.ndarray, out: Path, equilibrate_ps: float, seed: int) -> list[Path]:
    """Equilibrated start of every window (solute restrained to the reference path, OpenMM)."""
    from openmm import app, unit

    from qmmm_driver.mm_systems import SN2_XML, WATER_XML, MMSetup
    from qmmm_driver.sampling import Sampler

    pdb = app.PDBFile(str(HERE / "system.pdb"))
    setup = MMSetup(name="sn2", topology=pdb.topology,
                    positions=np.array(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)),
                    forcefield_files=[WATER_XML, SN2_XML], qm_indices=np.arange(6), qm_charge=-1)
    sampler = Sampler(setup, 300.0, 1.0, seed, 10.0, 12.0, threads=1)
    sampler.minimize()
    starts = []
    for k, xi0 in enumerate(xis):  # in order of xi, so that each window starts from its neighbour
        sampler.set_window(float(xi0))
        sampler.run(equilibrate_ps)
        starts.append(sampler.write_system(out / f"w{k:02d}")["extxyz"].resolve())
        print(f"window {k:2d}: xi0 = {xi0:+.2f} A equilibrated", flush=True)
    return starts


def ipi_input(xis, starts, k_eV: float, k_wall: float, steps: int, stride: int) -> str:
    umbrella = REPO / "qmmm_driver" / "umbrella.py"
    props = ("step, time{picosecond}, temperature{kelvin}, potential{electronvolt}, ensemble_bias{electronvolt}, "
             "atom_x{angstrom}(atom=0), atom_x{angstrom}(atom=4), atom_x{angstrom}(atom=5)")
    ffs, systems = [], []
    for k, (xi0, start) in enumerate(zip(xis, starts)):
        ffs.append(f"""  <ffdirect name='umbrella_{k}' pbc='false'>
    <pes>custom</pes> <pes_path>{umbrella}</pes_path>
    <parameters>{{atoms: 0 4 5, xi0: {xi0:.4f}, k: {k_eV}, k_wall: {k_wall}, wall: 0.3}}</parameters>
  </ffdirect>""")
        systems.append(f"""  <system prefix='w{k:02d}'>
    <initialize nbeads='1'>
      <file mode='ase'> {start} </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities>
    </initialize>
    <forces> <force forcefield='qmmm'/> <force forcefield='mm'/> </forces>
    <ensemble>
      <temperature units='kelvin'> 300 </temperature>
      <bias> <force forcefield='umbrella_{k}'/> </bias>
    </ensemble>
    <motion mode='dynamics'>
      <dynamics mode='nvt'>
        <timestep units='femtosecond'> 0.5 </timestep>
        <thermostat mode='langevin'> <tau units='femtosecond'> 100 </tau> </thermostat>
      </dynamics>
    </motion>
  </system>""")
    nl = "\n"
    return f"""<!-- Umbrella sampling of the SN2 reaction in water: {len(xis)} independent windows, written by
     examples/sn2/free_energy.py. -->
<simulation verbosity='low'>
  <output prefix='simulation'>
    <properties stride='{stride}' filename='out'> [ {props} ] </properties>
    <checkpoint filename='chk' stride='1000' overwrite='true'/>
  </output>
  <total_steps> {steps} </total_steps>
  <prng><seed> 27182 </seed></prng>
  <ffsocket name='qmmm' mode='unix' pbc='false'>
    <address>qmmm</address>
    <batch_size> {len(xis)} </batch_size>
  </ffsocket>
  <ffsocket name='mm' mode='unix' pbc='false'> <address>mm</address> </ffsocket>
{nl.join(ffs)}
{nl.join(systems)}
</simulation>
"""


def xi_samples(run_dir: Path, n_windows: int, discard: float) -> list[np.ndarray]:
    out = []
    for k in range(n_windows):
        data = np.loadtxt(run_dir / f"w{k:02d}_simulation.out", ndmin=2)
        data = data[int(len(data) * discard):]
        c, cl1, cl2 = data[:, 5:8], data[:, 8:11], data[:, 11:14]
        out.append(np.linalg.norm(cl1 - c, axis=1) - np.linalg.norm(cl2 - c, axis=1))
    return out


def steps_done(run_dir: Path) -> int:
    """The last MD step written (a run continued with `launch --restart` appends to the same files)."""
    return int(np.loadtxt(run_dir / "w00_simulation.out", ndmin=2)[-1, 0])


def wham(samples: list[np.ndarray], centres: np.ndarray, k_eV: float, kT: float, bins: np.ndarray,
         tol: float = 1e-10, max_iter: int = 100000) -> tuple[np.ndarray, np.ndarray]:
    """Weighted histogram analysis: F(xi) (eV, minimum 0) on the bin centres."""
    mid = 0.5 * (bins[1:] + bins[:-1])
    counts = np.array([np.histogram(s, bins)[0] for s in samples], dtype=float)  # [windows, bins]
    n = counts.sum(axis=1)
    bias = 0.5 * k_eV * (mid[None, :] - centres[:, None]) ** 2 / kT       # [windows, bins]
    f = np.zeros(len(samples))
    total = counts.sum(axis=0)
    for _ in range(max_iter):
        p = total / (n[:, None] * np.exp(f[:, None] - bias)).sum(axis=0)
        f_new = -np.log((p[None, :] * np.exp(-bias)).sum(axis=1))
        f_new -= f_new[0]
        if np.abs(f_new - f).max() < tol:
            f = f_new
            break
        f = f_new
    with np.errstate(divide="ignore"):
        free = -kT * np.log(p)
    return mid, free - free[np.isfinite(free)].min()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", default="-2.0:2.0:21", help="xi0 values start:stop:count (A)")
    p.add_argument("--k", type=float, default=3.0, help="umbrella force constant, eV/A^2 (default 3)")
    p.add_argument("--k-wall", type=float, default=10.0,
                   help="collinearity wall on d(C-Cl1) + d(C-Cl2) - d(Cl1-Cl2) > 0.3 A, eV/A^2 (default 10; 0: none)")
    p.add_argument("--steps", type=int, default=4000, help="steps of 0.5 fs per window (default 4000 = 2 ps)")
    p.add_argument("--equilibrate", type=float, default=2.0, help="ps of OpenMM equilibration per window start")
    p.add_argument("--discard", type=float, default=0.2, help="fraction of each window discarded")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "sn2-umbrella")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    start, stop, count = args.windows.split(":")
    xis = np.linspace(float(start), float(stop), int(count))
    run_dir = args.runs / "ipi"
    if not args.analyse_only:
        starts = window_starts(xis, args.runs / "starts", args.equilibrate, seed=5)
        xml = args.runs / "umbrella.xml"
        xml.write_text(ipi_input(xis, starts, args.k, args.k_wall, args.steps, stride=2))
        cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", str(HERE),
               "--run-dir", str(run_dir), "--workers", str(args.workers)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    samples = xi_samples(run_dir, len(xis), args.discard)
    bins = np.linspace(xis[0] - 0.4, xis[-1] + 0.4, 121)
    mid, free = wham(samples, xis, args.k, KT_300, bins)
    ok = np.isfinite(free)
    reactant, product = ok & (mid < -0.5), ok & (mid > 0.5)
    ts = ok & (np.abs(mid) < 0.5)
    top = float(free[ts].max())
    # the reaction is symmetric: the two sides measure the same barrier, their difference the convergence
    barriers = (top - float(free[reactant].min()), top - float(free[product].min()))
    summary = {
        "windows": len(xis), "k_eV_per_A2": args.k, "k_wall_eV_per_A2": args.k_wall,
        "ps_per_window": steps_done(run_dir) * 0.5e-3,
        "samples_per_window": [int(len(s)) for s in samples],
        "reactant_xi_A": float(mid[reactant][np.argmin(free[reactant])]),
        "transition_state_xi_A": float(mid[ts][np.argmax(free[ts])]),
        "product_xi_A": float(mid[product][np.argmin(free[product])]),
        "barrier_from_reactant_kcal_per_mol": barriers[0] * 23.0605,
        "barrier_from_product_kcal_per_mol": barriers[1] * 23.0605,
        "barrier_mean_kcal_per_mol": 0.5 * sum(barriers) * 23.0605,
        "product_minus_reactant_kcal_per_mol": (barriers[0] - barriers[1]) * 23.0605,
    }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax1.plot(mid[ok], free[ok] * 23.0605, color="C3")
    ax1.set_ylabel("free energy (kcal/mol)")
    ax1.set_title(f"Cl$^-$ + CH$_3$Cl in water (ML/MM, 300 K): barrier "
                  f"{summary['barrier_from_reactant_kcal_per_mol']:.1f} / "
                  f"{summary['barrier_from_product_kcal_per_mol']:.1f} kcal/mol (from each side)", fontsize=10)
    ax1.grid(alpha=0.3)
    for s in samples:
        ax2.hist(s, bins=bins, histtype="step")
    ax2.set_xlabel("ξ = d(C–Cl1) − d(C–Cl2) (Å)")
    ax2.set_ylabel("samples per window")
    fig.tight_layout()
    fig.savefig(HERE / "free_energy.png", dpi=120)
    (HERE / "free_energy.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
