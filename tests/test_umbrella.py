"""The umbrella restraint used by the SN2 free-energy example: exact forces, and it biases i-PI runs."""

import numpy as np
import pytest

from qmmm_driver.ipi.umbrella import (
    DistanceDifferenceUmbrella,
    collinearity_and_gradient,
    shorter_distance_and_gradient,
    xi_and_gradient,
)
from qmmm_driver.units import ANGSTROM_TO_BOHR, HARTREE


def assert_forces_are_minus_gradient(pes, pos, atoms, h=1e-6):
    """Central differences of the bias energy against its forces, for every component of ``atoms``."""
    forces = pes.compute_structure(None, pos)[1]
    for a in atoms:
        for c in range(3):
            p, m = pos.copy(), pos.copy()
            p[a, c] += h
            m[a, c] -= h
            fd = -(pes.compute_structure(None, p)[0] - pes.compute_structure(None, m)[0]) / (2 * h)
            assert fd == pytest.approx(forces[a, c], abs=1e-9)


def test_forces_are_minus_gradient():
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(6, 3)) * 3.0
    pes = DistanceDifferenceUmbrella(atoms="0 4 5", xi0=-0.7, k=3.0, verbosity=0)
    e, f, vir, extras = pes.compute_structure(np.eye(3), pos)
    assert_forces_are_minus_gradient(pes, pos, atoms=(0, 4, 5, 2))
    xi, _ = xi_and_gradient(pos, 0, 4, 5)
    assert e == pytest.approx(0.5 * 3.0 / HARTREE / ANGSTROM_TO_BOHR**2 * (xi - (-0.7) * ANGSTROM_TO_BOHR) ** 2)
    assert '"xi"' in extras and np.all(f[[1, 2, 3]] == 0)


def test_collinearity_wall_forces_and_flat_bottom():
    """The wall is minus the gradient where it acts, and exactly zero for a straight B-A-C."""
    rng = np.random.default_rng(1)
    bent = rng.normal(size=(6, 3)) * 3.0
    pes = DistanceDifferenceUmbrella(atoms="0 4 5", xi0=-0.7, k=3.0, k_wall=10.0, wall=0.3, verbosity=0)
    plain = DistanceDifferenceUmbrella(atoms="0 4 5", xi0=-0.7, k=3.0, verbosity=0)
    delta, _ = collinearity_and_gradient(bent, 0, 4, 5)
    assert delta > 0.3 * ANGSTROM_TO_BOHR  # the wall acts here
    e = pes.compute_structure(None, bent)[0]
    assert e > plain.compute_structure(None, bent)[0]
    assert_forces_are_minus_gradient(pes, bent, atoms=(0, 4, 5))
    straight = bent.copy()
    straight[4] = straight[0] + np.array([1.8, 0.0, 0.0]) * ANGSTROM_TO_BOHR
    straight[5] = straight[0] - np.array([3.2, 0.0, 0.0]) * ANGSTROM_TO_BOHR
    assert collinearity_and_gradient(straight, 0, 4, 5)[0] == pytest.approx(0.0, abs=1e-12)
    np.testing.assert_array_equal(pes.compute_structure(None, straight)[1], plain.compute_structure(None, straight)[1])


def test_bond_wall_forces_and_flat_bottom():
    """The wall on the shorter A-B / A-C distance: minus the gradient where it acts (at and away from the
    symmetric point), zero while one distance is under ``bond``, and its coordinate is the shorter distance."""
    a = ANGSTROM_TO_BOHR
    pos = np.zeros((6, 3))
    pos[4], pos[5] = [2.9 * a, 0.1 * a, 0.0], [-2.9 * a, 0.0, 0.2 * a]  # both C-Cl stretched, about equal
    pes = DistanceDifferenceUmbrella(atoms="0 4 5", xi0=0.0, k=3.0, k_bond=20.0, bond=2.5, verbosity=0)
    plain = DistanceDifferenceUmbrella(atoms="0 4 5", xi0=0.0, k=3.0, verbosity=0)
    s = 0.05 * a
    m, _ = shorter_distance_and_gradient(pos, 0, 4, 5, s)
    d = np.linalg.norm(pos[[4, 5]], axis=1)
    assert d.min() <= m <= d.min() + s
    expected = 0.5 * 20.0 / HARTREE / a**2 * (m - 2.5 * a) ** 2
    assert pes.compute_structure(None, pos)[0] - plain.compute_structure(None, pos)[0] == pytest.approx(expected)
    assert_forces_are_minus_gradient(pes, pos, atoms=(0, 4, 5))
    lopsided = pos.copy()
    lopsided[5] = [-3.6 * a, 0.0, 0.0]
    assert_forces_are_minus_gradient(pes, lopsided, atoms=(0, 4, 5))
    bonded = pos.copy()
    bonded[4] = [1.8 * a, 0.0, 0.0]  # the reactant: one short bond, the other chloride far
    np.testing.assert_array_equal(pes.compute_structure(None, bonded)[1], plain.compute_structure(None, bonded)[1])


