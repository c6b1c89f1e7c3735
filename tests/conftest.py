"""Shared fixtures: small QM/MM systems (ASE atoms) and an untrained model with a fixed seed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import sysconfig
import time
import uuid
from pathlib import Path

import numpy as np
import pytest
import torch
from ase import Atoms
from ase.build import molecule

from qmmm_driver.ipi.shm import remove_segments

TIP3P = np.array([-0.834, 0.417, 0.417])

# the test models are tiny: one thread is fastest and leaves the other core to i-PI and workers
torch.set_num_threads(1)

# i-pi, mpiexec and qmmm-driver are console scripts installed beside this python
os.environ["PATH"] = sysconfig.get_path("scripts") + os.pathsep + os.environ.get("PATH", "")

REPO = Path(__file__).resolve().parents[1]


def load_example(relative: str):
    """An example script (``relative`` to the repository, e.g. ``examples/sn2/free_energy.py``) as a module."""
    import importlib.util

    path = REPO / relative
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def water_box(n_side: int = 8, spacing: float = 3.25, seed: int = 0, triclinic: bool = False) -> Atoms:
    """A periodic box of n_side**3 randomly oriented waters; the first one is QM."""
    rng = np.random.default_rng(seed)
    w = molecule("H2O")
    w.translate(-w.positions[0])
    atoms = Atoms(cell=np.eye(3) * n_side * spacing, pbc=True)
    grid = np.stack(np.meshgrid(*[np.arange(n_side)] * 3, indexing="ij"), -1).reshape(-1, 3)
    for g in grid:
        m = w.copy()
        m.rotate(rng.uniform(0, 360), rng.normal(size=3))
        m.translate((g + rng.uniform(-0.08, 0.08, 3)) * spacing)
        atoms += m
    if triclinic:  # shear the lattice, moving whole (undistorted) molecules with it
        cell = atoms.cell.array.copy()
        cell[1] += 0.3 * cell[0]
        cell[2] += 0.2 * cell[0] - 0.25 * cell[1]
        frac = atoms.cell.scaled_positions(atoms.positions[::3])
        shift = np.repeat(frac @ cell - atoms.positions[::3], 3, axis=0)
        atoms.set_cell(cell, scale_atoms=False)
        atoms.positions += shift
    return first_water_in_qm(atoms)



def first_water_in_qm(atoms: Atoms) -> Atoms:
    """Waters (O, H, H each) with the first one QM (neutral singlet) and TIP3P charges on the others."""
    n = len(atoms)
    qm = np.zeros(n, dtype=np.int64)
    qm[:3] = 1
    atoms.set_array("qm", qm)
    atoms.set_array("mm_charge", np.where(qm == 1, 0.0, np.tile(TIP3P, n // 3)))
    atoms.info["qm_total_charge"] = 0
    atoms.info["qm_multiplicity"] = 1
    return atoms


def water_cluster(n_mm: int = 30, seed: int = 1) -> Atoms:
    """A QM water surrounded by n_mm MM waters (no cell)."""
    rng = np.random.default_rng(seed)
    atoms = molecule("H2O")
    placed = [atoms.get_center_of_mass()]
    while len(placed) <= n_mm:
        c = rng.normal(size=3) * 4.5
        if min(np.linalg.norm(c - p) for p in placed) < 2.8:
            continue
        m = molecule("H2O")
        m.rotate(rng.uniform(0, 360), rng.normal(size=3))
        m.translate(c - m.get_center_of_mass())
        atoms += m
        placed.append(c)
    return first_water_in_qm(atoms)


ETHANOL_BONDS = [(0, 1), (1, 2), (2, 3), (1, 4), (1, 5), (0, 6), (0, 7), (0, 8)]


def ethanol_cluster(n_mm_waters: int = 12, seed: int = 2) -> Atoms:
    """Ethanol with its CH2OH group QM and its methyl group MM (the C-C bond cut: a link hydrogen), among MM
    waters; the methyl carbon's charge redistributed to its hydrogens (the RC scheme)."""
    from qmmm_driver.boundary import redistribute_charges

    rng = np.random.default_rng(seed)
    atoms = molecule("CH3CH2OH")
    waters = water_cluster(n_mm=n_mm_waters, seed=seed)[3:]
    waters.positions *= 1.25
    waters.translate(rng.normal(size=3) * 0.2)
    far = np.linalg.norm(waters.positions[::3, None] - atoms.positions[None], axis=-1).min(axis=1) > 2.6
    keep = np.repeat(far, 3)
    atoms += waters[keep]
    n = len(atoms)
    qm = np.zeros(n, dtype=np.int64)
    qm[[1, 2, 3, 4, 5]] = 1
    link = np.full(n, -1, dtype=np.int64)
    link[0] = 1
    charges = np.zeros(n)
    charges[[0, 6, 7, 8]] = [0.12, 0.05, 0.03, -0.02]
    charges[9:] = np.tile(TIP3P, (n - 9) // 3)
    atoms.set_array("qm", qm)
    atoms.set_array("qm_link", link)
    atoms.set_array("mm_charge", redistribute_charges(charges, qm.astype(bool), link, ETHANOL_BONDS))
    atoms.info["qm_total_charge"] = 0
    atoms.info["qm_multiplicity"] = 1
    return atoms


def evaluate(model, atoms, dtype=torch.float64, params=None):
    """The model's results (atomic units) for an ASE ``atoms`` with 'qm' and 'mm_charge' arrays."""
    from qmmm_driver import ModelEvaluator, QMMMStructure

    structure = QMMMStructure.from_atoms(atoms)
    return ModelEvaluator(model, structure, dtype=dtype).compute(structure.positions, structure.cell, params)


def fd_force(model, atoms, atom: int, c: int, h: float = 1e-5) -> float:
    """Central finite difference of the energy: force on ``atom`` along ``c`` (Hartree/Bohr, step ``h`` Bohr)."""
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    plus, minus = atoms.copy(), atoms.copy()
    plus.positions[atom, c] += h / ANGSTROM_TO_BOHR
    minus.positions[atom, c] -= h / ANGSTROM_TO_BOHR
    return -(evaluate(model, plus).energy[0] - evaluate(model, minus).energy[0]) / (2 * h)


def tiny_model(elements=("H", "O"), env_order: int = 3, seed: int = 0, **kw):
    """An untrained model with fixed weights and mild, non-trivial statistics."""
    from ase.data import atomic_masses, atomic_numbers

    from qmmm_driver.nn import ModelSettings, QMMMModel

    torch.manual_seed(seed)
    kw.setdefault("polarizability", env_order >= 1)
    kw = {"channels": 8, "n_layers": 2, "radial_hidden": 8, "readout_hidden": 8, **kw}
    settings = ModelSettings(elements=list(elements), masses=[float(atomic_masses[atomic_numbers[e]]) for e in elements],
                             env_order=env_order, **kw)
    model = QMMMModel(settings)
    with torch.no_grad():
        model.energy_scale.fill_(0.01)
        model.avg_neighbors.fill_(2.0)
        model.short_neighbors.fill_(5.0)
        model.polarizability_scale.fill_(3.0)
        model.env_scale.copy_(torch.tensor([0.1, 0.03, 0.01, 0.005])[: env_order + 1])
        model.energy_shift.copy_(torch.linspace(-0.5, -75.0, len(elements), dtype=torch.float64))
        for p in model.parameters():  # weights large enough that every term matters
            p.mul_(1.5)
    return model


@pytest.fixture
def box_atoms():
    return water_box()


@pytest.fixture
def cluster_atoms():
    return water_cluster()


@pytest.fixture(scope="session")
def tiny_model_file(tmp_path_factory):
    from qmmm_driver.nn.io import save_model

    path = tmp_path_factory.mktemp("model") / "tiny.pt"
    save_model(tiny_model(), path, metadata={"note": "untrained test model"})
    return path


# --------------------------------------------------------------------------- i-PI + worker processes
# Used by tests/test_ipi_driver.py and tests/test_worker_errors.py: a real `i-pi`
# server and real `qmmm-driver run` workers as subprocesses, each in its own
# session so that everything (including mpiexec's children) is killed at teardown.

IPI_PREFIX = "/tmp/ipi_"
WORKER_CMD = [sys.executable, "-m", "qmmm_driver.cli", "run"]


def write_frame(atoms, path, box: float | None = None):
    """Write ``atoms`` as extended XYZ; a cluster gets a ``box`` cell (pbc stays off) that i-PI needs."""
    import ase.io

    atoms = atoms.copy()
    if box is not None and not atoms.pbc.any():
        atoms.set_cell(np.eye(3) * box)
        atoms.pbc = False
    ase.io.write(path, atoms, format="extxyz")
    return Path(path)


def read_ipi_bin(path):
    """Frames ``(h[3,3], q[nat,3], title)`` of an i-PI trajectory written with format='bin' (the one lossless
    trajectory format; i-PI 3.3.1's own binary reader fails on its files, so it is read here)."""
    data = Path(path).read_bytes()
    frames, off = [], 0
    cell_tag, close = "cell{".encode("utf-32-le"), "}".encode("utf-32-le")
    while off < len(data):
        h = np.frombuffer(data, np.float64, 9, off).reshape(3, 3).copy()
        off += 72
        nat = int(np.frombuffer(data, np.int64, 1, off)[0])
        off += 8
        q = np.frombuffer(data, np.float64, 3 * nat, off).reshape(nat, 3).copy()
        off += 24 * nat
        nchar = int(np.frombuffer(data, np.int64, 1, off)[0])
        off += 8 + 4 * nchar  # atom names, UCS-4
        # the title (UCS-4) reads "Step: ... Bead: ... positions{unit}  cell{unit}"
        end = data.index(close, data.index(cell_tag, off)) + 4
        frames.append((h, q, data[off:end].decode("utf-32-le")))
        off = end
    return frames


def read_ipi_properties(path):
    """Columns of an i-PI properties file as a dict name -> array (i-PI's own reader)."""
    from ipi.scripting import read_output

    values, _ = read_output(str(path))
    return {name: np.atleast_1d(v) for name, v in values.items()}


def ipi_input(address: str, init_file: str, steps: int, *, dt_fs: float = 0.5, nbeads: int = 1,
              temperature: float = 300.0, seed: int = 12345, parameters: str = "", batch_size: int = 1,
              trajectories: bool = True, extra_forcefields: str = "", extra_forces: str = "", fixcom: bool = True,
              pbc: str = "false", mode: str = "unix",
              properties: str = "step, time{picosecond}, conserved{atomic_unit}, potential{atomic_unit}") -> str:
    """An NVE (or NVE-PIMD) i-PI input with a unix (or ``mode='shm'``) ffsocket named ``address``."""
    traj = ""
    if trajectories:
        traj = ("<trajectory filename='pos' stride='1' format='bin' cell_units='atomic_unit'> positions{atomic_unit} </trajectory>\n"
                "<trajectory filename='frc' stride='1' format='bin' cell_units='atomic_unit'> forces{atomic_unit} </trajectory>\n"
                "<trajectory filename='xtr' stride='1'> extras </trajectory>")
    pars = f"<parameters>{parameters}</parameters>" if parameters else ""
    batch = f"<batch_size>{batch_size}</batch_size>" if batch_size > 1 else ""
    return f"""<simulation verbosity='low' safe_stride='100000' floatformat='%.16e' sockets_prefix='{IPI_PREFIX}'>
  <output prefix='sim'>
    <properties stride='1' filename='out'> [ {properties} ] </properties>
    {traj}
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>{seed}</seed></prng>
  <ffsocket name='qmmm' mode='{mode}' pbc='{pbc}'>
    <address>{address}</address> {pars} {batch}
  </ffsocket>
  {extra_forcefields}
  <system>
    <initialize nbeads='{nbeads}'>
      <file mode='ase'> {init_file} </file>
      <velocities mode='thermal' units='kelvin'> {temperature} </velocities>
    </initialize>
    <forces><force forcefield='qmmm'/>{extra_forces}</forces>
    <motion mode='dynamics'>
      <fixcom> {fixcom} </fixcom>
      <dynamics mode='nve'><timestep units='femtosecond'> {dt_fs} </timestep></dynamics>
    </motion>
    <ensemble><temperature units='kelvin'> {temperature} </temperature></ensemble>
  </system>
</simulation>
"""


class Procs:
    """Starts i-PI and workers under ``tmp_path`` and guarantees their cleanup."""

    def __init__(self, tmp_path: Path):
        self.dir = Path(tmp_path)
        self.procs: list[subprocess.Popen] = []
        self.logs: dict[int, Path] = {}
        self.sockets: list[Path] = []

    def socket_name(self) -> str:
        name = f"qmt_{uuid.uuid4().hex[:12]}"
        self.sockets.append(Path(IPI_PREFIX + name))
        return name

    def _start(self, cmd, log: str, env=None):
        path = self.dir / log
        full_env = dict(os.environ)
        full_env["OMP_NUM_THREADS"] = "1"  # 2 shared cores: one thread per worker avoids oversubscription
        full_env.update(env or {})
        with open(path, "wb") as out:
            p = subprocess.Popen(cmd, cwd=self.dir, stdout=out, stderr=subprocess.STDOUT, env=full_env,
                                 start_new_session=True)
        self.procs.append(p)
        self.logs[p.pid] = path
        return p

    def start_ipi(self, xml: str, name: str = "input.xml"):
        (self.dir / name).write_text(xml)
        return self._start(["i-pi", name], f"ipi_{name}.log")

    def start_worker(self, args, log: str = "worker.log", mpi: int | None = None, env=None):
        cmd = WORKER_CMD + [str(a) for a in args]
        if mpi:
            cmd = ["mpiexec", "-n", str(mpi)] + cmd
        return self._start(cmd, log, env)

    def log(self, p) -> str:
        return self.logs[p.pid].read_text(errors="replace")

    def wait_for(self, predicate, what: str, timeout: float = 60.0, procs=()):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            for p in procs:
                if p.poll() is not None:
                    raise AssertionError(f"process {p.args} exited ({p.returncode}) while waiting for {what}:\n"
                                         + self.log(p)[-3000:])
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_log(self, p, pattern: str, count: int = 1, timeout: float = 60.0):
        self.wait_for(lambda: len(re.findall(pattern, self.log(p))) >= count, f"{count} x '{pattern}' in the log of {p.args}",
                      timeout, procs=[p])

    def wait_socket(self, name: str, ipi, timeout: float = 60.0):
        self.wait_for(lambda: os.path.exists(IPI_PREFIX + name), f"i-PI socket {IPI_PREFIX + name}", timeout, procs=[ipi])

    def finish(self, p, timeout: float = 90.0) -> int:
        try:
            return p.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill(p)
            raise AssertionError(f"{p.args} did not finish within {timeout} s:\n" + self.log(p)[-3000:])

    def kill(self, p, sig=signal.SIGKILL):
        if p.poll() is None:
            try:
                os.killpg(p.pid, sig)  # the session started for this process only
            except ProcessLookupError:
                pass
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def cleanup(self):
        for p in self.procs:
            self.kill(p)
            try:  # leftovers of the session we started (e.g. ranks of an mpiexec that is gone)
                os.killpg(p.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            remove_segments(p.pid)  # an i-PI killed here leaves its shared memory
        for s in self.sockets:
            try:
                s.unlink()
            except FileNotFoundError:
                pass


@pytest.fixture
def procs(tmp_path):
    harness = Procs(tmp_path)
    try:
        yield harness
    finally:
        harness.cleanup()


CLUSTER_BOX = 60.0  # Angstrom: i-PI needs a cell even for a cluster (pbc stays off)


def start_workers_then_ipi(procs: Procs, worker_args, xml: str, n_workers: int = 1, mpi: int | None = None):
    """Start the worker(s) first, wait until each is about to connect, then start i-PI.

    Workers retry until the socket appears, so all of them are queued on it when
    i-PI begins to hand out requests.
    """
    workers = []
    if mpi:
        workers.append(procs.start_worker(worker_args, log="mpi_workers.log", mpi=mpi))
        procs.wait_log(workers[0], r"socket unix:", count=mpi, timeout=90)
    else:
        for k in range(n_workers):
            workers.append(procs.start_worker(worker_args, log=f"worker{k}.log"))
        for w in workers:
            procs.wait_log(w, r"socket unix:", timeout=90)
    ipi = procs.start_ipi(xml)
    return ipi, workers


def finish_run(procs: Procs, ipi, workers, timeout: float = 120.0):
    for w in workers:
        rc = procs.finish(w, timeout)
        assert rc == 0, f"worker exited with {rc}:\n{procs.log(w)}\n--- i-PI:\n{procs.log(ipi)[-3000:]}"
    rc = procs.finish(ipi, 60)
    assert rc == 0, procs.log(ipi)[-3000:]


def served_counts(log: str) -> list[tuple[int, int]]:
    """(structures, requests) from every worker exit line in ``log``."""
    return [(int(a), int(b)) for a, b in re.findall(r"served (\d+) structures in (\d+) requests", log)]


# --------------------------------------------------------------------------- MM worker (OpenMM) and small periodic boxes
# Used by tests/test_mm_worker.py and tests/test_dynamics.py: `qmmm-driver mm` workers beside the
# model workers, on a small periodic water box that a tiny model with a short embedding cutoff fits.

MM_CMD = [sys.executable, "-m", "qmmm_driver.cli", "mm"]
SMALL_BOX_A = 15.0                       # cubic box edge (A): about 100 waters
SMALL_R_ON_A, SMALL_R_OFF_A = 5.0, 6.5   # embedding switch of the small-box model (cell > 2 r_off)
SMALL_MM_ARGS = ["--forcefield", "amber14/tip3p.xml", "--cutoff", "7.0", "--switch-distance", "6.0"]


def start_mm_worker(procs: Procs, args, log: str = "mm_worker.log"):
    """Start ``qmmm-driver mm`` under ``procs`` (same cleanup as the model workers)."""
    return procs._start(MM_CMD + [str(a) for a in args], log)


def sn2_solute():
    """The SN2 example's solute (Cl- + CH3Cl, examples/sn2/solute.py)."""
    sys.path.insert(0, str(REPO / "examples" / "sn2"))
    import solute

    return solute.solute()


def serine_peptide():
    """The serine example's capped dipeptide ACE-SER-NME (examples/serine/peptide.py): (modeller, QM indices)."""
    sys.path.insert(0, str(REPO / "examples" / "serine"))
    import peptide

    modeller = peptide.peptide()
    return modeller, peptide.qm_indices(modeller.topology), peptide.FORCEFIELD


def minimized_setup(box_A: float = SMALL_BOX_A, seed: int = 0, cutoff_nm: float = 0.7, solute=None):
    """A QM solute (default: a water) in a box of water (qmmm_driver.mm.systems) with its solvent overlaps removed
    (``MMSetup.relaxed``: OpenMM minimisation, the QM atoms held fixed)."""
    from qmmm_driver.mm.systems import build_setup, water_solute

    return build_setup(solute or water_solute(), box_A=box_A, seed=seed).relaxed(cutoff_A=cutoff_nm * 10.0)


@pytest.fixture(scope="session")
def small_box(tmp_path_factory):
    """A minimised periodic water box: ``{'dir', 'pdb', 'extxyz', 'setup'}`` (files system.pdb, system.extxyz)."""
    directory = tmp_path_factory.mktemp("small_box")
    setup = minimized_setup()
    files = setup.write(directory)
    return {"dir": directory, "pdb": files["pdb"], "extxyz": files["extxyz"], "setup": setup}


@pytest.fixture(scope="session")
def small_model_file(tmp_path_factory):
    """A tiny model whose embedding cutoff fits the small box."""
    from qmmm_driver.nn.io import save_model
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    path = tmp_path_factory.mktemp("model") / "small.pt"
    model = tiny_model(mm_switch_on=SMALL_R_ON_A * ANGSTROM_TO_BOHR, mm_switch_off=SMALL_R_OFF_A * ANGSTROM_TO_BOHR)
    save_model(model, path, metadata={"note": "untrained test model, short embedding cutoff"})
    return path
