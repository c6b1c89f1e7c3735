"""i-PI PIMD throughput: qmmm-driver against i-PI's own floor and against i-PI's stock driver, fairly.

Every comparison runs the same i-PI input with different clients of its sockets, in the same run of this
script, on the same machine; steps per second are timed between the first and the last measured step (start-up
excluded).

1. ``shipped``: ``qmmm-driver launch`` as shipped (template ``pimd``, 16 beads, shipped water model + OpenMM,
   1671 atoms, the launcher's batching) against the same input with i-PI's dummy driver on both sockets (the
   floor: i-PI's own cost); also with the MM nonbonded terms on a contracted ring polymer (``pimd-contracted``).
2. ``user``: a user's own PIMD input, 8 beads, the water example cut to a ~700-atom cluster, the model socket
   only, no ``<batch_size>``, one worker (one structure per request), against the dummy floor (the faster of one
   dummy driver and eight); with i-PI's default ``<consolidate_messages>`` (true) and with false (what the
   templates set, for fault tolerance); the worker on one connection and on eight (``--connections 8``: the
   beads that arrive together are evaluated in one call).
3. ``fair``: a batched input (``<batch_size>`` = beads) served by ``qmmm-driver run`` and by i-PI's own
   ``i-pi-py_driver`` hosting the same evaluator through a PES that overrides ``compute`` for batches
   (``qmmm_driver/ipi/pes.py``): the best the stock driver can do with this model.

Padding: the structures the model workers evaluated and the requests they answered, from their exit lines,
against the structures i-PI asked for (beads x steps). i-PI pads a partial batch by repeating its last
structure; the worker evaluates no repeated structure, and one request per step means no partial batch.

    python benchmarks/ipi_pimd.py                 # all three
    python benchmarks/ipi_pimd.py --only fair     # one of them

Prints tables and writes benchmarks/results/ipi_pimd.json (with the machine it ran on).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
import xml.etree.ElementTree as ET
from pathlib import Path

import ase.io
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from machine import describe  # noqa: E402

from qmmm_driver.ipi.outputs import OutputSpec, last_step  # noqa: E402
from qmmm_driver.launcher import MODELS, TEMPLATES  # noqa: E402

OUT = [OutputSpec("properties", "sim.out", "")]
# A fixed seed: the same thermal start in every run. The input has no MM force field (the model socket only), so
# the MM charges drift towards the QM water; some random starts collapse onto it within 300 steps and the run
# blows up (the worker then stops with its non-finite-energy error), which this seed does not.
INPUT = """<simulation verbosity='low'>
  <prng><seed> 31415 </seed></prng>
  <output prefix='sim'> <properties stride='1' filename='out'> [ step, potential ] </properties> </output>
  <total_steps> {steps} </total_steps>
  <ffsocket name='qmmm' mode='unix' pbc='false'> <address>{address}</address> {batch}
    <consolidate_messages> {consolidate} </consolidate_messages> </ffsocket>
  <system>
    <initialize nbeads='{beads}'> <file mode='ase'> {system} </file>
      <velocities mode='thermal' units='kelvin'> 300 </velocities> </initialize>
    <forces> <force forcefield='qmmm'/> </forces>
    <motion mode='dynamics'> <dynamics mode='nvt'> <timestep units='femtosecond'> 0.25 </timestep>
      <thermostat mode='pile_l'> <tau units='femtosecond'> 100 </tau> </thermostat> </dynamics> </motion>
    <ensemble> <temperature units='kelvin'> 300 </temperature> </ensemble>
  </system>
