"""Unlabelled SN2 frames along the reaction coordinate: umbrella windows of OpenMM MD around a held solute.

    python examples/sn2/sample.py --out frames.extxyz --frames 85 [--windows=-2.0:2.0:17] \
        [--solvent methanol] [--ion Mg2+ --ion-distance 3.0:6.0 [--ion-end-on 150]] [--charge-noise 0.15] \
        [--acceptor-contact 2:2.4:3.2]

In each window the solute atoms are held (k = 50 000 kJ/mol/nm^2, about 0.07 A
thermal spread per coordinate at 300 K) to the reference geometry at that xi
(``solute.geometry``), with charges interpolated between reactant and product,
while the solvent equilibrates around it (``--window-equilibrate`` ps per
window: in the first half the hold points travel from the last window's
geometry to the new one, ``Sampler.hold_qm``; in the second the system
equilibrates there). Every option of ``qmmm-driver sample`` applies (solvent, ion, charge
noise, box, interval); ``--qm-noise`` defaults to 0 here (the windows spread
the solute). ``--ion-end-on DEG`` keeps the ion on the far side of Cl1, on the
C-Cl1 axis (a flat-bottom wall on the angle C-Cl1-ion below DEG): a cation
pulling on the chloride that leaves (xi > 0) or is about to (xi < 0), where
the side-on contacts of ``--ion-distance`` alone hardly ever go.
``--acceptor-contact N:LO:HI`` holds the N solvent oxygens or nitrogens nearest
to the methyl hydrogens at start within LO..HI A of the nearest of those
hydrogens (the flat-bottom wall of ``--ion-distance``): bare acceptors at the
methyl group, as acetonitrile's nitrogen sits there and acetone's oxygen
rarely does unheld. ``--bend LO:HI`` turns the farther chloride off the
Cl-C-Cl axis in each window by an angle drawn uniformly from LO..HI degrees
(towards a random azimuth; ``solute.geometry``): the bent complexes a free
chloride visits in unheld (PIMD) dynamics, which the collinear path never
holds. Pair it with windows that keep that chloride 3.7-5 A from the carbon
(``--windows=1.8:3.2:8``), where the beads bend; nearer, a large bend presses
it onto a methyl hydrogen. A configuration in which a held atom strayed more
than ``HOLD_TOLERANCE_A`` (0.35 A) from its hold point is passed over
(``Sampler.sample``); the bent windows did that often while a change of
window still moved the hold points in one jump.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

#: kJ/mol/rad^2: the --ion-end-on wall (20 degrees short of it costs 6 kT at 300 K)
END_ON_K = 250.0

sys.path.insert(0, str(Path(__file__).resolve().parent))
import solute as sn2  # noqa: E402


def end_on_restraint(carbon: int, chlorine: int, ion: int, min_deg: float):
    """Flat-bottom wall keeping the angle carbon-chlorine-ion at or above ``min_deg``."""
    import openmm

    force = openmm.CustomCompoundBondForce(3, "0.5*kendon*step(amin-a)*(a-amin)^2; a=angle(p1, p2, p3)")
    force.addGlobalParameter("kendon", END_ON_K)
    force.addGlobalParameter("amin", float(np.radians(min_deg)))
    force.addBond([int(carbon), int(chlorine), int(ion)], [])
    force.setUsesPeriodicBoundaryConditions(True)
    return force


def nearest_acceptors(positions_A: np.ndarray, box_A: float, candidates: list[int], targets: list[int],
                      count: int) -> list[int]:
    """The ``count`` atoms of ``candidates`` nearest (minimum image in a cubic box) to any of ``targets``."""
    from qmmm_driver.mm.systems import min_image_distances

    nearest = min_image_distances(positions_A[candidates], positions_A[targets], box_A).min(axis=1)
    return [int(candidates[k]) for k in np.argsort(nearest, kind="stable")[:count]]


def acceptor_contact_restraint(sampler, count: int, lo_A: float, hi_A: float):
    """Flat-bottom walls holding the ``count`` solvent O/N atoms nearest to the methyl hydrogens within
    [lo, hi] A of the nearest hydrogen; returns the force and the atoms held."""
    from qmmm_driver.mm.sampling import distance_wall

    hydrogens = sampler.qm[1:4]  # solute atoms: C, H1-3, Cl1, Cl2
    candidates = [a.index for a in sampler.setup.topology.atoms()
                  if a.index not in sampler.qm and a.element is not None and a.element.symbol in ("O", "N")]
    if len(candidates) < count:
        raise SystemExit(f"--acceptor-contact: the solvent has {len(candidates)} O/N atoms, {count} asked for")
    held = nearest_acceptors(sampler.positions_A(), sampler.setup.box_nm()[0, 0] * 10.0, candidates, hydrogens,
                             count)
    force = distance_wall(held[0], hydrogens, lo_A, hi_A)
    for atom in held[1:]:
        force.addBond([atom] + hydrogens, [])
    return force, held


def parse_contact(text: str) -> tuple[int, float, float]:
    try:
        count, lo, hi = text.split(":")
        count, lo, hi = int(count), float(lo), float(hi)
    except ValueError:
        raise SystemExit(f"--acceptor-contact '{text}' is not N:LO:HI (e.g. 2:2.4:3.2)")
    if count < 1 or not 0.0 < lo < hi:
        raise SystemExit(f"--acceptor-contact '{text}' needs N >= 1 and 0 < LO < HI (A)")
    return count, lo, hi


def parse_bend(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in text.split(":"))
    except ValueError:
        raise SystemExit(f"--bend '{text}' is not LO:HI in degrees (e.g. 10:90)")
    if not 0.0 <= lo <= hi < 180.0:
        raise SystemExit(f"--bend '{text}' needs 0 <= LO <= HI < 180 degrees")
    return lo, hi


def main(argv=None) -> int:
    from tqdm import tqdm

    from qmmm_driver.cli.sample import configure, make_sampler
    from qmmm_driver.errors import InputError

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    configure(parser)
    parser.add_argument("--windows", default="-2.0:2.0:17",
                        help="umbrella windows in xi (A) as start:stop:count; write --windows=-2.0:2.0:17 (a value "
                             "starting with - needs the =)")
    parser.add_argument("--window-equilibrate", type=float, default=2.0, help="ps at each new window (default 2)")
    parser.add_argument("--ion-end-on", type=float, default=None, metavar="DEG",
                        help="keep the angle C-Cl1-ion >= DEG (e.g. 150: the ion beyond Cl1 on the C-Cl1 axis)")
    parser.add_argument("--acceptor-contact", default=None, metavar="N:LO:HI",
                        help="hold the N solvent O/N atoms nearest to the methyl hydrogens within LO..HI A of the "
                             "nearest of them (e.g. 2:2.4:3.2 with --solvent acetone); not with --ion")
    parser.add_argument("--bend", default=None, metavar="LO:HI",
                        help="turn the farther chloride off the Cl-C-Cl axis by an angle drawn from LO..HI degrees "
                             "in each window (e.g. 10:90; default: collinear)")
    parser.set_defaults(qm_noise=0.0, solute="sn2")
    args = parser.parse_args(argv)
    if args.ion_end_on is not None and (args.ion is None or not 90.0 <= args.ion_end_on < 180.0):
        raise SystemExit("--ion-end-on needs --ion and an angle in [90, 180) degrees")
    contact = None
    if args.acceptor_contact is not None:
        if args.ion is not None:
            raise SystemExit("--acceptor-contact and --ion cannot be combined (both hold atoms at the solute)")
        contact = parse_contact(args.acceptor_contact)
    try:
        start, stop, count = args.windows.split(":")
        windows = np.linspace(float(start), float(stop), int(count))
    except ValueError:
        raise SystemExit(f"--windows '{args.windows}' is not start:stop:count (e.g. -2.0:2.0:17)")
    per_window = np.full(len(windows), args.frames // len(windows))
    per_window[: args.frames % len(windows)] += 1
    # per window: the far chloride's bend and azimuth (degrees), zero on the collinear path
    bends = np.zeros((len(windows), 2))
    if args.bend is not None:
        lo, hi = parse_bend(args.bend)
        rng = np.random.default_rng(args.seed)
        bends[:, 0], bends[:, 1] = rng.uniform(lo, hi, len(windows)), rng.uniform(0.0, 360.0, len(windows))

    def window(sampler, k: int, ramp_ps: float = 0.0) -> None:
        xi0 = float(windows[k])
        sampler.set_qm_charges(sn2.charges(xi0))
        sampler.hold_qm(sn2.geometry(xi0, *bends[k]), ramp_ps)

    def start(sampler) -> None:
        if args.ion_end_on is not None:  # solute atoms: C, H1-3, Cl1, Cl2
            sampler.sim.system.addForce(end_on_restraint(sampler.qm[0], sampler.qm[4], sampler.setup.ion_index,
                                                         args.ion_end_on))
            sampler.sim.context.reinitialize(preserveState=True)
        if contact is not None:
            force, held = acceptor_contact_restraint(sampler, *contact)
            sampler.sim.system.addForce(force)
            sampler.sim.context.reinitialize(preserveState=True)
            print(f"holding solvent atoms {held} at {contact[1]}-{contact[2]} A from the methyl hydrogens")
        window(sampler, 0)

    try:
        sampler, info = make_sampler(args, sn2.solute(float(windows[0])), start)
    except InputError as err:
        raise SystemExit(f"error: {err}")
    if args.ion_end_on is not None:
        info["ion_end_on_deg"] = args.ion_end_on
    if contact is not None:
        info["acceptor_contact"] = args.acceptor_contact
    passed_over = 0
    with tqdm(total=args.frames, desc="sampling sn2", unit="frame") as bar:
        for k, (xi0, n) in enumerate(zip(windows, per_window)):
            if k > 0:  # the first half of the window's equilibration moves the hold to its geometry
                window(sampler, k, ramp_ps=args.window_equilibrate / 2)
                sampler.equilibrate(args.window_equilibrate / 2)
            extra = {"window_bend_deg": round(float(bends[k, 0]), 2)} if args.bend is not None else {}
            try:
                passed_over += sampler.sample(args.out, n, args.interval, args.qm_noise, args.charge_noise,
                                              dict(info, window_xi=round(float(xi0), 4), **extra), bar)
            except InputError as err:
                raise SystemExit(f"error: window xi = {xi0:g} A: {err}")
    print(f"wrote {args.frames} frames to {args.out}" + (f" ({passed_over} configurations passed over: a held "
                                                         "atom had strayed from its hold point)" if passed_over else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
