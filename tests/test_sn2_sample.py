"""examples/sn2/sample.py: the --ion-end-on angle wall is flat beyond its angle, rises as 1/2 k (amin - a)^2 below
it and pushes the ion back towards the C-Cl axis; --bend turns the far chloride off the axis; bad use is refused
before any sampling."""

import numpy as np
import pytest

from conftest import load_example


def _energy_and_ion_force(script, angle_deg: float, min_deg: float):
    import openmm
    from openmm import unit

    system = openmm.System()
    for _ in range(3):
        system.addParticle(1.0)
    system.addForce(script.end_on_restraint(0, 1, 2, min_deg))
    a = np.radians(angle_deg)
    ion = np.array([0.3, 0.0, 0.0]) + 0.3 * np.array([-np.cos(a), np.sin(a), 0.0])  # carbon at 0, chlorine at x
    pos = np.array([[0.0, 0.0, 0.0], [0.3, 0.0, 0.0], ion])
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pos * unit.nanometer)
    state = context.getState(getEnergy=True, getForces=True)
    energy = state.getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    force = state.getForces(asNumpy=True).value_in_unit(unit.kilojoule_per_mole / unit.nanometer)[2]
    return energy, force, ion - pos[1]


def test_end_on_wall_is_flat_beyond_its_angle_and_harmonic_below():
    script = load_example("examples/sn2/sample.py")
    for angle in (160.0, 175.0):
        energy, force, _ = _energy_and_ion_force(script, angle, 155.0)
        assert energy == 0.0 and np.allclose(force, 0.0)
    energy, force, arm = _energy_and_ion_force(script, 125.0, 155.0)
    assert energy == pytest.approx(0.5 * script.END_ON_K * np.radians(30.0) ** 2, rel=1e-6)
    # the ion is pushed round the chlorine (perpendicular to its arm) towards the axis beyond it (+x, -y here)
    assert np.dot(force, arm) == pytest.approx(0.0, abs=1e-6 * np.linalg.norm(force))
    assert force[0] > 0.0 and force[1] < 0.0


@pytest.mark.parametrize("argv", [["--ion-end-on", "150"], ["--ion", "Mg2+", "--ion-end-on", "200"]])
def test_end_on_needs_an_ion_and_an_angle_in_range(argv, tmp_path):
    script = load_example("examples/sn2/sample.py")
    with pytest.raises(SystemExit, match="--ion-end-on needs"):
        script.main(["--out", str(tmp_path / "x.extxyz"), "--frames", "1", *argv])


def test_nearest_acceptors_uses_the_minimum_image_and_the_nearest_target():
    script = load_example("examples/sn2/sample.py")
    box = 20.0
    pos = np.array([[1.0, 1.0, 1.0],     # 0: target
                    [10.0, 10.0, 10.0],  # 1: target
                    [19.5, 1.0, 1.0],    # 2: 1.5 A from 0 through the wall
                    [4.0, 1.0, 1.0],     # 3: 3 A from 0
                    [10.0, 12.0, 10.0],  # 4: 2 A from 1
                    [6.0, 6.0, 6.0]])    # 5: far from both
    assert script.nearest_acceptors(pos, box, [2, 3, 4, 5], [0, 1], 3) == [2, 4, 3]
    assert script.nearest_acceptors(pos, box, [5, 3], [0], 1) == [3]


@pytest.mark.parametrize("argv, message", [
    (["--acceptor-contact", "2:2.4"], "is not N:LO:HI"),
    (["--acceptor-contact", "0:2.4:3.2"], "needs N >= 1"),
    (["--acceptor-contact", "2:3.2:2.4"], "needs N >= 1"),
    (["--acceptor-contact", "2:2.4:3.2", "--ion", "Na+"], "cannot be combined"),
])
def test_acceptor_contact_refuses_bad_use_before_sampling(argv, message, tmp_path):
    script = load_example("examples/sn2/sample.py")
    with pytest.raises(SystemExit, match=message):
        script.main(["--out", str(tmp_path / "x.extxyz"), "--frames", "1", *argv])
    assert not (tmp_path / "x.extxyz").exists()


