"""QM/MM dynamics from the i-PI templates in qmmm_driver/inputs/: model worker + OpenMM worker, real i-PI, short
runs.

Each test copies a template into a run directory beside ``system.extxyz``, ``system.pdb`` and
``model.pt`` (links, as a launcher would), shrinks it (beads, replicas, steps, strides) and gives
its sockets unique addresses, then starts one worker per ``<ffsocket>``: names starting with "mm"
get ``qmmm-driver mm``, all others ``qmmm-driver run``. The system is a small periodic water box
with a tiny model whose embedding cutoff fits it (see conftest.py).
"""

from __future__ import annotations

import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import SMALL_MM_ARGS, finish_run, read_ipi_bin, read_ipi_properties, start_mm_worker

from qmmm_driver.launcher import TEMPLATES
ALL_TEMPLATES = ("md-nvt.xml", "nve.xml", "pimd.xml", "pimd-contracted.xml", "remd.xml", "pimd-remd.xml", "hremd.xml")


def run_dir(tmp_path, small_box, small_model_file) -> Path:
    """Link the system files and the model into ``tmp_path`` under the names the templates use."""
    for name, target in (("system.extxyz", small_box["extxyz"]), ("system.pdb", small_box["pdb"]),
                         ("model.pt", small_model_file)):
        (tmp_path / name).symlink_to(target)
    return tmp_path


def derive(template: str, procs, *, steps: int, nbeads: int | None = None, replicas: int | None = None,
           exchange_stride: float | None = None, verbosity: str | None = None,
           outputs: tuple[str, ...] = ()) -> tuple[str, dict[str, str]]:
    """The template as XML text for a short test run, and ``{ffsocket name: unique address}``.

    Every output is written at every step (checkpoints too); ``replicas`` keeps the first instances
    of a ``<system_template>``; ``outputs`` are extra XML elements for ``<output>``.
    """
    root = ET.parse(TEMPLATES / template).getroot()
    root.find("total_steps").text = f" {steps} "
    root.set("floatformat", "%.16e")  # full precision for the comparisons
    if verbosity:
        root.set("verbosity", verbosity)
    for out in root.find("output"):
        out.set("stride", "1")
    for extra in outputs:
        root.find("output").append(ET.fromstring(extra))
    sockets = {}
    for ff in root.iter("ffsocket"):
        sockets[ff.get("name")] = ff.find("address").text = procs.socket_name()
    if nbeads is not None:
        for init in root.iter("initialize"):
            init.set("nbeads", str(nbeads))
    if replicas is not None:
        st = root.find("system_template")
        for extra in st.findall("instance")[replicas:]:
            st.remove(extra)
    if exchange_stride is not None:
        root.find("smotion/remd/stride").text = f" {exchange_stride} "
    return ET.tostring(root, encoding="unicode"), sockets


def start_workers(procs, sockets: dict[str, str], model_args=()) -> list:
    """One worker per ffsocket, by the naming convention; returns them once each is about to connect."""
    workers = []
    for name, address in sockets.items():
        if name.startswith("mm"):
            workers.append(start_mm_worker(procs, ["--pdb", "system.pdb", "--system", "system.extxyz",
                                                   "--unix", address, *SMALL_MM_ARGS], log=f"{name}.log"))
        else:
            workers.append(procs.start_worker(["--model", "model.pt", "--system", "system.extxyz",
                                               "--unix", address, *model_args], log=f"{name}.log"))
    for w in workers:
        procs.wait_log(w, r"socket unix:", timeout=90)
    return workers


def run(procs, xml: str, sockets: dict[str, str], name: str = "input.xml", timeout: float = 120.0, model_args=()):
    workers = start_workers(procs, sockets, model_args)
    ipi = procs.start_ipi(xml, name)
    finish_run(procs, ipi, workers, timeout=timeout)
    return ipi, workers


def steps_of(path: Path) -> list[int]:
    """The step column of an i-PI properties file."""
    return [int(s) for s in read_ipi_properties(path)["step"]]


