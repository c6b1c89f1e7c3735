"""Physics of the model: symmetries, gauge invariance, forces = -gradient, batching, the training path,
model files and the ASE calculator."""

import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

from qmmm_driver import ModelEvaluator, QMMMCalculator, QMMMStructure
from qmmm_driver.launcher import MODELS
from qmmm_driver.nn.io import ModelFileError, load_model, save_model
from qmmm_driver.structures import StructureError
from qmmm_driver.units import ANGSTROM_TO_BOHR, HARTREE

from conftest import evaluate, fd_force, tiny_model, water_box, water_cluster


def sn2_cluster(seed=3, n_mm=25, spread=1.6):
    """Cl- + CH3Cl (QM, charge -1) in a shell of MM waters, some of them within the short-range cutoff."""
    rng = np.random.default_rng(seed)
    solute = Atoms("CHHHClCl", positions=[[0, 0, 0], [1.03, 0, -0.36], [-0.51, 0.89, -0.36],
                                          [-0.51, -0.89, -0.36], [0, 0, 1.80], [0, 0, -3.2]])
    water = water_cluster(n_mm=n_mm, seed=seed)[3:]
    water.translate(rng.normal(size=3) * 0.1)
    water.positions *= spread
    atoms = solute + water
    qm = np.zeros(len(atoms), dtype=np.int64)
    qm[:6] = 1
    atoms.set_array("qm", qm)
    atoms.set_array("mm_charge", np.concatenate([np.zeros(6), np.tile([-0.834, 0.417, 0.417], n_mm)]))
    atoms.info["qm_total_charge"] = -1
    return atoms


@pytest.fixture(scope="module")
def model64():
    return tiny_model(elements=("H", "C", "O", "Cl")).double()


def test_short_range_neighbours_are_present():
    """The SN2 cluster puts MM atoms inside the short-range cutoff, so every test below exercises that term."""
    atoms = sn2_cluster()
    d = np.linalg.norm(atoms.positions[6:, None] - atoms.positions[None, :6], axis=-1).min(axis=1)
    assert (d < 4.0).sum() >= 3


@pytest.mark.parametrize("dtype,tol,width", [(torch.float64, 1e-9, 0.0), (torch.float32, 2e-4, 0.0),
                                             (torch.float64, 1e-9, 0.8)])
@pytest.mark.parametrize("improper", [False, True])
def test_rotation_and_reflection(dtype, tol, width, improper):
    model = tiny_model(elements=("H", "C", "O", "Cl"), penetration_width=width)
    atoms = sn2_cluster()
    ref = evaluate(model, atoms, dtype)
    torch.manual_seed(11)
    R = o3.rand_matrix(dtype=torch.float64).numpy() * (-1 if improper else 1)
    rot = atoms.copy()
    rot.positions = atoms.positions @ R.T
    out = evaluate(model, rot, dtype)
    scale = np.abs(ref.forces).max()
    assert abs(out.energy[0] - ref.energy[0]) < tol * max(1.0, abs(ref.energy[0] - model.energy_shift.sum().item()))
    assert np.abs(out.forces[0] - ref.forces[0] @ R.T).max() < tol * scale * 10
    assert np.abs(out.dipole[0] - ref.dipole[0] @ R.T).max() < tol * 10
    assert np.abs(out.qm_charges - ref.qm_charges).max() < tol * 10


