"""Free-energy profile of Cl- + CH3Cl -> ClCH3 + Cl- in water, by umbrella sampling driven by i-PI.

The reaction coordinate is xi = d(C-Cl1) - d(C-Cl2) (A): about -1.4 at the
reactant ion-dipole complex, 0 at the transition state, +1.4 at the product.

1. Starting structures: for every window the solute is restrained (OpenMM, the
   sampler of `examples/sn2/sample.py`) to the reference path at xi0 while the
   water equilibrates around it.
2. One i-PI run holds all windows as independent systems, each with the ML/MM
   potential (model worker + OpenMM worker, shared) and its own umbrella bias
   k/2 (xi - xi0)^2 (`qmmm_driver/ipi/umbrella.py`, an i-PI `<ffdirect>` bias);
   the model evaluates all windows' structures in one batch per step.
3. MBAR (pymbar) turns the biased samples, decorrelated window by window, into
   F(xi) with statistical error bars; the barrier is read off it.

    python examples/sn2/free_energy.py                 # prepare, run, analyse (17 windows of 1 ps: 16 min on 2 cores)
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
from ipi.scripting import read_output

from qmmm_driver.launcher import MODELS

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
import solute as sn2  # noqa: E402

KT_300 = 8.617333262e-5 * 300.0  # eV


def window_starts(xis: np.ndarray, out: Path, equilibrate_ps: float, seed: int) -> list[Path]:
    """Equilibrated start of every window (solute restrained to the reference path, OpenMM)."""
    from openmm import app, unit

    from qmmm_driver.mm.sampling import Sampler
    from qmmm_driver.mm.systems import WATER_XML, MMSetup

    pdb = app.PDBFile(str(MODELS / "sn2" / "system.pdb"))
    setup = MMSetup(name="sn2", topology=pdb.topology,
                    positions=np.array(pdb.getPositions(asNumpy=True).value_in_unit(unit.nanometer)),
                    forcefield_files=[WATER_XML, sn2.SOLUTE_XML], qm_indices=np.arange(6), qm_charge=-1)
    sampler = Sampler(setup, 300.0, 1.0, seed, 10.0, 12.0, threads=1)
    sampler.hold_qm(sn2.geometry(float(xis[0])))
    sampler.minimize()
    starts = []
    for k, xi0 in enumerate(xis):  # in order of xi, so that each window starts from its neighbour
        sampler.set_qm_charges(sn2.charges(float(xi0)))
        sampler.hold_qm(sn2.geometry(float(xi0)), ramp_ps=equilibrate_ps / 2)  # the hold travels, then settles
        sampler.equilibrate(equilibrate_ps / 2)
        starts.append(sampler.write_system(out / f"w{k:02d}")["extxyz"].resolve())
        print(f"window {k:2d}: xi0 = {xi0:+.2f} A equilibrated", flush=True)
    return starts


def ipi_input(xis, starts, k_eV: float, k_wall: float, k_bond: float, bond: float, steps: int, stride: int) -> str:
    umbrella = REPO / "qmmm_driver" / "ipi" / "umbrella.py"
    props = ("step, time{picosecond}, temperature{kelvin}, potential{electronvolt}, ensemble_bias{electronvolt}, "
             "atom_x{angstrom}(atom=0), atom_x{angstrom}(atom=4), atom_x{angstrom}(atom=5)")
    ffs, systems = [], []
    for k, (xi0, start) in enumerate(zip(xis, starts)):
        ffs.append(f"""  <ffdirect name='umbrella_{k}' pbc='false'>
    <pes>custom</pes> <pes_path>{umbrella}</pes_path>
    <parameters>{{atoms: 0 4 5, xi0: {xi0:.4f}, k: {k_eV}, k_wall: {k_wall}, wall: 0.3, k_bond: {k_bond}, bond: {bond}}}</parameters>
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