# --------------------------------------------------------------------------- the templates themselves


def test_templates_follow_the_conventions():
    """Every template: unix ffsockets 'qmmm*' (model) and 'mm*' (OpenMM), all used by every system,
    system.extxyz, properties, positions, the QM dipole from the model's extras, a checkpoint, 0.25-0.5 fs."""
    for name in ALL_TEMPLATES:
        root = ET.parse(TEMPLATES / name).getroot()
        ffs = {ff.get("name"): ff for ff in root.iter("ffsocket")}
        assert all(ff.get("mode") == "unix" for ff in ffs.values()), name
        assert any(n.startswith("mm") for n in ffs) and any(not n.startswith("mm") for n in ffs), name
        systems = list(root.iter("system"))
        assert len(systems) == 1, name  # one system, or one template for all replicas
        used = [f.get("forcefield") for f in systems[0].iter("force")]
        assert sorted(used) == sorted(ffs), name
        assert [f.text.strip() for f in root.iter("file")] == ["system.extxyz"], name
        out = root.find("output")
        assert out.find("properties") is not None and out.find("checkpoint") is not None, name
        traj = {t.text.strip(): t for t in out.findall("trajectory")}
        assert "positions" in traj, name
        dipole = traj.get("extras_component_raw(0)", traj.get("extras_bias"))
        assert dipole is not None and dipole.get("extra_type") == "dipole", name
        if "extras_component_raw(0)" in traj:  # extras of force 0: the model
            assert not systems[0].find("forces/force").get("forcefield").startswith("mm"), name
        dt = root.find(".//timestep")
        assert dt.get("units") == "femtosecond" and 0.25 <= float(dt.text) <= 0.5, name


