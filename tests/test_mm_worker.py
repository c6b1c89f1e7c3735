"""``qmmm-driver mm`` counts nothing twice: its energy and forces are exactly the MM part of QM/MM.

The MM part is, by definition (shared/conventions/qmmm-frames.md): MM-MM bonded terms,
MM-MM Coulomb and Lennard-Jones (with the force field's exclusions), QM-MM Lennard-Jones;
no QM charge, no QM-QM anything. The references below compute exactly that, independently of
the worker's code: for clusters in numpy (atomic units, constants from scipy, parameters read from
the unmodified force field), and in a periodic cell OpenMM on the MM atoms alone (the QM molecules
deleted from the topology) plus the QM-MM Lennard-Jones in numpy. Then a real i-PI run with
two ffsockets shows that i-PI's potential is the model's plus this MM energy.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import numpy as np
import pytest
from scipy.constants import N_A, physical_constants

from conftest import (SMALL_MM_ARGS, finish_run, ipi_input, minimized_setup, read_ipi_bin, read_ipi_properties,
                      serine_peptide, sn2_solute, start_mm_worker)
from qmmm_driver.cli import mm as mm_worker
from qmmm_driver.mm.forcefield import force_field_charges, reduced_box
from qmmm_driver.parallel import Placement

HARTREE_KJ_PER_MOL = physical_constants["Hartree energy"][0] * N_A / 1000.0
BOHR_NM = physical_constants["Bohr radius"][0] * 1e9
CUTOFF_A, SWITCH_A = 7.0, 6.0  # SMALL_MM_ARGS


def worker_args(*argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    mm_worker.configure(parser)
    return parser.parse_args([str(a) for a in argv] + ["--unix", "unused"])


# --------------------------------------------------------------------------- independent references


def force_field_terms(system):
    """Parameters of an unmodified OpenMM System in atomic units (charges e, sigma Bohr, epsilon Hartree)."""
    import openmm
    from openmm import unit

    nm, kj = unit.nanometer, unit.kilojoule_per_mole
    out = {"bonds": [], "angles": [], "torsions": [], "exceptions": {}}
    for f in system.getForces():
        if isinstance(f, openmm.NonbondedForce):
            p = [f.getParticleParameters(i) for i in range(f.getNumParticles())]
            out["q"] = np.array([x[0].value_in_unit(unit.elementary_charge) for x in p])
            out["sigma"] = np.array([x[1].value_in_unit(nm) for x in p]) / BOHR_NM
            out["eps"] = np.array([x[2].value_in_unit(kj) for x in p]) / HARTREE_KJ_PER_MOL
            out["hydrogen"] = np.array([system.getParticleMass(i).value_in_unit(unit.dalton) < 1.5
                                        for i in range(f.getNumParticles())])
            for k in range(f.getNumExceptions()):
                a, b, qq, s, e = f.getExceptionParameters(k)
                out["exceptions"][(min(a, b), max(a, b))] = (
                    qq.value_in_unit(unit.elementary_charge**2), s.value_in_unit(nm) / BOHR_NM,
                    e.value_in_unit(kj) / HARTREE_KJ_PER_MOL)
        elif isinstance(f, openmm.HarmonicBondForce):
            for k in range(f.getNumBonds()):
                a, b, r0, kb = f.getBondParameters(k)
                out["bonds"].append((a, b, r0.value_in_unit(nm) / BOHR_NM,
                                     kb.value_in_unit(kj / nm**2) * BOHR_NM**2 / HARTREE_KJ_PER_MOL))
        elif isinstance(f, openmm.HarmonicAngleForce):
            for k in range(f.getNumAngles()):
                a, b, c, t0, ka = f.getAngleParameters(k)
                out["angles"].append((a, b, c, t0.value_in_unit(unit.radian),
                                      ka.value_in_unit(kj / unit.radian**2) / HARTREE_KJ_PER_MOL))
        elif isinstance(f, openmm.PeriodicTorsionForce):
            for k in range(f.getNumTorsions()):
                a, b, c, d, n, phase, kt = f.getTorsionParameters(k)
                out["torsions"].append((a, b, c, d, n, phase.value_in_unit(unit.radian),
                                        kt.value_in_unit(kj) / HARTREE_KJ_PER_MOL))
    return out


def pair_energy(pos, i, j, qq, sig, eps, cell=None, cutoff=None, switch=None):
    """Coulomb qq/r + Lennard-Jones 4 eps ((s/r)^12 - (s/r)^6) of pairs (i, j); optional minimum image,
    cutoff and OpenMM's switch. Returns (energy, forces)."""
    d = pos[j] - pos[i]
    if cell is not None:
        d -= np.round(d @ np.linalg.inv(cell)) @ cell
    r = np.linalg.norm(d, axis=1)
    sr6 = (sig / r) ** 6
    e = qq / r + 4 * eps * (sr6 * sr6 - sr6)
    de = -qq / r**2 + 4 * eps * (-12 * sr6 * sr6 + 6 * sr6) / r
    if cutoff is not None:
        x = np.clip((r - switch) / (cutoff - switch), 0.0, 1.0)
        s = 1 - 10 * x**3 + 15 * x**4 - 6 * x**5
        ds = (-30 * x**2 + 60 * x**3 - 30 * x**4) / (cutoff - switch)
        de = de * s + e * ds
        e = e * s
        inside = r < cutoff
        e, de = e * inside, de * inside
    forces = np.zeros_like(pos)
    fj = -de[:, None] * d / r[:, None]
    np.add.at(forces, j, fj)
    np.add.at(forces, i, -fj)
    return e.sum(), forces