def test_bad_atoms_are_refused():
    with pytest.raises(ValueError, match="three indices"):
        DistanceDifferenceUmbrella(atoms="0 4")
    with pytest.raises(ValueError, match="k_wall='stiff'"):
        DistanceDifferenceUmbrella(atoms="0 4 5", k_wall="stiff")


def test_umbrella_biases_an_ipi_run(procs, tmp_path, small_box, small_model_file):
    """An i-PI run with the model, OpenMM and an umbrella <ffdirect> bias on d(O-H1) - d(O-H2)
    of the QM water: i-PI's ensemble_bias equals k/2 (xi - xi0)^2 of the recorded positions."""

    from conftest import REPO, SMALL_MM_ARGS, read_ipi_properties, start_mm_worker

    umbrella = REPO / "qmmm_driver" / "ipi" / "umbrella.py"
    for name, target in (("system.extxyz", small_box["extxyz"]), ("system.pdb", small_box["pdb"]),
                         ("model.pt", small_model_file)):
        (tmp_path / name).symlink_to(target)
    xml = f"""<simulation verbosity='low'>
  <output prefix='sim'>
    <properties stride='1' filename='out'> [ step, ensemble_bias{{electronvolt}}, atom_x{{angstrom}}(atom=0),
      atom_x{{angstrom}}(atom=1), atom_x{{angstrom}}(atom=2) ] </properties>
  </output>
  <total_steps> 4 </total_steps>
  <ffsocket name='qmmm' mode='unix' pbc='false'> <address>QMMM</address> </ffsocket>
  <ffsocket name='mm' mode='unix' pbc='false'> <address>MM</address> </ffsocket>
  <ffdirect name='umbrella' pbc='false'> <pes>custom</pes> <pes_path>{umbrella}</pes_path>
    <parameters>{{atoms: 0 1 2, xi0: 0.2, k: 4.0}}</parameters> </ffdirect>
  <system>
    <initialize nbeads='1'> <file mode='ase'> system.extxyz </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities> </initialize>
    <forces> <force forcefield='qmmm'/> <force forcefield='mm'/> </forces>
    <ensemble> <temperature units='kelvin'> 300 </temperature> <bias> <force forcefield='umbrella'/> </bias> </ensemble>
    <motion mode='dynamics'> <dynamics mode='nvt'> <timestep units='femtosecond'> 0.5 </timestep>
      <thermostat mode='langevin'> <tau units='femtosecond'> 100 </tau> </thermostat> </dynamics> </motion>
  </system>
</simulation>"""
    qmmm, mm = procs.socket_name(), procs.socket_name()
    xml = xml.replace("<address>QMMM</address>", f"<address>{qmmm}</address>")
    ipi = procs.start_ipi(xml.replace("<address>MM</address>", f"<address>{mm}</address>"))
    procs.wait_socket(qmmm, ipi)
    procs.start_worker(["--model", "model.pt", "--system", "system.extxyz", "--unix", qmmm], log="w.log")
    start_mm_worker(procs, ["--pdb", "system.pdb", "--system", "system.extxyz", "--unix", mm, *SMALL_MM_ARGS])
    assert procs.finish(ipi, timeout=180) == 0, procs.log(ipi)[-3000:]
    props = read_ipi_properties(tmp_path / "sim.out")
    o, h1, h2 = (props[f"atom_x(atom={k})"] for k in range(3))
    xi = np.linalg.norm(h1 - o, axis=1) - np.linalg.norm(h2 - o, axis=1)
    bias = props["ensemble_bias"]
    assert np.allclose(bias, 0.5 * 4.0 * (xi - 0.2) ** 2, rtol=1e-4, atol=1e-7)
    assert bias.max() > 1e-3  # the bias is active
