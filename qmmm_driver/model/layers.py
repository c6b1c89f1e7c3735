"""Building blocks of the model: radial basis, interaction block."""

from __future__ import annotations

import math

import torch
from e3nn import nn as enn
from e3nn import o3


def natural_irreps(muls: list[int]) -> o3.Irreps:
    """``m0 x 0e + m1 x 1o + m2 x 2e + m3 x 3o`` (zero multiplicities left out)."""
    return o3.Irreps([(m, (l, (-1) ** l)) for l, m in enumerate(muls) if m > 0])


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

    ``h_i <- h_i + Gate( W_msg sum_j TP(h_j, Y(r_ij); R(r_ij))  +  W_env TP(h_i, T_i)  +  W_self h_i )``

    The first term is equivariant message passing between QM atoms; the second
    contracts the node features (learned atomic multipoles) with the
    environment tensors ``T_i`` (MM charges plus long-range QM charges), which
    is how polarisation and QM-MM interaction enter the features.
    """

    def __init__(self, irreps_node: o3.Irreps, irreps_sh: o3.Irreps, irreps_env: o3.Irreps,
                 n_radial: int, radial_hidden: int):
        super().__init__()
        allowed = {ir for _, ir in irreps_node}
        mid, instructions = [], []
        for i, (mul, ir_in) in enumerate(irreps_node):
            for j, (_, ir_edge) in enumerate(irreps_sh):
                for ir_out in ir_in * ir_edge:
                    if ir_out in allowed:
                        instructions.append((i, j, len(mid), "uvu", True))
                        mid.append((mul, ir_out))
        irreps_mid = o3.Irreps(mid)
        self.conv = o3.TensorProduct(irreps_node, irreps_sh, irreps_mid, instructions,
                                     shared_weights=False, internal_weights=False)
        self.radial = enn.FullyConnectedNet([n_radial, radial_hidden, self.conv.weight_numel], torch.nn.functional.silu)

        scalars = o3.Irreps([(m, ir) for m, ir in irreps_node if ir.l == 0])
        gated = o3.Irreps([(m, ir) for m, ir in irreps_node if ir.l > 0])
        gates = o3.Irreps([(gated.num_irreps, (0, 1))]) if gated.num_irreps else o3.Irreps("")
        self.gate = enn.Gate(scalars, [torch.nn.functional.silu], gates, [torch.sigmoid], gated)
        irreps_pre = self.gate.irreps_in
        self.env_tp = o3.FullyConnectedTensorProduct(irreps_node, irreps_env, irreps_node)
        self.lin_msg = o3.Linear(irreps_mid, irreps_pre)
        self.lin_env = o3.Linear(irreps_node, irreps_pre)
        self.lin_self = o3.Linear(irreps_node, irreps_pre)

    def forward(self, h: torch.Tensor, edge_src: torch.Tensor, edge_dst: torch.Tensor,
                edge_sh: torch.Tensor, edge_basis: torch.Tensor, env: torch.Tensor,
                avg_neighbors: torch.Tensor) -> torch.Tensor:
        weights = self.radial(edge_basis)
        messages = self.conv(h[edge_src], edge_sh, weights)
        agg = torch.zeros(h.shape[0], messages.shape[1], device=h.device, dtype=h.dtype)
        agg = agg.index_add(0, edge_dst, messages) / avg_neighbors
        pre = self.lin_msg(agg) + self.lin_env(self.env_tp(h, env)) + self.lin_self(h)
        return h + self.gate(pre)