def bonded_energy(terms, pos, skip):
    """Harmonic bonds 1/2 k (r - r0)^2 and angles 1/2 k (theta - theta0)^2, leaving out terms with skip[atoms].all()."""
    energy, forces = 0.0, np.zeros_like(pos)
    for a, b, r0, k in terms["bonds"]:
        if skip[[a, b]].all():
            continue
        d = pos[b] - pos[a]
        r = np.linalg.norm(d)
        energy += 0.5 * k * (r - r0) ** 2
        forces[b] -= k * (r - r0) * d / r
        forces[a] += k * (r - r0) * d / r
    for a, b, c, t0, k in terms["angles"]:
        if skip[[a, b, c]].all():
            continue
        u, v = pos[a] - pos[b], pos[c] - pos[b]
        nu, nv = np.linalg.norm(u), np.linalg.norm(v)
        cos = u @ v / (nu * nv)
        theta = np.arccos(cos)
        energy += 0.5 * k * (theta - t0) ** 2
        g = k * (theta - t0) / -np.sin(theta)  # dE/dcos
        fa = -g * (v / nv - cos * u / nu) / nu
        fc = -g * (u / nu - cos * v / nv) / nv
        forces[a] += fa
        forces[c] += fc
        forces[b] -= fa + fc
    return energy, forces


def dihedral(p: np.ndarray) -> float:
    b1, b2, b3 = p[1] - p[0], p[2] - p[1], p[3] - p[2]
    n1, n2 = np.cross(b1, b2), np.cross(b2, b3)
    return np.arctan2(np.linalg.norm(b2) * b1 @ n2, n1 @ n2)


def torsion_energy(terms, pos, skip, h: float = 1e-6):
    """Periodic torsions k (1 + cos(n phi - phase)), leaving out terms with skip[atoms].all(); forces by central
    differences of each term (error ~h^2)."""
    energy, forces = 0.0, np.zeros_like(pos)
    for a, b, c, d, n, phase, k in terms["torsions"]:
        atoms = [a, b, c, d]
        if skip[atoms].all():
            continue
        p = pos[atoms].copy()
        energy += k * (1 + np.cos(n * dihedral(p) - phase))
        for x in range(4):
            for y in range(3):
                p[x, y] += h
                up = k * np.cos(n * dihedral(p) - phase)
                p[x, y] -= 2 * h
                down = k * np.cos(n * dihedral(p) - phase)
                p[x, y] += h
                forces[atoms[x], y] -= (up - down) / (2 * h)
    return energy, forces


def qm_lennard_jones(terms, qm):
    """sigma (Bohr) and epsilon (Hartree) per atom as the QM-MM Lennard-Jones uses them: the force field's, but a
    QM hydrogen without any gets CHARMM's TIP3P hydrogen's (Rmin/2 0.2245 A, 0.046 kcal/mol)."""
    bare = qm & terms["hydrogen"] & (terms["eps"] == 0.0)
    sigma = np.where(bare, 2 * 0.02245 / 2 ** (1 / 6) / BOHR_NM, terms["sigma"])
    return sigma, np.where(bare, 0.046 * 4.184 / HARTREE_KJ_PER_MOL, terms["eps"])


def cluster_reference(terms, pos, qm):
    """The MM part of a cluster: MM-MM bonded, Coulomb and LJ (exclusions as given), QM-MM LJ, nothing else.
    Across a cut bond: bonded terms with any MM atom, QM-MM exceptions' Lennard-Jones (no Coulomb)."""
    n = len(pos)
    sigma, epsilon = qm_lennard_jones(terms, qm)
    i, j = np.triu_indices(n, 1)
    keep = ~(qm[i] & qm[j])                                   # no QM-QM pair at all
    i, j = i[keep], j[keep]
    both_mm = ~qm[i] & ~qm[j]
    qq = np.where(both_mm, terms["q"][i] * terms["q"][j], 0.0)  # QM atoms carry no charge
    sig = 0.5 * (sigma[i] + sigma[j])
    eps = np.sqrt(epsilon[i] * epsilon[j])
    for k, (a, b) in enumerate(zip(i, j)):
        if (a, b) in terms["exceptions"]:
            qq_ab, sig[k], eps[k] = terms["exceptions"][(a, b)]
            qq[k] = qq_ab if both_mm[k] else 0.0
    e_pair, f_pair = pair_energy(pos, i, j, qq, sig, eps)
    e_bond, f_bond = bonded_energy(terms, pos, skip=qm)
    e_tors, f_tors = torsion_energy(terms, pos, skip=qm)
    return e_pair + e_bond + e_tors, f_pair + f_bond + f_tors