def test_penetration_is_the_potential_felt_by_a_gaussian_cloud():
    """The penetration correction against independent oracles: the point-charge potential averaged over a million
    samples of each QM atom's Gaussian cloud (Monte Carlo) minus the point value; its T_1 part is the exact
    gradient of that potential with respect to the QM atom (autograd; T_1 is the gradient of the potential)."""
    model = tiny_model(elements=("H", "O"), penetration_width=0.8).double()
    with torch.no_grad():
        model.penetration.copy_(torch.tensor([0.3, -0.4], dtype=torch.float64))
    species = torch.tensor([[0, 1]])
    qm = torch.tensor([[[0.0, 0.0, 0.0], [1.8, 0.2, -0.1]]], dtype=torch.float64, requires_grad=True)
    near = torch.tensor([[[0.5, 0.3, -0.2], [2.9, 1.1, 0.4], [-1.0, 1.2, 0.9], [9.0, 0.0, 0.0]]], dtype=torch.float64)
    q = torch.tensor([[0.7, -0.4, 0.25, -0.8]], dtype=torch.float64)
    vec = near[:, None] - qm[:, :, None]
    dV, dT1 = model.penetration_correction(species, vec, vec.norm(dim=-1), q)
    for i in range(2):
        grad, = torch.autograd.grad(dV[0, i], qm, retain_graph=True)
        assert torch.allclose(dT1[0, i], grad[0, i], rtol=1e-10, atol=1e-12)
    width = (0.8 * 2 * torch.sigmoid(model.penetration.detach()))[species[0]]
    gen = torch.Generator().manual_seed(0)
    unit = torch.randn(500_000, 3, generator=gen, dtype=torch.float64)
    unit = torch.cat([unit, -unit]) / 2**0.5  # density exp(-r^2/w^2)/(pi^1.5 w^3): sigma = w/sqrt(2) per axis

    def potential(points):
        return (q[0] / (near[0][None] - points[:, None]).norm(dim=-1)).sum(-1)

    for i in range(2):
        centre = qm[0, i].detach()
        expected = potential(centre + unit * width[i]).mean() - potential(centre[None])[0]
        assert float(dV[0, i].detach()) == pytest.approx(float(expected), rel=0.01, abs=2e-4)
    assert abs(float(dV[0, 0].detach())) > 0.05  # the oracle can fail: the close charge is well inside the cloud


def test_translation_and_permutation_invariance(model64):
    atoms = sn2_cluster()
    ref = evaluate(model64, atoms)
    moved = atoms.copy()
    moved.translate([13.0, -5.0, 2.5])
    out = evaluate(model64, moved)
    assert out.energy[0] == pytest.approx(ref.energy[0], abs=1e-10)
    assert np.allclose(out.forces, ref.forces, atol=1e-10)
    # MM atoms in any order; QM atoms of the same element swapped (the three methyl H)
    perm = np.concatenate([[0, 3, 1, 2, 4, 5], 6 + np.random.default_rng(0).permutation(len(atoms) - 6)])
    shuffled = atoms[perm]
    out = evaluate(model64, shuffled)
    assert out.energy[0] == pytest.approx(ref.energy[0], abs=1e-10)
    assert np.allclose(out.forces[0], ref.forces[0][perm], atol=1e-10)
    assert np.allclose(out.qm_charges[0], ref.qm_charges[0][perm[:6]], atol=1e-10)


@pytest.mark.parametrize("which", ["untrained", "untrained with penetration", "shipped"])
@pytest.mark.parametrize("name,charge", [("water", 0), ("sn2", -1)])
def test_uniform_potential_shift_changes_energy_by_total_charge(name, charge, which):
    """A shell of charge far away (no field inside, a constant potential dV over the QM region) changes the
    energy by exactly Q_QM dV, from -10 V to +10 V, and leaves the QM forces unchanged: for an untrained model
    and for the shipped one."""
    if which == "shipped":
        model = load_model(MODELS / name / "model.pt").double()
    else:
        width = 0.8 if "penetration" in which else 0.0
        model = tiny_model(elements=("H", "O") if name == "water" else ("H", "C", "O", "Cl"),
                           penetration_width=width).double()
    atoms = water_cluster() if name == "water" else sn2_cluster()
    ref = evaluate(model, atoms)
    qm = np.flatnonzero(atoms.arrays["qm"])
    centre = atoms.positions[qm].mean(axis=0)
    shell = 300.0  # A: a Fibonacci sphere of 2000 equal charges; inside, the potential is constant to < 1e-10 V
    k = np.arange(2000) + 0.5
    theta, phi = np.arccos(1 - 2 * k / 2000), np.pi * (1 + 5**0.5) * k
    points = centre + shell * np.stack([np.sin(theta) * np.cos(phi), np.sin(theta) * np.sin(phi), np.cos(theta)], 1)
    for dV in (-10.0, -5.0, -1.0, 1.0, 2.0, 5.0, 10.0):
        q_total = dV * shell / 14.399645  # e: potential of a charged sphere inside, V = k Q / R (eV A / e)
        shifted = atoms + Atoms(f"He{len(points)}", positions=points)
        shifted.set_array("qm", np.concatenate([atoms.arrays["qm"], np.zeros(len(points), dtype=np.int64)]))
        shifted.set_array("mm_charge", np.concatenate([atoms.arrays["mm_charge"],
                                                       np.full(len(points), q_total / len(points))]))
        shifted.info.update(atoms.info)
        out = evaluate(model, shifted)
        dE_meV = (out.energy[0] - ref.energy[0]) * HARTREE * 1000.0
        assert dE_meV == pytest.approx(charge * dV * 1000.0, abs=0.1), dV
        assert np.abs(out.forces[0][qm] - ref.forces[0][qm]).max() * HARTREE / 0.5291772105638411 < 1e-4


