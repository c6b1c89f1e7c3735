"""The shared-memory segments of i-PI's ``mode="shm"`` sockets.

In that mode the unix socket carries only the control messages and the JSON
extras; positions, cells, energies, forces and virials of a whole batch live in
six segments that i-PI creates and owns (``pos``, ``h``, ``ih``, ``pot``,
``force``, ``vir``, float64, one slot per structure of the batch) and names in
its first ``POSDATA``. A worker attaches to them, reads the positions where
i-PI wrote them and writes its results in place, so that a batch of a few
hundred kB never has to cross the socket (i-PI drops a client that takes more
than 0.1 s to take a large POSDATA off the socket, as a loaded machine can).
The protocol's turn-taking orders the accesses: i-PI writes the positions
before ``POSDATA`` and reads the results after ``FORCEREADY``.
"""

from __future__ import annotations

from multiprocessing import shared_memory
from pathlib import Path

import numpy as np

#: the segments, in the order i-PI names them
KINDS = ("pos", "h", "ih", "pot", "force", "vir")
#: how i-PI names a segment: NAME_PREFIX + "<i-PI pid>_<socket fd>_<kind>"
NAME_PREFIX = "ipi_shm_"
#: where POSIX shared memory appears as files (Linux)
SHM_DIR = Path("/dev/shm")


def remove_segments(ipi_pid: int) -> None:
    """Remove the segments of the i-PI process ``ipi_pid``, which an i-PI that died or was killed could not."""
    for segment in SHM_DIR.glob(f"{NAME_PREFIX}{ipi_pid}_*"):
        segment.unlink(missing_ok=True)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Attach to i-PI's segment ``name`` without taking it over: the segment is i-PI's to remove (Python's
    resource tracker would otherwise unlink it when this worker exits)."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # Python >= 3.13
    except TypeError:
        from multiprocessing import resource_tracker

        segment = shared_memory.SharedMemory(name=name)
        resource_tracker.unregister(segment._name, "shared_memory")  # noqa: SLF001 - the documented workaround
        return segment


class Segments:
    """Numpy views of i-PI's segments for batches of ``batch`` structures of ``nat`` atoms."""

    def __init__(self, names: list[str], batch: int, nat: int):
        shapes = {"pos": (batch, nat, 3), "h": (batch, 3, 3), "ih": (batch, 3, 3), "pot": (batch,),
                  "force": (batch, nat, 3), "vir": (batch, 3, 3)}
        self._segments = []
        self.views: dict[str, np.ndarray] = {}
        try:
            for kind, name in zip(KINDS, names):
                segment = _attach(name)
                self._segments.append(segment)
                size = 8 * int(np.prod(shapes[kind]))
                if segment.size < size:
                    raise ValueError(f"i-PI's shared-memory segment {name} holds {segment.size} bytes, "
                                     f"{size} needed for {batch} x {nat} atoms")
                self.views[kind] = np.ndarray(shapes[kind], dtype=np.float64, buffer=segment.buf)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        self.views.clear()  # the views hold the buffers: release them before closing
        for segment in self._segments:
            try:
                segment.close()
            except BufferError:  # a view is still held somewhere: the mapping goes with the process
                pass
        self._segments.clear()
