"""``qmmm-driver launch``: i-PI plus its workers in one command, with progress and clean shutdown.

``qmmm-driver launch [INPUT.xml] [--example DIR] [--workers N]`` copies the i-PI
input into a run directory with the example's files (``model.pt``,
``system.extxyz``, ``system.pdb``), gives every ``<ffsocket>`` a unique unix
socket, starts i-PI there, then the workers of each forcefield: sockets whose
name starts with ``mm`` get an OpenMM worker (``qmmm-driver mm``), all others
model workers (``qmmm-driver run``; ``mpirun -n N`` when N > 1 and MPI is
there). A progress bar follows the step count in i-PI's properties output.
Ctrl-C, the end of i-PI, or a worker that dies stop everything: i-PI is asked
to exit softly (it writes its checkpoint ``RESTART`` and flushes its outputs),
workers are stopped, socket files removed. ``--restart`` continues a run
directory from its checkpoint.

An example directory holds ``example.toml``::

    model = "model.pt"
    system = "system.extxyz"
    pdb = "system.pdb"
    forcefield = ["amber14/tip3p.xml"]   # OpenMM names, files of the example, or of qmmm_driver/data
    mm_options = []                      # extra options of `qmmm-driver mm` (e.g. ["--cutoff", "8"])
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from .errors import InputError, read_toml

REPO = Path(__file__).resolve().parents[1]
DEFAULT_INPUT = REPO / "inputs" / "pimd.xml"
DEFAULT_EXAMPLE = REPO / "examples" / "water"
SOCKET_PREFIX = "/tmp/ipi_"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", type=Path, default=None,
                        help=f"i-PI input XML (default: {DEFAULT_INPUT.relative_to(REPO)})")
    parser.add_argument("--example", type=Path, default=None,
                        help=f"example directory with example.toml (default: {DEFAULT_EXAMPLE.relative_to(REPO)})")
    parser.add_argument("--workers", type=int, default=1, help="model workers per model forcefield (default 1)")
    parser.add_argument("--mm-workers", type=int, default=1, help="OpenMM workers per MM forcefield (default 1)")
    parser.add_argument("--run-dir", type=Path, default=None, help="run directory (default runs/INPUT-EXAMPLE)")
    parser.add_argument("--restart", action="store_true", help="continue the run directory from its RESTART file")
    parser.add_argument("--device", default="auto", help="device of the model workers (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")


@dataclass
class Example:
    """Files of an example directory (absolute paths)."""

    root: Path
    model: Path
    system: Path
    pdb: Path
    forcefield: list[str] = field(default_factory=list)
    mm_options: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, root: Path) -> "Example":
        spec = root / "example.toml"
        data = read_toml(spec, f"{root} is not an example directory: it has no example.toml")
        paths = {}
        for key in ("model", "system", "pdb"):
            path = root / data.get(key, {"model": "model.pt", "system": "system.extxyz", "pdb": "system.pdb"}[key])
            if not path.is_file():
                raise InputError(f"{spec}: {key} file {path} does not exist")
            paths[key] = path.resolve()
        forcefield = [resolve_forcefield(name, root) for name in data.get("forcefield", ["amber14/tip3p.xml"])]
        mm_options = [str(x) for x in data.get("mm_options", [])]
        return cls(root=root.resolve(), forcefield=forcefield, mm_options=mm_options, **paths)


def resolve_forcefield(name: str, root: Path) -> str:
    """An OpenMM force-field file: in the example directory, in qmmm_driver/data, or OpenMM's own name."""
    for base in (root, Path(__file__).parent / "data"):
        if (base / name).is_file():
            return str((base / name).resolve())
    return name


@dataclass
class Socket:
    name: str
    address: str

    @property
    def is_mm(self) -> bool:
        return self.name.lower().startswith("mm")

    @property
    def path(self) -> Path:
        return Path(SOCKET_PREFIX + self.address)