def mm_only_openmm(setup, pos_bohr, cell_bohr, qm, cutoff_A=CUTOFF_A, switch_A=SWITCH_A):
    """Energy and forces (atomic units) of the MM atoms alone: OpenMM with the QM molecules deleted from the
    topology, same PME settings, Reference platform. Forces on QM atoms are zero."""
    import openmm
    from openmm import app, unit

    modeller = app.Modeller(setup.topology, pos_bohr * BOHR_NM * unit.nanometer)
    qm_residues = {a.residue for a in setup.topology.atoms() if qm[a.index]}
    assert all(qm[a.index] for r in qm_residues for a in r.atoms())  # whole molecules
    modeller.delete(list(qm_residues))
    system = app.ForceField(*setup.forcefield_files).createSystem(
        modeller.topology, nonbondedMethod=app.PME, nonbondedCutoff=cutoff_A / 10 * unit.nanometer,
        switchDistance=switch_A / 10 * unit.nanometer, constraints=None, rigidWater=False, removeCMMotion=False)
    for f in system.getForces():
        if isinstance(f, openmm.NonbondedForce):
            f.setUseDispersionCorrection(False)
    ctx = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    ctx.setPeriodicBoxVectors(*(openmm.Vec3(*v) for v in cell_bohr * BOHR_NM))
    ctx.setPositions(modeller.positions)
    state = ctx.getState(getEnergy=True, getForces=True)
    forces = np.zeros_like(pos_bohr)
    forces[~qm] = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)
    return (state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole) / HARTREE_KJ_PER_MOL,
            forces * BOHR_NM / HARTREE_KJ_PER_MOL)


def periodic_reference(setup, pos, cell, qm, cutoff_A=CUTOFF_A, switch_A=SWITCH_A):
    """MM-MM from OpenMM on the MM atoms alone + QM-MM Lennard-Jones in numpy (minimum image, cutoff, switch)."""
    terms = force_field_terms(setup.create_system())
    e_mm, f_mm = mm_only_openmm(setup, pos, cell, qm, cutoff_A, switch_A)
    i, j = np.meshgrid(np.flatnonzero(qm), np.flatnonzero(~qm), indexing="ij")
    i, j = i.ravel(), j.ravel()
    sigma, epsilon = qm_lennard_jones(terms, qm)
    e_lj, f_lj = pair_energy(pos, i, j, 0.0, 0.5 * (sigma[i] + sigma[j]), np.sqrt(epsilon[i] * epsilon[j]), cell,
                             cutoff_A / 10 / BOHR_NM, switch_A / 10 / BOHR_NM)
    return e_mm + e_lj, f_mm + f_lj


# --------------------------------------------------------------------------- systems


def write_cluster(setup, radius_A: float, directory):
    """The QM region and the MM molecules within ``radius_A`` of it, as a cluster (PDB without box, extxyz)."""
    import ase.io
    from ase import Atoms
    from openmm import app, unit

    pos = setup.positions
    centre = pos[setup.qm_indices].mean(axis=0)
    far = [r for r in setup.topology.residues()
           if np.linalg.norm(pos[[a.index for a in r.atoms()]].mean(axis=0) - centre) > radius_A / 10]
    modeller = app.Modeller(setup.topology, pos * unit.nanometer)
    modeller.delete(far)
    modeller.topology.setPeriodicBoxVectors(None)
    pdb = directory / "cluster.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    xyz = np.array(modeller.positions.value_in_unit(unit.angstrom))
    atoms = Atoms([a.element.symbol for a in modeller.topology.atoms()], positions=xyz)
    qm = np.zeros(len(atoms), dtype=np.int64)
    qm[setup.qm_indices] = 1  # the QM region comes first and stays
    atoms.set_array("qm", qm)
    full = force_field_charges(setup.create_system())  # the force field's charges, as the model worker takes them
    kept = [a.index for a in setup.topology.atoms() if a.residue not in far]
    atoms.set_array("mm_charge", np.where(qm == 1, 0.0, full[kept]))
    extxyz = directory / "cluster.extxyz"
    ase.io.write(extxyz, atoms, format="extxyz")
    return pdb, extxyz, modeller