def window_samples(run_dir: Path, n_windows: int, discard: float,
                   last_step: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """xi and the shorter C-Cl distance (A) of every window's recorded steps up to ``last_step`` (all if None),
    after discarding the first fraction ``discard`` of them."""
    xis, shorter = [], []
    for k in range(n_windows):
        values, _ = read_output(str(run_dir / f"w{k:02d}_simulation.out"))
        upto = np.atleast_1d(values["step"]) <= (np.inf if last_step is None else last_step)
        c, cl1, cl2 = (np.atleast_2d(values[f"atom_x(atom={a})"])[upto] for a in (0, 4, 5))
        d1, d2 = np.linalg.norm(cl1 - c, axis=1), np.linalg.norm(cl2 - c, axis=1)
        kept = slice(int(len(d1) * discard), None)
        xis.append((d1 - d2)[kept])
        shorter.append(np.minimum(d1, d2)[kept])
    return xis, shorter


def steps_done(run_dir: Path) -> int:
    """The last MD step written (a run continued with `launch --restart` appends to the same files)."""
    return int(np.atleast_1d(read_output(str(run_dir / "w00_simulation.out"))[0]["step"])[-1])


def free_energy(samples: list[np.ndarray], centres: np.ndarray, k_eV: float, kT: float, bins: np.ndarray):
    """F(xi) (eV, minimum 0) and its statistical uncertainty on the bin centres, by MBAR (pymbar).

    Each window's series is reduced to uncorrelated samples first (pymbar's statistical inefficiency), so
    that the error bars count independent samples only.
    """
    import pymbar
    from pymbar import timeseries

    kept = [s[timeseries.subsample_correlated_data(s)] for s in samples]
    x_n = np.concatenate(kept)
    n_k = np.array([len(s) for s in kept])
    u_kn = 0.5 * k_eV * (x_n[None, :] - centres[:, None]) ** 2 / kT   # reduced bias of every sample in every window
    fes = pymbar.FES(u_kn, n_k)
    fes.generate_fes(np.zeros_like(x_n), x_n, fes_type="histogram", histogram_parameters={"bin_edges": bins})
    mid = 0.5 * (bins[1:] + bins[:-1])
    occupied = np.histogram(x_n, bins)[0] > 0
    result = fes.get_fes(mid[occupied], reference_point="from-lowest", uncertainty_method="analytical")
    return mid[occupied], result["f_i"] * kT, result["df_i"] * kT, n_k


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--windows", default="-2.0:2.0:21",
                   help="xi0 values start:stop:count (A); write --windows=-2.0:2.0:21 (a value starting with - "
                        "needs the =)")
    p.add_argument("--k", type=float, default=5.0,
                   help="umbrella force constant, eV/A^2 (default 5: with 3 the transition-state window slid 0.2 A "
                        "off its centre and lost overlap with its neighbour)")
    p.add_argument("--k-wall", type=float, default=10.0,
                   help="collinearity wall on d(C-Cl1) + d(C-Cl2) - d(Cl1-Cl2) > 0.3 A, eV/A^2 (default 10; 0: none)")
    p.add_argument("--k-bond", type=float, default=20.0,
                   help="wall on the shorter C-Cl distance beyond --bond, eV/A^2 (default 20; 0: none)")
    p.add_argument("--bond", type=float, default=2.5,
                   help="where the bond wall starts, A (default 2.5: the longest C-Cl bond the path frames hold "
                        "is 2.4 A)")
    p.add_argument("--steps", type=int, default=4000, help="steps of 0.5 fs per window (default 4000 = 2 ps)")
    p.add_argument("--equilibrate", type=float, default=2.0, help="ps of OpenMM equilibration per window start")
    p.add_argument("--discard", type=float, default=0.2, help="fraction of each window discarded")
    p.add_argument("--last-step", type=int, default=None,
                   help="analyse the steps up to this one only (e.g. those before a window blew up)")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--runs", type=Path, default=REPO / "runs" / "sn2-umbrella")
    p.add_argument("--analyse-only", action="store_true")
    args = p.parse_args()
    start, stop, count = args.windows.split(":")
    xis = np.linspace(float(start), float(stop), int(count))
    run_dir = args.runs / "ipi"
    if not args.analyse_only:
        if run_dir.is_dir() and any(run_dir.iterdir()):
            p.error(f"{run_dir} holds an earlier umbrella run: analyse it with --analyse-only, or give --runs a "
                    "new folder (nothing was equilibrated)")
        starts = window_starts(xis, args.runs / "starts", args.equilibrate, seed=5)
        xml = args.runs / "umbrella.xml"
        xml.write_text(ipi_input(xis, starts, args.k, args.k_wall, args.k_bond, args.bond, args.steps,
                                 stride=2))
        cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", "sn2",
               "--run-dir", str(run_dir), "--workers", str(args.workers)]
        print("$", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)

    samples, shorter = window_samples(run_dir, len(xis), args.discard, args.last_step)
    bins = np.linspace(xis[0] - 0.4, xis[-1] + 0.4, 81)
    mid, free, err, independent = free_energy(samples, xis, args.k, KT_300, bins)
    kcal = 23.0605  # kcal/mol per eV
    reactant, product, ts = mid < -0.5, mid > 0.5, np.abs(mid) < 0.5
    top = int(np.flatnonzero(ts)[np.argmax(free[ts])])
    low_r = int(np.flatnonzero(reactant)[np.argmin(free[reactant])])
    low_p = int(np.flatnonzero(product)[np.argmin(free[product])])
    # the reaction is symmetric: the two sides measure the same barrier, their difference the convergence
    barriers = (free[top] - free[low_r], free[top] - free[low_p])
    errors = (np.hypot(err[top], err[low_r]), np.hypot(err[top], err[low_p]))
    summary = {
        "windows": len(xis), "k_eV_per_A2": args.k, "k_wall_eV_per_A2": args.k_wall,
        "k_bond_eV_per_A2": args.k_bond, "bond_wall_A": args.bond,
        # the bond wall only keeps the run where the model was trained if it seldom acts
        "longest_shorter_C_Cl_A": float(max(s.max() for s in shorter)),
        "fraction_of_samples_beyond_bond_wall": float(np.mean(np.concatenate(shorter) > args.bond)),
        "ps_per_window": min(steps_done(run_dir), args.last_step or np.inf) * 0.5e-3,
        "samples_per_window": [int(len(s)) for s in samples],
        "independent_samples_per_window": independent.tolist(),
        "reactant_xi_A": float(mid[low_r]), "transition_state_xi_A": float(mid[top]), "product_xi_A": float(mid[low_p]),
        "barrier_from_reactant_kcal_per_mol": float(barriers[0] * kcal),
        "barrier_from_reactant_error_kcal_per_mol": float(errors[0] * kcal),
        "barrier_from_product_kcal_per_mol": float(barriers[1] * kcal),
        "barrier_from_product_error_kcal_per_mol": float(errors[1] * kcal),
        "barrier_mean_kcal_per_mol": float(0.5 * sum(barriers) * kcal),
        "product_minus_reactant_kcal_per_mol": float((barriers[0] - barriers[1]) * kcal),
        "method": "MBAR (pymbar), histogram FES, analytical uncertainties on decorrelated samples",
    }

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(6.5, 6.5), sharex=True, gridspec_kw={"height_ratios": [2, 1]})
    ax1.fill_between(mid, (free - err) * kcal, (free + err) * kcal, color="C3", alpha=0.3, lw=0)
    ax1.plot(mid, free * kcal, color="C3")
    ax1.set_ylabel("free energy (kcal/mol)")
    ax1.set_title(f"Cl$^-$ + CH$_3$Cl in water (ML/MM, 300 K, MBAR): barrier "
                  f"{summary['barrier_from_reactant_kcal_per_mol']:.1f} ± {summary['barrier_from_reactant_error_kcal_per_mol']:.1f}"
                  f" / {summary['barrier_from_product_kcal_per_mol']:.1f} ± "
                  f"{summary['barrier_from_product_error_kcal_per_mol']:.1f} kcal/mol", fontsize=9)
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
