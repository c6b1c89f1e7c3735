"""i-PI plus its workers as one run: input preparation, processes, progress, faults and restarts.

A run directory holds the i-PI input (``input.xml``, or ``restart-input.xml``
made from a checkpoint), links to the example's model and system files, i-PI's
outputs and one log per process. :func:`launch` starts i-PI there, then the
workers of each ``<ffsocket>`` (sockets whose name starts with ``mm`` get an
OpenMM worker, all others model workers; ``mpirun -n N`` when N > 1 and MPI is
present), follows the step count with a progress bar and stops everything
cleanly:

- at the end of the run, on Ctrl-C, SIGTERM or SIGHUP (what a batch scheduler
  sends at the wall-time limit, what a closed terminal sends): i-PI exits softly
  (it writes ``RESTART`` and flushes its outputs), the workers get EXIT;
- when a worker or i-PI dies, or when the run stops advancing for
  ``stall_timeout`` seconds (a worker killed in a way i-PI does not notice):
  i-PI is asked to exit softly, then everything is stopped.

Nothing is left behind: no process (each runs in its own session and is killed
with it; if the launcher itself is killed, its watchdog, :mod:`.reaper`, stops
the run in the same order), no socket file. A restart continues from the newest checkpoint
(``RESTART`` or i-PI's periodic ``<checkpoint>``), after cutting the outputs
back to that checkpoint's step, so that no step is missing or written twice.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .errors import InputError, read_toml
from .ipi.outputs import OutputSpec, checkpoint_step, last_step, output_specs, truncate_after
from .reaper import Watchdog, stop
from .signals import describe, exit_status

SOCKET_PREFIX = "/tmp/ipi_"
PACKAGE = resources.files("qmmm_driver")
#: the i-PI templates and shipped models, inside the installed package
TEMPLATES = Path(str(PACKAGE / "inputs"))
MODELS = Path(str(PACKAGE / "models"))


@dataclass
class Example:
    """Files of an example (absolute paths): a shipped model name or a directory with ``example.toml``."""

    root: Path
    model: Path
    system: Path
    pdb: Path
    forcefield: list[str] = field(default_factory=list)
    mm_options: list[str] = field(default_factory=list)

    @classmethod
    def find(cls, name_or_dir: str | Path) -> "Example":
        path = Path(name_or_dir)
        if not path.is_dir() and (MODELS / str(name_or_dir)).is_dir():
            path = MODELS / str(name_or_dir)
        if not path.is_dir():
            shipped = ", ".join(sorted(p.name for p in MODELS.iterdir() if p.is_dir()))
            raise InputError(f"example {name_or_dir} is neither a directory nor a shipped model ({shipped})")
        return cls.read(path)

    @classmethod
    def read(cls, root: Path) -> "Example":
        spec = root / "example.toml"
        data = read_toml(spec, f"{root} is not an example directory: it has no example.toml")
        paths = {}
        for key, default in (("model", "model.pt"), ("system", "system.extxyz"), ("pdb", "system.pdb")):
            path = root / data.get(key, default)
            if not path.is_file():
                raise InputError(f"{spec}: {key} file {path} does not exist")
            paths[key] = path.resolve()
        forcefield = [resolve_forcefield(name, root) for name in data.get("forcefield", ["amber14/tip3p.xml"])]
        return cls(root=root.resolve(), forcefield=forcefield, mm_options=[str(x) for x in data.get("mm_options", [])],
                   **paths)


def resolve_forcefield(name: str, root: Path) -> str:
    """An OpenMM force-field file: in the example directory, in qmmm_driver/data, or OpenMM's own name."""
    for base in (root, Path(str(PACKAGE / "data"))):
        if (base / name).is_file():
            return str((base / name).resolve())
    return name


def resolve_input(name: str | Path) -> Path:
    """An i-PI input: a file, or the name of a shipped template (``pimd``, ``remd.xml``, ...)."""
    path = Path(name)
    if path.is_file():
        return path
    for candidate in (TEMPLATES / path.name, TEMPLATES / f"{path.name}.xml"):
        if candidate.is_file():
            return candidate
    shipped = ", ".join(sorted(p.stem for p in TEMPLATES.glob("*.xml")))
    raise InputError(f"i-PI input {name} does not exist (shipped templates: {shipped})")


@dataclass
class Socket:
    name: str
    address: str
    shm: bool = False  # i-PI's mode="shm": positions and forces through shared memory

    @property
    def is_mm(self) -> bool:
        return self.name.lower().startswith("mm")

    @property
    def path(self) -> Path:
        return Path(SOCKET_PREFIX + self.address)


