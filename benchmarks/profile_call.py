"""Where the time of one force call goes, end to end, through the real socket client: eager and compiled model.

A scripted i-PI peer (this process, another thread) sends INIT, then POSDATA
and GETFORCE for a batch of beads over a unix socket pair, and reads the reply;
qmmm-driver's IPIClient answers with the real ModelEvaluator, once with the
eager model and once with the compiled one (``qmmm-driver compile``), in the
same run. torch's profiler, with the stage labels placed in the client and
evaluator, splits each call into: socket read, presentation of the MM
environment (imaging, culling, near atoms), the model (energy and gradients),
assembly of forces and virial, socket write (with the extras JSON).

The default system is the shipped water example cut to a cluster of the QM
water and the ~700 MM atoms within 12 A (the issue's "one model call"); one
structure per call, one thread.

    python benchmarks/profile_call.py [--beads 1] [--calls 200] [--periodic]

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
from machine import describe

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

STAGES = ["ipi:read", "qmmm:present", "qmmm:model", "qmmm:assemble", "ipi:reply"]


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
    p.add_argument("--beads", type=int, default=1)
    p.add_argument("--calls", type=int, default=200)
    p.add_argument("--periodic", action="store_true", help="the full periodic box (1671 atoms) instead of the cluster")
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "profile_call.json")
    args = p.parse_args()

    import tempfile

    import torch
    from torch.profiler import ProfilerActivity, profile

    from ipi_pimd import cluster_system
    from qmmm_driver.evaluator import ModelEvaluator, load
    from qmmm_driver.ipi.client import IPIClient
    from qmmm_driver.launcher import MODELS
    from qmmm_driver.nn.compile import compiled_path, load_compiled
    from qmmm_driver.structures import QMMMStructure

    torch.set_num_threads(1)
    model_path = MODELS / "water" / "model.pt"
    path = MODELS / "water" / "system.extxyz" if args.periodic else cluster_system(Path(tempfile.mkdtemp()))
    structure = QMMMStructure.read(path)
    model = load(model_path)
    compiled = load_compiled(compiled_path(model_path, structure.n_qm, "cpu", torch.float32), model.checksum,
                             structure.n_qm, "cpu", torch.float32)
    rng = np.random.default_rng(0)
    pos = np.stack([structure.positions + rng.normal(scale=0.01, size=structure.positions.shape)
                    for _ in range(args.beads)])
    cell = structure.cell if structure.periodic else np.eye(3) * 150.0

    results = {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "system": str(path.name),
               "atoms": structure.n_atoms, "beads": args.beads, "threads": 1}
    for name, runner in (("eager", None), ("compiled", compiled)):
        ev = ModelEvaluator(model, structure, "cpu", torch.float32, compiled=runner)

        def session(calls: int) -> list:
            a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
            times: list = []
            t = threading.Thread(target=peer, args=(b, pos, cell, calls, times))
            t.start()
            IPIClient(a, ev).serve()
            t.join()
            a.close()
            b.close()
            return times

        session(5)  # warm-up
        times = session(args.calls)  # timed without the profiler
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            session(min(args.calls, 50))
        per_call = 1000 * float(np.median(times))
        calls = min(args.calls, 50)
        totals = {e.key: e.cpu_time_total / 1000 / calls for e in prof.key_averages() if e.key in STAGES}
        n_mm = int(ev.compute(pos[:1], cell[None] if structure.periodic else None).n_mm_embedded[0])
        results[name] = {"ms_per_call": per_call, "ms_per_structure": per_call / args.beads, "stages_ms": totals,
                         "mm_atoms_embedded": n_mm}
        print(f"{name}: {path.name}, {structure.n_atoms} atoms ({n_mm} MM charges embedded), {args.beads} "
              f"structure(s) per call: {per_call:.2f} ms per force call (median of {args.calls}, as the peer sees it)")
        print(f"  {'stage':16s} {'ms/call':>8s} {'share':>7s}   (profiled calls; the profiler adds its own overhead)")
        for stage in STAGES:
            ms = totals.get(stage, 0.0)
            print(f"  {stage:16s} {ms:8.3f} {100 * ms / per_call:6.1f}%")
    results["speedup"] = results["eager"]["ms_per_call"] / results["compiled"]["ms_per_call"]
    print(f"compiled / eager: {results['speedup']:.1f}x faster")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
