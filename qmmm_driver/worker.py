"""``qmmm-driver run``: serve the model to i-PI over a socket, one worker per process or MPI rank.

Under ``mpirun``/``mpiexec`` every rank is an independent worker that connects
to the same i-PI address; i-PI hands each one whole structures (beads,
replicas). Ranks are spread over the GPUs of their node by node-local rank;
each uses ``--threads`` CPU threads (default: ``OMP_NUM_THREADS`` when set, else 1).

Exit status: 0 after i-PI's EXIT; 2 for input a user can fix (files, selection,
model, socket address, INIT parameters, atom count); 3 when i-PI goes away
without EXIT or breaks the protocol; 4 when the model gives a non-finite result.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

from .errors import InputError

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_CONNECTION = 3
EXIT_NONFINITE = 4

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
    parser.add_argument("--coupling", type=float, default=1.0, metavar="X",
                        help="QM-MM electrostatic coupling (scales all MM charges) unless i-PI's <parameters> "
                             "set 'coupling' (default: %(default)s)")


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Socket and CPU options shared by the worker commands (``run``, ``mm``)."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME",
                       help="unix socket name, i-PI's <address> (connects to SOCKET_PREFIX + NAME)")
    where.add_argument("--address", metavar="HOST", help="inet host of i-PI (with --port)")
    parser.add_argument("--port", type=int, metavar="N", help="inet port of i-PI (with --address)")
    parser.add_argument("--socket-prefix", default="/tmp/ipi_", metavar="PREFIX",
                        help="i-PI's sockets_prefix for unix sockets (default: %(default)s)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, metavar="S",
                        help="keep retrying to connect for S seconds while i-PI is not up (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads (default: OMP_NUM_THREADS if set, else 1: the cores are shared with "
                             "i-PI and other workers; raise it for large systems on dedicated cores)")


def socket_address(args):
    """The :class:`~qmmm_driver.ipi_client.SocketAddress` named by the arguments."""
    from .ipi_client import SocketAddress

    if args.unix is not None:
        if args.port is not None:
            raise InputError("--port goes with --address HOST (inet), not with --unix")
        return SocketAddress.unix(args.unix, args.socket_prefix)
    if args.port is None:
        raise InputError(f"--address {args.address} needs --port N (the <port> of i-PI's inet <ffsocket>)")
    return SocketAddress.inet(args.address, args.port)


def log(command: str, text: str) -> None:
    print(f"qmmm-driver {command}: {text}", file=sys.stderr, flush=True)


def _on_sigterm(signum, _frame):
    raise SystemExit(128 + signum)


def serve_ipi(command: str, args, build) -> int:
    """The main of a worker command: build the evaluator, serve i-PI, report, return the exit status.

    ``build(args, placement)`` returns ``(evaluator, system, description,
    coupling, nonfinite_error)``: the exception type the evaluator raises for a
    non-finite result. One line is logged at the start and one at the exit,
    whatever the outcome.
    """
    from .ipi_client import ConnectionLost, IPIClient, ProtocolError, connect
    from .parallel import detect_placement

    placement = detect_placement()
    tag = f"[rank {placement.rank}/{placement.size}] " if placement.size > 1 else ""
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)  # so that the exit line is still written
    except ValueError:  # not the main thread (embedded use)
        pass
    client = None
    code, outcome = EXIT_INPUT, "interrupted"
    try:
        address = socket_address(args)
        ev, system, text, coupling, nonfinite = build(args, placement)
        log(command, f"{placement.label()}, {text}, socket {address}")
        sock = connect(address, args.connect_timeout)
        client = IPIClient(sock, ev, system, coupling=coupling)
        try:
            client.serve()
            code, outcome = EXIT_OK, "i-PI sent EXIT"
        except (ConnectionLost, ProtocolError) as err:
            log(command, f"error: {tag}{err}")
            code, outcome = EXIT_CONNECTION, "connection lost"
        except nonfinite as err:
            log(command, f"error: {tag}{err}; nothing was sent to i-PI for this request. Check the structure "
                         "(atoms too close?) and that the model covers it")
            code, outcome = EXIT_NONFINITE, "stopped by a non-finite result"
        finally:
            try:
                sock.shutdown(2)
            except OSError:
                pass
            sock.close()
    except InputError as err:
        log(command, f"error: {tag}{err}")
        code, outcome = EXIT_INPUT, "stopped by an input error"
    finally:
        served = client.structures if client is not None else 0
        requests = client.requests if client is not None else 0
        log(command, f"{tag}served {served} structures in {requests} requests; {outcome}")
    return code


def build(args, placement):
    """The model evaluator for ``qmmm-driver run`` (see :func:`serve_ipi`)."""
    from .system import QMMMSystem

    # cheap checks first: a wrong file or selection is reported before torch is even imported
    if not float("-inf") < args.coupling < float("inf"):
        raise InputError(f"--coupling {args.coupling} must be a finite number")
    system = QMMMSystem.read(args.system, qm=args.qm)

    import torch

    from .evaluator import Evaluator, NonFiniteResult
    from .model.io import load_model
    from .parallel import setup_torch

    device, n_threads = setup_torch(placement, args.device, args.threads)
    model = load_model(args.model, device)
    dtype = torch.float64 if args.dtype == "float64" else torch.float32
    ev = Evaluator(model, system, device, dtype, coupling=args.coupling)
    text = (f"device {device} ({args.dtype}, {n_threads} CPU thread{'s' if n_threads > 1 else ''}), "
            f"model {Path(args.model).name} ({' '.join(model.elements)}), "
            f"system {Path(system.source).name}: {system.n_atoms} atoms, {system.n_qm} QM, "
            f"{'periodic' if system.periodic else 'cluster'}")
    return ev, system, text, args.coupling, NonFiniteResult


def main(args) -> int:
    return serve_ipi("run", args, build)