@dataclass
class Prepared:
    """What the launcher needs to know of a prepared input."""

    sockets: list[Socket]
    total_steps: int | None
    outputs: list[OutputSpec]
    batch: dict[str, int]


def structures_per_step(root: ET.Element) -> tuple[int, int]:
    """(beads per system, number of systems) of an i-PI input."""
    nbeads = 1
    for init in root.iter("initialize"):
        nbeads = max(nbeads, int(init.get("nbeads", "1")))
    n_systems = len(root.findall("system"))
    for template in root.iter("system_template"):
        n_systems += max(len(template.findall("instance")), 1)
    return nbeads, max(n_systems, 1)


#: i-PI's polling interval (s) on batched model sockets (see prepare_input)
BATCH_LATENCY_S = 0.002


def auto_batch(nbeads: int, n_systems: int, workers: int) -> int:
    """Batch size for a model socket: the largest divisor of ``nbeads`` not above the structures per worker,
    so that a step's structures fill whole batches and every worker gets work."""
    share = -(-nbeads * n_systems // max(workers, 1))
    return max(d for d in range(1, nbeads + 1) if nbeads % d == 0 and d <= share)


def prepare_input(source: Path, target: Path, tag: str, workers: int, batch: bool = True,
                  total_steps: int | None = None) -> Prepared:
    """Copy an i-PI input (or checkpoint) to ``target`` with a unique unix socket per ffsocket.

    Model sockets without a ``<batch_size>`` get one (:func:`auto_batch`) when
    ``batch``, and a polling interval of ``BATCH_LATENCY_S`` unless they set
    ``<latency>``. Batching needs i-PI's consolidated messages, whose polling thread
    dies when a worker's connection is reset (the run then stalls, and
    :func:`follow` stops it); every socket that is not batched gets
    ``<consolidate_messages>false``, which keeps i-PI's polling alive.
    """
    try:
        tree = ET.parse(source)
    except (ET.ParseError, OSError) as err:
        raise InputError(f"cannot read the i-PI input {source}: {err}") from err
    root = tree.getroot()
    nbeads, n_systems = structures_per_step(root)
    sockets, batches = [], {}
    for ff in root.iter("ffsocket"):
        name = ff.get("name", "")
        if ff.get("mode", "inet") not in ("unix", "inet", "shm"):
            raise InputError(f"{source}: ffsocket '{name}' has mode {ff.get('mode')}; the launcher uses unix sockets "
                             "(or shm)")
        asked_shm = ff.get("mode") == "shm"
        ff.set("mode", "unix")
        address = ff.find("address")
        if address is None:
            address = ET.SubElement(ff, "address")
        address.text = f" qd{tag}-{name} "
        sockets.append(Socket(name=name, address=address.text.strip()))
        size = ff.find("batch_size")
        if size is None and batch and not sockets[-1].is_mm and nbeads * n_systems > 1:
            size = ET.SubElement(ff, "batch_size")
            size.text = f" {auto_batch(nbeads, n_systems, workers)} "
        batched = size is not None and int(size.text) > 1
        consolidate = ff.find("consolidate_messages")
        if consolidate is None:
            consolidate = ET.SubElement(ff, "consolidate_messages")
            consolidate.text = " false "
        if batched or asked_shm:
            # a batch of positions is hundreds of kB: through the socket, i-PI drops a worker that takes more than
            # 0.1 s to read it (a loaded machine); in shared memory only a short message crosses the socket
            ff.set("mode", "shm")
            sockets[-1] = Socket(name=name, address=sockets[-1].address, shm=True)
        if batched:  # i-PI batches only with consolidated messages; the launcher's stall watch covers it
            consolidate.text = " true "
            if ff.find("latency") is None:
                # i-PI's polling thread sends whatever beads are queued when it wakes (every 0.1 ms by default),
                # padding the rest of the batch; waking every 2 ms lets a step's beads be queued first, so that
                # they go to the model in one request instead of two
                ET.SubElement(ff, "latency").text = f" {BATCH_LATENCY_S} "
        batches[name] = int(size.text) if batched else 1
    if not sockets:
        raise InputError(f"{source} has no <ffsocket>: nothing for qmmm-driver to serve")
    if total_steps is not None:
        node = root.find("total_steps")
        if node is None:
            node = ET.SubElement(root, "total_steps")
        node.text = f" {int(total_steps)} "
    steps = root.findtext("total_steps")
    tree.write(target)
    return Prepared(sockets, int(steps) if steps else None, output_specs(root), batches)


#: the template run when none is named: PIMD with the MM nonbonded terms on a contracted ring polymer, twice
#: as fast as ``pimd`` (OpenMM's PME on 16 beads is most of a step) for the same O-H distribution (README)
DEFAULT_INPUT = "pimd-contracted"

#: suffix of the launcher's copy of the last complete checkpoint (i-PI rewrites its own in place)
KEPT = ".complete"


def checkpoint_files(run_dir: Path, specs: list[OutputSpec]) -> list[Path]:
    """``RESTART`` (written at a soft exit) and the periodic ``<checkpoint>`` files of the run."""
    return [run_dir / "RESTART"] + [run_dir / s.filename for s in specs if s.kind == "checkpoint"]


def keep_checkpoints(run_dir: Path, specs: list[OutputSpec], seen: dict) -> None:
    """Copy every checkpoint that changed and is complete to ``NAME.complete``.

    i-PI truncates its checkpoint file, then serialises the simulation into it:
    an i-PI killed meanwhile leaves an empty or cut file and no other. The copy
    made here, atomically, is what a restart falls back on.
    """
    from .files import write_atomically

    for path in checkpoint_files(run_dir, specs):
        try:
            stamp = path.stat().st_mtime_ns, path.stat().st_size
        except OSError:
            continue
        if seen.get(path) == stamp:
            continue
        data = path.read_bytes()
        seen[path] = stamp
        if checkpoint_step(data) is not None:
            write_atomically(path.with_name(path.name + KEPT), data)


def newest_checkpoint(run_dir: Path, specs: list[OutputSpec]) -> tuple[Path, int] | None:
    """The complete checkpoint of the run with the largest step (i-PI's own files or the launcher's copies)."""
    candidates = [q for p in checkpoint_files(run_dir, specs) for q in (p, p.with_name(p.name + KEPT))]
    found = [(p, checkpoint_step(p)) for p in candidates if p.is_file()]
    found = [(p, s) for p, s in found if s is not None]
    return max(found, key=lambda x: x[1]) if found else None


def clear_unstarted(run_dir: Path) -> None:
    """Empty a run directory whose run never completed a step (a failed start), or refuse one that did."""
    specs = output_specs(ET.parse(run_dir / "input.xml").getroot()) if (run_dir / "input.xml").is_file() else []
    newest = newest_checkpoint(run_dir, specs)
    done = last_step(run_dir, specs)
    if (newest is not None and newest[1] > 0) or (done is not None and done > 0) or not (run_dir / "input.xml").is_file():
        raise InputError(f"run directory {run_dir} holds the outputs of a run: use --restart to continue it, or "
                         "--run-dir for a new one")
    print(f"qmmm-driver launch: {run_dir} holds a run that never completed a step; starting it afresh",
          file=sys.stderr)
    for path in run_dir.iterdir():
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class Run:
    """The processes of one launched run."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir
        self.ipi: subprocess.Popen | None = None
        self.workers: list[tuple[str, subprocess.Popen]] = []
        self.sockets: list[Socket] = []
        self.logs: list = []
        self._read: dict[str, tuple[int, bytes]] = {}  # worker log -> (bytes read, unfinished last line)
        self.watchdog: Watchdog | None = None  # started with the first process

    def _log(self, name: str):
        fh = open(self.run_dir / f"{name}.log", "ab")
        self.logs.append(fh)
        return fh

    def _start(self, cmd: list[str], log_name: str) -> subprocess.Popen:
        if self.watchdog is None:  # stops the rest in order should the launcher itself be killed
            self.watchdog = Watchdog(self.run_dir)
            for s in self.sockets:
                self.watchdog.tell(f"socket {s.path}")
        # a session of its own: Ctrl-C at the terminal reaches only the launcher, which stops the rest in order
        proc = subprocess.Popen(cmd, cwd=self.run_dir, stdout=self._log(log_name), stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.watchdog.tell(f"{'ipi' if log_name == 'ipi' else 'worker'} {proc.pid}")
        return proc

    def start_ipi(self, input_name: str) -> None:
        exe = shutil.which("i-pi")
        if exe is None:
            raise InputError("the i-pi command is not on PATH (pip install ipi)")
        self.ipi = self._start([exe, input_name], "ipi")

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

    def start_worker(self, label: str, cmd: list[str]) -> None:
        self.watch_log(label)
        self.workers.append((label, self._start(cmd, label)))

    def watch_log(self, label: str) -> None:
        """Follow ``label.log`` from its current end (a restarted run appends to the logs of the last)."""
        path = self.run_dir / f"{label}.log"
        self._read[label] = (path.stat().st_size if path.exists() else 0, b"")

    def new_warnings(self) -> list[tuple[str, str]]:
        """The warning lines the followed logs gained since the last call, as (label, line)."""
        found = []
        for label, (done, rest) in self._read.items():
            path = self.run_dir / f"{label}.log"
            try:
                with open(path, "rb") as fh:
                    fh.seek(done)
                    data = fh.read()
            except FileNotFoundError:
                continue
            *lines, rest = (rest + data).split(b"\n")
            self._read[label] = (done + len(data), rest)
            found += [(label, line) for line in map(bytes.decode, lines) if ": warning: " in line]
        return found

    def dead_worker(self) -> tuple[str, int] | None:
        for label, proc in self.workers:
            code = proc.poll()
            if code is not None and code != 0:
                return label, code
        return None

    def stop(self, grace: float = 60.0) -> None:
        """Ask i-PI to exit softly (checkpoint, flushed outputs), then stop the workers; remove sockets.

        Signals are held off meanwhile, so that a second Ctrl-C or SIGTERM cannot
        cut the shutdown short and leave processes behind.
        """
        held = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
        try:
            stop(self.ipi, [proc for _, proc in self.workers], [s.path for s in self.sockets], grace)
            for fh in self.logs:
                fh.close()
            if self.watchdog is not None:
                self.watchdog.dismiss()
        finally:
            for sig, handler in held.items():
                signal.signal(sig, handler)


def worker_commands(sock: Socket, example: Example, args) -> list[tuple[str, list[str]]]:
    """Commands (label, argv) that serve ``sock``."""
    base = [sys.executable, "-m", "qmmm_driver.cli"]
    if sock.is_mm:
        cmd = base + ["mm", "--pdb", str(example.pdb), "--system", str(example.system), "--unix", sock.address,
                      *example.mm_options, "--forcefield", *example.forcefield] + (["--shm"] if sock.shm else [])
        return [(f"{sock.name}-mm{k}", cmd) for k in range(args.mm_workers)]
    cmd = ["run", "--model", str(example.model), "--system", str(example.system), "--unix", sock.address,
           "--device", args.device, "--dtype", args.dtype] + (["--shm"] if sock.shm else [])
    mpirun = shutil.which("mpirun") or shutil.which("mpiexec")
    if args.workers > 1 and mpirun:
        return [(f"{sock.name}-mpi", [mpirun, "-n", str(args.workers)] + base + cmd)]
    return [(f"{sock.name}-w{k}", base + cmd) for k in range(args.workers)]


def follow(run: Run, prepared: Prepared, start_step: int, progress: bool, stall_timeout: float) -> int:
    """Show progress until i-PI ends (0), or a worker dies, i-PI fails or the run stalls (1)."""
    from tqdm import tqdm

    total = prepared.total_steps
    bar = tqdm(total=total, initial=min(start_step, total or start_step), unit="step", desc="i-PI",
               disable=not progress, dynamic_ncols=True)
    done = start_step
    last_log = last_progress = time.time()
    seen: dict = {}
    try:
        while True:
            keep_checkpoints(run.run_dir, prepared.outputs, seen)
            if run.ipi.poll() is not None:
                if run.ipi.returncode != 0:
                    print(f"qmmm-driver launch: i-PI exited with code {run.ipi.returncode}; see "
                          f"{run.run_dir / 'ipi.log'}", file=sys.stderr)
                    return 1
                return 0
            dead = run.dead_worker()
            if dead:
                label, code = dead
                print(f"qmmm-driver launch: worker {label} exited with code {code} (see "
                      f"{run.run_dir / label}.log); stopping the run", file=sys.stderr)
                return 1
            for label, line in run.new_warnings():  # a model extrapolating, say: not only in the worker's log
                tqdm.write(f"qmmm-driver launch: {label}: {line}", file=sys.stderr)
            step = last_step(run.run_dir, prepared.outputs)
            if step is not None and step > done:
                bar.update(step - done)
                done = step
                last_progress = time.time()
            elif time.time() - last_progress > stall_timeout:
                print(f"qmmm-driver launch: the run has not advanced for {stall_timeout:.0f} s (last step {done}); "
                      "a worker may have died without i-PI noticing, see the logs in "
                      f"{run.run_dir}; stopping the run", file=sys.stderr)
                return 1
            if not progress and time.time() - last_log > 30:
                print(f"qmmm-driver launch: step {done}/{total}", file=sys.stderr)
                last_log = time.time()
            time.sleep(0.5)
    finally:
        bar.close()


def launch(args) -> int:
    """Run (or continue, with ``args.restart``) an i-PI input with its workers; returns the exit status."""
    if args.workers < 1 or args.mm_workers < 1:
        raise InputError(f"--workers {args.workers} and --mm-workers {args.mm_workers} must be at least 1")
    if args.stall_timeout <= 0:
        raise InputError(f"--stall-timeout {args.stall_timeout} must be positive")
    source = resolve_input(args.input or DEFAULT_INPUT)
    example = Example.find(args.example or "water")
    # absolute: the workers run inside it and are given paths of files in it
    run_dir = Path(args.run_dir or Path("runs") / f"{source.stem}-{example.root.name}").absolute()
    tag = uuid.uuid4().hex[:8]
    start_step = 0
    if args.restart:
        if not run_dir.is_dir():
            raise InputError(f"--restart: run directory {run_dir} does not exist")
        specs = output_specs(ET.parse(run_dir / "input.xml").getroot()) if (run_dir / "input.xml").is_file() else []
        newest = newest_checkpoint(run_dir, specs)
        if newest is None:
            raise InputError(f"--restart: {run_dir} holds no checkpoint (RESTART or a <checkpoint> file): the run "
                             "never reached one; start it again without --restart (the directory is reused)")
        checkpoint, start_step = newest
        removed = truncate_after(run_dir, specs, start_step)
        cut = {k: v for k, v in removed.items() if v > 0}
        print(f"qmmm-driver launch: continuing {run_dir} from {checkpoint.name} at step {start_step}"
              + (f"; outputs cut back to that step ({len(cut)} files)" if cut else ""), file=sys.stderr)
        for name, n in removed.items():
            if n < 0:
                print(f"qmmm-driver launch: warning: {name} has no step markers to cut back; it may hold steps "
                      f"after {start_step} twice", file=sys.stderr)
        source, input_name = checkpoint, "restart-input.xml"
    else:
        if run_dir.exists() and any(run_dir.iterdir()):
            clear_unstarted(run_dir)
        input_name = "input.xml"
    run_dir.mkdir(parents=True, exist_ok=True)
    for name, path in (("model.pt", example.model), ("system.extxyz", example.system), ("system.pdb", example.pdb)):
        link = run_dir / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(path)
    for compiled in example.model.parent.glob(f"{example.model.stem}.*.pt2"):
        link = run_dir / compiled.name.replace(example.model.stem, "model", 1)
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(compiled)
    prepared = prepare_input(source, run_dir / input_name, tag, args.workers, batch=not args.no_batch,
                             total_steps=args.total_steps)
    if prepared.total_steps is not None and start_step >= prepared.total_steps:
        raise InputError(f"the run in {run_dir} has reached its total of {prepared.total_steps} steps; give "
                         "--total-steps N (larger) to continue it")
    example = Example(root=example.root, model=run_dir / "model.pt", system=example.system, pdb=example.pdb,
                      forcefield=example.forcefield, mm_options=example.mm_options)
    run = Run(run_dir)
    run.sockets = prepared.sockets
    code = 1
    try:
        run.start_ipi(input_name)
        run.wait_for_sockets()
        for sock in prepared.sockets:
            for label, cmd in worker_commands(sock, example, args):
                run.start_worker(label, cmd)
        batched = ", ".join(f"{k} batch {v}" for k, v in prepared.batch.items() if v > 1)
        print(f"qmmm-driver launch: running {source.name} on {example.root.name} in {run_dir} "
              f"(i-PI + {len(run.workers)} worker processes{'; ' + batched if batched else ''}; logs there)",
              file=sys.stderr)
        code = follow(run, prepared, start_step, progress=not args.no_progress, stall_timeout=args.stall_timeout)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM/SIGHUP as Stopped
        print(f"\nqmmm-driver launch: {describe(err)}; stopping i-PI (it writes RESTART) and the workers",
              file=sys.stderr)
        code = exit_status(err)
    except RuntimeError as err:
        print(f"qmmm-driver launch: error: {err}", file=sys.stderr)
        code = 1
    finally:
        run.stop()
    if code != 0:
        print(f"qmmm-driver launch: outputs so far are in {run_dir}; continue with: qmmm-driver launch --restart "
              f"--run-dir {run_dir} --example {args.example or 'water'}", file=sys.stderr)
    return code