@pytest.fixture(scope="module")
def boxes(tmp_path_factory):
    out = {}
    for name, solute in (("water", None), ("sn2", sn2_solute())):
        setup = minimized_setup(solute=solute)
        out[name] = (setup, setup.write(tmp_path_factory.mktemp(f"box_{name}")))
    return out


# --------------------------------------------------------------------------- nothing counted twice


@pytest.mark.parametrize("name", ["water", "sn2"])
def test_cluster_equals_numpy_reference(boxes, tmp_path, name):
    """Cluster (no cutoff): worker = numpy sum of MM-MM bonded + Coulomb + LJ and QM-MM LJ; nothing of QM-QM."""
    setup, _ = boxes[name]
    pdb, extxyz, modeller = write_cluster(setup, 6.0, tmp_path)
    ff = setup.forcefield_files
    ev, text, *_ = mm_worker.build(worker_args("--pdb", pdb, "--forcefield", *ff, "--system", extxyz,
                                               "--device", "reference"), Placement())
    system = ev.structure
    assert "no cutoff" in text and system.n_qm == len(setup.qm_indices)
    if name == "water":  # TIP3P hydrogens have no Lennard-Jones: the QM ones get it (the reference does the same)
        assert "2 QM hydrogens given Lennard-Jones" in text
    from openmm import app, unit

    original = app.ForceField(*ff).createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                               rigidWater=False)
    terms = force_field_terms(original)
    pos = np.array(modeller.positions.value_in_unit(unit.nanometer)) / BOHR_NM
    rng = np.random.default_rng(1)
    pos = pos + rng.normal(scale=0.05, size=pos.shape)  # off equilibrium: every bonded term has a force
    qm = np.zeros(len(pos), dtype=bool)
    qm[system.qm_indices] = True
    e_ref, f_ref = cluster_reference(terms, pos, qm)
    res = ev.compute(pos[None])
    de = abs(res.energy[0] - e_ref)
    df = np.abs(res.forces[0] - f_ref).max()
    print(f"\n{name} cluster ({len(pos)} atoms, {qm.sum()} QM), Reference platform: |dE| = {de:.2e} Ha "
          f"(E = {e_ref:.6f} Ha), max |dF| = {df:.2e} Ha/Bohr (max |F| = {np.abs(f_ref).max():.3f})")
    assert de < 1e-8 * max(1.0, abs(e_ref))
    assert df < 1e-8 * np.abs(f_ref).max()

    # the test sees what it checks: the full force field differs by the QM terms the worker removed
    e_full, _ = cluster_reference(terms, pos, np.zeros_like(qm))
    print(f"  the removed QM terms (QM charges, QM-QM pairs and bonded terms) amount to {e_full - e_ref:+.4f} Ha")
    assert abs(e_full - e_ref) > 1e-3

    cpu, *_ = mm_worker.build(worker_args("--pdb", pdb, "--forcefield", *ff, "--system", extxyz,
                                            "--device", "cpu"), Placement())
    rc = cpu.compute(pos[None])
    print(f"  CPU platform vs reference: |dE| = {abs(rc.energy[0] - e_ref):.2e} Ha, "
          f"max |dF| = {np.abs(rc.forces[0] - f_ref).max():.2e} Ha/Bohr")
    assert abs(rc.energy[0] - e_ref) < 1e-5 * max(1.0, abs(e_ref))
    assert np.abs(rc.forces[0] - f_ref).max() < 1e-4 * np.abs(f_ref).max()


def test_qm_hydrogens_get_a_lennard_jones_wall(boxes, tmp_path):
    """A QM hydrogen pushed onto the MM oxygen it donates to meets CHARMM's TIP3P hydrogen Lennard-Jones, exactly
    the pair sum; ``--no-qm-hydrogen-lj`` leaves it bare, as the force field has it."""
    setup, _ = boxes["water"]
    pdb, extxyz, modeller = write_cluster(setup, 6.0, tmp_path)
    common = ("--pdb", pdb, "--forcefield", *setup.forcefield_files, "--system", extxyz, "--device", "reference")
    walled, *_ = mm_worker.build(worker_args(*common), Placement())
    bare, text, *_ = mm_worker.build(worker_args(*common, "--no-qm-hydrogen-lj"), Placement())
    assert "given Lennard-Jones" not in text
    from openmm import app, unit

    terms = force_field_terms(app.ForceField(*setup.forcefield_files).createSystem(
        modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None, rigidWater=False))
    pos = np.array(modeller.positions.value_in_unit(unit.nanometer)) / BOHR_NM
    qm = np.zeros(len(pos), dtype=bool)
    qm[walled.structure.qm_indices] = True
    h = walled.structure.qm_indices[1]
    oxygens = np.flatnonzero(~qm & ~terms["hydrogen"])
    o = oxygens[np.argmin(np.linalg.norm(pos[oxygens] - pos[h], axis=1))]
    pos[h] = pos[o] + (pos[h] - pos[o]) / np.linalg.norm(pos[h] - pos[o]) * 1.1 / (10 * BOHR_NM)  # 1.1 A off it
    sigma, epsilon = qm_lennard_jones(terms, qm)
    hydrogens = np.flatnonzero(qm & terms["hydrogen"])
    i, j = np.meshgrid(hydrogens, np.flatnonzero(~qm), indexing="ij")
    wall, _ = pair_energy(pos, i.ravel(), j.ravel(), 0.0, 0.5 * (sigma[i] + sigma[j]).ravel(),
                          np.sqrt(epsilon[i] * epsilon[j]).ravel())
    difference = walled.compute(pos[None]).energy[0] - bare.compute(pos[None]).energy[0]
    assert difference == pytest.approx(wall, rel=1e-8)
    assert difference * physical_constants["Hartree energy in eV"][0] > 0.1  # eV: a wall, not a rounding


