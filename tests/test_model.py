"""Physics of the model: symmetries, forces = -gradient, charge conservation, batching, model files."""

import numpy as np
import pytest
import torch
from ase import Atoms
from e3nn import o3

from qmmm_driver import Evaluator, QMMMCalculator, QMMMSystem
from qmmm_driver.model.io import ModelFileError, load_model, save_model

from conftest import tiny_model, water_box, water_cluster


def sn2_cluster(seed=3, n_mm=25):
    """Cl- + CH3Cl (QM, charge -1) in a shell of MM waters."""
    rng = np.random.default_rng(seed)
    solute = Atoms("CHHHClCl", positions=[[0, 0, 0], [1.03, 0, -0.36], [-0.51, 0.89, -0.36],
                                          [-0.51, -0.89, -0.36], [0, 0, 1.80], [0, 0, -3.2]])
    water = water_cluster(n_mm=n_mm, seed=seed)[3:]
    water.translate(rng.normal(size=3) * 0.1)
    water.positions *= 1.6
    atoms = solute + water
    qm = np.zeros(len(atoms), dtype=np.int64)
    qm[:6] = 1
    atoms.set_array("qm", qm)
    atoms.set_array("mm_charge", np.concatenate([np.zeros(6), np.tile([-0.834, 0.417, 0.417], n_mm)]))
    atoms.info["qm_total_charge"] = -1
    return atoms


def evaluate(model, atoms, dtype=torch.float64):
    ev = Evaluator(model, QMMMSystem.from_atoms(atoms), dtype=dtype)
    cell = atoms.cell.array * 1.8897261254578281 if all(atoms.pbc) else None
    return ev.compute(atoms.positions * 1.8897261254578281, cell)


@pytest.fixture(scope="module")
def model64():
    return tiny_model(elements=("H", "C", "O", "Cl")).double()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-9), (torch.float32, 2e-4)])
@pytest.mark.parametrize("improper", [False, True])
def test_rotation_and_reflection(dtype, tol, improper):
    model = tiny_model(elements=("H", "C", "O", "Cl"))
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


def test_translation_and_mm_permutation_invariance(model64):
    atoms = sn2_cluster()
    ref = evaluate(model64, atoms)
    moved = atoms.copy()
    moved.translate([13.0, -5.0, 2.5])
    out = evaluate(model64, moved)
    assert out.energy[0] == pytest.approx(ref.energy[0], abs=1e-10)
    assert np.allclose(out.forces, ref.forces, atol=1e-10)
    perm = np.concatenate([np.arange(6), 6 + np.random.default_rng(0).permutation(len(atoms) - 6)])
    shuffled = atoms[perm]
    out = evaluate(model64, shuffled)
    assert out.energy[0] == pytest.approx(ref.energy[0], abs=1e-10)
    assert np.allclose(out.forces[0], ref.forces[0][perm], atol=1e-10)


@pytest.mark.parametrize("env_order", [0, 1, 3])
def test_forces_are_minus_gradient(env_order):
    model = tiny_model(elements=("H", "C", "O", "Cl"), env_order=env_order).double()
    atoms = sn2_cluster(n_mm=8)
    res = evaluate(model, atoms)
    h = 1e-5
    rng = np.random.default_rng(env_order)
    for a in list(range(6)) + list(rng.choice(np.arange(6, len(atoms)), 6, replace=False)):
        for c in range(3):
            plus, minus = atoms.copy(), atoms.copy()
            plus.positions[a, c] += h / 1.8897261254578281
            minus.positions[a, c] -= h / 1.8897261254578281
            fd = -(evaluate(model, plus).energy[0] - evaluate(model, minus).energy[0]) / (2 * h)
            assert fd == pytest.approx(res.forces[0, a, c], rel=1e-5, abs=1e-8), (a, c)


def test_cluster_forces_sum_to_zero_and_charges_to_total(model64):
    atoms = sn2_cluster()
    res = evaluate(model64, atoms)
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


def test_batch_equals_one_by_one(model64):
    atoms = sn2_cluster()
    system = QMMMSystem.from_atoms(atoms)
    ev = Evaluator(model64, system, dtype=torch.float64)
    rng = np.random.default_rng(2)
    frames = np.stack([atoms.positions + rng.normal(scale=0.05, size=atoms.positions.shape) for _ in range(5)])
    frames *= 1.8897261254578281
    batch = ev.compute(frames)
    for b in range(5):
        single = ev.compute(frames[b])
        assert single.energy[0] == pytest.approx(batch.energy[b], abs=1e-10)
        assert np.allclose(single.forces[0], batch.forces[b], atol=1e-10)
        assert np.allclose(single.dipole[0], batch.dipole[b], atol=1e-10)


def test_frames_of_different_sizes_batch_like_single(model64):
    """The training path: frames with different MM counts in one pass equal separate passes."""
    from qmmm_driver.frames import Frame
    from qmmm_driver.training.data import collate
    from qmmm_driver.training.loss import predict

    frames = [Frame.from_atoms(sn2_cluster(seed=s, n_mm=n)) for s, n in ((1, 5), (2, 9), (3, 14))]
    together = predict(model64, collate(frames, model64.elements), create_graph=False)
    for k, f in enumerate(frames):
        alone = predict(model64, collate([f], model64.elements), create_graph=False)
        assert float(alone["energy"][0]) == pytest.approx(float(together["energy"][k]), abs=1e-10)


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
    h = 1e-5
    for a in [0, 1, *switched.tolist()]:
        c = 2
        plus, minus = atoms.copy(), atoms.copy()
        plus.positions[a, c] += h / 1.8897261254578281
        minus.positions[a, c] -= h / 1.8897261254578281
        fd = -(evaluate(model, plus).energy[0] - evaluate(model, minus).energy[0]) / (2 * h)
        assert fd == pytest.approx(res.forces[0, a, c], rel=1e-5, abs=1e-9)


def test_model_file_round_trip(tmp_path):
    model = tiny_model(elements=("H", "C", "O", "Cl"))
    path = save_model(model, tmp_path / "m.pt", metadata={"test_metrics": {"energy_mae_meV": 1.0}})
    loaded = load_model(path)
    assert loaded.metadata["test_metrics"]["energy_mae_meV"] == 1.0
    atoms = sn2_cluster()
    a, b = evaluate(model, atoms, torch.float32), evaluate(loaded, atoms, torch.float32)
    assert a.energy[0] == b.energy[0] and np.array_equal(a.forces, b.forces)
    assert loaded.energy_shift.dtype == torch.float64


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


def test_unknown_element_is_refused():
    model = tiny_model(elements=("H", "O"))
    with pytest.raises(ValueError, match="QM atom 0 .* is C, which the model does not know"):
        Evaluator(model, QMMMSystem.from_atoms(sn2_cluster()))


def test_ase_calculator_units_and_results(tiny_model_file):
    atoms = water_cluster()
    atoms.calc = QMMMCalculator(model=str(tiny_model_file), dtype="float64")
    e = atoms.get_potential_energy()
    f = atoms.get_forces()
    res = evaluate(load_model(tiny_model_file), atoms)
    assert e == pytest.approx(res.energy[0] * 27.211386024367243, rel=1e-12)
    assert np.allclose(f, res.forces[0] * 27.211386024367243 / 0.5291772105638411, atol=1e-9)
    charges = atoms.calc.results["charges"]
    assert charges[:3].sum() == pytest.approx(0.0, abs=1e-10) and np.all(charges[3:] == 0)
    assert atoms.calc.results["dipole"].shape == (3,)
