"""Unlabelled QM/MM frames from OpenMM molecular dynamics.

Classical MD (OpenMM, CPU platform, flexible molecules, PME, Langevin) of an
:class:`~qmmm_driver.mm.systems.MMSetup`; each frame is the configuration
presented exactly as the driver presents it to the model (whole molecules at
the nearest image of the QM region, cut and switched between r_on and r_off,
see :mod:`qmmm_driver.embedding`), written as a cluster frame whose
``mm_charge`` are the switched charges.

Environment options:

- QM atoms may get Gaussian displacements (``qm_noise``, A) so that frames cover
  the nuclear quantum broadening that path-integral runs visit;
- an MM ion is held by a flat-bottom restraint at a distance range from the
  *nearest* QM atom (:func:`distance_wall`);
- ``charge_noise`` multiplies the charges of every MM molecule (ions included) by
  its own factor ``1 + charge_noise * N(0, 1)`` per frame: neutral molecules stay
  neutral, the fields and their gradients at the QM atoms change (field
  augmentation);
- :meth:`Sampler.hold_qm` restrains the QM atoms to a reference geometry and
  :meth:`Sampler.set_qm_charges` sets their MM charges (umbrella windows along a
  reaction, as ``examples/sn2/sample.py`` does).
"""

from __future__ import annotations

import numpy as np

from ..errors import InputError
from ..structures import QMMMStructure
from ..units import ANGSTROM_TO_BOHR
from .systems import SOLVENTS, min_image_distances

HOLD_K = 50000.0          # kJ/mol/nm^2: about 0.07 A thermal spread per coordinate at 300 K
HOLD_TOLERANCE_A = 0.35   # a held QM atom farther from its hold point (5 spreads) is not held: no frame is taken
HOLD_RETRIES = 40         # intervals a frame waits for the held atoms to come back before sampling gives up
HOLD_RAMP_STAGES = 50     # steps in which hold points travel to a new geometry (Sampler.hold_qm with ramp_ps)
DISTANCE_WALL_K = 1000.0  # kJ/mol/A^2: flat-bottom distance walls (ions, acceptors)


def distance_wall(atom: int, targets: list[int], lo_A: float, hi_A: float):
    """Flat-bottom restraint keeping the distance of ``atom`` to the nearest of ``targets`` in [lo, hi] (A).

    One bond of the returned force per held atom: ``force.addBond([other] + targets, [])`` holds another
    atom to the same targets and range."""
    import openmm

    nearest = "distance(p1, p2)"
    for k in range(3, len(targets) + 2):
        nearest = f"min({nearest}, distance(p1, p{k}))"
    force = openmm.CustomCompoundBondForce(
        len(targets) + 1, f"0.5*kwall*(step(lo-d)*(d-lo)^2 + step(d-hi)*(d-hi)^2); d=10*{nearest}")
    force.addGlobalParameter("kwall", DISTANCE_WALL_K)
    force.addGlobalParameter("lo", float(lo_A))
    force.addGlobalParameter("hi", float(hi_A))
    force.addBond([int(atom)] + [int(a) for a in targets], [])
    force.setUsesPeriodicBoundaryConditions(True)
    return force