def test_templates_load_in_ipi(tmp_path, small_box, small_model_file):
    """i-PI builds every template as it is (read-only: no sockets), in a directory with the system files."""
    run_dir(tmp_path, small_box, small_model_file)
    code = ("import sys\nfrom ipi.engine.simulation import Simulation\n"
            "for f in sys.argv[1:]:\n"
            "    sim = Simulation.load_from_xml(open(f), read_only=True)\n"
            "    print(f, len(sim.syslist), sim.syslist[0].beads.nbeads, sorted(sim.fflist), flush=True)\n")
    r = subprocess.run([sys.executable, "-c", code, *[str(TEMPLATES / t) for t in ALL_TEMPLATES]], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    lines = {Path(line.split()[0]).name: line for line in r.stdout.splitlines() if line.startswith("/")}
    assert " 1 1 ['mm', 'qmmm']" in lines["md-nvt.xml"] and " 1 16 " in lines["pimd.xml"], r.stdout
    assert " 4 1 " in lines["remd.xml"] and " 4 16 " in lines["pimd-remd.xml"], r.stdout
    assert " 4 1 ['mm', 'qmmm', 'qmmm_025', 'qmmm_050', 'qmmm_075']" in lines["hremd.xml"], r.stdout
    assert " 1 16 ['mm_bonded', 'mm_nonbonded', 'qmmm']" in lines["pimd-contracted.xml"], r.stdout


# --------------------------------------------------------------------------- runs


def test_pimd_runs_and_restarts(procs, tmp_path, small_box, small_model_file):
    """pimd.xml with 4 beads: 3 steps, then i-PI restarted from the checkpoint continues the step counter
    and appends to the outputs."""
    run_dir(tmp_path, small_box, small_model_file)
    xml, sockets = derive("pimd.xml", procs, steps=3, nbeads=4)
    run(procs, xml, sockets)
    out = tmp_path / "simulation.out"
    assert steps_of(out) == [0, 1, 2, 3]
    props = read_ipi_properties(out)
    assert np.all(np.isfinite(props["conserved"])) and props["spring"][-1] > props["spring"][0]  # beads spread
    dipole = (tmp_path / "simulation.dipole").read_text()
    assert len(re.findall(r"#EXTRAS_COMPONENT_RAW\(dipole\)# Step:\s+\d+", dipole)) == 4
    rows = dipole.split("#EXTRAS_COMPONENT_RAW(dipole)#")[1].strip().splitlines()[1:]
    assert np.loadtxt(rows).shape == (4, 3)  # one QM dipole per bead
    assert len(list(tmp_path.glob("simulation.pos_*.extxyz"))) == 4
    first_xc = (tmp_path / "simulation.xc.extxyz").read_text().count("Lattice=")
    assert first_xc == 4

    # i-PI's final RESTART and the template's checkpoint (stride 1 here) both hold step 3; restart from the latter
    assert re.search(r"<step>\s*3\s*</step>", (tmp_path / "RESTART").read_text())
    restart = (tmp_path / "simulation.chk").read_text()
    assert re.search(r"<step>\s*3\s*</step>", restart), restart[:2000]
    restart = re.sub(r"<total_steps>\s*\d+\s*</total_steps>", "<total_steps>6</total_steps>", restart)
    run(procs, restart, sockets, name="restart.xml")
    assert steps_of(out) == [0, 1, 2, 3, 4, 5, 6]  # continued and appended, no second header
    assert (tmp_path / "simulation.xc.extxyz").read_text().count("Lattice=") == 7
    backups = [p.name for p in tmp_path.glob("#simulation*") if not p.name.startswith("#simulation.chk")]
    assert not backups  # properties and trajectories were appended to, not backed up and restarted
    t = read_ipi_properties(out)["time"]
    assert np.allclose(np.diff(t), t[1] - t[0])  # the time runs on without a jump


def test_contracted_pimd_evaluates_the_nonbonded_terms_on_fewer_beads(procs, tmp_path, small_box, small_model_file):
    """pimd-contracted.xml with 4 beads and the MM nonbonded terms on 2: the bonded worker serves every bead,
    the nonbonded one half of them; the three potential components are there."""
    from conftest import served_counts

    run_dir(tmp_path, small_box, small_model_file)
    xml, sockets = derive("pimd-contracted.xml", procs, steps=3, nbeads=4)
    xml = xml.replace('nbeads="4" forcefield="mm_nonbonded"', 'nbeads="2" forcefield="mm_nonbonded"') \
             .replace('forcefield="mm_nonbonded" nbeads="4"', 'forcefield="mm_nonbonded" nbeads="2"')
    assert 'nbeads="2"' in xml
    ipi, workers = run(procs, xml, sockets)
    served = {name: served_counts(procs.log(w))[0][0] for name, w in zip(sockets, workers)}
    assert served == {"qmmm": 16, "mm_bonded": 16, "mm_nonbonded": 8}, served
    props = read_ipi_properties(tmp_path / "simulation.out")
    assert all(np.all(np.isfinite(props[f"pot_component_raw({k})"])) for k in range(3))
    assert np.all(props["pot_component_raw(2)"] < 0)  # cohesive nonbonded energy of the water box


def test_remd_attempts_exchanges(procs, tmp_path, small_box, small_model_file):
    """remd.xml with 2 replicas: both run, and i-PI attempts exchanges between them (its log says so)."""
    run_dir(tmp_path, small_box, small_model_file)
    xml, sockets = derive("remd.xml", procs, steps=3, replicas=2, exchange_stride=1, verbosity="high")
    ipi, workers = run(procs, xml, sockets)
    log = procs.log(ipi)
    attempts = re.findall(r"@ PT:\s+(SWAPPING replicas|SWAP REJECTED BETWEEN replicas)\s+1\s+(?:and\s+)?0", log)
    assert len(attempts) >= 1, log[-3000:]
    for k, temperature in ((0, 300.0), (1, 308.0)):
        props = read_ipi_properties(tmp_path / f"replica_{k}_simulation.out")
        assert list(props["step"]) == [0, 1, 2, 3]
        assert props["ensemble_temperature"][0] == pytest.approx(temperature)
    print(f"\nREMD exchange attempts: {len(attempts)} ({sum(a.startswith('SWAPPING') for a in attempts)} accepted)")


@pytest.mark.slow  # about 30 s; plain REMD (test_remd_attempts_exchanges) runs by default
def test_hremd_samples_one_coupling_per_replica(procs, tmp_path, small_box, small_model_file):
    """hremd.xml (4 replicas, 3 steps): each replica feels MM + the model at the coupling its bias weights
    select (checked against the model evaluated independently at every coupling); exchanges are attempted."""
    import torch

    from ipi.utils.units import unit_to_internal

    from qmmm_driver.evaluator import ModelEvaluator
    from qmmm_driver.nn.io import load_model
    from qmmm_driver.structures import QMMMStructure

    run_dir(tmp_path, small_box, small_model_file)
    full = ("<trajectory filename='q' stride='1' format='bin' cell_units='atomic_unit'> positions{atomic_unit} "
            "</trajectory>")
    xml, sockets = derive("hremd.xml", procs, steps=3, exchange_stride=1, verbosity="high", outputs=(full,))
    assert list(sockets) == ["qmmm", "qmmm_075", "qmmm_050", "qmmm_025", "mm"]
    ipi, workers = run(procs, xml, sockets, timeout=150, model_args=("--dtype", "float64"))
    log = procs.log(ipi)
    attempts = re.findall(r"@ PT:\s+(SWAPPING replicas|SWAP REJECTED BETWEEN replicas)", log)
    assert attempts, log[-3000:]

    # the couplings move with the accepted exchanges: remd_idx line "s p0 p1 .." (after step s) gives
    # replica i the weights of coupling p_i from step s + 1 on
    perm = np.tile(np.arange(4), (4, 1))  # [step, replica] -> coupling index
    for line in (tmp_path / "simulation.remd_idx").read_text().split("\n"):
        if line.strip():
            step, *p = (int(v) for v in line.split())
            perm[step + 1:] = p
    active = np.stack([np.argmax(np.loadtxt(tmp_path / f"replica_{k}_simulation.out", ndmin=2)[:, 7:11], axis=1)
                       for k in range(4)], axis=1)
    np.testing.assert_array_equal(active, perm)

    system = QMMMStructure.read(small_box["extxyz"])
    ev = ModelEvaluator(load_model(small_model_file), system, "cpu", torch.float64)
    couplings = (1.0, 0.75, 0.5, 0.25)
    for k in range(4):
        columns = np.loadtxt(tmp_path / f"replica_{k}_simulation.out", ndmin=2)
        bias = unit_to_internal("energy", "electronvolt", columns[:, 6])  # ensemble_bias, in i-PI's own eV
        weights = columns[:, 7:11]  # bweights_component(0-3)
        assert np.all(weights.sum(axis=1) == 1) and weights[0, k] == 1  # replica k starts at the k-th coupling
        frames = read_ipi_bin(tmp_path / f"replica_{k}_simulation.q_0.bin")
        q = np.stack([f[1] for f in frames])
        cells = np.stack([f[0].T for f in frames])
        energies = []
        for c in couplings:
            energies.append(ev.compute(q, cells, {"coupling": c}).energy)
        energies = np.stack(energies, axis=1)  # [step, coupling], Hartree
        expected = energies[np.arange(len(q)), np.argmax(weights, axis=1)]
        np.testing.assert_allclose(bias, expected, rtol=1e-8)
        assert np.min(np.abs(np.diff(energies, axis=1))) > 50 * 1e-8 * np.abs(energies).max()  # couplings differ
    print(f"\nHREMD exchange attempts: {len(attempts)} ({sum(a.startswith('SWAPPING') for a in attempts)} accepted)")
    served = {name: procs.log(w) for name, w in zip(sockets, workers)}
    assert all("i-PI sent EXIT" in text for text in served.values()), served
