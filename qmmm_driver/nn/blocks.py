"""Building blocks of the model: radial basis, packed equivariant layers, the interaction block.

Node features are tensors ``[n, C, (lmax+1)^2]``: each of the C channels carries
one irrep of every degree l = 0..lmax with natural parity (``C x (0e + 1o + 2e +
3o)``), components in e3nn's order and normalisation. A tensor product with a
one-channel-per-degree input ``y`` (edge spherical harmonics, Taylor tensors) is
done for all coupling paths at once with e3nn's Clebsch-Gordan coefficients
packed into one dense tensor: a few large contractions instead of several
small kernels per path. QM regions are small, so kernel count, not arithmetic,
sets the cost; ``benchmarks/layers.py`` measures this layout against e3nn's
``o3.TensorProduct``/``o3.Linear``/``nn.Gate`` doing the same maps.
"""

from __future__ import annotations

import math

import torch
from e3nn import o3
from e3nn.math import soft_one_hot_linspace


def degree_index(lmax: int, device=None) -> torch.Tensor:
    """The degree l of each of the (lmax+1)^2 spherical-harmonic components."""
    return torch.cat([torch.full((2 * l + 1,), l, dtype=torch.long, device=device) for l in range(lmax + 1)])


def node_irreps(channels: int, lmax: int) -> o3.Irreps:
    """The irreps of the packed node features: ``channels x (0e + 1o + ... lmax)``."""
    return o3.Irreps([(channels, (l, (-1) ** l)) for l in range(lmax + 1)])


def switch(d: torch.Tensor, r_on: float, r_off: float) -> torch.Tensor:
    """C2-continuous switch: 1 for d <= r_on, 0 for d >= r_off, ``1 - 10x^3 + 15x^4 - 6x^5`` between."""
    x = ((d - r_on) / (r_off - r_on)).clamp(0.0, 1.0)
    return 1.0 - x * x * x * (10.0 - 15.0 * x + 6.0 * x * x)


class RadialBasis(torch.nn.Module):
    """e3nn's Bessel functions ``sin(n pi r / rc) / r`` times a polynomial envelope (p = 6) that takes
    them and their first two derivatives smoothly to zero at ``rc``: ``n`` scalars (``n x 0e``) per distance."""

    def __init__(self, cutoff: float, n: int):
        super().__init__()
        self.cutoff, self.n = float(cutoff), int(n)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        x = (r / self.cutoff).clamp(max=1.0)
        p = 6.0
        env = 1.0 - (p + 1) * (p + 2) / 2 * x**p + p * (p + 2) * x ** (p + 1) - p * (p + 1) / 2 * x ** (p + 2)
        return soft_one_hot_linspace(r, 0.0, self.cutoff, self.n, basis="bessel", cutoff=True) * env[..., None]

    def extra_repr(self) -> str:
        return f"cutoff={self.cutoff:.3f} bohr, irreps_out={self.n}x0e"


def leading(x: torch.Tensor, k: int) -> torch.Tensor:
    """The first ``k`` components (last axis) of ``x``; ``x`` itself when it has no more, so that the traced graph
    holds no empty slice (torch 2.13's tuned compile baked a batch size into the products after one)."""
    return x[..., :k] if k < x.shape[-1] else x


def coupling_paths(l_in: int, l_y: int, l_out: int) -> list[tuple[int, int, int]]:
    """Paths (l1, l2, l3) allowed by the triangle rule and natural parity (l1 + l2 + l3 even)."""
    return [(l1, l2, l3) for l1 in range(l_in + 1) for l2 in range(l_y + 1) for l3 in range(l_out + 1)
            if abs(l1 - l2) <= l3 <= l1 + l2 and (l1 + l2 + l3) % 2 == 0]