def prepare_input(source: Path, target: Path, tag: str) -> tuple[list[Socket], dict]:
    """Copy an i-PI input (or RESTART) to ``target`` with a unique unix socket per ffsocket.

    Returns the sockets and what the progress bar needs (total steps, properties files).
    """
    try:
        tree = ET.parse(source)
    except (ET.ParseError, OSError) as err:
        raise InputError(f"cannot read the i-PI input {source}: {err}") from err
    root = tree.getroot()
    sockets = []
    for ff in root.iter("ffsocket"):
        name = ff.get("name", "")
        if ff.get("mode", "inet") not in ("unix", "inet"):
            raise InputError(f"{source}: ffsocket '{name}' has mode {ff.get('mode')}; the launcher uses unix sockets")
        ff.set("mode", "unix")
        address = ff.find("address")
        if address is None:
            address = ET.SubElement(ff, "address")
        address.text = f" qd{tag}-{name} "
        sockets.append(Socket(name=name, address=address.text.strip()))
    if not sockets:
        raise InputError(f"{source} has no <ffsocket>: nothing for qmmm-driver to serve")
    steps = root.findtext("total_steps")
    output = root.find("output")
    prefix = output.get("prefix", "simulation") if output is not None else "simulation"
    props = [p.get("filename", "properties") for p in (output.iter("properties") if output is not None else [])]
    tree.write(target)
    return sockets, {"total_steps": int(steps) if steps else None, "properties": [f"{prefix}.{p}" for p in props]}


def last_step(run_dir: Path, files: list[str]) -> int | None:
    """Largest step written so far to i-PI's properties files (REMD replica files included)."""
    best = None
    for base in files:
        for path in run_dir.glob(f"*{base}*"):
            column = None
            last = None
            try:
                with open(path, "rb") as fh:
                    for raw in fh:
                        line = raw.decode(errors="replace")
                        m = re.match(r"#\s*column\s+(\d+)\s+-->\s+step\b", line)
                        if m:
                            column = int(m.group(1)) - 1
                        elif line.strip() and not line.startswith("#"):
                            last = line
            except OSError:
                continue
            if column is not None and last is not None:
                try:
                    step = int(float(last.split()[column]))
                except (ValueError, IndexError):
                    continue
                best = step if best is None else max(best, step)
    return best


