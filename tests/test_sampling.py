"""Sampled frames are the configurations the driver sees: a cluster frame cut from a periodic system gives the
model the same energy as the system itself, link atoms and redistributed charges included; charge noise keeps
every molecule's charge scaled as a whole."""

import numpy as np
import pytest
import torch

from qmmm_driver import ModelEvaluator
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import REPO, tiny_model

PEPTIDE = REPO / "examples" / "serine" / "dipeptide.pdb"


@pytest.fixture(scope="module")
def serine_sampler():
    from qmmm_driver.mm.sampling import Sampler
    from qmmm_driver.mm.systems import build_setup, solute_from_pdb

    solute = solute_from_pdb(PEPTIDE, ["amber14-all.xml"], charge=0, qm="12-16")
    setup = build_setup(solute, box_A=25.0, seed=0)
    return Sampler(setup, temperature=300.0, dt_fs=1.0, seed=0, r_on_A=10.0, r_off_A=12.0)


def test_side_chain_setup_declares_the_cut_bond(serine_sampler):
    s = serine_sampler.structure
    names = {(a.residue.name, a.name): a.index for a in serine_sampler.setup.topology.atoms()}
    assert s.qm_indices.tolist() == list(range(12, 17))
    assert s.links.tolist() == [[names[("SER", "CB")], names[("SER", "CA")]]]
    assert s.mm_charge[names[("SER", "CA")]] == 0.0 and s.periodic


def test_cluster_frame_gives_the_driver_energy(serine_sampler):
    model = tiny_model(elements=("H", "C", "O")).double()
    s = serine_sampler.structure
    frame = serine_sampler.frame(qm_noise_A=0.0, info={})
    assert frame.n_qm == 5 and frame.links.shape == (1, 2) and frame.links[0, 0] == 0  # Q1 = CB, first QM atom
    assert frame.n_atoms < s.n_atoms  # the cutoff dropped distant molecules
    pos = serine_sampler.positions_A() * ANGSTROM_TO_BOHR
    periodic = ModelEvaluator(model, s, dtype=torch.float64).compute(pos[None], s.cell[None])
    cluster = ModelEvaluator(model, frame, dtype=torch.float64).compute(frame.positions[None])
    assert cluster.energy[0] == pytest.approx(periodic.energy[0], abs=1e-9)
    np.testing.assert_allclose(cluster.qm_charges, periodic.qm_charges, atol=1e-10)


def test_charge_noise_scales_molecules_as_a_whole(serine_sampler):
    plain = serine_sampler.frame(qm_noise_A=0.0, info={})
    noisy = serine_sampler.frame(qm_noise_A=0.0, info={}, charge_noise=0.3)
    assert np.allclose(noisy.positions, plain.positions)
    ratio = noisy.mm_charge[plain.mm_charge != 0] / plain.mm_charge[plain.mm_charge != 0]
    assert ratio.std() > 0.05  # molecules got different factors
    o = np.flatnonzero(noisy.numbers[:-2] == 8)
    o = o[(noisy.numbers[o + 1] == 1) & (noisy.numbers[o + 2] == 1)]
    rows = o[:, None] + np.arange(3)                                    # O, H, H of a water
    neutral = np.abs(plain.mm_charge[rows].sum(axis=1)) < 1e-9
    assert neutral.sum() > 100
    assert np.abs(noisy.mm_charge[rows[neutral]].sum(axis=1)).max() < 1e-9  # a neutral molecule stays neutral


@pytest.mark.parametrize("name", ["methanol", "acetonitrile", "acetone", "dmso", "nitromethane"])
def test_solvent_molecule_matches_its_force_field(name):
    """The packed molecule is the force field's: neutral, its bonds at the force field's lengths (a typo in a
    template or an XML file shows here, not as a blown-up sampling run)."""
    import xml.etree.ElementTree as ET

    from qmmm_driver.mm.systems import SOLVENTS, _template_bonds

    solvent = SOLVENTS[name]
    root = ET.parse(solvent.forcefield).getroot()
    residue = next(r for r in root.iter("Residue") if r.get("name") == solvent.residue)
    types = {a.get("name"): a.get("type") for a in residue.iter("Atom")}
    classes = {t.get("name"): t.get("class") for t in root.iter("Type")}
    assert sum(float(a.get("charge")) for a in residue.iter("Atom")) == pytest.approx(0.0, abs=1e-9)
    assert sorted(types) == sorted(a[0] for a in solvent.atoms)
    length = {frozenset((b.get("class1"), b.get("class2"))): 10.0 * float(b.get("length"))
              for b in root.iter("Bond") if b.get("class1")}
    xyz = {a[0]: np.array(a[2:], dtype=float) for a in solvent.atoms}
    for a, b in _template_bonds(solvent):
        r0 = length[frozenset((classes[types[a]], classes[types[b]]))]
        assert np.linalg.norm(xyz[a] - xyz[b]) == pytest.approx(r0, abs=0.02), (a, b)