def test_without_gauge_invariance_the_test_above_fails():
    """The oracle can fail: the original model (features see the absolute potential) misses Q dV."""
    model = tiny_model(elements=("H", "O"), gauge_invariant=False).double()
    atoms = water_cluster()
    ref = evaluate(model, atoms)
    shifted = atoms.copy()
    far = Atoms("He", positions=[[0.0, 0.0, 400.0]])
    both = shifted + far
    both.set_array("qm", np.concatenate([atoms.arrays["qm"], [0]]))
    both.set_array("mm_charge", np.concatenate([atoms.arrays["mm_charge"], [150.0]]))  # about +0.5 V here
    both.info.update(atoms.info)
    assert abs(evaluate(model, both).energy[0] - ref.energy[0]) * HARTREE > 1e-4


@pytest.mark.parametrize("env_order,width", [(0, 0.0), (1, 0.0), (3, 0.0), (3, 0.8)])
def test_forces_are_minus_gradient(env_order, width):
    """Finite differences, on QM and MM atoms; ``width``: with Gaussian QM charge clouds (penetration)."""
    model = tiny_model(elements=("H", "C", "O", "Cl"), env_order=env_order, penetration_width=width).double()
    atoms = sn2_cluster(n_mm=8, spread=1.2)
    res = evaluate(model, atoms)
    rng = np.random.default_rng(env_order)
    for a in list(range(6)) + list(rng.choice(np.arange(6, len(atoms)), 6, replace=False)):
        for c in range(3):
            assert fd_force(model, atoms, a, c) == pytest.approx(res.forces[0, a, c], rel=1e-5, abs=1e-8), (a, c)


def separated_sn2(far: float, angle: float, seed: int = 3) -> Atoms:
    """``sn2_cluster`` with the free chloride ``far`` A from the carbon, ``angle`` degrees from the C-Cl bond
    (180: behind the carbon, where an SN2 attack comes from; small: beside the bound chlorine)."""
    atoms = sn2_cluster(seed=seed)
    t = np.radians(angle)
    atoms.positions[5] = far * np.array([np.sin(t), 0.0, np.cos(t)])
    return atoms