</simulation>
"""
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # one thread per process for every client


def timed(run_dir: Path, proc, warmup: int, clients=()) -> tuple[float, int]:
    """Steps per second of a running i-PI (or launcher) between step ``warmup`` and its last step."""
    t0 = s0 = None
    while proc.poll() is None:
        if any(c.poll() not in (None, 0) for c in clients):
            raise RuntimeError(f"a client of the run in {run_dir} failed; see its log")
        step = last_step(run_dir, OUT) if (run_dir / "sim.out").exists() else \
            last_step(run_dir, [OutputSpec("properties", "simulation.out", "")])
        if t0 is None and step is not None and step >= warmup:
            t0, s0 = time.perf_counter(), step
        time.sleep(0.005)
    t1 = time.perf_counter()
    final = last_step(run_dir, OUT) or last_step(run_dir, [OutputSpec("properties", "simulation.out", "")])
    if proc.returncode != 0 or t0 is None or final is None or final <= s0:
        raise RuntimeError(f"run in {run_dir} failed (exit {proc.returncode}); see its logs")
    return (final - s0) / (t1 - t0), final


def served(log: str) -> tuple[int, int]:
    """Structures evaluated and requests answered, from the model workers' exit lines (a worker does not
    evaluate i-PI's padding of a partial batch, nor identical beads twice)."""
    pairs = re.findall(r"served (\d+) structures in (\d+) requests", log)
    return sum(int(a) for a, _ in pairs), sum(int(b) for _, b in pairs)


# --------------------------------------------------------------------------- 1: the shipped main job