def test_acceptor_contact_holds_the_nearest_acceptors_with_a_flat_bottom_wall():
    """The restraint picks the solvent O/N nearest to the methyl H (not a QM atom, not a carbon) and is zero
    inside LO..HI of the nearest H, 1/2 k (d - HI)^2 beyond."""
    import openmm
    from openmm import app, unit

    from qmmm_driver.mm.sampling import DISTANCE_WALL_K

    script = load_example("examples/sn2/sample.py")
    top = app.Topology()
    residue = top.addResidue("SOL", top.addChain())
    elements = ["C", "H", "H", "H", "Cl", "Cl", "O", "N", "C", "O"]  # solute C, H1-3, Cl1, Cl2; then solvent
    for k, e in enumerate(elements):
        top.addAtom(f"A{k}", app.Element.getBySymbol(e), residue)
    pos = np.array([[5.0, 5.0, 5.0], [6.0, 5.0, 5.0], [5.0, 6.0, 5.0], [5.0, 5.0, 6.0], [3.2, 5.0, 5.0],
                    [7.0, 7.0, 3.0],
                    [9.0, 5.0, 5.0],   # 6: O, 3 A from H1
                    [5.0, 5.0, 9.5],   # 7: N, 3.5 A from H3
                    [7.5, 5.0, 5.0],   # 8: C, nearer but not an acceptor
                    [5.0, 15.0, 5.0]])  # 9: O, far

    class FakeSetup:
        topology = top

        @staticmethod
        def box_nm():
            return np.eye(3) * 3.0

    class FakeSampler:
        qm = [0, 1, 2, 3, 4, 5]
        setup = FakeSetup()

        @staticmethod
        def positions_A():
            return pos

    force, held = script.acceptor_contact_restraint(FakeSampler(), 2, 2.4, 3.2)
    assert held == [6, 7] and force.getNumBonds() == 2
    system = openmm.System()
    for _ in elements:
        system.addParticle(1.0)
    system.setDefaultPeriodicBoxVectors(*(openmm.Vec3(*row) for row in np.eye(3) * 3.0))
    system.addForce(force)
    context = openmm.Context(system, openmm.VerletIntegrator(0.001), openmm.Platform.getPlatformByName("Reference"))
    context.setPositions(pos / 10.0 * unit.nanometer)
    energy = context.getState(getEnergy=True).getPotentialEnergy().value_in_unit(unit.kilojoule_per_mole)
    assert energy == pytest.approx(0.5 * DISTANCE_WALL_K * (3.5 - 3.2) ** 2, rel=1e-6)  # only N is outside
    with pytest.raises(SystemExit, match="O/N atoms, 5 asked for"):
        script.acceptor_contact_restraint(FakeSampler(), 5, 2.4, 3.2)


def _angle_deg(a, b):
    return np.degrees(np.arccos(np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)))


@pytest.mark.parametrize("xi", [-2.0, -0.4, 0.7, 2.3])
def test_bend_turns_only_the_far_chloride_and_keeps_its_distance(xi):
    script = load_example("examples/sn2/sample.py")
    solute = script.sn2
    straight = solute.geometry(xi)
    bent = solute.geometry(xi, 35.0, 120.0)
    far = 5 if xi < 0 else 4
    near = 9 - far
    assert _angle_deg(straight[4], straight[5]) == pytest.approx(180.0)
    assert _angle_deg(bent[near], bent[far]) == pytest.approx(145.0)
    assert np.linalg.norm(bent[far]) == pytest.approx(np.linalg.norm(straight[far]))
    assert np.allclose(np.delete(bent, far, axis=0), np.delete(straight, far, axis=0))
    assert solute.xi_of(bent) == pytest.approx(xi)
    # the azimuth is measured from the x axis (the plane of C, H1 and the C-Cl axis)
    assert np.degrees(np.arctan2(bent[far, 1], bent[far, 0])) == pytest.approx(120.0)


@pytest.mark.parametrize("bend, message", [("10", "is not LO:HI"), ("50:20", "needs 0 <= LO <= HI < 180"),
                                           ("-5:20", "needs 0 <= LO"), ("10:180", "needs 0 <= LO")])
def test_bend_refuses_bad_ranges_before_sampling(bend, message, tmp_path):
    script = load_example("examples/sn2/sample.py")
    with pytest.raises(SystemExit, match=message):
        script.main(["--out", str(tmp_path / "x.extxyz"), "--frames", "1", f"--bend={bend}"])
    assert not (tmp_path / "x.extxyz").exists()


def test_a_change_of_window_moves_the_hold_over_ramp_ps_and_leaves_the_solute_held():
    """A new window's hold points (the far chloride turned 60 degrees off the axis, the rest aligned onto the
    solute as it is) put, reached in one jump, hundreds of kT into the held atoms, which still swing beyond
    HOLD_TOLERANCE_A 0.2 ps later; reached over ``ramp_ps`` of MD, they leave every held atom within it, and the
    clock counts the ramp (real OpenMM, TIP3P)."""
    from qmmm_driver.mm import sampling
    from qmmm_driver.mm.systems import build_setup

    sn2 = load_example("examples/sn2/solute.py")
    sampler = sampling.Sampler(build_setup(sn2.solute(-2.0), box_A=22.0, seed=3), temperature=300.0, dt_fs=1.0,
                               seed=3, r_on_A=8.0, r_off_A=10.0)
    sampler.hold_qm(sn2.geometry(-2.0))
    sampler.minimize()
    sampler.equilibrate(0.3)

    def largest_deviation(intervals: int) -> float:
        worst = 0.0
        for _ in range(intervals):
            sampler.run(0.01)
            worst = max(worst, sampler.hold_deviation())
        return worst

    start, before = sampler.positions_A()[sampler.qm], sampler.time_ps
    sampler.hold_qm(sn2.geometry(-2.0, 60.0, 90.0), ramp_ps=0.5)
    assert sampler.time_ps == pytest.approx(before + 0.5)
    assert np.linalg.norm(sampler.hold_points_A - start, axis=1).max() > 1.0  # the points travelled that far
    assert largest_deviation(20) < sampling.HOLD_TOLERANCE_A
    sampler.hold_qm(sn2.geometry(-2.0, 60.0, 270.0))  # the same change the other way, in one jump
    assert largest_deviation(20) > sampling.HOLD_TOLERANCE_A