@pytest.mark.parametrize("far,angle", [(6.2, 150.0), (6.8, 40.0), (9.0, 60.0), (12.0, 180.0)])
def test_qm_electrostatics_is_the_coulomb_energy_of_the_predicted_charges(far, angle):
    """The same weights with ``qm_electrostatics`` on and off differ by exactly the switched Coulomb energy of
    the charges the model predicts (which the term leaves unchanged), computed here pair by pair."""
    from qmmm_driver.nn.blocks import switch

    off = tiny_model(elements=("H", "C", "O", "Cl")).double()
    on = off.with_settings(qm_electrostatics=True)
    atoms = separated_sn2(far, angle)
    a, b = evaluate(off, atoms), evaluate(on, atoms)
    q = b.qm_charges[0]
    np.testing.assert_allclose(q, a.qm_charges[0], atol=1e-14)
    x = atoms.positions[:6] * ANGSTROM_TO_BOHR
    s = on.settings
    coulomb = 0.0
    for i in range(6):
        for j in range(i + 1, 6):
            r = float(np.linalg.norm(x[i] - x[j]))
            weight = 1.0 - float(switch(torch.tensor(r, dtype=torch.float64), s.qq_switch_on, s.qq_switch_off))
            coulomb += q[i] * q[j] * weight / r
    assert abs(coulomb) > (1e-4 if far < 7.0 else 1e-3)  # the chloride reaches into the term: it is tested
    assert b.energy[0] - a.energy[0] == pytest.approx(coulomb, rel=1e-10, abs=1e-14)


def test_qm_electrostatics_forces_are_minus_gradient_inside_the_switch():
    """Finite differences with the free chloride where the QM-QM Coulomb term is being switched on."""
    model = tiny_model(elements=("H", "C", "O", "Cl"), qm_electrostatics=True).double()
    atoms = separated_sn2(6.3, 70.0)
    res = evaluate(model, atoms)
    for a in range(6):
        for c in range(3):
            assert fd_force(model, atoms, a, c) == pytest.approx(res.forces[0, a, c], rel=1e-5, abs=1e-8), (a, c)


def test_only_terms_without_weights_can_be_switched_on_a_trained_model():
    model = tiny_model(elements=("H", "C", "O", "Cl"))
    with pytest.raises(ValueError, match="only terms without weights"):
        model.with_settings(polarizability=False)


def test_cluster_forces_sum_to_zero_and_charges_to_total(model64):
    res = evaluate(model64, sn2_cluster())
    assert np.abs(res.forces[0].sum(axis=0)).max() < 1e-10
    assert res.qm_charges[0].sum() == pytest.approx(-1.0, abs=1e-12)
    assert np.abs(res.forces[0, 6:]).max() > 1e-6  # MM atoms do feel the QM region


def test_zero_mm_charges_decouple_mm_positions(model64):
    atoms = sn2_cluster()
    atoms.set_array("mm_charge", np.zeros(len(atoms)))
    ref = evaluate(model64, atoms)
    moved = atoms.copy()
    moved.positions[6:] += np.random.default_rng(1).normal(size=(len(atoms) - 6, 3))
    out = evaluate(model64, moved)
    assert out.energy[0] == pytest.approx(ref.energy[0], abs=1e-12)
    assert np.abs(out.forces[0, 6:]).max() == 0.0


def test_coupling_scales_the_mm_charges(model64):
    atoms = sn2_cluster()
    half = atoms.copy()
    half.set_array("mm_charge", atoms.arrays["mm_charge"] * 0.5)
    assert evaluate(model64, atoms, params={"coupling": 0.5}).energy[0] == pytest.approx(
        evaluate(model64, half).energy[0], abs=1e-12)


def test_batch_equals_one_by_one(model64):
    atoms = sn2_cluster()
    structure = QMMMStructure.from_atoms(atoms)
    ev = ModelEvaluator(model64, structure, dtype=torch.float64)
    rng = np.random.default_rng(2)
    frames = np.stack([structure.positions + rng.normal(scale=0.1, size=structure.positions.shape) for _ in range(5)])
    batch = ev.compute(frames)
    for b in range(5):
        single = ev.compute(frames[b])
        assert single.energy[0] == pytest.approx(batch.energy[b], abs=1e-10)
        assert np.allclose(single.forces[0], batch.forces[b], atol=1e-10)
        assert np.allclose(single.dipole[0], batch.dipole[b], atol=1e-10)


