"""``qmmm-driver sample``: unlabelled QM/MM frames from OpenMM MD (see :mod:`qmmm_driver.mm.sampling`).

The QM region is a water (``--solute water``, the default) or a solute from a
PDB file with its force field (``--solute X.pdb --solute-forcefield X.xml
--qm-charge Q``), all of it or the atoms ``--qm`` selects (bonds the selection
cuts get link atoms, :mod:`qmmm_driver.boundary`), solvated in water (TIP3P),
methanol, acetonitrile, acetone or DMSO (OPLS-AA), optionally next to one ion held at
a distance range from the nearest QM atom,
optionally with charge noise (field augmentation).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--solute", default="water", help="'water' or a PDB file of one residue (the QM region)")
    parser.add_argument("--solute-forcefield", nargs="+", default=[], metavar="FFXML",
                        help="OpenMM force-field files of a PDB solute (its Lennard-Jones and MM charges)")
    parser.add_argument("--qm", default=None, metavar="SELECTION",
                        help="QM atoms of a PDB solute, 0-based, e.g. '7-11' (default: all; cut bonds get link atoms)")
    parser.add_argument("--qm-charge", type=int, default=0, help="total charge of the QM region (default 0)")
    parser.add_argument("--out", required=True, type=Path, help="output frames (extended XYZ, appended)")
    parser.add_argument("--frames", type=int, required=True, help="number of frames")
    parser.add_argument("--solvent", default="water",
                        help="water (TIP3P), methanol, acetonitrile, acetone, dmso or nitromethane (OPLS-AA)")
    parser.add_argument("--ion", default=None,
                        help="add one MM ion of amber14's set: Li+, Na+, K+, Rb+, Cs+, Mg2+, Ca2+, Zn2+, Sr2+, Ba2+, "
                             "F-, Cl-, Br-")
    parser.add_argument("--ion-distance", default="3.0:6.0",
                        help="LO:HI, A: flat-bottom range of the ion's distance to the nearest QM atom "
                             "(default 3.0:6.0; 1.8:3.0 holds a cation in the first shell of a QM water)")
    parser.add_argument("--charge-noise", type=float, default=0.0,
                        help="scale each MM molecule's charges by 1 + SIGMA*N(0,1) per frame (default 0)")
    parser.add_argument("--qm-noise", type=float, default=0.05,
                        help="Gaussian displacement of QM atoms per frame, A (default 0.05)")
    parser.add_argument("--box", type=float, default=26.0, help="cubic box edge (A), > 2 r_off (default 26)")
    parser.add_argument("--interval", type=float, default=0.25, help="ps between frames (default 0.25)")
    parser.add_argument("--equilibrate", type=float, default=10.0, help="ps of equilibration first (default 10)")
    parser.add_argument("--temperature", type=float, default=300.0, help="K (default 300)")
    parser.add_argument("--dt", type=float, default=1.0, help="MD time step in fs (default 1.0)")
    parser.add_argument("--r-on", type=float, default=None, help="embedding switch start, A (default 10)")
    parser.add_argument("--r-off", type=float, default=None, help="embedding cutoff, A (default 12)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="OpenMM CPU threads (default 1)")
    parser.add_argument("--system-dir", type=Path, default=None,
                        help="also write the equilibrated system.pdb and system.extxyz here (an i-PI start)")


def parse_range(text: str, option: str) -> tuple[float, float]:
    try:
        lo, hi = (float(x) for x in text.split(":"))
    except ValueError as err:
        raise InputError(f"{option} '{text}' is not LO:HI in Angstrom (e.g. 1.8:3.0)") from err
    if not 0 <= lo < hi:
        raise InputError(f"{option} '{text}' needs 0 <= LO < HI")
    return lo, hi


def make_sampler(args, solute, prepare=None):
    """Check the environment options, build the system and its :class:`~qmmm_driver.mm.sampling.Sampler`,
    minimise and equilibrate; ``prepare(sampler)`` runs first (e.g. to hold the solute)."""
    from ..embedding import DEFAULT_R_OFF_A, DEFAULT_R_ON_A
    from ..mm.sampling import Sampler
    from ..mm.systems import IONS, SOLVENTS, build_setup

    r_on = DEFAULT_R_ON_A if args.r_on is None else args.r_on
    r_off = DEFAULT_R_OFF_A if args.r_off is None else args.r_off
    if args.box <= 2 * r_off:
        raise InputError(f"--box {args.box} A must exceed 2 r_off = {2 * r_off} A")
    if args.frames < 1:
        raise InputError("--frames must be at least 1")
    if args.solvent not in SOLVENTS:
        raise InputError(f"--solvent {args.solvent}: known solvents are {', '.join(SOLVENTS)}")
    if args.ion is not None and args.ion not in IONS:
        raise InputError(f"--ion {args.ion}: known ions are {', '.join(IONS)}")
    if args.charge_noise < 0 or args.qm_noise < 0:
        raise InputError("--charge-noise and --qm-noise must be >= 0")
    ion_range = parse_range(args.ion_distance, "--ion-distance")
    setup = build_setup(solute, box_A=args.box, seed=args.seed, ion=args.ion, solvent=args.solvent,
                        ion_distance_A=sum(ion_range) / 2)
    sampler = Sampler(setup, args.temperature, args.dt, args.seed, r_on, r_off, args.threads, ion_range)
    if prepare is not None:
        prepare(sampler)
    sampler.minimize()
    sampler.equilibrate(args.equilibrate)
    if args.system_dir is not None:  # an equilibrated start for i-PI and OpenMM
        written = sampler.write_system(args.system_dir)
        print(f"wrote {written['pdb']} and {written['extxyz']}")
    info = {"system": solute.name, "environment": environment_label(args), "solvent": args.solvent,
            "ion": args.ion or "none", "seed": args.seed}
    return sampler, info


def environment_label(args) -> str:
    return args.solvent + (f"+{args.ion}" if args.ion else "") + (f"+noise{args.charge_noise:g}"
                                                                   if args.charge_noise else "")


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from ..mm.systems import solute_from_pdb, water_solute

    if args.solute == "water" and args.qm is not None:
        raise InputError("--qm selects QM atoms of a PDB solute (--solute X.pdb); a water solute is all QM")
    solute = water_solute() if args.solute == "water" else solute_from_pdb(args.solute, args.solute_forcefield,
                                                                            args.qm_charge, qm=args.qm)
    sampler, info = make_sampler(args, solute)
    with tqdm(total=args.frames, desc=f"sampling {solute.name}", unit="frame") as bar:
        sampler.sample(args.out, args.frames, args.interval, args.qm_noise, args.charge_noise, info, bar)
    print(f"wrote {args.frames} frames to {args.out}")
    return 0
