"""Covalent QM/MM boundaries: link hydrogens, redistributed charges, forces = -gradient on every atom of the
boundary, symmetries with a cut bond, bad cuts refused."""

import numpy as np
import pytest
import torch
from e3nn import o3

from qmmm_driver import ModelEvaluator, QMMMStructure
from qmmm_driver.boundary import BoundaryError, check_cut_bonds, g_factor, redistribute_charges
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import ethanol_cluster, evaluate, fd_force, tiny_model, water_cluster


@pytest.fixture(scope="module")
def model():
    return tiny_model(elements=("H", "C", "O")).double()


def test_redistributed_charges_keep_the_total():
    atoms = ethanol_cluster()
    q = atoms.arrays["mm_charge"]
    assert q[0] == 0.0 and np.allclose(q[[6, 7, 8]], [0.09, 0.07, 0.02])
    raw = q.copy()
    raw[[0, 6, 7, 8]] = [0.12, 0.05, 0.03, -0.02]
    assert q.sum() == pytest.approx(raw.sum(), abs=1e-12)


def test_link_atom_sits_on_the_bond():
    atoms = ethanol_cluster()
    s = QMMMStructure.from_atoms(atoms)
    assert s.links.tolist() == [[1, 0]] and s.link_g == pytest.approx([1.090 / 1.526])
    assert g_factor("C", "C") == pytest.approx(0.7143, abs=1e-4)


@pytest.mark.parametrize("atom", [1, 0, 6, 2, "nearest water"])  # Q1, M1, an M2, another QM atom, a close MM atom
def test_forces_are_minus_gradient_across_the_boundary(model, atom):
    atoms = ethanol_cluster()
    if atom == "nearest water":
        link = atoms.positions[1] + 0.714 * (atoms.positions[0] - atoms.positions[1])
        atom = 9 + int(np.argmin(np.linalg.norm(atoms.positions[9:] - link, axis=1)))
    res = evaluate(model, atoms)
    for c in range(3):
        assert fd_force(model, atoms, atom, c) == pytest.approx(res.forces[0, atom, c], rel=1e-5, abs=1e-8), (atom, c)
    assert np.abs(res.forces[0, 0]).max() > 1e-5  # the MM partner feels the QM region through its link atom


def test_rotation_translation_and_total_charge_with_a_cut_bond(model):
    atoms = ethanol_cluster()
    ref = evaluate(model, atoms)
    R = o3.rand_matrix(dtype=torch.float64).numpy()
    moved = atoms.copy()
    moved.positions = atoms.positions @ R.T + np.array([3.0, -2.0, 7.5])
    out = evaluate(model, moved)
    assert out.energy[0] == pytest.approx(ref.energy[0], abs=1e-9)
    assert np.abs(out.forces[0] - ref.forces[0] @ R.T).max() < 1e-8
    assert np.abs(ref.forces[0].sum(axis=0)).max() < 1e-10
    assert ref.qm_charges.shape == (1, 5) and ref.qm_charges[0].sum() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("system", ["water", "ethanol with a cut bond"])
def test_cluster_virial_equals_strain_derivative(system):
    """A cluster's virial (assembled on the host from the forces and the frame's positions) is minus the
    derivative of the energy with respect to a homogeneous strain of every position, link atoms included."""
    elements = ("H", "O") if system == "water" else ("H", "C", "O")
    model = tiny_model(elements=elements).double()
    atoms = water_cluster() if system == "water" else ethanol_cluster()
    res = evaluate(model, atoms)
    eps = 1e-6
    for a, b in ((0, 0), (0, 1), (2, 1)):
        energies = []
        for sign in (1, -1):
            strain = np.eye(3)
            strain[a, b] += sign * eps
            moved = atoms.copy()
            moved.positions = atoms.positions @ strain.T
            energies.append(evaluate(model, moved).energy[0])
        dE = (energies[0] - energies[1]) / (2 * eps)
        assert -dE == pytest.approx(res.virial[0, a, b], rel=1e-5, abs=1e-9), (a, b)


def test_bad_cuts_are_refused_naming_the_atoms():
    atoms = ethanol_cluster()
    symbols = atoms.get_chemical_symbols()
    qm = atoms.arrays["qm"].astype(bool)
    pos = atoms.positions.copy()
    check_cut_bonds(symbols, pos, [(1, 0)], qm)  # the C-C single bond is fine
    short = pos.copy()
    short[0] = pos[1] + 1.30 * (pos[0] - pos[1]) / np.linalg.norm(pos[0] - pos[1])
    with pytest.raises(BoundaryError, match=r"QM atom 1 \(C\) and MM atom 0 \(C\) is 1.30 A long.*double"):
        check_cut_bonds(symbols, short, [(1, 0)], qm)
    with pytest.raises(BoundaryError, match="MM atom 0 .* bonded to two QM atoms"):
        check_cut_bonds(symbols, pos, [(1, 0), (2, 0)], qm)
    ff = np.zeros(len(atoms))
    ff[[1, 2, 3, 4, 5]] = [0.2, -0.4, 0.4, 0.1, 0.1]  # 0.4 e: part of a charged group
    with pytest.raises(BoundaryError, match=r"sum to \+0.400 e, not an integer"):
        check_cut_bonds(symbols, pos, [(1, 0)], qm, ff)
    link = atoms.arrays["qm_link"].copy()
    with pytest.raises(BoundaryError, match="no MM neighbour"):
        redistribute_charges(np.ones(len(atoms)), qm, link, [(0, 1)])


