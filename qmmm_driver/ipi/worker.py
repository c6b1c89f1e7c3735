"""What every worker command shares: connection options, the serve loop, exit statuses and log lines.

``qmmm-driver run`` (the model) and ``qmmm-driver mm`` (OpenMM) each build an
evaluator and hand it to :func:`serve`, which connects to i-PI, answers until
EXIT and returns the exit status:

- 0: i-PI sent EXIT;
- 2: input to fix (files, selection, model, socket address, INIT parameters,
  atom count), with a message naming the file, atom or value;
- 3: i-PI went away without EXIT or broke the protocol;
- 4: a non-finite result, or non-finite positions from i-PI (nothing is sent then).

Warnings (a structure outside the model's training domain, say) go to the same log as one
``qmmm-driver COMMAND: warning: ...`` line each.

SIGTERM and SIGHUP end a worker like Ctrl-C (:mod:`qmmm_driver.signals`, set up by the command line): the exit
line is still written, and the status is 128 + the signal.
"""

from __future__ import annotations

import argparse
import sys
import warnings

from ..errors import InputError
from ..signals import describe

EXIT_OK = 0
EXIT_INPUT = 2
EXIT_CONNECTION = 3
EXIT_NONFINITE = 4

#: Most connections one worker opens (``--connections``).
MAX_CONNECTIONS = 256


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """Socket and CPU options shared by the worker commands (``run``, ``mm``)."""
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--unix", metavar="NAME",
                       help="unix socket name, i-PI's <address> (connects to SOCKET_PREFIX + NAME)")
    where.add_argument("--address", metavar="HOST", help="inet host of i-PI (with --port)")
    parser.add_argument("--port", type=int, metavar="N", help="inet port of i-PI (with --address)")
    parser.add_argument("--shm", action="store_true",
                        help="i-PI's <ffsocket mode='shm'>: the unix socket for messages, shared memory for "
                             "positions and forces (with --unix; the worker must run on i-PI's machine)")
    parser.add_argument("--socket-prefix", default="/tmp/ipi_", metavar="PREFIX",
                        help="i-PI's sockets_prefix for unix sockets (default: %(default)s)")
    parser.add_argument("--connections", type=int, default=1, metavar="K",
                        help="open K connections to i-PI's socket and evaluate the structures that arrive on them "
                             "together, in one batched call: batching for an <ffsocket> without <batch_size> "
                             "(e.g. K = the number of beads; default: %(default)s)")
    parser.add_argument("--connect-timeout", type=float, default=60.0, metavar="S",
                        help="keep retrying to connect for S seconds while i-PI is not up (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=0, metavar="N",
                        help="CPU threads (default: OMP_NUM_THREADS if set, else 1: the cores are shared with "
                             "i-PI and other workers; raise it for large systems on dedicated cores)")


def socket_address(args):
    """The :class:`~qmmm_driver.ipi.client.SocketAddress` named by the arguments."""
    from .client import SocketAddress

    if args.unix is not None:
        if args.port is not None:
            raise InputError("--port goes with --address HOST (inet), not with --unix")
        return SocketAddress.unix(args.unix, args.socket_prefix)
    if args.port is None:
        raise InputError(f"--address {args.address} needs --port N (the <port> of i-PI's inet <ffsocket>)")
    if args.shm:
        raise InputError("--shm goes with --unix NAME (i-PI's mode='shm' listens on a unix socket), not with "
                         "--address")
    return SocketAddress.inet(args.address, args.port)


def log(command: str, text: str) -> None:
    print(f"qmmm-driver {command}: {text}", file=sys.stderr, flush=True)


def serve(command: str, args, build) -> int:
    """The main of a worker command: build the evaluator, serve i-PI, report, return the exit status.

    ``build(args, placement)`` returns ``(evaluator, description, defaults,
    nonfinite_errors)``: the worker's default forcefield parameters and the
    exception types that mean a non-finite result. One line is logged at the
    start and one at the exit, whatever the outcome.
    """
    from ..parallel import detect_placement
    from .client import ConnectionLost, IPIClient, ProtocolError
    from .fanin import FanIn, connect_all

    placement = detect_placement()
    tag = f"[rank {placement.rank}/{placement.size}] " if placement.size > 1 else ""
    warnings.showwarning = lambda message, *_, **__: log(command, f"warning: {tag}{message}")
    client, socks = None, []
    code, outcome = EXIT_INPUT, "interrupted"
    try:
        address = socket_address(args)
        if not 1 <= args.connections <= MAX_CONNECTIONS:
            raise InputError(f"--connections {args.connections}: give 1 to {MAX_CONNECTIONS} (one per structure "
                             "i-PI has in flight at once, e.g. the number of beads)")
        ev, text, defaults, nonfinite = build(args, placement)
        how = f" x {args.connections} connections" if args.connections > 1 else ""
        log(command, f"{placement.label()}, {text}, socket {address}{how}{' + shared memory' if args.shm else ''}")
        try:
            clients = connect_all(address, args.connections, args.connect_timeout,
                                  lambda sock: IPIClient(sock, ev, defaults, shm=args.shm))
            socks = [c.sock for c in clients]
            client = clients[0] if len(clients) == 1 else FanIn(clients)
            client.serve()
            code, outcome = EXIT_OK, "i-PI sent EXIT"
        except (ConnectionLost, ProtocolError) as err:
            log(command, f"error: {tag}{err}")
            code, outcome = EXIT_CONNECTION, "connection lost"
        except nonfinite as err:
            log(command, f"error: {tag}{err}; nothing was sent to i-PI for this request. Check the structure "
                         "(atoms too close? a blown-up run?) and that the model covers it")
            code, outcome = EXIT_NONFINITE, "stopped by a non-finite result"
        finally:
            for sock in socks:
                try:
                    sock.shutdown(2)
                except OSError:
                    pass
                sock.close()
    except InputError as err:
        log(command, f"error: {tag}{err}")
        code, outcome = EXIT_INPUT, "stopped by an input error"
    except MemoryError:
        log(command, f"error: {tag}out of memory (a batch or system too large for this machine?)")
        code, outcome = EXIT_INPUT, "out of memory"
    except KeyboardInterrupt as err:  # Ctrl-C, SIGTERM, SIGHUP: the command line sets the exit status
        outcome = describe(err)
        raise
    finally:
        served = client.structures if client is not None else 0
        requests = client.requests if client is not None else 0
        calls = f" ({client.calls} batched calls)" if isinstance(client, FanIn) else ""
        log(command, f"{tag}served {served} structures in {requests} requests{calls}; {outcome}")
    return code