def test_cut_bond_counts_every_term_once(tmp_path):
    """Serine side chain QM, CA-CB cut (ff14SB, cluster): the worker = numpy MM part, with every bonded term that
    has an MM atom (bonds, angles, torsions across the cut) and the boundary's 1-2/1-3/1-4 Lennard-Jones kept,
    all-QM terms and QM Coulomb gone; the model side sees CA's charge moved to N, HA and C."""
    from openmm import app, unit

    modeller, qm_indices, ff = serine_peptide()
    pdb = tmp_path / "ser.pdb"
    with open(pdb, "w") as fh:
        app.PDBFile.writeFile(modeller.topology, modeller.positions, fh)
    ev, text, *_ = mm_worker.build(worker_args("--pdb", pdb, "--forcefield", *ff, "--qm",
                                               ",".join(map(str, qm_indices)), "--device", "reference"), Placement())
    structure = ev.structure
    atoms = {(a.residue.name, a.name): a.index for a in modeller.topology.atoms()}
    ca, cb = atoms[("SER", "CA")], atoms[("SER", "CB")]
    assert structure.links.tolist() == [[cb, ca]]

    original = app.ForceField(*ff).createSystem(modeller.topology, nonbondedMethod=app.NoCutoff, constraints=None,
                                               rigidWater=False)
    terms = force_field_terms(original)
    pos = np.array(modeller.positions.value_in_unit(unit.nanometer)) / BOHR_NM
    pos = pos + np.random.default_rng(3).normal(scale=0.05, size=pos.shape)
    qm = structure.qm.astype(bool)
    e_ref, f_ref = cluster_reference(terms, pos, qm)
    res = ev.compute(pos[None])
    de, df = abs(res.energy[0] - e_ref), np.abs(res.forces[0] - f_ref).max()
    print(f"\nserine side chain, CA-CB cut: |dE| = {de:.2e} Ha, max |dF| = {df:.2e} Ha/Bohr; {text}")
    assert de < 1e-8 * max(1.0, abs(e_ref))
    assert df < 1e-7 * np.abs(f_ref).max()

    # each bonded term once: all-QM ones removed (the model's), those with an MM atom kept and counted
    spanning = sum(qm[list(t[:k])].any() and not qm[list(t[:k])].all()
                   for key, k in (("bonds", 2), ("angles", 3), ("torsions", 4)) for t in terms[key])
    assert spanning >= 10 and f"kept {spanning} bonded terms across cut bonds" in text
    # the test sees what it checks: dropping the spanning terms (as if they were the model's) changes the energy
    e_qm_side, _ = cluster_reference(terms, pos, qm | np.isin(np.arange(len(qm)), [ca]))
    assert abs(e_qm_side - e_ref) > 1e-3

    # the model side: CA's charge spread over its MM neighbours, the MM total as the force field has it
    charges = force_field_charges(original)
    m2 = [atoms[("SER", "N")], atoms[("SER", "HA")], atoms[("SER", "C")]]
    assert structure.mm_charge[ca] == 0.0
    np.testing.assert_allclose(structure.mm_charge[m2], charges[m2] + charges[ca] / 3, atol=1e-12)
    assert abs(structure.mm_charge[~qm].sum() - charges[~qm].sum()) < 1e-10


