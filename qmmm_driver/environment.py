"""Environment tensors: the Taylor expansion of an electrostatic potential at each QM atom.

For point charges ``q_j`` at ``r_j`` the potential near QM atom ``i`` is

    V(r_i + d) = sum_l  |d|^l Y_l(d/|d|) . T_l(i),
    T_l(i)     = sum_j  q_j Y_l(u_ij) / r_ij^(l+1),     u_ij = (r_j - r_i)/r_ij,

with ``Y_l`` the real spherical harmonics of e3nn in ``'norm'`` normalisation
(``|Y_l| = 1``; for l = 1 this is the unit vector in x, y, z order). ``T_l`` is the
irregular solid harmonic sum: ``T_0`` is the potential, ``T_1`` its gradient
(minus the field), ``T_2`` and ``T_3`` the traceless second and third derivatives
in spherical form, so that the l-th directional derivative of V along a unit
vector ``u`` equals ``l! Y_l(u) . T_l``. They are e3nn irreps
``0e + 1o + 2e + 3o`` (atomic units: e / Bohr^(l+1)).
"""

from __future__ import annotations

from functools import lru_cache

import torch
from e3nn import o3
from torch.autograd.function import once_differentiable


def env_irreps(lmax: int) -> o3.Irreps:
    """Irreps of the environment tensors up to order ``lmax``: 0e + 1o + 2e + 3o ..."""
    return o3.Irreps([(1, (l, (-1) ** l)) for l in range(lmax + 1)])


def frame_pairs(a_frame: torch.Tensor, b_frame: torch.Tensor, n_frames: int,
                exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """All pairs (i in set a, j in set b) that belong to the same frame.

    Both index tensors must be sorted by frame. With ``exclude_self`` (a and b the
    same set) the pairs i == j are dropped.
    """
    dev = a_frame.device
    na = torch.bincount(a_frame, minlength=n_frames)
    nb = torch.bincount(b_frame, minlength=n_frames)
    oa, ob = torch.cumsum(na, 0) - na, torch.cumsum(nb, 0) - nb
    npair = na * nb
    frame = torch.repeat_interleave(torch.arange(n_frames, device=dev), npair)
    start = torch.cumsum(npair, 0) - npair
    local = torch.arange(frame.numel(), device=dev) - start[frame]
    i = oa[frame] + torch.div(local, nb[frame], rounding_mode="floor")
    j = ob[frame] + local % nb[frame]
    if exclude_self:
        keep = i != j
        i, j = i[keep], j[keep]
    return i, j


def degree_index(lmax: int, device=None) -> torch.Tensor:
    """The degree l of each of the (lmax+1)^2 spherical-harmonic components."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long, device=device) for l in range(lmax + 1)])


def to_padded(values: torch.Tensor, frame: torch.Tensor, n_frames: int, fill: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat per-atom ``values`` [n, ...] (sorted by frame) as ``[n_frames, max_per_frame, ...]``, padded with ``fill``.

    Returns the padded tensor and each atom's slot in its frame.
    """
    count = torch.bincount(frame, minlength=n_frames)
    slot = torch.arange(frame.numel(), device=frame.device) - (torch.cumsum(count, 0) - count)[frame]
    width = int(count.max()) if frame.numel() else 0
    out = values.new_full((n_frames, width) + tuple(values.shape[1:]), fill)
    return out.index_put((frame, slot), values), slot


def irregular_harmonics(vec: torch.Tensor, lmax: int) -> torch.Tensor:
    """``Y_l(vec/r) / r^(l+1)`` for l = 0..lmax, stacked over components ``[..., (lmax+1)^2]``."""
    inv_r = 1.0 / vec.norm(dim=-1, keepdim=True)
    sh = o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=True, normalization="norm")
    factors = [inv_r]
    for _ in range(lmax):
        factors.append(factors[-1] * inv_r)
    return torch.cat([sh[..., l * l:(l + 1) ** 2] * f for l, f in enumerate(factors)], dim=-1)


@lru_cache(maxsize=None)
def _gradient_map(lmax: int) -> torch.Tensor:
    """Constant ``D`` [3, (lmax+1)^2, (lmax+2)^2 - 1] with ``d I_k / d r_a = sum_j D[a, k, j] I_(1+j)``.

    The gradient of an irregular solid harmonic of degree l is a combination of
    those of degree l + 1; the coefficients are found once by least squares
    (exact to rounding) rather than transcribed from tables.
    """
    with torch.enable_grad():
        return _fit_gradient_map(lmax)


