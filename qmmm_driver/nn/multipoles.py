"""Taylor tensors of an electrostatic potential at the QM atoms (torch and e3nn only).

For point charges ``q_j`` at ``r_j`` the potential near QM atom ``i`` is

    V(r_i + d) = sum_l  |d|^l Y_l(d/|d|) . T_l(i),
    T_l(i)     = sum_j  q_j Y_l(u_ij) / r_ij^(l+1),     u_ij = (r_j - r_i)/r_ij,

with ``Y_l`` the real spherical harmonics of e3nn in ``'norm'`` normalisation
(``|Y_l| = 1``; for l = 1 the unit vector in x, y, z order). ``T_0`` is the
potential, ``T_1`` its gradient (minus the field), ``T_2`` and ``T_3`` the
traceless second and third derivatives in spherical form: the l-th directional
derivative of V along a unit vector ``u`` is ``l! Y_l(u) . T_l``. They are the
e3nn irreps ``0e + 1o + 2e + 3o`` (atomic units: e / Bohr^(l+1)).

Layout: frames are dense, ``[B, n, ...]``; padding MM atoms carry zero charge
and contribute exactly nothing.
"""

from __future__ import annotations

from functools import lru_cache

import torch
from e3nn import o3


def env_irreps(lmax: int) -> o3.Irreps:
    """Irreps of the Taylor tensors up to order ``lmax``: 0e + 1o + 2e + 3o ..."""
    return o3.Irreps([(1, (l, (-1) ** l)) for l in range(lmax + 1)])


def degree_index(lmax: int, device=None) -> torch.Tensor:
    """The degree l of each of the (lmax+1)^2 spherical-harmonic components."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long, device=device) for l in range(lmax + 1)])


@lru_cache(maxsize=None)
def _harmonics(lmax: int) -> o3.SphericalHarmonics:
    return o3.SphericalHarmonics(list(range(lmax + 1)), normalize=True, normalization="norm")


def irregular_harmonics(vec: torch.Tensor, lmax: int) -> torch.Tensor:
    """``Y_l(vec/r) / r^(l+1)`` for l = 0..lmax, stacked over components ``[..., (lmax+1)^2]``."""
    inv_r = 1.0 / vec.norm(dim=-1, keepdim=True)
    sh = _harmonics(lmax)(vec)
    parts, power = [], inv_r
    for l in range(lmax + 1):
        parts.append(sh[..., l * l:(l + 1) ** 2] * power)
        power = power * inv_r
    return torch.cat(parts, dim=-1)


def taylor_tensors(targets: torch.Tensor, sources: torch.Tensor, charges: torch.Tensor, lmax: int) -> torch.Tensor:
    """Taylor tensors ``[B, n_t, (lmax+1)^2]`` of charges ``[B, n_s]`` at ``sources`` ``[B, n_s, 3]``
    at the points ``targets`` ``[B, n_t, 3]`` (every target sees every source of its frame)."""
    harm = irregular_harmonics(sources[:, None, :, :] - targets[:, :, None, :], lmax)
    return torch.einsum("btsk,bs->btk", harm, charges)


@lru_cache(maxsize=None)
def gradient_map(lmax: int) -> torch.Tensor:
    """Constant ``D`` [3, (lmax+1)^2, (lmax+2)^2 - 1] with ``d I_k / d r_a = sum_j D[a, k, j] I_(1+j)``.

    ``I`` are the irregular harmonics of :func:`irregular_harmonics`; the gradient
    of one of degree l is a combination of those of degree l + 1. The
    coefficients are found once by least squares (exact to rounding) rather than
    transcribed from tables.
    """
    with torch.enable_grad():
        g = torch.Generator().manual_seed(0)
        vec = torch.randn(400, 3, generator=g, dtype=torch.float64)
        vec = vec / vec.norm(dim=-1, keepdim=True) * (1.0 + 2.0 * torch.rand(400, 1, generator=g, dtype=torch.float64))
        vec.requires_grad_(True)
        n, m = (lmax + 1) ** 2, (lmax + 2) ** 2
        higher = irregular_harmonics(vec.detach(), lmax + 1)[:, 1:]
        low = irregular_harmonics(vec, lmax)
        jac = torch.stack([torch.autograd.grad(low[:, k].sum(), vec, retain_graph=True)[0] for k in range(n)], 1)
    D = torch.zeros(3, n, m - 1, dtype=torch.float64)
    deg = degree_index(lmax + 1)[1:]
    for k, l in enumerate(degree_index(lmax).tolist()):
        cols = torch.nonzero(deg == l + 1).squeeze(1)
        for a in range(3):
            D[a, k, cols] = torch.linalg.lstsq(higher[:, cols], jac[:, k, a:a + 1]).solution.squeeze(1)
    residual = (torch.einsum("akj,pj->pka", D, higher) - jac).abs().max()
    if residual > 1e-9:
        raise RuntimeError(f"solid-harmonic gradient map not exact (residual {float(residual):.2e})")
    return D


def linearised_tensors(reference: torch.Tensor, displacement: torch.Tensor, lmax: int) -> torch.Tensor:
    """Taylor tensors of order <= ``lmax`` of fixed charges at displaced targets, to first order.

    ``reference`` ``[B, n, (lmax+2)^2]`` are the tensors up to order ``lmax + 1``
    at the reference target positions; ``displacement`` ``[B, n, 3]`` moves the
    targets. The value at zero displacement and the first derivative are exact,
    which is all a loss on energies and forces needs (training evaluates at zero
    displacement and differentiates once).
    """
    D = gradient_map(lmax).to(reference.device, reference.dtype)
    n = (lmax + 1) ** 2
    # moving the target by d changes r_j - r_i by -d
    return reference[..., :n] - torch.einsum("akj,btj,bta->btk", D, reference[..., 1:], displacement)