@pytest.mark.parametrize("name", ["water", "sn2"])
def test_periodic_equals_mm_only_plus_qm_mm_lj(boxes, name):
    """PME box: worker = OpenMM on the MM atoms alone + numpy QM-MM Lennard-Jones (minimum image, switch)."""
    setup, files = boxes[name]
    ff = setup.forcefield_files
    ev, text, *_ = mm_worker.build(worker_args("--pdb", files["pdb"], "--forcefield", *ff, "--system",
                                               files["extxyz"], "--device", "reference", "--cutoff", CUTOFF_A,
                                               "--switch-distance", SWITCH_A), Placement())
    system = ev.structure
    assert "PME, cutoff 7 A" in text
    qm = np.zeros(system.n_atoms, dtype=bool)
    qm[system.qm_indices] = True
    cell = setup.box_nm() / BOHR_NM
    rng = np.random.default_rng(2)
    pos = setup.positions / BOHR_NM + rng.normal(scale=0.05, size=setup.positions.shape)
    residue = np.array([a.residue.index for a in setup.topology.atoms()])
    moved = rng.random(residue.max() + 1) < 0.3
    moved[residue[system.qm_indices]] = False
    pos += cell[1] * moved[residue][:, None]  # some molecules an image away: the cell is used
    e_ref, f_ref = periodic_reference(setup, pos, cell, qm)
    res = ev.compute(pos[None], cell[None])
    de = abs(res.energy[0] - e_ref)
    df = np.abs(res.forces[0] - f_ref).max()
    print(f"\n{name} periodic box ({len(pos)} atoms, {qm.sum()} QM, PME), Reference platform: |dE| = {de:.2e} Ha "
          f"(E = {e_ref:.6f} Ha), max |dF| = {df:.2e} Ha/Bohr (max |F| = {np.abs(f_ref).max():.3f})")
    assert de < 1e-8 * max(1.0, abs(e_ref))
    assert df < 1e-8 * np.abs(f_ref).max()
    assert np.abs(res.forces[0][qm]).max() > 1e-5  # QM atoms feel the MM Lennard-Jones walls
    assert np.all(res.virial == 0)

    # the same System read back from XmlSerializer serves the same numbers
    import openmm

    from qmmm_driver.mm import forcefield as mmf

    pdb = mmf.read_pdb(files["pdb"])
    xml = files["pdb"].parent / "system.xml"
    xml.write_text(openmm.XmlSerializer.serialize(
        mmf.create_system(pdb.topology, ff, None, True, CUTOFF_A, SWITCH_A)))
    ev2, *_ = mm_worker.build(worker_args("--pdb", files["pdb"], "--serialized", xml, "--system", files["extxyz"],
                                            "--device", "reference"), Placement())
    r2 = ev2.compute(pos[None], cell[None])
    assert abs(r2.energy[0] - res.energy[0]) < 1e-10 and np.abs(r2.forces - res.forces).max() < 1e-10


def test_wrapped_atoms_and_term_groups(small_box):
    """pbc='true' in i-PI wraps atoms one by one: the worker makes molecules whole (same energy and forces as
    unwrapped positions); 'terms' bonded + nonbonded add up to all, and a bad value is refused."""
    from qmmm_driver.evaluator import check_parameters
    from qmmm_driver.errors import InputError

    ev, *_ = mm_worker.build(worker_args("--pdb", small_box["pdb"], "--system", small_box["extxyz"],
                                         "--device", "reference", *SMALL_MM_ARGS), Placement())
    assert ev.whole is not None
    setup = small_box["setup"]
    cell = setup.box_nm() / BOHR_NM
    pos = setup.positions / BOHR_NM + np.random.default_rng(4).normal(scale=0.05, size=setup.positions.shape)
    frac = pos @ np.linalg.inv(cell)
    wrapped = (frac - np.floor(frac)) @ cell  # every atom in the cell: molecules split across it
    shifted = pos + np.random.default_rng(5).integers(-2, 3, size=(len(pos), 3)) @ cell  # atoms moved by lattice vectors
    ref = ev.compute(pos[None], cell[None])
    for other in (wrapped, shifted):
        res = ev.compute(other[None], cell[None])
        assert abs(res.energy[0] - ref.energy[0]) < 1e-9 * abs(ref.energy[0])
        assert np.abs(res.forces - ref.forces).max() < 1e-8 * np.abs(ref.forces).max()
    parts = [ev.compute(pos[None], cell[None], {"terms": t}) for t in ("bonded", "nonbonded")]
    assert abs(parts[0].energy[0] + parts[1].energy[0] - ref.energy[0]) < 1e-9 * abs(ref.energy[0])
    assert np.abs(parts[0].forces + parts[1].forces - ref.forces).max() < 1e-8 * np.abs(ref.forces).max()
    assert abs(parts[0].energy[0]) > 1e-4 and abs(parts[1].energy[0]) > 1e-4
    with pytest.raises(InputError, match="terms must be one of all, bonded, nonbonded"):
        check_parameters(ev, {"terms": "reciprocal"}, "INIT")


def test_reduced_box_keeps_the_lattice():
    """Triclinic cells from i-PI are handed to OpenMM in its reduced form, describing the same lattice."""
    rows = np.array([[20.0, 0, 0], [14.0, 18.0, 0], [-13.0, 11.0, 19.0]])
    red = reduced_box(rows)
    assert np.all(red[np.triu_indices(3, 1)] == 0.0)
    assert abs(red[1, 0]) <= red[0, 0] / 2 and abs(red[2, 0]) <= red[0, 0] / 2 and abs(red[2, 1]) <= red[1, 1] / 2
    m = np.linalg.solve(rows.T, red.T)  # integer and unimodular: the same lattice
    assert np.allclose(m, np.round(m)) and abs(abs(np.linalg.det(m)) - 1) < 1e-12