def _fit_gradient_map(lmax: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(400, 3, generator=g, dtype=torch.float64)
    vec = vec / vec.norm(dim=-1, keepdim=True) * (1.0 + 2.0 * torch.rand(400, 1, generator=g, dtype=torch.float64))
    vec.requires_grad_(True)
    n, m = (lmax + 1) ** 2, (lmax + 2) ** 2
    higher = irregular_harmonics(vec.detach(), lmax + 1)[:, 1:]          # degrees 1..lmax+1
    low = irregular_harmonics(vec, lmax)
    jac = torch.stack([torch.autograd.grad(low[:, k].sum(), vec, retain_graph=True)[0] for k in range(n)], 1)
    D = torch.zeros(3, n, m - 1, dtype=torch.float64)
    deg = degree_index(lmax + 1)[1:]
    for k, l in enumerate(degree_index(lmax).tolist()):
        cols = torch.nonzero(deg == l + 1).squeeze(1)
        for a in range(3):
            sol = torch.linalg.lstsq(higher[:, cols], jac[:, k, a:a + 1]).solution.squeeze(1)
            D[a, k, cols] = sol
    residual = (torch.einsum("akj,pj->pka", D, higher) - jac).abs().max()
    if residual > 1e-9:
        raise RuntimeError(f"solid-harmonic gradient map not exact (residual {float(residual):.2e})")
    return D


class _MMTaylor(torch.autograd.Function):
    """Padded MM Taylor tensors with an analytic first derivative (inference only)."""

    @staticmethod
    def forward(ctx, qm, mm, q, lmax: int):
        n = (lmax + 1) ** 2
        harm = irregular_harmonics(mm[:, None, :, :] - qm[:, :, None, :], lmax + 1)  # [B, NQ, NM, (lmax+2)^2]
        ctx.save_for_backward(harm, q)
        ctx.lmax = lmax
        return torch.einsum("bqmk,bm->bqk", harm[..., :n], q)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        harm, q = ctx.saved_tensors
        n = (ctx.lmax + 1) ** 2
        D = _gradient_map(ctx.lmax).to(grad.device, grad.dtype)
        dq = torch.einsum("bqmk,bqk->bm", harm[..., :n], grad)
        h = torch.einsum("bqk,akj->bqaj", grad, D)
        gvec = torch.einsum("bqmj,bqaj->bqma", harm[..., 1:], h) * q[:, None, :, None]  # dL/d(r_mm - r_qm)
        return -gvec.sum(dim=2), gvec.sum(dim=1), dq, None


def mm_taylor_tensors(qm_pos: torch.Tensor, qm_frame: torch.Tensor, mm_pos: torch.Tensor, mm_charge: torch.Tensor,
                      mm_frame: torch.Tensor, n_frames: int, lmax: int, analytic_gradient: bool = False) -> torch.Tensor:
    """Environment tensors [n_qm, (lmax+1)^2] of the MM charges of each frame at its QM atoms.

    Dense over (QM atom, MM atom) within each frame: frames are padded to the
    largest MM count with zero charges far away, which adds exactly nothing.
    ``analytic_gradient`` (for inference) differentiates once, analytically,
    through the degree-(l+1) harmonics: a few large contractions instead of
    autograd through every step; it refuses to be differentiated twice.
    """
    far = 1.0e6
    qm, qm_slot = to_padded(qm_pos, qm_frame, n_frames, -far)
    mm, _ = to_padded(mm_pos, mm_frame, n_frames, far)
    q, _ = to_padded(mm_charge, mm_frame, n_frames, 0.0)
    if analytic_gradient:
        t = _MMTaylor.apply(qm, mm, q, lmax)
    else:
        t = torch.einsum("bqmk,bm->bqk", irregular_harmonics(mm[:, None, :, :] - qm[:, :, None, :], lmax), q)
    return t[qm_frame, qm_slot]


def taylor_tensors(target_pos: torch.Tensor, source_pos: torch.Tensor, source_charge: torch.Tensor,
                   i: torch.Tensor, j: torch.Tensor, lmax: int,
                   pair_weight: torch.Tensor | None = None) -> torch.Tensor:
    """Environment tensors [n_target, (lmax+1)^2] of the charges at ``source_pos``.

    ``(i, j)`` lists the (target, source) pairs to sum over; ``pair_weight``
    optionally scales each pair (a short-range switch).
    """
    vec = source_pos[j] - target_pos[i]
    r = vec.norm(dim=-1)
    sh = o3.spherical_harmonics(list(range(lmax + 1)), vec, normalize=True, normalization="norm")
    inv_r = 1.0 / r
    powers = torch.stack([inv_r ** (l + 1) for l in range(lmax + 1)], dim=-1)
    weight = source_charge[j] if pair_weight is None else source_charge[j] * pair_weight
    terms = sh * (powers * weight[:, None])[:, degree_index(lmax, vec.device)]
    out = torch.zeros(target_pos.shape[0], terms.shape[1], device=vec.device, dtype=vec.dtype)
    return out.index_add(0, i, terms)
