"""Equivariant building blocks in a uniform-channel layout.

Node features are tensors ``[n, channels, (lmax+1)^2]``: every channel carries
one irrep of each degree l = 0..lmax with natural parity (0e, 1o, 2e, 3o), in
e3nn's component order and normalisation. Tensor products with a
one-channel-per-degree input ``y`` (edge spherical harmonics, environment
tensors) are done for all coupling paths at once with e3nn's Clebsch-Gordan
coefficients (``o3.wigner_3j``) packed into one dense tensor, so a product costs
a few large contractions instead of one small kernel per path: the models here
have few QM atoms, and small kernels, not arithmetic, would dominate.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3

from ..environment import degree_index


def coupling_paths(l_in: int, l_y: int, l_out: int) -> list[tuple[int, int, int]]:
    """Paths (l1, l2, l3) allowed by the triangle rule and natural parity (l1 + l2 + l3 even)."""
    return [(l1, l2, l3) for l1 in range(l_in + 1) for l2 in range(l_y + 1) for l3 in range(l_out + 1)
            if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0]


class TensorProductY(torch.nn.Module):
    """``x (x) y`` for x ``[n, U, (l_in+1)^2]`` and y ``[n, (l_y+1)^2]``, mixed into ``[n, W, (l_out+1)^2]``.

    Every path (l1, l2, l3) couples channel u of x with y through Clebsch-Gordan
    coefficients (component normalisation); channels are then mixed per path
    by weights ``[n_paths, U, W]`` and the paths of each output degree summed.
    Optional ``path_weights`` ``[n, U, n_paths]`` scale each (sample, channel,
    path) before mixing (the radial weights of a convolution). Paths are
    ordered by l3 so that each output degree is one contiguous block.
    """

    def __init__(self, l_in: int, l_y: int, l_out: int, channels_in: int, channels_out: int):
        super().__init__()
        self.paths = sorted(coupling_paths(l_in, l_y, l_out), key=lambda p: (p[2], p[0], p[1]))
        d_in, d_y = (l_in + 1) ** 2, (l_y + 1) ** 2
        blocks = []
        for l1, l2, l3 in self.paths:
            cg = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)
            block = torch.zeros(d_in, d_y, 2 * l3 + 1, dtype=torch.float64)
            block[l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2] = cg
            blocks.append(block)
        self.register_buffer("cg", torch.cat(blocks, dim=2).to(torch.get_default_dtype()))
        # per output degree: (first path, number of paths, first component, 1/sqrt(fan-in))
        self.groups = []
        first_path = first_comp = 0
        for l3 in range(l_out + 1):
            n = sum(1 for *_, l in self.paths if l == l3)
            if n:
                self.groups.append((l3, first_path, n, first_comp, 1.0 / math.sqrt(n * channels_in)))
            first_path += n
            first_comp += n * (2 * l3 + 1)
        self.l_out = l_out
        self.n_paths = len(self.paths)
        self.weight = torch.nn.Parameter(torch.randn(self.n_paths, channels_in, channels_out))

    def couple(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unmixed path outputs ``[n, U, n_components_of_all_paths]``."""
        return torch.bmm(x, torch.einsum("nj,ijp->nip", y, self.cg))

    def weigh(self, t: torch.Tensor, path_weights: torch.Tensor) -> torch.Tensor:
        """Scale the components of every path of ``t`` by ``path_weights`` ``[n, U, n_paths]``."""
        parts = []
        for l3, p0, n, c0, _ in self.groups:
            block = t[:, :, c0:c0 + n * (2 * l3 + 1)].unflatten(2, (n, 2 * l3 + 1))
            parts.append((block * path_weights[:, :, p0:p0 + n, None]).flatten(2))
        return torch.cat(parts, dim=2)

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """Mix channels per path and sum the paths of each output degree: ``[n, W, (l_out+1)^2]``."""
        out = t.new_zeros(t.shape[0], self.weight.shape[2], (self.l_out + 1) ** 2)
        blocks = []
        for l3, p0, n, c0, norm in self.groups:
            block = t[:, :, c0:c0 + n * (2 * l3 + 1)].unflatten(2, (n, 2 * l3 + 1))  # [N, U, q, m]
            w = self.weight[p0:p0 + n].flatten(0, 1)  # [(q u), W]
            blocks.append((block.permute(0, 3, 2, 1).flatten(2) @ w).transpose(1, 2) * norm)  # [N, W, m]
        if len(blocks) == self.l_out + 1:
            return torch.cat(blocks, dim=2)
        for (l3, *_), block in zip(self.groups, blocks):  # some degree has no path: leave it zero
            out = out.index_copy(2, torch.arange(l3 * l3, (l3 + 1) ** 2, device=out.device), block)
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mix(self.couple(x, y))


