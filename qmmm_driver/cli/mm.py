"""``qmmm-driver mm``: serve the MM force field (OpenMM) to i-PI as a second forcefield.

The model worker (``qmmm-driver run``) gives the QM energy in the field of the MM
charges; this worker gives everything else: MM-MM bonded terms, MM-MM
electrostatics (PME in a periodic cell) and all Lennard-Jones terms involving
an MM atom, with QM charges zeroed and every QM-QM term removed (see
:mod:`qmmm_driver.mm_forcefield`). i-PI adds the two, so nothing is counted twice::

    <ffsocket name="qmmm" mode="unix"><address>qmmm</address></ffsocket>
    <ffsocket name="mm" mode="unix"><address>mm</address></ffsocket>
    <forces><force forcefield="qmmm"/><force forcefield="mm"/></forces>

    qmmm-driver mm --pdb system.pdb --forcefield amber14/tip3p.xml --system system.extxyz --unix mm

The virial sent to i-PI is zero (OpenMM gives none): constant-pressure runs are
not supported with this worker. Exit status as for ``qmmm-driver run``: 0 after
i-PI's EXIT; 2 for input to fix; 3 when i-PI goes away; 4 for a non-finite
OpenMM result.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..ipi.worker import add_connection_arguments, log, serve

DEVICES = "auto, cpu, reference, cuda or cuda:N"


def configure(parser: argparse.ArgumentParser) -> None:
    from ..mm.forcefield import DEFAULT_CUTOFF_A, DEFAULT_SWITCH_A

    parser.add_argument("--pdb", required=True, metavar="SYSTEM.pdb",
                        help="topology (and box) of all atoms in i-PI's order, e.g. examples/water/system.pdb")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--forcefield", nargs="+", metavar="FFXML",
                        help="OpenMM force-field files, e.g. amber14/tip3p.xml qmmm_driver/data/sn2_solute.xml")
    source.add_argument("--serialized", metavar="SYSTEM.xml",
                        help="an OpenMM System written by XmlSerializer (flexible, no virtual sites), with --pdb")
    parser.add_argument("--system", metavar="FRAME.extxyz",
                        help="the model worker's system file: its 'qm' array selects the QM atoms")
    parser.add_argument("--qm", metavar="SELECTION",
                        help="QM atoms as 0-based indices and ranges, e.g. '0-5,9' (overrides the 'qm' array)")
    parser.add_argument("--cutoff", type=float, default=None, metavar="A",
                        help="real-space cutoff (PME and Lennard-Jones) in Angstrom, with --forcefield "
                             f"(default {DEFAULT_CUTOFF_A:g})")
    parser.add_argument("--switch-distance", type=float, default=None, metavar="A",
                        help="Lennard-Jones switch start in Angstrom, 0 for none, with --forcefield "
                             f"(default {DEFAULT_SWITCH_A:g})")
    parser.add_argument("--no-qm-hydrogen-lj", action="store_true",
                        help="leave QM hydrogens without Lennard-Jones where the force field has none (by default "
                             "they get CHARMM's TIP3P hydrogen's, so that none is pulled onto an MM charge)")
    add_connection_arguments(parser)
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help=f"{DEVICES}: OpenMM's CUDA platform where there is one (GPU local_rank %% n_gpus), "
                             "the CPU platform otherwise; reference = double-precision validation "
                             "(default: %(default)s)")


def main(args) -> int:
    return serve("mm", args, build)


def build(args, placement):
    """The OpenMM evaluator for ``qmmm-driver mm`` (see :func:`qmmm_driver.ipi.worker.serve`)."""
    from ..mm import forcefield as mmf
    from ..structures import QMMMStructure

    if args.serialized is not None and (args.cutoff is not None or args.switch_distance is not None):
        raise InputError("--cutoff and --switch-distance go with --forcefield; a serialized System has its own")
    cutoff = mmf.DEFAULT_CUTOFF_A if args.cutoff is None else args.cutoff
    switch = mmf.DEFAULT_SWITCH_A if args.switch_distance is None else args.switch_distance
    if args.system is None and args.qm is None:
        raise InputError("give the QM atoms: --system FRAME.extxyz (its 'qm' array) or --qm '0-2'")

    pdb = mmf.read_pdb(args.pdb)
    topology = pdb.topology
    symbols = [a.element.symbol if a.element is not None else "?" for a in topology.atoms()]
    pdb_periodic = topology.getPeriodicBoxVectors() is not None
    if args.system is not None:
        system = QMMMStructure.read(args.system, qm=args.qm)
        if system.n_atoms != len(symbols):
            raise InputError(f"PDB file {args.pdb} has {len(symbols)} atoms but the system file {system.source} has "
                             f"{system.n_atoms}; both must list the same atoms in the same order")
        system.check_atoms(len(symbols), symbols, origin=f"PDB file {args.pdb}")
        if system.periodic and not pdb_periodic:
            raise InputError(f"system file {system.source} is periodic but PDB file {args.pdb} has no box (CRYST1)")
        periodic = system.periodic
    else:
        periodic = pdb_periodic

    mm = mmf.create_system(topology, args.forcefield, args.serialized, periodic, cutoff, switch)
    source = args.serialized or f"force field {' '.join(args.forcefield)}"
    if mm.usesPeriodicBoundaryConditions() != periodic:
        raise InputError(f"{source} is {'' if mm.usesPeriodicBoundaryConditions() else 'not '}periodic but the "
                         f"system is {'periodic' if periodic else 'a cluster'}")
    mmf.check_flexible(mm, topology, source)
    charges = mmf.force_field_charges(mm)
    if args.system is None:
        system = _system_from_pdb(topology, pdb.positions, charges, args.qm, args.pdb, periodic)
    _warn_charges(system, charges, topology)
    removed = mmf.remove_qm_terms(mm, topology, system.qm_indices, system.links,
                                  None if args.no_qm_hydrogen_lj else mmf.QM_HYDROGEN_LJ)

    platform, properties = mmf.select_platform(args.device, placement.local_rank, args.threads)
    ev = mmf.OpenMMEvaluator(mm, system, platform, properties, periodic, topology)
    threads = f", {properties['Threads']} thread{'s' if properties['Threads'] != '1' else ''}" \
        if "Threads" in properties else ""
    nb = (f"PME, cutoff {ev.cutoff_nm * 10:g} A" if periodic and ev.cutoff_nm else "no cutoff (cluster)")
    text = (f"platform {ev.platform}{threads}, {source}, pdb {Path(args.pdb).name}: {system.n_atoms} atoms, "
            f"{system.n_qm} QM ({removed.summary()}), {nb}")
    return ev, text, {}, (mmf.NonFiniteMM,)


def _system_from_pdb(topology, positions, charges, qm, source, periodic):
    """The QM/MM system (atom order, QM selection) from the PDB alone, for ``--qm`` without ``--system``:
    molecules from the topology's bonds, the bonds the selection cuts as link atoms."""
    import numpy as np
    from openmm import unit

    from ..boundary import boundary_from_bonds
    from ..mm.systems import molecules_of
    from ..structures import QMMMStructure, parse_selection
    from ..units import ANGSTROM_TO_BOHR

    pos = np.asarray(positions.value_in_unit(unit.angstrom))
    n = len(pos)
    flags = np.zeros(n, dtype=bool)
    flags[parse_selection(qm, n)] = True
    bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
    symbols = [a.element.symbol for a in topology.atoms()]
    links, mm_charge = boundary_from_bonds(symbols, pos, flags, bonds, charges, f"{source}: ")
    cell = np.asarray(topology.getPeriodicBoxVectors().value_in_unit(unit.angstrom)) * ANGSTROM_TO_BOHR \
        if periodic else None
    return QMMMStructure(numbers=np.array([a.element.atomic_number for a in topology.atoms()]),
                         positions=pos * ANGSTROM_TO_BOHR, qm=flags, mm_charge=mm_charge, cell=cell,
                         molecule=molecules_of(n, bonds), qm_link=links, source=str(source))


def _warn_charges(system, charges, topology) -> None:
    """One warning line when the model's MM charges differ from the force field's (with charges at cut bonds
    redistributed, :mod:`qmmm_driver.boundary`)."""
    import numpy as np

    from ..boundary import redistribute_charges

    mm = system.mm_indices
    if system.qm_link is not None:
        bonds = [(b[0].index, b[1].index) for b in topology.bonds()]
        charges = redistribute_charges(np.where(system.qm, 0.0, charges), system.qm, system.qm_link, bonds)
    diff = np.abs(system.mm_charge[mm] - charges[mm])
    if diff.size and diff.max() > 1e-4:
        k = int(np.argmax(diff))
        log("mm", f"warning: {int(np.sum(diff > 1e-4))} MM charges of {system.source} differ from the force field's, e.g. "
             f"atom {int(mm[k])}: {system.mm_charge[mm[k]]:.4f} vs {charges[mm[k]]:.4f} e; "
             "the model then sees other charges than the MM electrostatics uses")