class TensorProductY(torch.nn.Module):
    """``x (x) y`` for x ``[n, U, (l_in+1)^2]`` and y ``[n, (l_y+1)^2]``, mixed into ``[n, W, (l_out+1)^2]``.

    Every path (l1, l2, l3) couples channel u of x with y through e3nn's
    Clebsch-Gordan coefficients (component normalisation); channels are then
    mixed per path by weights ``[n_paths, U, W]`` and the paths of each output
    degree summed. Optional ``path_weights`` ``[n, U, n_paths]`` scale each
    (sample, channel, path) before mixing (the radial weights of a convolution).
    """

    def __init__(self, l_in: int, l_y: int, l_out: int, channels_in: int, channels_out: int,
                 l_in_used: int | None = None, l_out_used: int | None = None):
        super().__init__()
        self.l_in, self.l_y, self.l_out = l_in, l_y, l_out
        self.paths = sorted(coupling_paths(l_in, l_y, l_out), key=lambda p: (p[2], p[0], p[1]))
        d_in, d_y = (l_in + 1) ** 2, (l_y + 1) ** 2
        blocks = []
        for l1, l2, l3 in self.paths:
            cg = o3.wigner_3j(l1, l2, l3, dtype=torch.float64) * math.sqrt(2 * l3 + 1)
            block = torch.zeros(d_in, d_y, 2 * l3 + 1, dtype=torch.float64)
            block[l1 * l1:(l1 + 1) ** 2, l2 * l2:(l2 + 1) ** 2] = cg
            blocks.append(block)
        self.register_buffer("cg", torch.cat(blocks, dim=2).to(torch.get_default_dtype()))
        self.n_paths = len(self.paths)
        self.weight = torch.nn.Parameter(torch.randn(self.n_paths, channels_in, channels_out))
        # Only the paths that can matter are evaluated: inputs of degree <= l_in_used (the rest are known to be
        # zero) into outputs of degree <= l_out_used (the rest are never read). Paths are sorted by (l3, l1, l2),
        # so those of one output degree with l1 <= l_in_used are a run; the weights and the normalisation stay
        # those of the whole product (the cg buffer too: both are in the model file).
        self.l_in_used = l_in if l_in_used is None else min(l_in_used, l_in)
        self.l_out_used = l_out if l_out_used is None else min(l_out_used, l_out)
        # per output degree: (degree, first path, number of paths, first component, 1/sqrt(fan-in))
        self.groups = []
        used_components = []
        first_path = first_comp = used_comp = 0
        for l3 in range(l_out + 1):
            group = [k for k, p in enumerate(self.paths) if p[2] == l3]
            used = [k for k in group if self.paths[k][0] <= self.l_in_used]
            if not group:
                raise ValueError(f"some output degree of {l_in} x {l_y} -> {l_out} has no coupling path")
            if l3 <= self.l_out_used:  # a group without used paths gives zeros
                self.groups.append((l3, first_path, len(used), used_comp, 1.0 / math.sqrt(len(group) * channels_in)))
                used_components.extend(range(first_comp, first_comp + len(used) * (2 * l3 + 1)))
                used_comp += len(used) * (2 * l3 + 1)
            first_path += len(group)
            first_comp += len(group) * (2 * l3 + 1)
        cg_used = self.cg[:(self.l_in_used + 1) ** 2, :, used_components].contiguous()
        self.register_buffer("cg_used", cg_used, persistent=False)

    def couple(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Unmixed outputs of the used paths ``[n, U, n_components]`` (x's degrees above l_in_used ignored)."""
        return torch.bmm(leading(x, self.cg_used.shape[0]), torch.einsum("nj,ijp->nip", y, self.cg_used))

    def weigh(self, t: torch.Tensor, path_weights: torch.Tensor) -> torch.Tensor:
        """Scale the components of every used path of ``t`` by ``path_weights`` ``[n, U, n_paths]`` (all paths)."""
        parts = []
        for l3, p0, n, c0, _ in self.groups:
            if n == 0:
                continue
            block = t[:, :, c0:c0 + n * (2 * l3 + 1)].unflatten(2, (n, 2 * l3 + 1))
            parts.append((block * path_weights[:, :, p0:p0 + n, None]).flatten(2))
        return torch.cat(parts, dim=2)

    def mix(self, t: torch.Tensor) -> torch.Tensor:
        """Mix channels per path and sum the paths of each output degree: ``[n, W, (l_out_used+1)^2]``."""
        blocks = []
        for l3, p0, n, c0, norm in self.groups:
            if n == 0:
                blocks.append(t.new_zeros(t.shape[0], self.weight.shape[2], 2 * l3 + 1))
                continue
            block = t[:, :, c0:c0 + n * (2 * l3 + 1)].unflatten(2, (n, 2 * l3 + 1))  # [N, U, q, m]
            w = self.weight[p0:p0 + n].flatten(0, 1)  # [(q u), W]
            blocks.append((block.permute(0, 3, 2, 1).flatten(2) @ w).transpose(1, 2) * norm)  # [N, W, m]
        return torch.cat(blocks, dim=2)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.mix(self.couple(x, y))

    def extra_repr(self) -> str:
        c_in, c_out = self.weight.shape[1:]
        return (f"{node_irreps(c_in, self.l_in)} x {o3.Irreps.spherical_harmonics(self.l_y)} -> "
                f"{node_irreps(c_out, self.l_out)}, {self.n_paths} paths")


class ChannelLinear(torch.nn.Module):
    """Equivariant linear map ``C_in x (0e..lmax) -> C_out x (0e..lmax)``: one channel-mixing matrix per
    degree, a bias on the scalars."""

    def __init__(self, lmax: int, channels_in: int, channels_out: int):
        super().__init__()
        self.lmax = lmax
        self.weight = torch.nn.Parameter(torch.randn(lmax + 1, channels_in, channels_out) / math.sqrt(channels_in))
        self.bias = torch.nn.Parameter(torch.zeros(channels_out))
        self.register_buffer("degrees", degree_index(lmax))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` [n, C_in, (l+1)^2] for any l <= lmax, mapped to [n, C_out, (l+1)^2]."""
        out = torch.einsum("nui,iuw->nwi", x, self.weight[self.degrees[:x.shape[2]]])
        return torch.cat([out[:, :, :1] + self.bias[:, None], out[:, :, 1:]], dim=2)

    def extra_repr(self) -> str:
        return f"{node_irreps(self.weight.shape[1], self.lmax)} -> {node_irreps(self.weight.shape[2], self.lmax)}"


class Gate(torch.nn.Module):
    """SiLU on the scalars; every irrep of degree l > 0 scaled by a sigmoid gate computed from the scalars.
    ``irreps_in`` = ``irreps_out`` = ``C x (0e..l)``, any l <= lmax."""

    def __init__(self, lmax: int, channels: int):
        super().__init__()
        self.lmax, self.channels = lmax, channels
        self.gates = torch.nn.Linear(channels, channels * lmax)
        self.register_buffer("gate_of", degree_index(lmax)[1:] - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, 0]
        g = torch.sigmoid(self.gates(s)).view(x.shape[0], x.shape[1], self.lmax)
        gated = x[:, :, 1:] * g[:, :, self.gate_of[:x.shape[2] - 1]]
        return torch.cat([torch.nn.functional.silu(s)[:, :, None], gated], dim=2)

    def extra_repr(self) -> str:
        return f"{node_irreps(self.channels, self.lmax)}"


class InteractionBlock(torch.nn.Module):
    """One message-passing step driven by the environment:

    ``h_i <- h_i + Gate( sum_j TP(h_j, Y(r_ij); R(r_ij)) / <n> + TP(h_i, T_i) + W h_i + W' s_i )``

    - messages between QM atoms, weighted per path and channel by an MLP
      (e3nn ``FullyConnectedNet``) of the radial basis;
    - the contraction of the node features (learned multipoles) with the Taylor
      tensors ``T_i`` of the MM (plus long-range QM) potential: polarisation and
      the QM-MM interaction enter the features here;
    - ``s_i`` (optional): the short-range MM charge features of the QM atom.

    Edges are arranged receiver-major, ``n - 1`` per receiver (see
    :func:`~qmmm_driver.nn.model.receiver_major_pairs`).

    ``l_in_used``: the input features above this degree are zero (the first block, fed the
    element embedding, has only scalars), so the paths from them are skipped; ``l_out_used``:
    only the output degrees up to this one are computed and returned (the last block, whose
    readout needs scalars and vectors). The weights are those of the whole block either way.
    """

    def __init__(self, lmax: int, env_order: int, channels: int, n_radial: int, radial_hidden: int,
                 short_range: bool, l_in_used: int | None = None, l_out_used: int | None = None):
        from e3nn.nn import FullyConnectedNet

        super().__init__()
        self.conv = TensorProductY(lmax, lmax, lmax, channels, channels, l_in_used, l_out_used)
        self.radial = FullyConnectedNet([n_radial, radial_hidden, channels * self.conv.n_paths],
                                        torch.nn.functional.silu)
        self.env = TensorProductY(lmax, env_order, lmax, channels, channels, l_in_used, l_out_used)
        self.n_in = (self.conv.l_in_used + 1) ** 2
        self.n_out = (self.conv.l_out_used + 1) ** 2
        self.self_linear = ChannelLinear(lmax, channels, channels)
        self.short_linear = ChannelLinear(lmax, channels, channels) if short_range else None
        self.gate = Gate(lmax, channels)
        self.channels = channels

    def forward(self, h: torch.Tensor, src: torch.Tensor, edge_sh: torch.Tensor, edge_basis: torch.Tensor,
                env: torch.Tensor, avg_neighbors: torch.Tensor, short: torch.Tensor | None) -> torch.Tensor:
        """``h`` [n, C, S] for ``n`` atoms of frames of ``per_frame`` atoms; edge tensors flat [n (per_frame - 1), ...].
        Returns [n, C, (l_out_used+1)^2]."""
        n = h.shape[0]
        per_receiver = edge_sh.shape[0] // max(n, 1)
        weights = self.radial(edge_basis).view(-1, self.channels, self.conv.n_paths)
        h_out = leading(h, self.n_out)
        pre = self.env(h, env) + self.self_linear(h_out)
        if per_receiver:  # a single QM atom has no messages
            messages = self.conv.weigh(self.conv.couple(leading(h, self.n_in)[src], edge_sh), weights)
            agg = messages.view(n, per_receiver, self.channels, -1).sum(dim=1) / avg_neighbors
            pre = pre + self.conv.mix(agg)
        if self.short_linear is not None and short is not None:
            pre = pre + self.short_linear(leading(short, self.n_out))
        return h_out + self.gate(pre)