class Run:
    """The processes of one launched run."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.ipi: subprocess.Popen | None = None
        self.workers: list[tuple[str, subprocess.Popen]] = []
        self.sockets: list[Socket] = []
        self.logs: list = []

    def _log(self, name: str):
        fh = open(self.run_dir / f"{name}.log", "ab")
        self.logs.append(fh)
        return fh

    def start_ipi(self, input_name: str) -> None:
        exe = shutil.which("i-pi")
        if exe is None:
            raise InputError("the i-pi command is not on PATH (pip install ipi)")
        log = self._log("ipi")
        self.ipi = subprocess.Popen([exe, input_name], cwd=self.run_dir, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)

    def wait_for_sockets(self, timeout: float = 120.0) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if all(s.path.exists() for s in self.sockets):
                return
            if self.ipi.poll() is not None:
                raise RuntimeError(f"i-PI stopped before opening its sockets (exit {self.ipi.returncode}); "
                                   f"see {self.run_dir / 'ipi.log'}")
            time.sleep(0.2)
        raise RuntimeError(f"i-PI opened no socket within {timeout:.0f} s; see {self.run_dir / 'ipi.log'}")

    def start_worker(self, label: str, cmd: list[str], env: dict | None = None) -> None:
        log = self._log(label)
        proc = subprocess.Popen(cmd, cwd=self.run_dir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        self.workers.append((label, proc))

    def dead_worker(self) -> tuple[str, int] | None:
        for label, proc in self.workers:
            code = proc.poll()
            if code is not None and code != 0:
                return label, code
        return None

    def stop(self, grace: float = 60.0) -> None:
        """Ask i-PI to exit softly (checkpoint, flushed outputs), then stop workers; remove sockets."""
        if self.ipi is not None and self.ipi.poll() is None:
            os.killpg(self.ipi.pid, signal.SIGTERM)
            try:
                self.ipi.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                os.killpg(self.ipi.pid, signal.SIGKILL)
                self.ipi.wait()
        for _, proc in self.workers:
            if proc.poll() is None:
                try:
                    proc.wait(timeout=10)  # i-PI's EXIT (or its closed socket) ends them
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGTERM)
                    try:
                        proc.wait(timeout=10)
                    except subprocess.TimeoutExpired:
                        os.killpg(proc.pid, signal.SIGKILL)
                        proc.wait()
        for s in self.sockets:
            s.path.unlink(missing_ok=True)
        for fh in self.logs:
            fh.close()


def worker_commands(sock: Socket, example: Example, args) -> list[tuple[str, list[str], dict | None]]:
    """Commands (label, argv, env) that serve ``sock``."""
    base = [sys.executable, "-m", "qmmm_driver.cli"]
    if sock.is_mm:
        cmd = base + ["mm", "--pdb", str(example.pdb), "--system", str(example.system), "--unix", sock.address,
                      *example.mm_options, "--forcefield", *example.forcefield]
        return [(f"{sock.name}-mm{k}", cmd, None) for k in range(args.mm_workers)]
    cmd = ["run", "--model", str(example.model), "--system", str(example.system), "--unix", sock.address,
           "--device", args.device, "--dtype", args.dtype]
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if args.workers > 1 and mpirun:
        return [(f"{sock.name}-mpi", [mpirun, "-n", str(args.workers)] + base + cmd, None)]
    return [(f"{sock.name}-w{k}", base + cmd, None) for k in range(args.workers)]


def main(args: argparse.Namespace) -> int:
    source = args.input or DEFAULT_INPUT
    example_dir = args.example or DEFAULT_EXAMPLE
    if not source.is_file():
        raise InputError(f"i-PI input {source} does not exist")
    if not example_dir.is_dir():
        raise InputError(f"example directory {example_dir} does not exist")
    example = Example.read(example_dir)
    run_dir = args.run_dir or Path("runs") / f"{source.stem}-{example.root.name}"
    tag = uuid.uuid4().hex[:8]
    if args.restart:
        checkpoint = run_dir / "RESTART"
        if not checkpoint.is_file():
            raise InputError(f"--restart: {checkpoint} does not exist (no checkpoint written yet)")
        source = checkpoint
        input_name = "restart-input.xml"
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            raise InputError(f"run directory {run_dir} is not empty: use --restart to continue it, or --run-dir")
        input_name = "input.xml"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("model.pt", example.model), ("system.extxyz", example.system), ("system.pdb", example.pdb)):
        link = run_dir / name
        if not link.exists():
            link.symlink_to(path)
    sockets, info = prepare_input(source, run_dir / input_name, tag)
    run = Run(run_dir)
    run.sockets = sockets
    code = 1
    try:
        run.start_ipi(input_name)
        run.wait_for_sockets()
        for sock in sockets:
            for label, cmd, env in worker_commands(sock, example, args):
                run.start_worker(label, cmd, env)
        print(f"qmmm-driver launch: running {source.name} on {example.root.name} in {run_dir} "
              f"(i-PI + {len(run.workers)} worker processes; logs there)", file=sys.stderr)
        code = follow(run, info, progress=not args.no_progress)
    except KeyboardInterrupt:
        print("\nqmmm-driver launch: interrupted; stopping i-PI (it writes RESTART) and the workers",
              file=sys.stderr)
        code = 130
    except RuntimeError as err:
        print(f"qmmm-driver launch: error: {err}", file=sys.stderr)
        code = 1
    finally:
        run.stop()
    if code not in (0, 130):
        print(f"qmmm-driver launch: outputs so far are in {run_dir}; continue with --restart "
              f"--run-dir {run_dir}", file=sys.stderr)
    return code


def follow(run: Run, info: dict, progress: bool) -> int:
    """Show progress until i-PI ends (0) or a worker dies (1)."""
    from tqdm import tqdm

    total = info["total_steps"]
    bar = tqdm(total=total, unit="step", desc="i-PI", disable=not progress, dynamic_ncols=True)
    done = 0
    last_log = time.time()
    while True:
        if run.ipi.poll() is not None:
            bar.close()
            if run.ipi.returncode != 0:
                print(f"qmmm-driver launch: i-PI exited with code {run.ipi.returncode}; see "
                      f"{run.run_dir / 'ipi.log'}", file=sys.stderr)
                return 1
            return 0
        dead = run.dead_worker()
        if dead:
            bar.close()
            label, code = dead
            print(f"qmmm-driver launch: worker {label} exited with code {code} (see {run.run_dir / label}.log); "
                  "stopping the run", file=sys.stderr)
            return 1
        step = last_step(run.run_dir, info["properties"])
        if step is not None and step + 1 > done:
            bar.update(step + 1 - done)
            done = step + 1
        if not progress and time.time() - last_log > 30:
            print(f"qmmm-driver launch: step {done}/{total}", file=sys.stderr)
            last_log = time.time()
        time.sleep(0.5)
