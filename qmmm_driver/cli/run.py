"""``qmmm-driver run``: serve the model to i-PI over a socket, one worker per process or MPI rank.

Under ``mpirun``/``mpiexec`` every rank is an independent worker that connects
to the same i-PI address; i-PI hands each one whole structures (beads,
replicas). Ranks are spread over the GPUs of their node by node-local rank;
each uses ``--threads`` CPU threads (default: ``OMP_NUM_THREADS`` when set, else 1).
A compiled form of the model (``qmmm-driver compile``) beside the model file is
used when it fits the model, QM region, device and dtype. Exit statuses: see
:mod:`qmmm_driver.ipi.worker`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError
from ..ipi.worker import add_connection_arguments, log, serve

DTYPES = ("float32", "float64")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="MODEL", help="model file written by qmmm-driver")
    parser.add_argument("--system", required=True, metavar="FRAME.extxyz",
                        help="extended XYZ frame with per-atom 'qm' and 'mm_charge', atoms in i-PI's order")
    parser.add_argument("--qm", metavar="SELECTION",
                        help="QM atoms as 0-based indices and ranges, e.g. '0-5,9' (overrides the 'qm' array)")
    add_connection_arguments(parser)
    parser.add_argument("--device", default="auto", metavar="DEV",
                        help="auto, cpu, cuda or cuda:N; auto and cuda use GPU local_rank %% n_gpus "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="precision of the model (the embedding and energies are float64; default: %(default)s)")
    parser.add_argument("--compiled", default="auto", choices=["auto", "no"],
                        help="auto: use the compiled model beside the model file when it fits (default); no: eager")
    parser.add_argument("--coupling", type=float, default=1.0, metavar="X",
                        help="QM-MM electrostatic coupling (scales all MM charges) unless i-PI's <parameters> "
                             "set 'coupling' (default: %(default)s)")


def build(args, placement):
    """The model evaluator for ``qmmm-driver run`` (see :func:`qmmm_driver.ipi.worker.serve`)."""
    from ..structures import QMMMStructure

    # cheap checks first: a wrong file or selection is reported before torch is even imported
    if not float("-inf") < args.coupling < float("inf"):
        raise InputError(f"--coupling {args.coupling} must be a finite number")
    structure = QMMMStructure.read(args.system, qm=args.qm)
    structure.mm_molecules()  # groups (and the whole-molecule check) before the model loads

    import torch

    from ..evaluator import ModelEvaluator, NonFiniteResult, load
    from ..nn.compile import CompiledModelError, compiled_path, load_compiled
    from ..parallel import setup_torch

    device, n_threads = setup_torch(placement, args.device, args.threads)
    model = load(args.model, device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    compiled, how = None, "eager"
    if args.compiled == "auto":
        path = compiled_path(args.model, structure.n_qm, device, dtype)
        if path.is_file():
            try:
                compiled, how = load_compiled(path, model.checksum, structure.n_qm, device, dtype), f"compiled {path.name}"
            except (CompiledModelError, RuntimeError) as err:
                log("run", f"warning: {err}; running the eager model")
        else:
            log("run", f"note: no compiled model at {path}; `qmmm-driver compile --model {args.model} --system "
                       f"{args.system}` makes force calls several times faster")
    ev = ModelEvaluator(model, structure, device, dtype, compiled=compiled)
    text = (f"device {device} ({args.dtype}, {how}, {n_threads} CPU thread{'s' if n_threads > 1 else ''}), "
            f"model {Path(args.model).name} ({' '.join(model.elements)}), "
            f"system {Path(structure.source).name}: {structure.n_atoms} atoms, {structure.n_qm} QM, "
            f"{'periodic' if structure.periodic else 'cluster'}")
    return ev, text, {"coupling": args.coupling}, (NonFiniteResult,)


def main(args) -> int:
    return serve("run", args, build)