def shipped(work: Path, steps: int, warmup: int, template: str = "pimd") -> dict:
    """``qmmm-driver launch TEMPLATE`` with the shipped water model against the dummy floor on the same input."""
    root = ET.parse(TEMPLATES / f"{template}.xml").getroot()
    root.find("total_steps").text = f" {steps + warmup} "
    for out in root.find("output"):
        out.set("stride", "1" if out.tag == "properties" else "100000")
    nbeads = int(next(root.iter("initialize")).get("nbeads"))
    xml = work / f"{template}.xml"
    ET.ElementTree(root).write(xml)
    run = work / f"launch-{template}"
    proc = subprocess.Popen([sys.executable, "-m", "qmmm_driver.cli", "launch", str(xml), "--example", "water",
                             "--run-dir", str(run), "--no-progress"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=ENV)
    rate, final = timed(run, proc, warmup)
    evaluated, requests = served((run / "qmmm-w0.log").read_text())
    # the floor: the same prepared input, i-PI's dummy driver on every socket (over plain unix sockets: the stock
    # driver does not speak i-PI's shared-memory mode, which the launcher gives batched sockets)
    floor_dir = work / f"floor-{template}"
    floor_dir.mkdir()
    text = re.sub(r"mode=(['\"])shm\1", r"mode=\1unix\1", (run / "input.xml").read_text())
    addresses = re.findall(r"<address>\s*(\S+)\s*</address>", text)
    for a in addresses:
        text = text.replace(a, f"fl{uuid.uuid4().hex[:8]}{a[-8:]}")
    (floor_dir / "input.xml").write_text(text.replace(str(run), str(floor_dir)))
    for name in ("system.extxyz",):
        (floor_dir / name).symlink_to((run / name).resolve())
    rate_floor = dummy_run(floor_dir, re.findall(r"<address>\s*(\S+)\s*</address>", text), warmup)
    return {"input": template, "beads": nbeads, "atoms": 1671, "qmmm_driver_steps_per_s": rate,
            "floor_steps_per_s": rate_floor, "ratio_to_floor": rate / rate_floor,
            "model_structures_evaluated": evaluated, "structures_requested": nbeads * (final + 1),
            "model_requests_per_step": requests / (final + 1)}


def with_clients(run_dir: Path, addresses: list[str], clients: list[list[str]], warmup: int,
                 watch: bool = True) -> tuple[float, int]:
    """i-PI on ``run_dir/input.xml``, then the ``clients`` commands once its sockets exist: steps per second and
    the last step (:func:`timed`; ``watch``: a client that fails stops the measurement). Everything is killed and
    the sockets removed at the end."""
    log = open(run_dir / "log", "wb")
    procs = [subprocess.Popen(["i-pi", "input.xml"], cwd=run_dir, stdout=log, stderr=subprocess.STDOUT)]
    try:
        while not all(Path("/tmp/ipi_" + a).exists() for a in addresses):
            time.sleep(0.05)
            if procs[0].poll() is not None:
                raise RuntimeError(f"i-PI failed in {run_dir}")
        procs += [subprocess.Popen(cmd, cwd=run_dir, stdout=log, stderr=subprocess.STDOUT, env=ENV)
                  for cmd in clients]
        return timed(run_dir, procs[0], warmup, procs[1:] if watch else ())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        log.close()
        for a in addresses:
            Path("/tmp/ipi_" + a).unlink(missing_ok=True)


def dummy_run(run_dir: Path, addresses: list[str], warmup: int) -> float:
    """Steps per second of i-PI's dummy driver on every socket: the floor."""
    return with_clients(run_dir, addresses, [["i-pi-py_driver", "-u", "-a", a, "-m", "dummy"] for a in addresses],
                        warmup, watch=False)[0]


# --------------------------------------------------------------------------- 2 and 3: one model socket

def cluster_system(work: Path, radius_A: float = 12.0) -> Path:
    """The shipped water system cut to the QM water and the MM waters within ``radius_A`` (no cell)."""
    from qmmm_driver.structures import QMMMStructure
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    full = QMMMStructure.read(MODELS / "water" / "system.extxyz")
    pos, cell = full.positions, full.cell
    centre = pos[full.qm_indices].mean(axis=0)
    mol = full.molecule
    keep = []
    for m in np.unique(mol):
        atoms = np.flatnonzero(mol == m)
        shift = -np.round((pos[atoms[0]] - centre) @ np.linalg.inv(cell)) @ cell
        if np.linalg.norm(pos[atoms].mean(axis=0) + shift - centre) < radius_A * ANGSTROM_TO_BOHR \
                or m == mol[full.qm_indices[0]]:
            keep.append((atoms, shift))
    index = np.concatenate([a for a, _ in keep])
    new_pos = np.concatenate([pos[a] + s for a, s in keep])
    from dataclasses import replace

    cluster = replace(full, numbers=full.numbers[index], positions=new_pos, qm=full.qm[index],
                      mm_charge=full.mm_charge[index], molecule=mol[index], cell=None)
    atoms = cluster.to_atoms()
    atoms.set_cell(np.eye(3) * 80.0)  # i-PI needs a cell; pbc stays off: a cluster
    atoms.pbc = False

    path = work / "cluster.extxyz"
    ase.io.write(path, atoms, format="extxyz")
    return path


def client(kind: str, address: str, model: Path, system: Path, connections: int = 1) -> list[list[str]]:
    """The command(s) of one client of ``kind``; ``connections`` > 1: that many dummy drivers, or one
    qmmm-driver worker with ``--connections``."""
    if kind == "dummy":
        return [["i-pi-py_driver", "-u", "-a", address, "-m", "dummy"]] * connections
    if kind == "stock":
        return [["i-pi-py_driver", "-u", "-a", address, "-m", "custom", "-P",
                 str(REPO / "qmmm_driver" / "ipi" / "pes.py"), "-o", f"model={model},system={system}"]]
    return [[sys.executable, "-m", "qmmm_driver.cli", "run", "--model", str(model), "--system", str(system),
             "--unix", address, "--connections", str(connections)]]


def single(kind: str, system: Path, model: Path, beads: int, batch: int, steps: int, warmup: int,
           work: Path, consolidate: bool = True, connections: int = 1) -> dict:
    """One socket served by one client of ``kind``; ``consolidate``: i-PI's <consolidate_messages> (its default,
    true, sends POSDATA and GETFORCE at once and collects the replies with select; false polls each client with
    STATUS, which the templates choose so that a killed worker cannot stall i-PI; batches need true)."""
    run = work / f"{kind}-{beads}-{batch}-{uuid.uuid4().hex[:6]}"
    run.mkdir()
    address = f"bench{uuid.uuid4().hex[:10]}"
    (run / "input.xml").write_text(INPUT.format(
        steps=steps + warmup, address=address, beads=beads, system=system,
        batch=f"<batch_size> {batch} </batch_size>" if batch > 1 else "",
        consolidate="true" if consolidate else "false"))
    rate, final = with_clients(run, [address], client(kind, address, model, system, connections), warmup)
    out = {"steps_per_s": rate, "ms_per_structure": 1000.0 / (rate * beads), "connections": connections}
    if kind == "qmmm-driver":
        evaluated, requests = served((run / "log").read_text())
        out.update(structures_evaluated=evaluated, structures_requested=beads * (final + 1),
                   requests_per_step=requests / (final + 1))
        calls = re.findall(r"\((\d+) batched calls\)", (run / "log").read_text())
        if calls:  # --connections > 1: model calls per step
            out["calls_per_step"] = int(calls[0]) / (final + 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=["shipped", "user", "fair"], default=None)
    p.add_argument("--steps", type=int, default=60, help="measured steps per run (after warm-up)")
    p.add_argument("--warmup", type=int, default=6)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "ipi_pimd.json")
    args = p.parse_args()
    work = Path(tempfile.mkdtemp(prefix="qmmm-bench-"))
    results = json.loads(args.out.read_text()) if args.out.exists() and args.only else {}
    results.update(machine=describe(),
                   cpus=os.cpu_count(), date=time.strftime("%Y-%m-%d"))
    model = MODELS / "water" / "model.pt"
    try:
        if args.only in (None, "shipped"):
            results["shipped"] = [shipped(work, args.steps, args.warmup, t) for t in ("pimd", "pimd-contracted")]
            for r in results["shipped"]:
                print(f"launch {r['input']} ({r['beads']} beads, {r['atoms']} atoms): {r['qmmm_driver_steps_per_s']:.2f} "
                      f"steps/s, floor {r['floor_steps_per_s']:.2f} -> {r['ratio_to_floor']:.2f} of the floor; "
                      f"{r['model_structures_evaluated']} structures evaluated of {r['structures_requested']} requested, "
                      f"{r['model_requests_per_step']:.2f} model requests per step", flush=True)
        system = cluster_system(work)
        if args.only in (None, "user"):
            results["user"] = []
            atoms = len(ase.io.read(system))
            for consolidate in (True, False):  # i-PI's default, then the templates' choice
                # the floor: one dummy driver, and eight (one per bead); the faster of the two counts
                floors = [single("dummy", system, model, 8, 1, args.steps, args.warmup, work, consolidate, k)
                          for k in (1, 8)]
                dummy = max(floors, key=lambda f: f["steps_per_s"])
                for connections in (1, 8):  # one worker, one connection / one per bead (--connections 8)
                    ours = single("qmmm-driver", system, model, 8, 1, args.steps, args.warmup, work, consolidate,
                                  connections)
                    row = {"beads": 8, "atoms": atoms, "batch": 1, "connections": connections,
                           "consolidate_messages": consolidate, "dummy": dummy, "floors": floors,
                           "qmmm_driver": ours, "ratio_to_floor": ours["steps_per_s"] / dummy["steps_per_s"]}
                    results["user"].append(row)
                    print(f"user input (8 beads, cluster, unbatched, consolidate_messages {str(consolidate).lower()}"
                          f", worker with {connections} connection(s)): {ours['ms_per_structure']:.2f} ms per "
                          f"structure, floor {dummy['ms_per_structure']:.2f} (dummy drivers: 1 "
                          f"{floors[0]['ms_per_structure']:.2f}, 8 {floors[1]['ms_per_structure']:.2f}) -> "
                          f"{row['ratio_to_floor']:.2f}", flush=True)
        if args.only in (None, "fair"):
            rows = []
            for beads in (8, 32):
                stock = single("stock", system, model, beads, beads, args.steps, args.warmup, work)
                ours = single("qmmm-driver", system, model, beads, beads, args.steps, args.warmup, work)
                dummy = single("dummy", system, model, beads, beads, args.steps, args.warmup, work)
                rows.append({"beads": beads, "batch": beads, "stock_batched": stock, "qmmm_driver": ours,
                             "dummy": dummy, "vs_stock": ours["steps_per_s"] / stock["steps_per_s"],
                             "ratio_to_floor": ours["steps_per_s"] / dummy["steps_per_s"]})
                print(f"batched {beads} beads: qmmm-driver {ours['steps_per_s']:.2f}, stock driver with the batched "
                      f"PES {stock['steps_per_s']:.2f} ({rows[-1]['vs_stock']:.2f}x), floor {dummy['steps_per_s']:.2f} "
                      f"({rows[-1]['ratio_to_floor']:.2f})", flush=True)
            results["fair"] = rows
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
