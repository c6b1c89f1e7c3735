"""Where the time of one force call goes, end to end, through the real socket client.

A scripted i-PI peer (this process, another thread) sends INIT, then POSDATA
and GETFORCE for a batch of beads of an example system over a unix socket pair,
and reads the reply; qmmm-driver's IPIClient answers with the real Evaluator.
torch's profiler, with the stage labels placed in the client and evaluator,
splits each call into: socket read, embedding (imaging, culling), model
forward, autograd backward, assembly of forces/virial on the host, socket
write (with the extras JSON). The rest of the wall time is the peer's own work
and waiting.

    python benchmarks/profile_call.py [--system water] [--beads 8] [--calls 30]

Prints a table and writes JSON (default benchmarks/results/profile_call.json).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

STAGES = ["ipi:read", "qmmm:present", "qmmm:forward", "qmmm:backward", "qmmm:assemble", "ipi:reply"]


def msg(text: str) -> bytes:
    return text.upper().ljust(12).encode()


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("client closed")
        buf += chunk
    return bytes(buf)


def peer(sock, pos: np.ndarray, cell: np.ndarray, calls: int, times: list) -> None:
    """A minimal i-PI: INIT with batch_size, then calls x (POSDATA + GETFORCE), then EXIT."""
    B, nat = pos.shape[:2]
    init = f" , batch_size:{B}".encode() if B > 1 else b" "
    sock.sendall(msg("INIT") + np.int32(0).tobytes() + np.int32(len(init)).tobytes() + init)
    h = cell.T.copy()  # i-PI sends h, whose columns are the lattice vectors
    hih = np.concatenate([h.ravel(), np.linalg.inv(h).ravel()])
    if B > 1:
        posdata = msg("POSDATA") + np.int32(nat).tobytes() + np.tile(hih, B).tobytes() + pos.tobytes()
    else:
        posdata = msg("POSDATA") + hih.tobytes() + np.int32(nat).tobytes() + pos.tobytes()
    for _ in range(calls):
        t = time.perf_counter()
        sock.sendall(posdata + msg("GETFORCE"))
        assert recv_exact(sock, 12) == msg("FORCEREADY")
        recv_exact(sock, 8 * B + 4 + 24 * B * nat + 72 * B)
        for _ in range(B):
            n = int(np.frombuffer(recv_exact(sock, 4), np.int32)[0])
            recv_exact(sock, n)
        times.append(time.perf_counter() - t)
    sock.sendall(msg("EXIT"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--system", default="water")
    p.add_argument("--beads", type=int, default=8)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile_call.json")
    args = p.parse_args()

    import ase.io
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ipi_pimd import model_for
    from qmmm_driver.evaluator import Evaluator
    from qmmm_driver.ipi_client import IPIClient
    from qmmm_driver.model.io import load_model
    from qmmm_driver.system import QMMMSystem
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    torch.set_num_threads(1)
    example = REPO / "examples" / args.system
    system = QMMMSystem.read(example / "system.extxyz")
    atoms = ase.io.read(example / "system.extxyz")
    ev = Evaluator(load_model(model_for(example, Path("/tmp"))), system,
                   dtype={"float32": torch.float32, "float64": torch.float64}[args.dtype])
    rng = np.random.default_rng(0)
    pos = np.stack([atoms.positions * ANGSTROM_TO_BOHR + rng.normal(scale=0.01, size=atoms.positions.shape)
                    for _ in range(args.beads)])
    cell = atoms.cell.array * ANGSTROM_TO_BOHR

    def session(calls: int, prof=None) -> list:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        times: list = []
        t = threading.Thread(target=peer, args=(b, pos, cell, calls, times))
        t.start()
        IPIClient(a, ev, system).serve()
        t.join()
        a.close()
        b.close()
        return times

    session(3)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        times = session(args.calls)
    per_call = 1000 * float(np.median(times))
    totals = {e.key: e.cpu_time_total / 1000 / args.calls for e in prof.key_averages() if e.key in STAGES}
    print(f"{args.system}, {args.beads} beads, {system.n_atoms} atoms, {args.dtype}: "
          f"{per_call:.2f} ms per force call (median of {args.calls}, wall time seen by the peer)")
    print(f"{'stage':16s} {'ms/call':>8s} {'share':>7s}")
    for stage in STAGES:
        ms = totals.get(stage, 0.0)
        print(f"{stage:16s} {ms:8.2f} {100 * ms / per_call:6.1f}%")
    print("(stage times include the profiler's own overhead; their sum can exceed the wall time)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"system": args.system, "beads": args.beads, "ms_per_call": per_call,
                                    "stages_ms": totals}, indent=1))


if __name__ == "__main__":
    main()
