"""Fault injection: kill workers, i-PI and the launcher at random moments of short PIMD runs, restart, and check
that every run ends with every step exactly once and nothing left behind.

Each trial launches ``qmmm-driver launch`` on a small PIMD run (4 beads, a periodic box of 100 waters, an
untrained model with a short cutoff plus OpenMM; 40 steps, a checkpoint every 5), then, at a random moment,
does one of:

- ``kill -9`` a model or an OpenMM worker (the launcher stops the run);
- ``kill -9`` i-PI (no RESTART: the restart takes the newest periodic checkpoint);
- ``kill -9`` the launcher itself (its children get SIGTERM: i-PI writes RESTART, workers stop);
- SIGTERM or SIGHUP to the launcher (a batch scheduler's wall-time limit, a closed terminal);
- SIGSTOP a model worker (frozen, as i-PI may not notice a dead one: the launcher's stall watch ends the run);

waits until everything has stopped, checks that no process and no socket file of the run remain, and continues
with ``launch --restart`` (faults may strike again, up to ``--faults`` per trial) until the run is complete. A
trial is recovered when the properties and the trajectory hold steps 0..40, each exactly once.

    python benchmarks/fault_injection.py [--trials 12 --seed 0]

Prints one line per trial and a summary; writes benchmarks/results/fault_injection.json.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from qmmm_driver.launcher import TEMPLATES  # noqa: E402

STEPS = 40
FAULTS = ("kill-model-worker", "kill-mm-worker", "kill-ipi", "kill-launcher", "sigterm-launcher",
          "sighup-launcher", "freeze-model-worker")


def make_example(work: Path) -> Path:
    """A 100-water periodic box with a QM water, an untrained model whose cutoff fits it, and example.toml."""
    import torch

    from qmmm_driver.mm.systems import build_setup, water_solute
    from qmmm_driver.nn import ModelSettings, QMMMModel
    from qmmm_driver.nn.io import save_model
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    setup = build_setup(water_solute(), box_A=15.0, seed=0).relaxed(cutoff_A=7.0)
    example = work / "example"
    setup.write(example)
    torch.manual_seed(0)
    model = QMMMModel(ModelSettings(elements=["H", "O"], masses=[1.008, 15.999], channels=8, n_layers=1,
                                    radial_hidden=8, readout_hidden=8, mm_switch_on=5.0 * ANGSTROM_TO_BOHR,
                                    mm_switch_off=6.5 * ANGSTROM_TO_BOHR))
    with torch.no_grad():
        model.energy_scale.fill_(1e-4)  # an untrained model with weak forces: the water stays a water for 40 steps
    save_model(model, example / "model.pt")
    (example / "example.toml").write_text('model = "model.pt"\nsystem = "system.extxyz"\npdb = "system.pdb"\n'
                                          'forcefield = ["amber14/tip3p.xml"]\n'
                                          'mm_options = ["--cutoff", "7.0", "--switch-distance", "6.0"]\n')
    root = ET.parse(TEMPLATES / "pimd.xml").getroot()
    root.find("total_steps").text = f" {STEPS} "
    for init in root.iter("initialize"):
        init.set("nbeads", "4")
    for out in root.find("output"):
        out.set("stride", "5" if out.tag == "checkpoint" else "1")
    ET.ElementTree(root).write(work / "pimd.xml")
    return example


def processes_of(run_dir: Path) -> list[str]:
    """Processes of this run still alive (by the run's socket tags and directory)."""
    tags = set(re.findall(r"qd[0-9a-f]{8}", " ".join(p.read_text() for p in run_dir.glob("*input.xml"))))
    out = subprocess.run(["ps", "-eo", "pid,stat,args"], capture_output=True, text=True).stdout.splitlines()
    return [line for line in out if any(t in line for t in tags) or f"--run-dir {run_dir}" in line]


def sockets_of(run_dir: Path) -> list[str]:
    tags = set(re.findall(r"qd[0-9a-f]{8}", " ".join(p.read_text() for p in run_dir.glob("*input.xml"))))
    return [str(p) for t in tags for p in Path("/tmp").glob(f"ipi_{t}*")]


def pids(pattern: str) -> list[int]:
    return [int(p) for p in subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()]


def inject(fault: str, launcher: subprocess.Popen, run_dir: Path) -> bool:
    """Strike ``fault``; False if its target was not (yet) there."""
    text = " ".join(p.read_text() for p in run_dir.glob("*input.xml"))
    tags = re.findall(r"qd[0-9a-f]{8}", text)
    if not tags:
        return False
    tag = tags[-1]
    if fault in ("kill-model-worker", "freeze-model-worker"):
        targets = pids(f"qmmm_driver.cli run .*--unix {tag}-qmmm")
        sig = signal.SIGKILL if fault.startswith("kill") else signal.SIGSTOP
    elif fault == "kill-mm-worker":
        targets, sig = pids(f"qmmm_driver.cli mm .*--unix {tag}-mm"), signal.SIGKILL
    elif fault == "kill-ipi":
        targets = [p for p in pids("i-pi ") if Path(f"/proc/{p}/cwd").resolve() == run_dir.resolve()]
        sig = signal.SIGKILL
    else:
        targets = [launcher.pid]
        sig = {"kill-launcher": signal.SIGKILL, "sigterm-launcher": signal.SIGTERM,
               "sighup-launcher": signal.SIGHUP}[fault]
    for p in targets:
        os.kill(p, sig)
    return bool(targets)


def steps_once(run_dir: Path) -> tuple[bool, str]:
    from ipi.scripting import read_output

    steps = [int(s) for s in np.atleast_1d(read_output(str(run_dir / "simulation.out"))[0]["step"])]
    xc = [int(m) for m in re.findall(r"Step:\s+(\d+)", (run_dir / "simulation.xc.extxyz").read_text())]
    ok = steps == list(range(STEPS + 1)) and xc == list(range(STEPS + 1))
    return ok, f"properties {len(steps)} rows ({len(set(steps))} distinct), centroid trajectory {len(xc)} frames"


def trial(k: int, rng: np.random.Generator, work: Path, example: Path, max_faults: int) -> dict:
    run_dir = work / f"run{k:02d}"
    record = {"trial": k, "faults": [], "launches": 0, "leftovers": []}
    restart = False
    while record["launches"] < max_faults + 3:
        cmd = [sys.executable, "-m", "qmmm_driver.cli", "launch", str(work / "pimd.xml"), "--example", str(example),
               "--run-dir", str(run_dir), "--no-progress", "--stall-timeout", "20"] + (["--restart"] if restart else [])
        launcher = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        record["launches"] += 1
        if len(record["faults"]) < max_faults:
            fault = str(rng.choice(FAULTS))
            time.sleep(float(rng.uniform(3.0, 14.0)))
            if launcher.poll() is None and inject(fault, launcher, run_dir):
                record["faults"].append(fault)
        try:
            _, err = launcher.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            launcher.kill()
            _, err = launcher.communicate()
            record["hung"] = True
        deadline = time.time() + 60  # orphans of a killed launcher get SIGTERM and must be gone soon
        while time.time() < deadline and (processes_of(run_dir) or sockets_of(run_dir)):
            time.sleep(0.5)
        record["leftovers"] += processes_of(run_dir) + sockets_of(run_dir)
        for line in processes_of(run_dir):  # clean up for the next trial, whatever happened
            os.kill(int(line.split()[0]), signal.SIGKILL)
        if launcher.returncode == 0:
            break
        restart = any(p.name in ("RESTART", "simulation.chk", "RESTART.complete", "simulation.chk.complete")
                      for p in run_dir.iterdir())
    ok, detail = steps_once(run_dir) if (run_dir / "simulation.out").exists() else (False, "no output")
    record.update(recovered=ok and not record["leftovers"], detail=detail)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--faults", type=int, default=2, help="faults per trial, at most (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "fault_injection.json")
    args = p.parse_args()
    rng = np.random.default_rng(args.seed)
    work = Path(tempfile.mkdtemp(prefix="qmmm-faults-"))
    example = make_example(work)
    records = []
    for k in range(args.trials):
        r = trial(k, rng, work, example, args.faults)
        records.append(r)
        print(f"trial {k:2d}: faults {', '.join(r['faults']) or 'none'}; {r['launches']} launches; "
              f"{'recovered' if r['recovered'] else 'NOT recovered'} ({r['detail']}"
              f"{'; leftovers: ' + str(r['leftovers']) if r['leftovers'] else ''})", flush=True)
    faults = [f for r in records for f in r["faults"]]
    summary = {"trials": len(records), "recovered": sum(r["recovered"] for r in records), "faults": len(faults),
               "by_kind": {f: faults.count(f) for f in FAULTS}, "steps": STEPS, "records": records}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=1))
    print(f"\n{summary['recovered']}/{summary['trials']} trials recovered, {summary['faults']} faults injected "
          f"({', '.join(f'{k} {v}' for k, v in summary['by_kind'].items())}); wrote {args.out}")


if __name__ == "__main__":
    main()