def assert_same_results(ours, reference, tol: float) -> None:
    """Energy (relative ``tol``), forces (``tol`` of the largest), QM charges (``tol`` e) and dipole (10 ``tol``)
    of one frame equal."""
    assert ours.energy[0] == pytest.approx(reference.energy[0], rel=tol)
    np.testing.assert_allclose(ours.forces, reference.forces, atol=tol * np.abs(reference.forces).max())
    np.testing.assert_allclose(ours.qm_charges, reference.qm_charges, atol=tol)
    np.testing.assert_allclose(ours.dipole, reference.dipole, atol=10 * tol)


@pytest.mark.parametrize("env_order,n_layers", [(0, 2), (1, 3), (3, 1), (3, 3)])
def test_skipped_paths_change_nothing(env_order, n_layers):
    """The first block skips the paths from feature degrees > 0 (zero there), the last computes only the degrees
    the readout uses: energy, forces, charges and dipole equal those with every path of every block evaluated."""
    from qmmm_driver.nn.blocks import InteractionBlock

    model = tiny_model(elements=("H", "C", "O", "Cl"), env_order=env_order, n_layers=n_layers).double()
    s = model.settings
    full = tiny_model(elements=("H", "C", "O", "Cl"), env_order=env_order, n_layers=n_layers).double()
    full.blocks = torch.nn.ModuleList(
        InteractionBlock(s.lmax, env_order, s.channels, s.n_radial, s.radial_hidden, s.short_range)
        for _ in range(n_layers)).double()
    full.load_state_dict(model.state_dict())
    assert model.blocks[0].conv.cg_used.shape[2] < full.blocks[0].conv.cg_used.shape[2] == full.blocks[0].conv.cg.shape[2]
    assert model.blocks[-1].env.cg_used.shape[2] < full.blocks[-1].env.cg_used.shape[2]
    atoms = sn2_cluster()
    assert_same_results(evaluate(model, atoms), evaluate(full, atoms), 1e-12)


@pytest.mark.parametrize("n_layers,deeper", [(1, 2), (2, 4)])
def test_a_deepened_model_starts_equal_and_can_learn(n_layers, deeper):
    """Blocks inserted before the last with zero output weights: energy, forces, charges and dipole are those of
    the model it came from, and the energy has a gradient with respect to the new blocks' weights."""
    model = tiny_model(elements=("H", "C", "O", "Cl"), n_layers=n_layers).double()
    grown = model.deepened(deeper)
    assert grown.settings.n_layers == len(grown.blocks) == deeper
    atoms = sn2_cluster()
    assert_same_results(evaluate(grown, atoms), evaluate(model, atoms), 1e-13)
    from qmmm_driver.nn.multipoles import taylor_tensors

    g = torch.Generator().manual_seed(0)
    qm = torch.randn(1, 4, 3, generator=g, dtype=torch.float64) * 1.5
    mm = torch.randn(1, 12, 3, generator=g, dtype=torch.float64) * 4.0
    q = torch.randn(1, 12, generator=g, dtype=torch.float64) * 0.4
    env = taylor_tensors(qm, mm, q, grown.K)
    out = grown(torch.tensor([[1, 0, 2, 3]]), qm, env, torch.tensor([-1.0]), mm, q)
    out["energy"].sum().backward()
    for k in range(n_layers - 1, deeper - 1):
        new = grown.blocks[k]
        assert float(new.conv.weight.grad.abs().max()) > 0 and float(new.env.weight.grad.abs().max()) > 0, k
    with pytest.raises(ValueError, match="cannot be deepened"):
        grown.deepened(deeper - 1)


