"""Do the hand-written packed layers of qmmm_driver/nn/blocks.py pay? Timed against e3nn doing the same maps.

For node features of 32 channels of 0e + 1o + 2e + 3o (the shipped models' size), forward + backward of:

- the message tensor product: node features (x) edge harmonics (l <= 3), weighted per channel and path by radial
  weights, channels mixed per path (``TensorProductY.couple/weigh/mix``) against e3nn's ``o3.TensorProduct``
  ('uvu' instructions, per-edge weights) followed by ``o3.Linear``;
- the environment tensor product (node features (x) Taylor tensors, shared weights) against the same e3nn pair;
- the self-interaction ``ChannelLinear`` against ``o3.Linear``;
- the ``Gate`` against ``o3.Linear`` (for the gate scalars) + ``e3nn.nn.Gate``.

Sizes: 6 (one water frame: 3 atoms, 6 edges), 96 and 768 rows (batches of frames). Eager mode, one thread, the
median of repeated calls; e3nn's layers run in its own (channel-major) layout.

    python benchmarks/layers.py

Prints a table and writes benchmarks/results/layers.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from e3nn import nn, o3

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402
from timing import median_ms  # noqa: E402

from qmmm_driver.nn.blocks import ChannelLinear, Gate, TensorProductY, node_irreps  # noqa: E402

C, L = 32, 3


def uvu_paths_e3nn(irreps_in1: o3.Irreps, irreps_in2: o3.Irreps, irreps_target: o3.Irreps):
    """e3nn's form of TensorProductY's coupling: 'uvu' instructions into every irrep of ``irreps_target``."""
    targets = {ir for _, ir in irreps_target}
    out, instructions = [], []
    for i1, (mul, ir1) in enumerate(irreps_in1):
        for i2, (_, ir2) in enumerate(irreps_in2):
            for ir in ir1 * ir2:
                if ir in targets:
                    instructions.append((i1, i2, len(out), "uvu", True))
                    out.append((mul, ir))
    out = o3.Irreps(out)
    sorted_irreps, perm, _ = out.sort()
    return sorted_irreps, [(i1, i2, perm[k], mode, train) for i1, i2, k, mode, train in instructions]


def backward(out: torch.Tensor, *inputs) -> None:
    torch.autograd.grad(out.square().sum(), inputs)


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    irreps = node_irreps(C, L)
    sh_irreps = o3.Irreps.spherical_harmonics(L)
    rows = []
    for n in (6, 96, 768):
        x_packed = torch.randn(n, C, (L + 1) ** 2, requires_grad=True)
        x_e3nn = torch.randn(n, irreps.dim, requires_grad=True)
        y = torch.randn(n, (L + 1) ** 2)
        ours = TensorProductY(L, L, L, C, C)
        w = torch.randn(n, C, ours.n_paths)
        mid, paths = uvu_paths_e3nn(irreps, sh_irreps, irreps)
        tp = o3.TensorProduct(irreps, sh_irreps, mid, paths, shared_weights=False, internal_weights=False)
        mix = o3.Linear(mid, irreps)
        w_e3nn = torch.randn(n, tp.weight_numel)
        tp_shared = o3.TensorProduct(irreps, sh_irreps, mid, paths, shared_weights=True, internal_weights=True)
        cases = {
            "message tensor product": (
                lambda: backward(ours.mix(ours.weigh(ours.couple(x_packed, y), w)), x_packed),
                lambda: backward(mix(tp(x_e3nn, y, w_e3nn)), x_e3nn)),
            "environment tensor product": (
                lambda: backward(ours(x_packed, y), x_packed),
                lambda: backward(mix(tp_shared(x_e3nn, y)), x_e3nn)),
            "linear": (
                lambda: backward(ChannelLinear(L, C, C)(x_packed), x_packed),
                lambda: backward(o3.Linear(irreps, irreps)(x_e3nn), x_e3nn)),
        }
        gate_ours = Gate(L, C)
        gates = o3.Linear(irreps, o3.Irreps(f"{C}x0e + {C * L}x0e") + irreps[1:])
        gate_e3nn = nn.Gate(f"{C}x0e", [torch.nn.functional.silu], f"{C * L}x0e", [torch.sigmoid], irreps[1:])
        cases["gate"] = (lambda: backward(gate_ours(x_packed), x_packed),
                         lambda: backward(gate_e3nn(gates(x_e3nn)), x_e3nn))
        for name, (a, b) in cases.items():
            ta, tb = median_ms(a, 50, warmup=5), median_ms(b, 50, warmup=5)
            rows.append({"layer": name, "rows": n, "packed_ms": ta, "e3nn_ms": tb, "e3nn_over_packed": tb / ta})
            print(f"{name:28s} n={n:4d}: packed {ta:7.3f} ms, e3nn {tb:7.3f} ms ({tb / ta:5.1f}x)", flush=True)
    out = REPO / "benchmarks" / "results" / "layers.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": describe(), "channels": C, "lmax": L, "threads": 1,
                               "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
