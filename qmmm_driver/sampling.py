"""``qmmm-driver sample``: unlabelled QM/MM frames from OpenMM molecular dynamics.

Classical MD (OpenMM, CPU platform, flexible TIP3P, PME, Langevin thermostat)
of an example system; every ``interval`` picoseconds the configuration is
presented exactly as the driver presents it to the model (whole molecules at
the nearest image of the QM region, cut and switched between r_on and r_off,
see :mod:`qmmm_driver.embedding`) and written as a cluster frame whose
``mm_charge`` are the switched charges.

- ``water``: one QM water in MM water. The QM atoms get Gaussian displacements
  (``--qm-noise``, A) so that the frames cover the nuclear quantum broadening
  that path-integral runs visit.
- ``sn2``: Cl- + CH3Cl (QM, charge -1) in water, umbrella windows along
  ``xi = d(C-Cl1) - d(C-Cl2)``: in each window the solute atoms are held by
  harmonic restraints (k = 50 000 kJ/mol/nm^2, about 0.07 A thermal spread per
  coordinate at 300 K) to a bond-order-conservation reference geometry at that
  xi (:func:`qmmm_driver.mm_systems.sn2_geometry`), with charges interpolated
  between reactant and product, while the water equilibrates around it.

Environments (``--solvent``, ``--ion``, ``--charge-noise``):

- ``--solvent water|methanol|acetonitrile``: flexible TIP3P, or OPLS-AA methanol
  or acetonitrile (``qmmm_driver/data/*.xml``) packed at liquid density.
- ``--ion NAME`` (Na+, K+, Mg2+, Ca2+, Cl-, ... from amber14/tip3p.xml) adds one
  MM ion whose distance to the *nearest* QM atom is held between
  ``--ion-distance LO:HI`` (A) by a flat-bottom restraint: ``1.8:3.0`` keeps a
  cation in the first shell of a QM water, ``3.5:7`` beyond it.
- ``--charge-noise SIGMA`` multiplies the charges of every MM molecule (each
  ion included) by its own factor ``1 + SIGMA * N(0, 1)`` in every frame:
  neutral molecules stay neutral, the fields and their gradients at the QM
  atoms change (field augmentation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .units import ANGSTROM_TO_BOHR

RESTRAINT_K = 50000.0  # kJ/mol/nm^2
ION_RESTRAINT_K = 1000.0  # kJ/mol/A^2, flat-bottom walls of the ion distance
SOLVENT_LABELS = {"water": "TIP3P (amber14)", "methanol": "OPLS-AA methanol", "acetonitrile": "OPLS-AA acetonitrile"}


def ion_restraint(ion: int, qm: list[int], lo_A: float, hi_A: float):
    """Flat-bottom restraint keeping the distance of atom ``ion`` to the nearest of ``qm`` in [lo, hi] (A)."""
    import openmm

    nearest = "distance(p1, p2)"
    for k in range(3, len(qm) + 2):
        nearest = f"min({nearest}, distance(p1, p{k}))"
    force = openmm.CustomCompoundBondForce(
        len(qm) + 1, f"0.5*kion*(step(lo-d)*(d-lo)^2 + step(d-hi)*(d-hi)^2); d=10*{nearest}")
    force.addGlobalParameter("kion", ION_RESTRAINT_K)
    force.addGlobalParameter("lo", float(lo_A))
    force.addGlobalParameter("hi", float(hi_A))
    force.addBond([int(ion)] + [int(a) for a in qm], [])
    force.setUsesPeriodicBoundaryConditions(True)
    return force


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("system", choices=["water", "sn2"], help="example system to sample")
    parser.add_argument("--out", required=True, type=Path, help="output frames (extended XYZ, appended)")
    parser.add_argument("--frames", type=int, required=True, help="number of frames (sn2: over all windows)")
    parser.add_argument("--windows", default="-2.0:2.0:17",
                        help="sn2 umbrella windows in xi (A) as start:stop:count (default -2.0:2.0:17)")
    parser.add_argument("--box", type=float, default=26.0, help="cubic box edge (A), > 2 r_off (default 26)")
    parser.add_argument("--interval", type=float, default=0.25, help="ps between frames (default 0.25)")
    parser.add_argument("--equilibrate", type=float, default=10.0, help="ps of equilibration before the first frame (default 10)")
    parser.add_argument("--window-equilibrate", type=float, default=2.0,
                        help="sn2: ps of equilibration at each new umbrella window (default 2)")
    parser.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    parser.add_argument("--dt", type=float, default=1.0, help="MD time step in fs (default 1.0)")
    parser.add_argument("--qm-noise", type=float, default=None,
                        help="Gaussian displacement of QM atoms per frame, A (default 0.05 water, 0 sn2)")
    parser.add_argument("--solvent", default="water", help="water (TIP3P), methanol or acetonitrile (OPLS-AA)")
    parser.add_argument("--ion", default=None, help="add one MM ion: Na+, K+, Li+, Mg2+, Ca2+, Zn2+, F-, Cl-, Br-")
    parser.add_argument("--ion-distance", default="3.0:6.0",
                        help="LO:HI, A: flat-bottom range of the ion's distance to the nearest QM atom "
                             "(default 3.0:6.0; 1.8:3.0 for the first shell of a cation around a QM water)")
    parser.add_argument("--charge-noise", type=float, default=0.0,
                        help="scale each MM molecule's charges by 1 + SIGMA*N(0,1) per frame (default 0)")
    parser.add_argument("--r-on", type=float, default=None, help="embedding switch start, A (default 10)")
    parser.add_argument("--r-off", type=float, default=None, help="embedding cutoff, A (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OpenMM CPU threads (default 1)")
    parser.add_argument("--system-dir", type=Path, default=None,
                        help="also write the starting system.pdb and system.extxyz here")


def parse_windows(text: str) -> np.ndarray:
    try:
        start, stop, count = text.split(":")
        return np.linspace(float(start), float(stop), int(count))
    except ValueError as err:
        from .errors import InputError

        raise InputError(f"--windows '{text}' is not start:stop:count (e.g. -2.0:2.0:17)") from err


def parse_range(text: str, option: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError as err:
        from .errors import InputError

        raise InputError(f"{option} '{text}' is not LO:HI in Angstrom (e.g. 1.8:3.0)") from err
    if not 0 <= lo < hi:
        from .errors import InputError

        raise InputError(f"{option} '{text}' needs 0 <= LO < HI")
    return lo, hi


def align(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``mobile`` rotated and translated onto ``target`` (least squares, Kabsch)."""
    a = mobile - mobile.mean(axis=0)
    b = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    rot = u @ np.diag([1.0, 1.0, d]) @ vt
    return a @ rot + target.mean(axis=0)


