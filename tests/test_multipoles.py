"""Taylor tensors of the MM potential (qmmm_driver.nn.multipoles): derivatives, rotations, the gradient map,
the linearised tensors of the training path."""

import math

import pytest
import torch
from e3nn import o3

from qmmm_driver.nn.multipoles import env_irreps, gradient_map, irregular_harmonics, linearised_tensors, taylor_tensors

DT = torch.float64


def random_charges(seed=0, n_qm=3, n_mm=40):
    g = torch.Generator().manual_seed(seed)
    qm = torch.randn(n_qm, 3, generator=g, dtype=DT)
    d = torch.randn(n_mm, 3, generator=g, dtype=DT)
    mm = d / d.norm(dim=-1, keepdim=True) * (5.0 + 6.0 * torch.rand(n_mm, 1, generator=g, dtype=DT))
    q = torch.randn(n_mm, generator=g, dtype=DT)
    return qm, mm, q


def tensors(qm, mm, q, lmax=3):
    return taylor_tensors(qm[None], mm[None], q[None], lmax)[0]


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


def test_zero_charge_padding_adds_nothing():
    qm, mm, q = random_charges(7)
    far = torch.cat([mm, torch.tensor([[1.0e6, 0.0, 0.0]], dtype=DT)])
    assert torch.equal(tensors(qm, far, torch.cat([q, torch.zeros(1, dtype=DT)])), tensors(qm, mm, q))


def test_gradient_map_gives_the_derivative_of_each_harmonic():
    D = gradient_map(3)
    vec = torch.randn(50, 3, dtype=DT, generator=torch.Generator().manual_seed(8)) * 3.0
    vec.requires_grad_(True)
    low = irregular_harmonics(vec, 3)
    jac = torch.stack([torch.autograd.grad(low[:, k].sum(), vec, retain_graph=True)[0] for k in range(16)], 1)
    predicted = torch.einsum("akj,pj->pka", D, irregular_harmonics(vec.detach(), 4)[:, 1:])
    assert torch.allclose(predicted, jac, rtol=1e-10, atol=1e-12)


def test_linearised_tensors_have_exact_value_and_first_derivative():
    """Training moves the QM atoms through fixed tensors of order K + 1: exact value and gradient at zero."""
    qm, mm, q = random_charges(9)
    reference = tensors(qm, mm, q, lmax=4)[None]
    d = torch.zeros(1, len(qm), 3, dtype=DT, requires_grad=True)
    lin = linearised_tensors(reference, d, 3)
    assert torch.allclose(lin.detach()[0], tensors(qm, mm, q), atol=1e-14)
    w = torch.randn(lin.shape, dtype=DT, generator=torch.Generator().manual_seed(1))
    (g_lin,) = torch.autograd.grad((lin * w).sum(), d)
    x = qm.clone().requires_grad_(True)
    (g_true,) = torch.autograd.grad((taylor_tensors(x[None], mm[None], q[None], 3) * w).sum(), x)
    assert torch.allclose(g_lin[0], g_true, rtol=1e-10, atol=1e-13)