def test_training_path_equals_the_driver(model64):
    """Training folds the far MM charges into fixed Taylor tensors (linearised in the QM positions): energies,
    QM forces and near-MM forces equal those of the driver's evaluation, frames of different sizes batched."""
    from qmmm_driver.training.data import batches, prepare, rows_in
    from qmmm_driver.training.loss import predict

    frames = []
    for seed, n in ((1, 5), (2, 9), (3, 14)):
        atoms = sn2_cluster(seed=seed, n_mm=n, spread=1.3)
        frames.append(QMMMStructure.from_atoms(atoms))
    radius = 3.0 * ANGSTROM_TO_BOHR  # MM forces scored within; the near set reaches the short-range cutoff
    sets = prepare(frames, model64.elements, model64.K, near_radius=model64.settings.short_range_cutoff + 0.5,
                   loss_radius=radius, short_radius=model64.settings.short_range_cutoff)
    assert 0 < sets[0].n_short < sets[0].near_pos.shape[1]
    assert len(sets) == 1 and bool(sets[0].near_scored.any()) and bool((sets[0].near_charge == 0).any())
    batch = next(batches(sets, rows_in(sets, [0, 1, 2]), 8))
    pred = predict(model64, batch, create_graph=False)
    assert int(batch.near_scored.sum()) >= 3
    for k, s in enumerate(frames):
        res = ModelEvaluator(model64, s, dtype=torch.float64).compute(s.positions)
        assert float(pred["energy"][k].detach()) == pytest.approx(res.energy[0], abs=1e-10)
        assert np.allclose(pred["qm_forces"][k].numpy(), res.forces[0][s.qm_indices], atol=1e-9)
        mm = s.mm_indices
        near = mm[np.linalg.norm(s.positions[mm][:, None] - s.positions[s.qm_indices][None], axis=-1).min(1) < radius]
        scored = batch.near_scored[k]
        assert int(scored.sum()) == len(near)
        # the near atoms are stored nearest first: match them to the frame's atoms by position
        where = batch.near_pos[k][scored].detach().numpy() + s.positions[s.qm_indices[0]]
        atom = [int(np.argmin(np.linalg.norm(s.positions - p, axis=1))) for p in where]
        assert sorted(atom) == sorted(near.tolist())
        assert np.allclose(pred["near_forces"][k][scored].numpy(), res.forces[0][atom], atol=1e-9)


def test_periodic_virial_equals_strain_derivative():
    model = tiny_model().double()
    atoms = water_box()
    res = evaluate(model, atoms)
    eps = 1e-6
    for a, b in ((0, 0), (1, 2), (2, 1)):
        strain = np.eye(3)
        strain[a, b] += eps
        plus = atoms.copy()
        plus.set_cell(atoms.cell.array @ strain.T, scale_atoms=False)
        plus.positions = atoms.positions @ strain.T
        strain[a, b] -= 2 * eps
        minus = atoms.copy()
        minus.set_cell(atoms.cell.array @ strain.T, scale_atoms=False)
        minus.positions = atoms.positions @ strain.T
        dE = (evaluate(model, plus).energy[0] - evaluate(model, minus).energy[0]) / (2 * eps)
        assert -dE == pytest.approx(res.virial[0, a, b], rel=1e-5, abs=1e-9)


def test_periodic_forces_are_minus_gradient():
    """Across images and the switching region, forces stay exact derivatives."""
    model = tiny_model().double()
    atoms = water_box()
    res = evaluate(model, atoms)
    switched = np.flatnonzero(np.abs(res.forces[0]).sum(axis=1) > 0)[-6:]
    for a in [0, 1, *switched.tolist()]:
        assert fd_force(model, atoms, a, 2) == pytest.approx(res.forces[0, a, 2], rel=1e-5, abs=1e-9)


def test_model_file_round_trip(tmp_path):
    model = tiny_model(elements=("H", "C", "O", "Cl"))
    path = save_model(model, tmp_path / "m.pt", metadata={"test_metrics": {"energy_mae_meV": 1.0}})
    loaded = load_model(path)
    assert loaded.metadata["test_metrics"]["energy_mae_meV"] == 1.0
    atoms = sn2_cluster()
    a, b = evaluate(model, atoms, torch.float32), evaluate(loaded, atoms, torch.float32)
    assert a.energy[0] == b.energy[0] and np.array_equal(a.forces, b.forces)
    assert loaded.energy_shift.dtype == torch.float64