def test_sampler_starts_at_thermal_speeds_after_minimisation():
    """OpenMM offsets leapfrog velocities by half a step of force: drawn before the minimisation of a freshly
    packed box they were thousands of nm/ps for atoms in contact (acetone blew up in its first steps)."""
    from openmm import unit

    from qmmm_driver.mm.sampling import Sampler
    from qmmm_driver.mm.systems import build_setup, water_solute

    setup = build_setup(water_solute(), seed=1, solvent="acetone")
    sampler = Sampler(setup, temperature=300.0, dt_fs=1.0, seed=1, r_on_A=10.0, r_off_A=12.0)
    sampler.minimize()
    v = sampler.sim.context.getState(getVelocities=True).getVelocities(asNumpy=True).value_in_unit(
        unit.nanometer / unit.picosecond)
    assert np.linalg.norm(v, axis=1).max() < 15.0  # 300 K hydrogen: 1.6 nm/ps per component
    sampler.run(0.05)
    assert np.isfinite(sampler.positions_A()).all()


def test_relaxed_setup_lowers_the_energy_and_keeps_the_qm_atoms():
    import openmm
    from openmm import unit

    from qmmm_driver.mm.forcefield import create_system
    from qmmm_driver.mm.systems import build_setup, water_solute

    setup = build_setup(water_solute(), box_A=15.0, seed=3)
    relaxed = setup.relaxed(cutoff_A=7.0)

    def energy(s):
        system = create_system(s.topology, s.forcefield_files, periodic=True, cutoff_A=7.0, switch_A=None)
        ctx = openmm.Context(system, openmm.VerletIntegrator(0.001),
                             openmm.Platform.getPlatformByName("Reference"))
        ctx.setPositions(s.positions * unit.nanometer)
        return ctx.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)

    np.testing.assert_array_equal(relaxed.positions[setup.qm_indices], setup.positions[setup.qm_indices])
    assert np.abs(relaxed.positions - setup.positions).max() > 1e-3  # the solvent moved (nm)
    assert energy(relaxed) < energy(setup) - 100.0
    assert relaxed.positions is not setup.positions and relaxed.topology is setup.topology


@pytest.fixture()
def held_water():
    from qmmm_driver.mm.sampling import Sampler
    from qmmm_driver.mm.systems import build_setup, water_solute

    setup = build_setup(water_solute(), box_A=25.0, seed=2)
    sampler = Sampler(setup, temperature=300.0, dt_fs=1.0, seed=2, r_on_A=10.0, r_off_A=12.0)
    sampler.minimize()
    return sampler


def test_hold_deviation_is_the_largest_distance_from_the_aligned_hold_points(held_water):
    from qmmm_driver.mm.sampling import align

    assert held_water.hold_deviation() == 0.0  # nothing held yet
    current = held_water.positions_A()[held_water.qm]
    reference = current.copy()
    reference[1] += [0.6, 0.0, 0.0]  # one hydrogen's hold point off where it is
    held_water.hold_qm(reference)
    expected = np.linalg.norm(align(reference, current) - current, axis=1).max()
    assert expected > 0.3
    assert held_water.hold_deviation() == pytest.approx(expected, abs=1e-5)


def test_frames_whose_held_atoms_strayed_are_passed_over_then_refused(held_water, tmp_path, monkeypatch):
    """Within the tolerance every interval gives a frame; beyond it none is written and, after HOLD_RETRIES
    intervals in a row, sampling stops with an error naming the tolerance."""
    from qmmm_driver.errors import InputError
    from qmmm_driver.mm import sampling
    from qmmm_driver.structures import read_structures

    held_water.hold_qm(held_water.positions_A()[held_water.qm])
    out = tmp_path / "frames.extxyz"
    assert held_water.sample(out, 2, 0.01, 0.0, 0.0, {}) == 0
    assert len(read_structures(out)) == 2
    assert held_water.hold_deviation() <= sampling.HOLD_TOLERANCE_A
    monkeypatch.setattr(sampling, "HOLD_TOLERANCE_A", 0.0)
    monkeypatch.setattr(sampling, "HOLD_RETRIES", 3)
    start = held_water.time_ps
    with pytest.raises(InputError, match="more than 0.0 A from their hold points for 4 intervals"):
        held_water.sample(out, 1, 0.01, 0.0, 0.0, {})
    assert held_water.time_ps == pytest.approx(start + 4 * 0.01)
    assert len(read_structures(out)) == 2