# --------------------------------------------------------------------------- i-PI: model + MM


@pytest.mark.parametrize("pbc", ["false", "true"])
def test_ipi_potential_is_model_plus_mm(procs, tmp_path, small_box, small_model_file, pbc):
    """Real i-PI with two ffsockets: potential = model + MM (each computed independently), forces too; with
    pbc='true' i-PI wraps every atom into the cell before sending it, and nothing changes."""
    import torch

    from qmmm_driver.evaluator import ModelEvaluator
    from qmmm_driver.nn.io import load_model
    from qmmm_driver.structures import QMMMStructure

    extxyz, pdb, setup = small_box["extxyz"], small_box["pdb"], small_box["setup"]
    model_sock, mm_sock = procs.socket_name(), procs.socket_name()
    xml = ipi_input(
        model_sock, str(extxyz), steps=3, dt_fs=0.5,
        extra_forcefields=f"<ffsocket name='mm' mode='unix' pbc='{pbc}'><address>{mm_sock}</address></ffsocket>",
        extra_forces="<force forcefield='mm'/>",
        properties="step, potential{atomic_unit}, pot_component_raw(0){atomic_unit}, "
                   "pot_component_raw(1){atomic_unit}", pbc=pbc)
    model = procs.start_worker(["--model", small_model_file, "--system", extxyz, "--unix", model_sock,
                                "--dtype", "float64"], log="model.log")
    mm = start_mm_worker(procs, ["--pdb", pdb, "--system", extxyz, "--unix", mm_sock, "--device", "reference",
                                 *SMALL_MM_ARGS])
    for w in (model, mm):
        procs.wait_log(w, r"socket unix:", timeout=90)
    ipi = procs.start_ipi(xml)
    finish_run(procs, ipi, [model, mm])
    assert "served 4 structures in 4 requests; i-PI sent EXIT" in procs.log(mm)

    pos = read_ipi_bin(tmp_path / "sim.pos_0.bin")
    frc = read_ipi_bin(tmp_path / "sim.frc_0.bin")
    props = read_ipi_properties(tmp_path / "sim.out")
    q = np.stack([p[1] for p in pos])
    cells = np.stack([p[0].T for p in pos])
    system = QMMMStructure.read(extxyz)
    qm = np.zeros(system.n_atoms, dtype=bool)
    qm[system.qm_indices] = True
    model_res = ModelEvaluator(load_model(small_model_file), system, "cpu", torch.float64).compute(q, cells)
    mm_ref = [periodic_reference(setup, q[k], cells[k], qm) for k in range(len(q))]
    e_mm = np.array([e for e, _ in mm_ref])
    f_total = model_res.forces + np.stack([f for _, f in mm_ref])

    de = np.abs(props["potential"] - (model_res.energy + e_mm)).max()
    df = np.abs(np.stack([f[1] for f in frc]) - f_total).max()
    print(f"\ni-PI (model + MM, {system.n_atoms} atoms, 4 frames): max |dE| = {de:.2e} Ha "
          f"(E_MM ~ {e_mm[0]:.4f}, E_model ~ {model_res.energy[0]:.4f} Ha), max |dF| = {df:.2e} Ha/Bohr "
          f"(max |F| = {np.abs(f_total).max():.3f})")
    assert np.abs(props["pot_component_raw(0)"] - model_res.energy).max() < 1e-8 * np.abs(model_res.energy).max()
    assert np.abs(props["pot_component_raw(1)"] - e_mm).max() < 1e-8 * max(1.0, np.abs(e_mm).max())
    assert de < 1e-8 * np.abs(props["potential"]).max()
    assert df < 1e-8 * np.abs(f_total).max()
    assert np.abs(np.diff(props["potential"])).max() > 1e-6  # the structures really moved
    # the MM worker sends no extras: i-PI's raw extras are the model's JSON, unchanged
    import ast
    import json

    block = (tmp_path / "sim.xtr_0").read_text().split("#EXTRAS(raw)#")[1]
    raw = ast.literal_eval(block.split("\n", 1)[1].strip())["raw"]
    assert json.loads(raw[0] if isinstance(raw, list) else raw)["qm_indices"] == [0, 1, 2]


# --------------------------------------------------------------------------- errors


def run_cli(*argv, timeout=60):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "qmmm_driver.cli", "mm", *[str(a) for a in argv]],
                          capture_output=True, text=True, timeout=timeout)


