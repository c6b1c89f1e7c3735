"""One worker on several connections to the same i-PI socket: the structures that arrive together are evaluated
in one batched call.

i-PI hands each request (a bead, a replica) to a free client and has all of a
step's requests in flight at once when enough clients are connected. A worker
started with ``--connections K`` opens K connections, each answered by its own
:class:`~qmmm_driver.ipi.client.IPIClient`, and gathers what arrives: the
positions of every connection that has a request are evaluated in one
:meth:`Evaluator.compute <qmmm_driver.evaluator.Evaluator.compute>` call (one per
set of INIT parameters), then each connection answers its own STATUS and
GETFORCE. So an i-PI input without ``<batch_size>`` is evaluated in batches, with
no change to the input, and one model in memory serves every connection.

When to evaluate: as soon as every connection has a request, or as many have one
as in the largest of the last :data:`MEMORY` evaluations; otherwise when no new
request has come for a quiet gap, or ``window`` seconds after the first request
arrived, whatever is there by then. The quiet gap is learned from the complete
rounds: three times the longest pause between two requests of a round in the last
:data:`MEMORY` of them, at least ``min_gap``, at most the window (the window until a
round has been seen). i-PI with its default messaging writes a round within
~0.1-0.3 ms, and splits a step's beads into two rounds in about a third of the
steps (it collects a round's forces before it sends the beads queued after it):
those rounds are evaluated ~0.5 ms after their last request instead of after the
window. Polling each client (``<consolidate_messages> false``) spreads a round
over up to ~1 ms, and the gap stays near the window. A connection
whose positions wait is not read from, so i-PI's STATUS queries to it are
answered (HAVEDATA) once its forces exist, as from a client that computes.
"""

from __future__ import annotations

import dataclasses
import select
import socket
import time
from collections import deque

import numpy as np

from .client import ConnectionLost, IPIClient, connect

#: How many past evaluations set the expected number of requests (the largest of them).
MEMORY = 16
#: Seconds after the first request to wait for more when fewer than expected have arrived.
WINDOW = 0.003
#: The shortest quiet gap (seconds) after the last request before the waiting ones are evaluated.
MIN_GAP = 0.0005
#: Send buffer asked for on every connection (bytes; the kernel caps it at twice net.core.wmem_max): a reply is
#: written whole without waiting (see IPIClient._check_room).
SEND_BUFFER = 1 << 26


def connect_all(address, count: int, timeout: float, make_client) -> list[IPIClient]:
    """``count`` connections to i-PI at ``address``, each served by ``make_client(sock)``, opened one after the
    other: each answers its first message (i-PI's handshake) before the next opens, because i-PI takes one new
    client at a time and waits for its answer, and unanswered connections would fill its queue."""
    clients: list[IPIClient] = []
    try:
        for k in range(count):
            clients.append(make_client(connect(address, timeout)))
            if k + 1 < count:
                if not select.select([clients[-1]], [], [], timeout)[0]:
                    raise ConnectionLost(f"i-PI at {address} accepted connection {k + 1} of {count} but did not "
                                         f"talk to it within {timeout:g} s")
                clients[-1].step()
        return clients
    except BaseException:
        for c in clients:
            c.sock.close()
        raise


def frames_of(results, start: int, stop: int):
    """The results of frames ``start:stop`` of a batch (every field of a results dataclass is per frame)."""
    return dataclasses.replace(results, **{f.name: getattr(results, f.name)[start:stop]
                                           for f in dataclasses.fields(results)})


def evaluate_together(clients: list[IPIClient]) -> int:
    """Evaluate the pending frames of ``clients`` (one call per set of parameters) and deliver the results;
    returns the number of calls."""
    groups: dict[tuple, list[IPIClient]] = {}
    for c in clients:
        groups.setdefault(tuple(sorted(c.params.items())), []).append(c)
    for group in groups.values():
        positions = np.concatenate([c.pending[0] for c in group])
        cells = None if group[0].pending[1] is None else np.concatenate([c.pending[1] for c in group])
        results = group[0].ev.compute(positions, cells, group[0].params)  # NonFiniteResult propagates
        start = 0
        for c in group:
            n = len(c.pending[0])
            c.deliver(frames_of(results, start, start + n))
            start += n
    return len(groups)


class FanIn:
    """Serves ``clients`` (IPIClients of one worker, each on its own connection) until every one has had EXIT.

    ``calls`` counts the evaluator calls, ``structures`` and ``requests`` what the clients answered.
    """

    def __init__(self, clients: list[IPIClient], window: float = WINDOW, min_gap: float = MIN_GAP):
        self.clients = list(clients)
        for c in self.clients:
            c.deferred = True
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SEND_BUFFER)
        self.window, self.min_gap = float(window), float(min_gap)
        self.calls = 0
        self._recent: deque[int] = deque(maxlen=MEMORY)  # requests per evaluation
        self._pauses: deque[float] = deque(maxlen=MEMORY)  # longest pause inside each complete round

    @property
    def quiet_gap(self) -> float:
        """Seconds without a new request after which the waiting ones are evaluated (see the module)."""
        if not self._pauses:
            return self.window
        return min(self.window, max(self.min_gap, 3.0 * max(self._pauses)))

    @property
    def structures(self) -> int:
        return sum(c.structures for c in self.clients)

    @property
    def requests(self) -> int:
        return sum(c.requests for c in self.clients)

    def serve(self) -> int:
        """Answer i-PI on every connection until each has sent EXIT (returns 0); raises like IPIClient.serve."""
        live = list(self.clients)
        first = last = None  # when the oldest and the newest waiting request were seen
        pause = 0.0  # the longest time between two of them
        try:
            while live:
                waiting = [c for c in live if c.pending is not None]
                idle = [c for c in live if c.pending is None]
                due = bool(waiting) and (not idle or len(waiting) >= max(self._recent, default=len(live)))
                if not waiting:
                    timeout = None
                elif due:
                    timeout = 0.0  # take what has already arrived, then evaluate
                else:
                    timeout = max(0.0, min(first + self.window, last + self.quiet_gap) - time.monotonic())
                for c in select.select(idle, [], [], timeout)[0] if idle else []:
                    if not c.step():
                        live.remove(c)
                    elif c.pending is not None:  # a request arrived
                        now = time.monotonic()
                        first = now if first is None else first
                        pause = max(pause, now - last) if last is not None else 0.0
                        last = now
                waiting = [c for c in live if c.pending is not None]
                if not waiting:
                    continue
                now = time.monotonic()
                if due or now - first >= self.window or now - last >= self.quiet_gap:
                    if due:  # a complete round: how far apart its requests came
                        self._pauses.append(pause)
                    self._recent.append(len(waiting))
                    self.calls += evaluate_together(waiting)
                    first = last = None
                    pause = 0.0
            return 0
        finally:
            for c in self.clients:
                c.close()