class Sampler:
    """OpenMM MD of an :class:`~qmmm_driver.mm_systems.MMSetup` that emits presented cluster frames."""

    def __init__(self, setup, temperature: float, dt_fs: float, seed: int, r_on_A: float, r_off_A: float,
                 threads: int = 1, ion_range_A: tuple[float, float] = (3.0, 6.0)):
        import openmm
        import torch
        from openmm import app, unit

        from .embedding import Embedding

        self.setup = setup
        self.rng = np.random.default_rng(seed)
        system = setup.create_system()
        self.nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
        qm = [int(i) for i in setup.qm_indices]
        # QM-QM nonbonded pairs carry no meaning here: the restraints or the force field hold the solute
        for a in qm:
            for b in qm:
                if a < b:
                    self.nb.addException(a, b, 0.0, 0.1, 0.0, replace=True)
        self.restraint = None
        if setup.name == "sn2":
            self.restraint = openmm.CustomExternalForce("0.5*k*periodicdistance(x, y, z, x0, y0, z0)^2")
            self.restraint.addGlobalParameter("k", RESTRAINT_K)
            for name in ("x0", "y0", "z0"):
                self.restraint.addPerParticleParameter(name)
            for a, p in zip(qm, setup.positions[qm]):
                self.restraint.addParticle(a, list(p))
            system.addForce(self.restraint)
        if setup.ion_index is not None:
            system.addForce(ion_restraint(setup.ion_index, qm, *ion_range_A))
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                     dt_fs * unit.femtosecond)
        integrator.setRandomNumberSeed(int(self.rng.integers(1, 2**31 - 1)))
        platform = openmm.Platform.getPlatformByName("CPU")
        self.sim = app.Simulation(setup.topology, system, integrator, platform, {"Threads": str(threads)})
        self.sim.context.setPositions(setup.positions * unit.nanometer)
        self.sim.context.setVelocitiesToTemperature(temperature * unit.kelvin, int(self.rng.integers(1, 2**31 - 1)))
        self.dt_ps = dt_fs / 1000.0
        self.qm_system = setup.qmmm_system()
        self.embedding = Embedding(self.qm_system, r_on_A * ANGSTROM_TO_BOHR, r_off_A * ANGSTROM_TO_BOHR)
        self.r_on_A, self.r_off_A, self.temperature = r_on_A, r_off_A, temperature
        self._torch = torch

    def set_window(self, xi: float) -> None:
        """Restrain the SN2 solute to the reference geometry at ``xi`` and set its charges."""
        from openmm import unit

        from .mm_systems import sn2_charges, sn2_geometry

        qm = [int(i) for i in self.setup.qm_indices]
        state = self.sim.context.getState(getPositions=True)
        current = np.array(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))[qm] * 10.0
        ref = align(sn2_geometry(xi), current) / 10.0
        for k, (a, p) in enumerate(zip(qm, ref)):
            self.restraint.setParticleParameters(k, a, list(p))
        self.restraint.updateParametersInContext(self.sim.context)
        for a, q in zip(qm, sn2_charges(xi)):
            _, sigma, eps = self.nb.getParticleParameters(a)
            self.nb.setParticleParameters(a, q, sigma, eps)
        self.nb.updateParametersInContext(self.sim.context)

    def write_system(self, directory: Path) -> dict:
        """Write the current configuration as the system files of an i-PI run (``MMSetup.write``)."""
        import dataclasses

        from openmm import unit

        state = self.sim.context.getState(getPositions=True, enforcePeriodicBox=True)
        pos = np.array(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        return dataclasses.replace(self.setup, positions=pos).write(directory)

    def ion_distance(self) -> float:
        """Distance (A, minimum image) of the MM ion to the nearest QM atom."""
        from openmm import unit

        state = self.sim.context.getState(getPositions=True)
        pos = np.array(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)) * 10.0
        box = self.setup.box_nm()[0, 0] * 10.0
        d = pos[self.setup.qm_indices] - pos[self.setup.ion_index]
        d -= box * np.round(d / box)
        return float(np.linalg.norm(d, axis=1).min())

    def run(self, ps: float) -> None:
        self.sim.step(max(1, int(round(ps / self.dt_ps))))

    def minimize(self) -> None:
        self.sim.minimizeEnergy(maxIterations=500)

    def frame(self, qm_noise_A: float, info: dict, charge_noise: float = 0.0):
        """The current configuration as a presented cluster frame."""
        from openmm import unit

        from .frames import Frame

        torch = self._torch
        state = self.sim.context.getState(getPositions=True)
        pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * 10.0 * ANGSTROM_TO_BOHR
        cell = np.array([[v[k].value_in_unit(unit.nanometer) for k in range(3)]
                         for v in state.getPeriodicBoxVectors()]) * 10.0 * ANGSTROM_TO_BOHR
        p = self.embedding.present(torch.as_tensor(pos)[None], torch.as_tensor(cell)[None])
        qm_pos = p.qm_pos + torch.as_tensor(self.rng.normal(size=tuple(p.qm_pos.shape)) * qm_noise_A * ANGSTROM_TO_BOHR)
        charges = self.embedding.effective_charges(p, qm_pos, p.mm_pos)
        if charge_noise > 0.0:
            factor = 1.0 + charge_noise * self.rng.normal(size=p.n_groups)
            charges = charges * torch.as_tensor(factor)[p.group]
        atoms = torch.cat([p.qm_atom, p.mm_atom]).numpy()
        numbers = self.qm_system.numbers[atoms]
        n_qm = p.qm_atom.numel()
        qm_flag = np.zeros(len(atoms), dtype=bool)
        qm_flag[:n_qm] = True
        info = dict(info, mm_switch_on=self.r_on_A, mm_switch_off=self.r_off_A, temperature=self.temperature,
                    sampler=f"OpenMM flexible {SOLVENT_LABELS[self.setup.solvent]}, PME, Langevin")
        return Frame(numbers=numbers, positions=torch.cat([qm_pos, p.mm_pos]).numpy(), qm=qm_flag,
                     mm_charge=np.concatenate([np.zeros(n_qm), charges.numpy()]),
                     qm_total_charge=self.qm_system.qm_charge, qm_multiplicity=1, info=info)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .embedding import DEFAULT_R_OFF_A, DEFAULT_R_ON_A
    from .errors import InputError
    from .frames import write_frames
    from .mm_systems import IONS, SOLVENTS, build_setup, sn2_xi

    r_on = DEFAULT_R_ON_A if args.r_on is None else args.r_on
    r_off = DEFAULT_R_OFF_A if args.r_off is None else args.r_off
    if args.box <= 2 * r_off:
        raise InputError(f"--box {args.box} A must exceed 2 r_off = {2 * r_off} A")
    if args.frames < 1:
        raise InputError("--frames must be at least 1")
    noise = args.qm_noise if args.qm_noise is not None else (0.05 if args.system == "water" else 0.0)
    if args.solvent not in SOLVENTS:
        raise InputError(f"--solvent {args.solvent}: known solvents are {', '.join(SOLVENTS)}")
    if args.ion is not None and args.ion not in IONS:
        raise InputError(f"--ion {args.ion}: known ions are {', '.join(IONS)}")
    ion_range = parse_range(args.ion_distance, "--ion-distance")
    if args.charge_noise < 0:
        raise InputError(f"--charge-noise {args.charge_noise} must be >= 0")
    setup = build_setup(args.system, box_A=args.box, seed=args.seed, ion=args.ion, solvent=args.solvent,
                        ion_distance_A=float(np.mean(ion_range)))
    sampler = Sampler(setup, args.temperature, args.dt, args.seed, r_on, r_off, args.threads, ion_range)
    if args.system == "sn2":
        windows = parse_windows(args.windows)
        per_window = np.full(len(windows), args.frames // len(windows))
        per_window[: args.frames % len(windows)] += 1
    else:
        windows, per_window = [None], [args.frames]
    label = args.solvent + (f"+{args.ion}" if args.ion else "") + (f"+noise{args.charge_noise:g}"
                                                                   if args.charge_noise else "")
    sampler.minimize()
    if args.system_dir is not None:  # an equilibrated start for i-PI and OpenMM
        sampler.run(args.equilibrate)
        written = sampler.write_system(args.system_dir)
        print(f"wrote {written['pdb']} and {written['extxyz']}")
    bar = tqdm(total=args.frames, desc=f"sampling {args.system}", unit="frame")
    if windows[0] is not None:
        sampler.set_window(float(windows[0]))
    sampler.run(args.equilibrate)
    time_ps = args.equilibrate
    for k, (xi0, count) in enumerate(zip(windows, per_window)):
        if xi0 is not None and k > 0:
            sampler.set_window(float(xi0))
            sampler.run(args.window_equilibrate)
            time_ps += args.window_equilibrate
        for _ in range(int(count)):
            sampler.run(args.interval)
            time_ps += args.interval
            info = {"system": args.system, "environment": label, "solvent": args.solvent,
                    "ion": args.ion or "none", "charge_noise": args.charge_noise,
                    "time_ps": round(time_ps, 4), "seed": args.seed}
            if args.ion:
                d = sampler.ion_distance()
                info["ion_distance"] = round(d, 4)
            frame = sampler.frame(noise, info, args.charge_noise)
            if xi0 is not None:
                qm_pos = frame.positions[frame.qm] / ANGSTROM_TO_BOHR
                frame.info.update(window_xi=round(float(xi0), 4), xi=float(sn2_xi(qm_pos)))
            write_frames(args.out, [frame], append=True, decimals=6)
            bar.update(1)
    bar.close()
    print(f"wrote {args.frames} frames to {args.out}")
    return 0
