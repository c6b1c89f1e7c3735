"""``qmmm-driver compile``: compile a model ahead of time for the QM region of a system (see
:mod:`qmmm_driver.nn.compile`). The package is written beside the model file, where ``qmmm-driver run``
finds it; it takes minutes on a CPU and is done once per model, QM atom count, device and dtype."""

from __future__ import annotations

import argparse
import time
from pathlib import Path


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, type=Path, help="model file")
    parser.add_argument("--system", type=Path, default=None,
                        help="system file whose QM region the compiled model serves (or give --n-qm)")
    parser.add_argument("--n-qm", type=int, default=None, help="number of QM atoms (instead of --system)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--out", type=Path, default=None, help="package path (default: beside the model)")
    parser.add_argument("--tune", action="store_true",
                        help="time each matrix product against generated kernels and keep the faster (a compile "
                             "2-3x longer; not always faster: the shipped packages are untuned)")


def main(args: argparse.Namespace) -> int:
    import torch

    from ..errors import InputError
    from ..evaluator import load
    from ..nn.compile import CompiledModelError, compile_model, compiled_path
    from ..parallel import select_device
    from ..structures import QMMMStructure

    if (args.system is None) == (args.n_qm is None):
        raise InputError("give the QM region: --system FRAME.extxyz or --n-qm N")
    n_qm = QMMMStructure.read(args.system).n_qm if args.system is not None else args.n_qm
    if n_qm < 1:
        raise InputError(f"--n-qm {n_qm} must be at least 1")
    device = select_device(args.device)
    dtype = {"float32": torch.float32, "float64": torch.float64}[args.dtype]
    model = load(args.model, device)
    out = args.out or compiled_path(args.model, n_qm, device, dtype)
    print(f"compiling {args.model} for {n_qm} QM atoms on {device.type} ({args.dtype}"
          f"{', tuned' if args.tune else ''}); this takes minutes")
    started = time.time()
    try:
        compile_model(model, model.checksum, n_qm, out, device, dtype, tune=args.tune)
    except CompiledModelError as err:  # the compiler's output failed the check against the eager model
        raise InputError(str(err)) from None
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {time.time() - started:.0f} s")
    return 0
