"""Environment tensors and the periodic embedding: derivatives, rotations, minimum image, smooth cutoff."""

import math

import numpy as np
import pytest
import torch
from e3nn import o3

from qmmm_driver.embedding import Embedding, switch
from qmmm_driver.environment import env_irreps, frame_pairs, taylor_tensors
from qmmm_driver.system import QMMMSystem
from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import water_box

DT = torch.float64


def random_charges(seed=0, n_qm=3, n_mm=40):
    g = torch.Generator().manual_seed(seed)
    qm = torch.randn(n_qm, 3, generator=g, dtype=DT)
    d = torch.randn(n_mm, 3, generator=g, dtype=DT)
    mm = d / d.norm(dim=-1, keepdim=True) * (5.0 + 6.0 * torch.rand(n_mm, 1, generator=g, dtype=DT))
    q = torch.randn(n_mm, generator=g, dtype=DT)
    return qm, mm, q


def tensors(qm, mm, q, lmax=3):
    i, j = frame_pairs(torch.zeros(len(qm), dtype=torch.long), torch.zeros(len(mm), dtype=torch.long), 1)
    return taylor_tensors(qm, mm, q, i, j, lmax)


def potential(x, mm, q):
    return float((q / (mm - x).norm(dim=-1)).sum())


@pytest.mark.parametrize("seed", [0, 1])
def test_tensors_equal_finite_difference_derivatives(seed):
    """l-th directional derivative of V along u equals l! Y_l(u) . T_l, for l = 0..3."""
    qm, mm, q = random_charges(seed)
    T = tensors(qm, mm, q)
    g = torch.Generator().manual_seed(seed + 10)
    h = 5e-3
    for a in range(len(qm)):
        for _ in range(4):
            u = torch.randn(3, generator=g, dtype=DT)
            u /= u.norm()
            f = lambda t: potential(qm[a] + t * u, mm, q)  # noqa: E731
            fd = [f(0.0), (f(h) - f(-h)) / (2 * h), (f(h) - 2 * f(0.0) + f(-h)) / h**2,
                  (f(2 * h) - 2 * f(h) + 2 * f(-h) - f(-2 * h)) / (2 * h**3)]
            for l in range(4):
                y = o3.spherical_harmonics(l, u, normalize=True, normalization="norm")
                pred = math.factorial(l) * float((y * T[a, l * l:(l + 1) ** 2]).sum())
                assert pred == pytest.approx(fd[l], rel=2e-4, abs=2e-7), (a, l)


def test_field_is_gradient_of_potential():
    qm, mm, q = random_charges(3)
    x = qm[0].clone().requires_grad_(True)
    v = (q / (mm - x).norm(dim=-1)).sum()
    (grad,) = torch.autograd.grad(v, x)
    T = tensors(qm, mm, q)
    assert torch.allclose(T[0, 1:4], grad, rtol=1e-12, atol=1e-14)
    assert float(T[0, 0]) == pytest.approx(v.item(), rel=1e-13)


@pytest.mark.parametrize("improper", [False, True])
def test_tensors_rotate_as_irreps(improper):
    qm, mm, q = random_charges(4)
    torch.manual_seed(5)
    R = o3.rand_matrix(dtype=DT)
    if improper:
        R = -R
    D = env_irreps(3).D_from_matrix(R)
    T = tensors(qm, mm, q)
    T_rot = tensors(qm @ R.T, mm @ R.T, q)
    assert torch.allclose(T_rot, T @ D.T, atol=1e-7)  # e3nn builds D(R) to ~1e-7
    # parity: 0e, 1o, 2e, 3o
    assert str(env_irreps(3)) == "1x0e+1x1o+1x2e+1x3o"


def test_tensors_translation_and_permutation_invariant():
    qm, mm, q = random_charges(6)
    T = tensors(qm, mm, q)
    shift = torch.tensor([3.0, -7.0, 11.0], dtype=DT)
    assert torch.allclose(tensors(qm + shift, mm + shift, q), T, atol=1e-13)
    perm = torch.randperm(len(mm))
    assert torch.allclose(tensors(qm, mm[perm], q[perm]), T, atol=1e-13)


def test_frame_pairs_within_frames_only():
    a = torch.tensor([0, 0, 1, 1, 1])
    b = torch.tensor([0, 1, 1])
    i, j = frame_pairs(a, b, 2)
    pairs = set(zip(i.tolist(), j.tolist()))
    assert pairs == {(0, 0), (1, 0), (2, 1), (2, 2), (3, 1), (3, 2), (4, 1), (4, 2)}
    i, j = frame_pairs(a, a, 2, exclude_self=True)
    assert len(i) == 2 + 6 and bool((i != j).all())


def brute_force_images(atoms, r_off_bohr):
    """Molecule images nearest the QM centre by explicit search over 5^3 images."""
    pos = atoms.positions * ANGSTROM_TO_BOHR  # unwrapped: molecules whole
    cell = atoms.cell.array * ANGSTROM_TO_BOHR
    qm = np.flatnonzero(atoms.arrays["qm"] == 1)
    centre = pos[qm].mean(axis=0)
    shifts = np.array([[a, b, c] for a in range(-2, 3) for b in range(-2, 3) for c in range(-2, 3)]) @ cell
    out = {}
    n = len(atoms)
    for start in range(3, n, 3):
        mol = pos[start:start + 3]
        cands = mol.mean(axis=0) + shifts - centre
        k = int(np.argmin(np.linalg.norm(cands, axis=1)))
        if np.linalg.norm(cands[k]) < r_off_bohr:
            out[start] = mol + shifts[k]
    return out