def align(mobile: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``mobile`` rotated and translated onto ``target`` (least squares, Kabsch)."""
    a = mobile - mobile.mean(axis=0)
    b = target - target.mean(axis=0)
    u, _, vt = np.linalg.svd(a.T @ b)
    d = np.sign(np.linalg.det(u @ vt))
    return a @ (u @ np.diag([1.0, 1.0, d]) @ vt) + target.mean(axis=0)


class Sampler:
    """OpenMM MD of an :class:`~qmmm_driver.mm.systems.MMSetup` that emits presented cluster frames."""

    def __init__(self, setup, temperature: float, dt_fs: float, seed: int, r_on_A: float, r_off_A: float,
                 threads: int = 1, ion_range_A: tuple[float, float] = (3.0, 6.0)):
        import openmm
        from openmm import app, unit

        from ..embedding import Embedding

        self.setup = setup
        self.rng = np.random.default_rng(seed)
        system = setup.create_system()
        self.nb = next(f for f in system.getForces() if isinstance(f, openmm.NonbondedForce))
        self.qm = [int(i) for i in setup.qm_indices]
        # QM-QM nonbonded pairs carry no meaning here: the force field or a restraint holds the solute
        for x, a in enumerate(self.qm):
            for b in self.qm[x + 1:]:
                self.nb.addException(a, b, 0.0, 0.1, 0.0, replace=True)
        self.hold = openmm.CustomExternalForce("0.5*khold*periodicdistance(x, y, z, x0, y0, z0)^2")
        self.hold.addGlobalParameter("khold", 0.0)
        for name in ("x0", "y0", "z0"):
            self.hold.addPerParticleParameter(name)
        for a, p in zip(self.qm, setup.positions[self.qm]):
            self.hold.addParticle(a, list(p))
        system.addForce(self.hold)
        if setup.ion_index is not None:
            system.addForce(distance_wall(setup.ion_index, self.qm, *ion_range_A))
        integrator = openmm.LangevinMiddleIntegrator(temperature * unit.kelvin, 1.0 / unit.picosecond,
                                                     dt_fs * unit.femtosecond)
        integrator.setRandomNumberSeed(int(self.rng.integers(1, 2**31 - 1)))
        platform = openmm.Platform.getPlatformByName("CPU")
        self.sim = app.Simulation(setup.topology, system, integrator, platform, {"Threads": str(threads)})
        self.sim.context.setPositions(setup.positions * unit.nanometer)
        self._velocity_seed = int(self.rng.integers(1, 2**31 - 1))
        self.sim.context.setVelocitiesToTemperature(temperature * unit.kelvin, self._velocity_seed)
        self.dt_ps = dt_fs / 1000.0
        self.structure = setup.structure()
        self.embedding = Embedding(self.structure, r_on_A * ANGSTROM_TO_BOHR, r_off_A * ANGSTROM_TO_BOHR)
        self.r_on_A, self.r_off_A, self.temperature = r_on_A, r_off_A, temperature
        self.time_ps = 0.0
        self.hold_points_A = None

    def positions_A(self) -> np.ndarray:
        from openmm import unit

        state = self.sim.context.getState(getPositions=True)
        return np.array(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer)) * 10.0

    def hold_qm(self, reference_A: np.ndarray, ramp_ps: float = 0.0) -> None:
        """Restrain the QM atoms (harmonic, k = 50 000 kJ/mol/nm^2) to ``reference_A``, aligned onto their
        current positions (A).

        With ``ramp_ps`` > 0 the hold points travel there from the atoms' current positions in
        ``HOLD_RAMP_STAGES`` equal steps over ``ramp_ps`` of MD (counted in ``time_ps``), so that the solvent
        makes way and the thermostat takes up the restraint's work as it is done. A sudden change of window
        does not: a jump of 1-2 A (a methyl group turned by the alignment) puts hundreds of kT into the held
        atoms, which a friction of 1/ps removes only over picoseconds, and the hot atoms then stray from
        their hold points (``hold_deviation``) when sampling starts."""
        current = self.positions_A()[self.qm]
        target = align(np.asarray(reference_A, dtype=float), current)
        self.sim.context.setParameter("khold", HOLD_K)
        if ramp_ps <= 0.0:
            self._set_hold_points(target)
            return
        for stage in range(1, HOLD_RAMP_STAGES + 1):  # the last stage sets the target itself
            self._set_hold_points(current + (target - current) * (stage / HOLD_RAMP_STAGES))
            self.run(ramp_ps / HOLD_RAMP_STAGES)
        self.time_ps += ramp_ps

    def _set_hold_points(self, points_A: np.ndarray) -> None:
        self.hold_points_A = points_A
        for k, (a, p) in enumerate(zip(self.qm, points_A / 10.0)):
            self.hold.setParticleParameters(k, a, list(p))
        self.hold.updateParametersInContext(self.sim.context)

    def hold_deviation(self) -> float:
        """Largest distance (A, minimum image) of a held QM atom from its hold point; 0 when none is held."""
        if self.hold_points_A is None:
            return 0.0
        box = self.setup.box_nm()[0, 0] * 10.0
        delta = self.positions_A()[self.qm] - self.hold_points_A
        delta -= box * np.round(delta / box)
        return float(np.linalg.norm(delta, axis=1).max())

    def set_qm_charges(self, charges: np.ndarray) -> None:
        """Charges (e) the QM atoms carry in the MM sampling (they never reach the frames)."""
        for a, q in zip(self.qm, charges):
            _, sigma, eps = self.nb.getParticleParameters(a)
            self.nb.setParticleParameters(a, float(q), sigma, eps)
        self.nb.updateParametersInContext(self.sim.context)

    def ion_distance(self) -> float:
        """Distance (A, minimum image) of the MM ion to the nearest QM atom."""
        pos = self.positions_A()
        return float(min_image_distances(pos[self.qm], pos[[self.setup.ion_index]], self.setup.box_nm()[0, 0] * 10.0)
                     .min())

    def run(self, ps: float) -> None:
        self.sim.step(max(1, int(round(ps / self.dt_ps))))

    def equilibrate(self, ps: float) -> None:
        self.run(ps)
        self.time_ps += ps

    def minimize(self) -> None:
        """Minimise, then draw velocities again: OpenMM offsets the velocities of its leapfrog integrators by
        half a step of the current forces, which before minimisation (molecules packed into contact) can be
        thousands of nm/ps and blow the first steps up."""
        from openmm import unit

        self.sim.minimizeEnergy(maxIterations=500)
        self.sim.context.setVelocitiesToTemperature(self.temperature * unit.kelvin, self._velocity_seed)

    def write_system(self, directory) -> dict:
        """Write the current configuration as the system files of an i-PI run (``MMSetup.write``)."""
        import dataclasses

        from openmm import unit

        state = self.sim.context.getState(getPositions=True, enforcePeriodicBox=True)
        pos = np.array(state.getPositions(asNumpy=True).value_in_unit(unit.nanometer))
        return dataclasses.replace(self.setup, positions=pos).write(directory)

    def frame(self, qm_noise_A: float, info: dict, charge_noise: float = 0.0) -> QMMMStructure:
        """The current configuration as a presented cluster frame (:meth:`Embedding.cluster`)."""
        from openmm import unit

        state = self.sim.context.getState(getPositions=True)
        pos = state.getPositions(asNumpy=True).value_in_unit(unit.nanometer) * 10.0 * ANGSTROM_TO_BOHR
        shift = self.rng.normal(size=(len(self.qm), 3)) * qm_noise_A * ANGSTROM_TO_BOHR
        scale = None
        if charge_noise > 0.0:
            scale = lambda n_groups: 1.0 + charge_noise * self.rng.normal(size=n_groups)  # noqa: E731
        info = dict(info, temperature=self.temperature,
                    sampler=f"OpenMM flexible {SOLVENTS[self.setup.solvent].label}, PME, Langevin")
        frame = self.embedding.cluster(np.asarray(pos), self.structure.cell, shift, scale, info)
        frame.source = "sampler"
        return frame

    def sample(self, out, count: int, interval_ps: float, qm_noise_A: float, charge_noise: float, info: dict,
               bar=None) -> int:
        """Append ``count`` frames, ``interval_ps`` apart, to ``out`` (extended XYZ); ``bar`` is a tqdm bar.

        While the QM atoms are held (:meth:`hold_qm`), a configuration in which one of them is more than
        ``HOLD_TOLERANCE_A`` from its hold point is passed over for the next interval's: an atom that far out
        (five thermal spreads) is hot or pushed, and its frame would hold a solute strained by an eV or more,
        which a thermal ensemble never visits. Returns the number passed over; raises :class:`InputError`
        after ``HOLD_RETRIES`` in a row."""
        from ..structures import write_structures

        passed_over = 0
        for _ in range(int(count)):
            for _ in range(HOLD_RETRIES + 1):
                self.run(interval_ps)
                self.time_ps += interval_ps
                deviation = self.hold_deviation()
                if deviation <= HOLD_TOLERANCE_A:
                    break
                passed_over += 1
            else:
                raise InputError(f"the held QM atoms stayed more than {HOLD_TOLERANCE_A} A from their hold points "
                                 f"for {HOLD_RETRIES + 1} intervals (last {deviation:.2f} A at {self.time_ps:g} ps): "
                                 "the solvent cannot take the held geometry, or the atoms are still hot from a "
                                 "sudden change of hold (hold_qm ramp_ps); choose another window or bend")
            frame_info = dict(info, time_ps=round(self.time_ps, 4), charge_noise=charge_noise)
            if self.setup.ion_index is not None:
                frame_info["ion_distance"] = round(self.ion_distance(), 4)
            write_structures(out, [self.frame(qm_noise_A, frame_info, charge_noise)], append=True, decimals=6)
            if bar is not None:
                bar.update(1)
                if passed_over:
                    bar.set_postfix(passed_over=passed_over)
        return passed_over