def test_error_bond_spanning_qm_and_mm(small_box):
    """Half a water as QM: the O-H bond links QM and MM, a clear error before connecting to anything."""
    r = run_cli("--pdb", small_box["pdb"], "--forcefield", "amber14/tip3p.xml", "--qm", "0", "--unix", "none",
                "--connect-timeout", "1")
    assert r.returncode == 2, r.stderr
    assert "the bond between QM atom 0 (O) and MM atom 1 (H) crosses the boundary" in r.stderr, r.stderr
    assert "no link-atom parameters for a cut O-H bond" in r.stderr and "select both atoms as QM or MM" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("qmmm-driver mm: served 0 structures")


def test_error_bonded_term_spanning_without_topology_bonds(small_box):
    """A System whose topology has no bonds (serialized input): the force terms themselves are checked."""
    from openmm import app

    from qmmm_driver.mm import forcefield as mmf

    pdb = mmf.read_pdb(small_box["pdb"])
    system = mmf.create_system(pdb.topology, ["amber14/tip3p.xml"], None, True, CUTOFF_A, SWITCH_A)
    bare = app.Topology()
    for chain in pdb.topology.chains():
        c = bare.addChain()
        for res in chain.residues():
            r = bare.addResidue(res.name, c, res.id)
            for a in res.atoms():
                bare.addAtom(a.name, a.element, r)
    with pytest.raises(mmf.MMSetupError) as info:
        mmf.remove_qm_terms(system, bare, [0, 1])  # O and H1 of the QM water, not H2
    text = str(info.value)
    assert "HarmonicBondForce term" in text and "MM atom 2 (H2 of HOH" in text, text


def test_error_pdb_and_system_disagree(tmp_path, small_box):
    import ase.io

    atoms = ase.io.read(small_box["extxyz"])
    del atoms[-3:]
    short = tmp_path / "short.extxyz"
    ase.io.write(short, atoms, format="extxyz")
    r = run_cli("--pdb", small_box["pdb"], "--forcefield", "amber14/tip3p.xml", "--system", short,
                "--unix", "none", "--connect-timeout", "1")
    assert r.returncode == 2
    n = len(atoms)
    assert f"has {n + 3} atoms but the system file {short} has {n}" in r.stderr, r.stderr


def test_error_atom_count_from_ipi(procs, tmp_path, small_box):
    """i-PI starts from a file with one water fewer than the PDB: the MM worker stops with exit 2, naming both."""
    import ase.io

    atoms = ase.io.read(small_box["extxyz"])
    del atoms[-3:]
    ase.io.write(tmp_path / "short.extxyz", atoms, format="extxyz")
    sock = procs.socket_name()
    xml = ipi_input(sock, "short.extxyz", steps=2, trajectories=False)
    mm = start_mm_worker(procs, ["--pdb", small_box["pdb"], "--qm", "0-2", "--unix", sock, *SMALL_MM_ARGS])
    procs.wait_log(mm, r"socket unix:", timeout=60)
    ipi = procs.start_ipi(xml)
    rc = procs.finish(mm, 60)
    log = procs.log(mm)
    assert rc == 2, log
    assert f"i-PI sent {len(atoms)} atoms but the system file {small_box['pdb']} has {len(atoms) + 3}" in log, log
    assert "served 0 structures" in log
    procs.kill(ipi)


def test_error_coupling_sent_to_mm_worker(small_box):
    """<parameters>{coupling: ...}</parameters> on the MM ffsocket is refused (it has no QM-MM electrostatics)."""
    from qmmm_driver.ipi.client import INIT, InitError, IPIClient

    ev, *_ = mm_worker.build(worker_args("--pdb", small_box["pdb"], "--system", small_box["extxyz"],
                                         *SMALL_MM_ARGS), Placement())
    a, b = socket.socketpair()
    out = {}
    with a, b:
        client = IPIClient(b, ev)
        t = threading.Thread(target=lambda: out.setdefault("rc", _serve(client, out)), daemon=True)
        t.start()
        text = b" coupling : 0.5 , "
        a.sendall(INIT + np.int32(0).tobytes() + np.int32(len(text)).tobytes() + text)
        t.join(10)
    assert isinstance(out.get("error"), InitError), out
    assert "unknown parameter(s) ['coupling']" in str(out["error"]) and "understands: terms (" in str(out["error"])


def _serve(client, out):
    try:
        return client.serve()
    except Exception as err:  # noqa: BLE001 - reported to the test
        out["error"] = err
        return None


def test_cli_registered():
    from qmmm_driver.cli import COMMANDS, build_parser

    assert COMMANDS["mm"][0] == "qmmm_driver.cli.mm"
    start = time.monotonic()
    args = build_parser().parse_args(["mm", "--pdb", "x.pdb", "--forcefield", "a.xml", "b.xml", "--qm", "0-2",
                                      "--unix", "mm"])
    assert args.forcefield == ["a.xml", "b.xml"] and time.monotonic() - start < 5
