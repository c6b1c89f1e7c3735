"""The MM half: the OpenMM worker against OpenMM's own cost per bead, and what ring-polymer contraction saves.

On the shipped water system (1671 atoms, PME, 10 A cutoff, CPU platform, one thread), in the same run:

- OpenMM alone: ``Context.setPositions`` + ``getState(energy, forces)`` on the worker's System;
- the worker's evaluator (unit conversion, whole molecules, the checks) per bead;
- the worker behind the socket client, a scripted i-PI peer sending 16-bead batches;
- per 16-bead PIMD step: every term on every bead (template ``pimd``) against bonded terms on 16 beads and
  nonbonded terms on 4 (``pimd-contracted``), as i-PI asks for them.

    python benchmarks/mm_cost.py

Prints a table and writes benchmarks/results/mm_cost.json.
"""

from __future__ import annotations

import json
import socket
import sys
import threading
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402
from timing import median_ms  # noqa: E402


def main() -> None:
    import argparse

    from profile_call import peer
    from qmmm_driver.cli import mm as mm_cli
    from qmmm_driver.ipi.client import IPIClient
    from qmmm_driver.launcher import MODELS
    from qmmm_driver.mm.forcefield import BOHR_TO_NM
    from qmmm_driver.parallel import Placement

    example = MODELS / "water"
    parser = argparse.ArgumentParser()
    mm_cli.configure(parser)
    args = parser.parse_args(["--pdb", str(example / "system.pdb"), "--system", str(example / "system.extxyz"),
                              "--forcefield", "amber14/tip3p.xml", "--unix", "unused", "--device", "cpu",
                              "--threads", "1"])
    ev, text, *_ = mm_cli.build(args, Placement())
    structure = ev.structure
    rng = np.random.default_rng(0)
    beads = np.stack([structure.positions + rng.normal(scale=0.02, size=structure.positions.shape)
                      for _ in range(16)])
    cell = structure.cell
    ctx = ev.context

    def openmm_alone(groups={0, 1}):
        for b in range(16):
            ctx.setPositions(beads[b] * BOHR_TO_NM)
            ctx.getState(getEnergy=True, getForces=True, groups=groups)

    def worker(terms="all", n=16):
        ev.compute(beads[:n], np.repeat(cell[None], n, 0), {"terms": terms})

    def through_socket():
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        times: list = []
        t = threading.Thread(target=peer, args=(b, beads, cell, 3, times))
        t.start()
        IPIClient(a, ev).serve()
        t.join()
        a.close()
        b.close()
        return float(np.median(times)) * 1000.0

    alone = median_ms(openmm_alone, 5) / 16
    per_bead = median_ms(worker, 5) / 16
    socket_ms = through_socket() / 16
    full_step = median_ms(lambda: worker("all", 16), 5)
    contracted_step = median_ms(lambda: (worker("bonded", 16), worker("nonbonded", 4)), 5)
    results = {"machine": describe(), "system": text, "threads": 1,
               "openmm_alone_ms_per_bead": alone, "worker_ms_per_bead": per_bead,
               "worker_through_socket_ms_per_bead": socket_ms, "worker_over_openmm": per_bead / alone,
               "pimd16_all_terms_ms_per_step": full_step, "pimd16_contracted_ms_per_step": contracted_step,
               "contraction_saving": full_step / contracted_step}
    print(text)
    print(f"OpenMM alone             {alone:7.2f} ms per bead")
    print(f"worker's evaluator       {per_bead:7.2f} ms per bead ({per_bead / alone:.2f} x OpenMM alone)")
    print(f"worker through a socket  {socket_ms:7.2f} ms per bead (16-bead batches)")
    print(f"16-bead PIMD step: all terms on 16 beads {full_step:.1f} ms; bonded on 16 + nonbonded on 4 "
          f"{contracted_step:.1f} ms ({full_step / contracted_step:.1f}x less)")
    out = REPO / "benchmarks" / "results" / "mm_cost.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