class ChannelLinear(torch.nn.Module):
    """Equivariant linear map ``[n, U, D] -> [n, W, D]``: one channel-mixing matrix per degree, bias on l = 0."""

    def __init__(self, lmax: int, channels_in: int, channels_out: int):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(lmax + 1, channels_in, channels_out) / math.sqrt(channels_in))
        self.bias = torch.nn.Parameter(torch.zeros(channels_out))
        self.register_buffer("degrees", degree_index(lmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("nui,iuw->nwi", x, self.weight[self.degrees])
        return torch.cat([out[:, :, :1] + self.bias[:, None], out[:, :, 1:]], dim=2)


class Gate(torch.nn.Module):
    """SiLU on the scalars; each higher-degree irrep scaled by a sigmoid gate computed from the scalars."""

    def __init__(self, lmax: int, channels: int):
        super().__init__()
        self.lmax = lmax
        self.gates = torch.nn.Linear(channels, channels * lmax)
        self.register_buffer("gate_of", degree_index(lmax)[1:] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, 0]
        out = torch.nn.functional.silu(s)[:, :, None]
        if self.lmax == 0:
            return out
        g = torch.sigmoid(self.gates(s)).view(x.shape[0], x.shape[1], self.lmax)
        return torch.cat([out, x[:, :, 1:] * g[:, :, self.gate_of]], dim=2)


def mlp(sizes: list[int], bias: bool = True) -> torch.nn.Sequential:
    """Linear layers with SiLU between; without biases it maps 0 to 0 (radial weights vanish at the cutoff)."""
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(a, b, bias=bias), torch.nn.SiLU()]
    return torch.nn.Sequential(*layers[:-1])


class BesselBasis(torch.nn.Module):
    """``sqrt(2/rc) sin(n pi r / rc) / r`` times a smooth polynomial envelope (p = 6) that vanishes at rc."""

    def __init__(self, cutoff: float, n: int):
        super().__init__()
        self.cutoff = float(cutoff)
        self.register_buffer("freq", torch.arange(1, n + 1, dtype=torch.get_default_dtype()) * math.pi / cutoff)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.cutoff).clamp(max=1.0)
        p = 6.0
        env = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        basis = math.sqrt(2.0 / self.cutoff) * torch.sin(self.freq * r[:, None]) / r[:, None]
        return basis * env[:, None]


class InteractionBlock(torch.nn.Module):
    """One message-passing step with the multipole contraction of the environment.

    ``h_i <- h_i + Gate( sum_j TP(h_j, Y(r_ij); R(r_ij)) / <n>  +  TP(h_i, T_i)  +  W h_i )``

    The first term is equivariant message passing between QM atoms (radial
    weights per channel and path from an MLP of a Bessel basis); the second
    contracts the node features, the learned atomic multipoles, with the
    environment tensors ``T_i`` (MM charges plus long-range QM charges): this is
    how polarisation and the QM-MM interaction enter the features.
    """

    def __init__(self, lmax: int, env_order: int, channels: int, n_radial: int, radial_hidden: int):
        super().__init__()
        self.conv = TensorProductY(lmax, lmax, lmax, channels, channels)
        self.radial = mlp([n_radial, radial_hidden, channels * self.conv.n_paths], bias=False)
        self.env = TensorProductY(lmax, env_order, lmax, channels, channels)
        self.self_linear = ChannelLinear(lmax, channels, channels)
        self.gate = Gate(lmax, channels)
        self.channels = channels

    def forward(self, h: torch.Tensor, edge_src: torch.Tensor, edge_dst: torch.Tensor, edge_sh: torch.Tensor,
                edge_basis: torch.Tensor, env: torch.Tensor, avg_neighbors: torch.Tensor) -> torch.Tensor:
        weights = self.radial(edge_basis).view(-1, self.channels, self.conv.n_paths)
        messages = self.conv.weigh(self.conv.couple(h[edge_src], edge_sh), weights)
        agg = torch.zeros((h.shape[0],) + messages.shape[1:], device=h.device, dtype=h.dtype)
        agg = agg.index_add(0, edge_dst, messages) / avg_neighbors
        pre = self.conv.mix(agg) + self.env(h, env) + self.self_linear(h)
        return h + self.gate(pre)
