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

import torch
from e3nn import o3


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