@pytest.mark.parametrize("triclinic", [False, True])
def test_minimum_image_of_whole_molecules(triclinic):
    """Atoms wrapped one by one (molecules split across the cell) come back whole at the nearest image."""
    atoms = water_box(triclinic=triclinic)
    expected = brute_force_images(atoms, 12.0 * ANGSTROM_TO_BOHR)
    wrapped = atoms.copy()
    wrapped.translate([7.3, -4.1, 2.2])
    wrapped.wrap()
    system = QMMMSystem.from_atoms(wrapped)
    emb = Embedding(system, 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR)
    pos = torch.as_tensor(wrapped.positions * ANGSTROM_TO_BOHR)[None]
    cell = torch.as_tensor(wrapped.cell.array * ANGSTROM_TO_BOHR)[None]
    p = emb.present(pos, cell)
    # compare in the frame of the (whole) QM molecule
    shift_qm = (atoms.positions[0] - wrapped.positions[0]) * ANGSTROM_TO_BOHR
    qm_ref = atoms.positions[:3] * ANGSTROM_TO_BOHR
    # undo the arbitrary global translation: compare relative to the QM oxygen
    got_qm = p.qm_pos.numpy() + shift_qm
    assert np.allclose(got_qm, qm_ref, atol=1e-9)
    mm_atoms = p.mm_atom.numpy()
    got = p.mm_pos.numpy() + shift_qm
    starts = sorted(set((mm_atoms // 3 * 3).tolist()))
    assert starts == sorted(expected)
    assert len(starts) > 100
    for s in starts:
        rows = np.flatnonzero(mm_atoms // 3 * 3 == s)
        assert np.allclose(got[rows], expected[s], atol=1e-9)


def test_small_cell_is_refused():
    atoms = water_box(n_side=6)  # 19.5 A box < 2 * 12 A
    system = QMMMSystem.from_atoms(atoms)
    emb = Embedding(system, 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR)
    with pytest.raises(ValueError, match="too small for the MM cutoff"):
        emb.present(torch.as_tensor(atoms.positions * ANGSTROM_TO_BOHR)[None],
                    torch.as_tensor(atoms.cell.array * ANGSTROM_TO_BOHR)[None])


def test_switch_values_and_derivatives_continuous():
    r_on, r_off = 10.0, 12.0
    d = torch.linspace(9.0, 13.0, 4001, dtype=DT, requires_grad=True)
    s = switch(d, r_on, r_off)
    (ds,) = torch.autograd.grad(s.sum(), d)
    s = s.detach()
    assert float(s[d < r_on].min()) == 1.0 and float(s[d > r_off].max()) == 0.0
    assert float(s.diff().abs().max()) < 2e-3          # no jumps
    assert float(ds.diff().abs().max()) < 5e-3         # continuous first derivative
    assert float(ds[(d - r_on).abs() < 1e-3].abs().max()) < 1e-5
    assert float(ds[(d - r_off).abs() < 1e-3].abs().max()) < 1e-5


def test_energy_and_force_continuous_when_a_molecule_crosses_the_cutoff():
    """Move one MM water radially through r_on..r_off: the electrostatic energy with fixed QM charges
    is continuous, vanishes beyond r_off, and its force matches finite differences everywhere."""
    atoms = water_box()
    system = QMMMSystem.from_atoms(atoms)
    r_on, r_off = 10.0 * ANGSTROM_TO_BOHR, 12.0 * ANGSTROM_TO_BOHR
    emb = Embedding(system, r_on, r_off)
    cell = torch.as_tensor(atoms.cell.array * ANGSTROM_TO_BOHR)[None]
    base = torch.as_tensor(atoms.positions * ANGSTROM_TO_BOHR)
    centre = base[:3].mean(dim=0)
    mover = 30  # atoms 30..32 are one MM water
    qm_charges = torch.tensor([-0.8, 0.4, 0.4], dtype=DT)

    def energy(dist):
        pos = base.clone()
        mol = pos[mover:mover + 3]
        direction = torch.tensor([0.3, 0.5, 0.81], dtype=DT)
        direction /= direction.norm()
        pos[mover:mover + 3] = mol - mol.mean(dim=0) + centre + dist * direction
        p = emb.present(pos[None], cell)
        qm = p.qm_pos.clone().requires_grad_(True)
        mm = p.mm_pos.clone().requires_grad_(True)
        q = emb.effective_charges(p, qm, mm)
        sel = (p.mm_atom >= mover) & (p.mm_atom < mover + 3)
        if not bool(sel.any()):
            return 0.0, 0.0
        e = (qm_charges[:, None] * q[sel][None] / torch.cdist(qm, mm[sel])).sum()
        (g,) = torch.autograd.grad(e, mm)
        force_along = -float((g[sel].sum(dim=0) * direction).sum())
        return float(e), force_along

    dists = np.linspace(r_on - 1.0, r_off + 1.0, 241)
    values = [energy(float(d)) for d in dists]
    e = np.array([v[0] for v in values])
    f = np.array([v[1] for v in values])
    assert np.all(e[dists > r_off + 1e-6] == 0.0)
    assert np.abs(np.diff(e)).max() < 5e-5
    fd = -(e[2:] - e[:-2]) / (dists[2:] - dists[:-2])
    assert np.allclose(fd, f[1:-1], atol=5e-6)