def test_a_link_on_a_qm_atom_is_refused():
    atoms = ethanol_cluster()
    atoms.arrays["qm_link"][2] = 1
    with pytest.raises(ValueError, match="atom 2 is QM but has a 'qm_link' partner"):
        QMMMStructure.from_atoms(atoms)


def test_training_path_equals_the_driver_with_link_atoms(model):
    """The cached-tensor training path places the link hydrogen the same way: energies, QM forces and the MM
    partner's force equal the driver's."""
    from qmmm_driver.training.data import batches, prepare, rows_in
    from qmmm_driver.training.loss import predict

    frames = [QMMMStructure.from_atoms(ethanol_cluster(seed=s)) for s in (2, 3)]
    sets = prepare(frames, model.elements, model.K, near_radius=6.0 * ANGSTROM_TO_BOHR,
                   loss_radius=6.0 * ANGSTROM_TO_BOHR, short_radius=model.settings.short_range_cutoff)
    assert len(sets) == 1 and sets[0].link_q1.shape == (2, 1)
    batch = next(batches(sets, rows_in(sets, [0, 1]), 8))
    pred = predict(model, batch, create_graph=False)
    for k, s in enumerate(frames):
        res = ModelEvaluator(model, s, dtype=torch.float64).compute(s.positions)
        assert float(pred["energy"][k].detach()) == pytest.approx(res.energy[0], abs=1e-10)
        assert np.allclose(pred["qm_forces"][k].detach().numpy(), res.forces[0][s.qm_indices], atol=1e-9)
        m1 = int(batch.link_m1[k, 0])
        assert np.allclose(pred["near_forces"][k][m1].detach().numpy(), res.forces[0][0], atol=1e-9)
        assert np.allclose(pred["charges"][k].detach().numpy(), res.qm_charges[0], atol=1e-10)


@pytest.fixture(scope="module")
def labelled_ethanol():
    from pyscf import lib

    from qmmm_driver.labelling import label_frame

    lib.num_threads(1)
    frame = QMMMStructure.from_atoms(ethanol_cluster(n_mm_waters=3))
    return frame, label_frame(frame)


@pytest.mark.parametrize("atom,comp", [(1, 0), (0, 1)])  # Q1 (the CH2 carbon), M1 (the methyl carbon)
def test_reference_forces_are_minus_gradient_across_the_boundary(labelled_ethanol, atom, comp):
    """PySCF with a link hydrogen: the forces on the two atoms of the cut bond equal finite differences."""
    from dataclasses import replace

    from qmmm_driver.labelling import label_frame

    frame, lab = labelled_ethanol
    h = 2e-3

    def energy(step):
        moved = replace(frame, positions=frame.positions.copy())
        moved.positions[atom, comp] += step
        return label_frame(moved).energy

    fd = -(energy(h) - energy(-h)) / (2 * h)
    assert lab.forces[atom, comp] == pytest.approx(fd, abs=3e-5, rel=1e-3)
    assert abs(fd) > 1e-3
    assert lab.qm_charges[~frame.qm].sum() == 0.0 and lab.qm_charges[frame.qm].sum() == pytest.approx(0.0, abs=1e-6)


def test_ipi_never_sees_link_atoms(procs, tmp_path, model):
    """A real i-PI run of the cut ethanol: i-PI moves the frame's atoms only (no link hydrogen), and the forces
    and potential it records equal the evaluator's, link-atom chain rule included."""
    from qmmm_driver.nn.io import save_model

    from conftest import CLUSTER_BOX, finish_run, ipi_input, read_ipi_bin, read_ipi_properties, \
        start_workers_then_ipi, write_frame

    atoms = ethanol_cluster()
    frame = write_frame(atoms, tmp_path / "ethanol.extxyz", box=CLUSTER_BOX)
    model_file = tmp_path / "model.pt"
    save_model(model.float(), model_file)
    model.double()
    name = procs.socket_name()
    ipi, workers = start_workers_then_ipi(
        procs, ["--model", model_file, "--system", frame, "--unix", name, "--dtype", "float64"],
        ipi_input(name, frame.name, steps=2))
    finish_run(procs, ipi, workers)
    pos, frc = read_ipi_bin(tmp_path / "sim.pos_0.bin"), read_ipi_bin(tmp_path / "sim.frc_0.bin")
    assert pos[0][1].shape == (len(atoms), 3)
    s = QMMMStructure.read(frame)
    res = ModelEvaluator(model, s, dtype=torch.float64).compute(np.stack([p[1] for p in pos]))
    np.testing.assert_allclose(np.stack([f[1] for f in frc]), res.forces, atol=1e-8 * np.abs(res.forces).max())
    np.testing.assert_allclose(read_ipi_properties(tmp_path / "sim.out")["potential"], res.energy, rtol=1e-10)
    assert np.abs(res.forces[:, 0]).max() > 1e-5  # M1 (the methyl carbon) is pushed through the link atom