def test_a_model_file_is_replaced_whole(tmp_path, monkeypatch):
    """SIGTERM (raised as an interrupt) while a new model file goes to disk: the old file stays whole and no
    temporary is left beside it (the training run's folder must hold only what it lists)."""
    import os

    path = save_model(tiny_model(), tmp_path / "m.pt")
    before = path.read_bytes()

    def stopped(*args):
        raise KeyboardInterrupt

    for name in ("fsync", "replace"):
        with monkeypatch.context() as patch:
            patch.setattr(os, name, stopped)
            with pytest.raises(KeyboardInterrupt):
                save_model(tiny_model(seed=1), path)
        assert path.read_bytes() == before
        assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]
    load_model(path)


def test_model_file_refusals(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("not a model")
    with pytest.raises(ModelFileError, match="not a readable qmmm-driver model"):
        load_model(text)
    with pytest.raises(ModelFileError, match="does not exist"):
        load_model(tmp_path / "missing.pt")
    model = tiny_model()
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["version"] = 99
    torch.save(payload, tmp_path / "v99.pt")
    with pytest.raises(ModelFileError, match="format version 99"):
        load_model(tmp_path / "v99.pt")

    class Evil:
        def __reduce__(self):
            return (print, ("code ran",))

    torch.save({"format": "qmmm-driver-model", "payload": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "evil.pt")


def test_corrupted_weights_are_refused(tmp_path):
    """400 bytes changed inside a weight tensor: the archive may still read, the checksum does not match."""
    model = tiny_model()
    path = save_model(model, tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    name = max(payload["state_dict"], key=lambda k: payload["state_dict"][k].numel())
    raw = payload["state_dict"][name].reshape(-1).view(torch.uint8)
    raw[100:500] = 255 - raw[100:500]
    torch.save(payload, tmp_path / "damaged.pt")  # a valid archive (fresh CRCs) with wrong weights
    with pytest.raises(ModelFileError, match="corrupted"):
        load_model(tmp_path / "damaged.pt")
    data = bytearray(path.read_bytes())  # bytes flipped in the file itself: the archive's own CRC fails
    start = data.find(b"data/") + 200
    data[start:start + 400] = bytes(255 - x for x in data[start:start + 400])
    (tmp_path / "flipped.pt").write_bytes(bytes(data))
    with pytest.raises(ModelFileError):
        load_model(tmp_path / "flipped.pt")


def test_unknown_element_is_refused():
    model = tiny_model(elements=("H", "O"))
    with pytest.raises(StructureError, match="QM atom 0 .* is C, which the model does not know"):
        ModelEvaluator(model, QMMMStructure.from_atoms(sn2_cluster()))


def test_ase_calculator_units_and_results(tiny_model_file):
    atoms = water_cluster()
    atoms.calc = QMMMCalculator(model=str(tiny_model_file), dtype="float64")
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    res = evaluate(load_model(tiny_model_file), atoms)
    assert e == pytest.approx(res.energy[0] * HARTREE, rel=1e-12)
    assert np.allclose(f, res.forces[0] * HARTREE / 0.5291772105638411, atol=1e-9)
    charges = atoms.calc.results["charges"]
    assert charges[:3].sum() == pytest.approx(0.0, abs=1e-10) and np.all(charges[3:] == 0)
    assert atoms.calc.results["dipole"].shape == (3,)


@pytest.mark.parametrize("change", ["mm_charge", "qm", "qm_total_charge"])
def test_ase_calculator_recomputes_when_the_system_changes(change):
    atoms = sn2_cluster()
    tiny = tiny_model(elements=("H", "C", "O", "Cl")).double()
    atoms.calc = QMMMCalculator(model=tiny, dtype="float64")
    before = atoms.get_potential_energy()
    if change == "mm_charge":
        atoms.arrays["mm_charge"] *= 0.5  # in place: the same Atoms, only the charges differ
    elif change == "qm":
        atoms.arrays["qm"][6:9] = 1  # a water joins the QM region
        atoms.arrays["mm_charge"][6:9] = 0.0
    else:
        atoms.info["qm_total_charge"] = 0
    after = atoms.get_potential_energy()
    expected = evaluate(tiny, atoms).energy[0] * HARTREE
    assert after != before and after == pytest.approx(expected, rel=1e-12)
