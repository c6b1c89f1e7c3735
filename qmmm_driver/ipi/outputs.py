"""i-PI's output files: which ones a run writes, their last step, and cutting them back to a checkpoint.

Properties are read with i-PI's own reader (``ipi.scripting.read_output``).
Cutting back (:func:`truncate_after`) is what a restart from a periodic
checkpoint needs: i-PI appends to its outputs when it restarts, so steps
written after the checkpoint would appear twice. Frames are recognised by the
markers i-PI writes: the ``step`` column of properties files, ``Step: N`` in the
comment line of ``xyz`` and ``ase`` trajectories and in the header of ``extras``
trajectories.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

STEP_MARK = re.compile(rb"Step:\s+(\d+)")
STEP_COLUMN = re.compile(r"#\s*column\s+(\d+)\s+-->\s+step\b")


@dataclass(frozen=True)
class OutputSpec:
    """One ``<properties>``, ``<trajectory>`` or ``<checkpoint>`` of an i-PI input."""

    kind: str        # "properties", "trajectory" or "checkpoint"
    filename: str    # with the output prefix, e.g. "simulation.out"
    format: str      # trajectory format ("xyz", "ase", "pdb", "bin", ...; "extras" for extras), else ""


def output_specs(root: ET.Element) -> list[OutputSpec]:
    """The outputs declared in a parsed i-PI input."""
    output = root.find("output")
    if output is None:
        return []
    prefix = output.get("prefix", "simulation")
    name = (lambda f: f"{prefix}.{f}") if prefix else (lambda f: f)
    specs = []
    for p in output.iter("properties"):
        specs.append(OutputSpec("properties", name(p.get("filename", "properties")), ""))
    for t in output.iter("trajectory"):
        fmt = t.get("format", "xyz")
        if (t.text or "").strip().startswith("extras"):
            fmt = "extras"
        specs.append(OutputSpec("trajectory", name(t.get("filename", "traj")), fmt))
    for c in output.iter("checkpoint"):
        specs.append(OutputSpec("checkpoint", name(c.get("filename", "checkpoint")), ""))
    return specs


def files_of(run_dir: Path, spec: OutputSpec) -> list[Path]:
    """The files an output writes: one per bead or replica (``sim.pos_0.xyz``, ``replica_1_sim.out``, ...)."""
    out = []
    for path in sorted(run_dir.glob(f"*{spec.filename}*")):
        name = path.name
        if name.startswith("#") or name.endswith(".tmp"):  # i-PI's backups, our temporaries
            continue
        if name == spec.filename or name.startswith(spec.filename + ".") or name.startswith(spec.filename + "_") \
                or name.endswith("_" + spec.filename) or "_" + spec.filename + "." in name \
                or "_" + spec.filename + "_" in name:
            out.append(path)
    return out


def properties_last_step(path: Path) -> int | None:
    """The step of the last complete line of an i-PI properties file (None before the first)."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    column = None
    for line in data.splitlines():
        if line.startswith(b"#"):
            m = STEP_COLUMN.match(line.decode(errors="replace"))
            if m:
                column = int(m.group(1)) - 1
    if column is None:
        return None
    complete = data[:data.rfind(b"\n") + 1]
    for line in reversed(complete.splitlines()):
        if line.strip() and not line.startswith(b"#"):
            try:
                return int(float(line.split()[column]))
            except (ValueError, IndexError):
                return None
    return None


def last_step(run_dir: Path, specs: list[OutputSpec]) -> int | None:
    """Largest step written so far to the run's properties files (REMD replica files included)."""
    steps = [properties_last_step(p) for s in specs if s.kind == "properties" for p in files_of(run_dir, s)]
    steps = [s for s in steps if s is not None]
    return max(steps) if steps else None


def checkpoint_step(source: Path | bytes) -> int | None:
    """The ``<step>`` of an i-PI checkpoint (RESTART, ``*.chk``; a path or its bytes); None if incomplete."""
    try:
        root = ET.fromstring(source) if isinstance(source, bytes) else ET.parse(source).getroot()
    except (ET.ParseError, OSError):
        return None
    text = root.findtext("step")
    try:
        return int(text) if text is not None else 0
    except ValueError:
        return None


def _cut_properties(data: bytes, step: int) -> int:
    column = None
    pos = 0
    for line in data.splitlines(keepends=True):
        if line.startswith(b"#"):
            m = STEP_COLUMN.match(line.decode(errors="replace"))
            if m:
                column = int(m.group(1)) - 1
        elif line.strip():
            if not line.endswith(b"\n"):
                return pos
            try:
                if column is not None and int(float(line.split()[column])) > step:
                    return pos
            except (ValueError, IndexError):
                return pos
        pos += len(line)
    return pos


def _cut_xyz(data: bytes, step: int) -> int:
    pos = 0
    lines = data.splitlines(keepends=True)
    k = 0
    while k < len(lines):
        try:
            n = int(lines[k])
        except ValueError:
            return pos
        frame = lines[k:k + n + 2]
        if len(frame) < n + 2 or not frame[-1].endswith(b"\n"):
            return pos
        m = STEP_MARK.search(frame[1])
        if m is None or int(m.group(1)) > step:
            return pos
        pos += sum(len(x) for x in frame)
        k += n + 2
    return pos


def _cut_extras(data: bytes, step: int) -> int:
    pos = 0
    keep = True
    for line in data.splitlines(keepends=True):
        if line.startswith(b"#EXTRAS"):
            m = STEP_MARK.search(line)
            keep = m is not None and int(m.group(1)) <= step
        if not keep or not line.endswith(b"\n"):
            return pos
        pos += len(line)
    return pos


CUTTERS = {"properties": _cut_properties, "xyz": _cut_xyz, "ase": _cut_xyz, "extras": _cut_extras}


def truncate_after(run_dir: Path, specs: list[OutputSpec], step: int) -> dict[str, int]:
    """Cut every output of the run back to its entries of steps <= ``step`` (atomically per file).

    Returns the bytes removed per file. Outputs in formats without step markers
    that can be read back (pdb, bin, ...) are left as they are and reported with -1.
    """
    from ..files import write_atomically

    removed = {}
    for spec in specs:
        if spec.kind == "checkpoint":
            continue
        cut = CUTTERS.get("properties" if spec.kind == "properties" else spec.format)
        for path in files_of(run_dir, spec):
            if cut is None:
                removed[path.name] = -1
                continue
            data = path.read_bytes()
            keep = cut(data, step)
            if keep < len(data):
                write_atomically(path, data[:keep])
                removed[path.name] = len(data) - keep
    return removed
