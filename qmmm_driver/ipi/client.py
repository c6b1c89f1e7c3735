"""Client side of the i-PI socket protocol (as implemented by i-PI 3.3).

One :class:`IPIClient` serves one connection: i-PI asks ``STATUS`` and gets
``NEEDINIT``/``READY``/``HAVEDATA``; ``INIT`` carries the forcefield
``<parameters>`` as ``" key : value , ..."`` (plus ``batch_size:N`` when the
``<ffsocket>`` batches requests); ``POSDATA`` carries the cell(s) and positions;
``GETFORCE`` is answered with ``FORCEREADY`` and the energy, forces, virial and
a JSON ``extras`` string (empty when the evaluator has no extras); ``EXIT``
ends the session.

Wire layout (native byte order, float64 and int32):

- ``POSDATA``: ``h[3,3]``, ``h^-1[3,3]``, ``nat``, ``pos[nat,3]``. Batched
  (``batch_size`` B > 1): ``nat``, B x (``h``, ``h^-1``), ``pos[B,nat,3]``.
- ``FORCEREADY``: ``U``, ``nat``, ``f[nat,3]``, ``vir[3,3]``, ``len``, ``extras``.
  Batched: ``U[B]``, ``nat``, ``f[B,nat,3]``, ``vir[B,3,3]``, then B x (``len``, ``extras``).
- i-PI's ``mode="shm"`` (``shm=True`` here): ``POSDATA`` carries only ``nat``
  (and, the first time, the names of i-PI's shared-memory segments, each as
  ``len``, ``name``), ``FORCEREADY`` only the B x (``len``, ``extras``); the
  numbers are read and written in the segments (:mod:`.shm`).

i-PI's ``h`` has the lattice vectors as columns; the evaluator takes them as
rows, so ``cells = h.T``. Everything is in atomic units on both sides: no unit
conversion happens here. Batches of B structures go through one
:meth:`Evaluator.compute <qmmm_driver.evaluator.Evaluator.compute>` call, with
the parameters of INIT (over the worker's defaults) passed along with it.

Sizes from i-PI are capped before anything is allocated: an INIT string longer
than :data:`MAX_INIT_BYTES`, a batch larger than :data:`MAX_BATCH` or a
position block larger than :data:`MAX_POSDATA_BYTES` is refused with a message.
"""

from __future__ import annotations

import errno
import json
import socket
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import InputError
from ..profiling import stage

HDRLEN = 12


def _message(text: str) -> bytes:
    return text.upper().ljust(HDRLEN).encode("ascii")


STATUS = _message("status")
READY = _message("ready")
HAVEDATA = _message("havedata")
NEEDINIT = _message("needinit")
INIT = _message("init")
POSDATA = _message("posdata")
GETFORCE = _message("getforce")
FORCEREADY = _message("forceready")
EXIT = _message("exit")

#: Added to the INIT string by i-PI itself when ``<batch_size>`` > 1.
BATCH_KEY = "batch_size"
#: Longest INIT string accepted (i-PI's <parameters> are a few short key: value pairs).
MAX_INIT_BYTES = 1 << 20
#: Largest batch accepted (i-PI batches the beads or replicas of one step).
MAX_BATCH = 4096
#: Largest POSDATA payload accepted (positions and cells of one batch), bytes.
MAX_POSDATA_BYTES = 8 << 30

#: Longest unix socket path the kernel accepts (sun_path is 108 bytes with the NUL).
MAX_UNIX_PATH = 107


class ConnectError(InputError):
    """No i-PI server answered at the address within the connection timeout."""


class InitError(InputError):
    """The INIT string from i-PI names an unknown parameter or an unreadable value."""


class ConnectionLost(RuntimeError):
    """i-PI closed the connection without sending EXIT."""


class ProtocolError(RuntimeError):
    """i-PI sent a message the protocol does not allow at this point."""


# --------------------------------------------------------------------------- addresses


@dataclass(frozen=True)
class SocketAddress:
    """Where i-PI listens: a unix socket file or an inet host and port."""

    mode: str                 # "unix" or "inet"
    path: str = ""            # unix: full socket path (prefix + name)
    name: str = ""            # unix: the <address> given to i-PI
    prefix: str = ""          # unix: i-PI's sockets_prefix
    host: str = ""            # inet
    port: int = 0             # inet

    @classmethod
    def unix(cls, name: str, prefix: str = "/tmp/ipi_") -> "SocketAddress":
        """``prefix + name`` (an absolute ``name`` is taken as the full path)."""
        name = str(name)
        if not name:
            raise InputError("--unix needs a socket name (i-PI's <address>)")
        if name.startswith("/"):
            path, prefix = name, ""
        else:
            path = f"{prefix}{name}"
        if len(path.encode()) > MAX_UNIX_PATH:
            raise InputError(
                f"unix socket path {path} is {len(path.encode())} bytes long; the limit is {MAX_UNIX_PATH} "
                "(use a shorter --socket-prefix / sockets_prefix or name)"
            )
        return cls(mode="unix", path=path, name=name, prefix=prefix)

    @classmethod
    def inet(cls, host: str, port: int) -> "SocketAddress":
        port = int(port)
        if not 0 < port < 65536:
            raise InputError(f"--port {port} is not a valid TCP port (1-65535)")
        return cls(mode="inet", host=str(host), port=port)

    def __str__(self) -> str:
        return f"unix:{self.path}" if self.mode == "unix" else f"inet:{self.host}:{self.port}"

    def hint(self) -> str:
        """The i-PI input that listens at this address."""
        if self.mode == "unix":
            return (f'<ffsocket mode="unix"><address>{self.name}</address></ffsocket> with '
                    f'<simulation sockets_prefix="{self.prefix}">, so that i-PI creates {self.path}')
        return f'<ffsocket mode="inet"><address>{self.host}</address><port>{self.port}</port></ffsocket>'


_RETRY_ERRNOS = {errno.ENOENT, errno.ECONNREFUSED, errno.EAGAIN, errno.ECONNRESET, errno.ETIMEDOUT,
                 errno.EHOSTUNREACH, errno.ENETUNREACH, errno.ECONNABORTED}


def connect(address: SocketAddress, timeout: float = 60.0, interval: float = 0.25) -> socket.socket:
    """Connect to i-PI, retrying while the socket is absent or refuses, for up to ``timeout`` s."""
    deadline = time.monotonic() + max(0.0, float(timeout))
    last: OSError | None = None
    while True:
        if address.mode == "unix":
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target = address.path
        else:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            target = (address.host, address.port)
        try:
            sock.settimeout(max(1.0, min(10.0, timeout)))
            sock.connect(target)
            sock.settimeout(None)  # blocking: i-PI may legitimately take long between requests
            return sock
        except socket.gaierror as err:
            sock.close()
            raise ConnectError(f"cannot resolve the i-PI host '{address.host}': {err}") from err
        except OSError as err:
            sock.close()
            if err.errno not in _RETRY_ERRNOS and not isinstance(err, (socket.timeout, FileNotFoundError,
                                                                          ConnectionRefusedError)):
                raise ConnectError(f"cannot connect to i-PI at {address}: {err}") from err
            last = err
        if time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    if isinstance(last, FileNotFoundError):
        reason = "the socket file does not exist"
    elif address.mode == "unix" and isinstance(last, ConnectionRefusedError):
        reason = (f"the socket file {address.path} exists but no i-PI listens on it: a file left behind by an "
                  "i-PI that was killed? Remove it, then start i-PI")
    else:
        reason = str(last)
    raise ConnectError(
        f"no i-PI server at {address} after {timeout:g} s ({reason}). Start i-PI first (or raise "
        f"--connect-timeout); its input must contain {address.hint()}"
    )


# --------------------------------------------------------------------------- INIT


@dataclass
class InitParameters:
    """Parsed INIT string: the forcefield ``params`` (as strings) and the announced ``batch_size``."""

    params: dict = field(default_factory=dict)
    batch_size: int = 1


def parse_init(text: str | bytes) -> InitParameters:
    """Parse i-PI's INIT string, e.g. ``" coupling : 0.5 , , batch_size:4"``.

    Empty tokens (trailing separators) are ignored. The values stay strings: the
    evaluator checks names and types (:func:`~qmmm_driver.evaluator.check_parameters`).
    """
    if isinstance(text, (bytes, bytearray, memoryview)):
        text = bytes(text).decode("utf-8", errors="replace")
    out = InitParameters()
    for token in text.split(","):
        token = token.strip()
        if not token:
            continue
        key, sep, value = token.partition(":")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise InitError(f"cannot read '{token}' in the i-PI parameter string {text[:200]!r}: "
                            "expected 'key : value'")
        if key == BATCH_KEY:
            try:
                out.batch_size = int(value)
            except ValueError:
                raise InitError(f"i-PI sent batch_size '{value}', which is not an integer") from None
            if not 1 <= out.batch_size <= MAX_BATCH:
                raise InitError(f"i-PI sent batch_size {out.batch_size}; qmmm-driver takes 1 to {MAX_BATCH} "
                                "structures per request (lower <batch_size> in the <ffsocket>)")
            continue
        out.params[key] = value
    return out


# --------------------------------------------------------------------------- client


class IPIClient:
    """Serves one i-PI connection with an :class:`~qmmm_driver.evaluator.Evaluator`.

    ``defaults`` are the forcefield parameters used where INIT does not set them
    (e.g. ``--coupling``). After :meth:`serve` returns (EXIT) or raises,
    ``structures`` and ``requests`` count the structures evaluated (i-PI's
    padding of partial batches excluded) and POSDATA messages answered.
    """

    def __init__(self, sock: socket.socket, evaluator, defaults: dict | None = None, shm: bool = False):
        from ..evaluator import check_parameters

        self.sock = sock
        self.shm = shm
        self._segments = None  # i-PI's shared memory (shm mode), attached at the first POSDATA
        self.ev = evaluator
        self.system = evaluator.structure
        self.defaults = dict(defaults or {})
        self.params = check_parameters(evaluator, self.defaults, "the worker's options")
        self.batch_size = 1
        self.initialised = False
        self.structures = 0
        self.requests = 0
        self._results = None
        self._hdr = bytearray(HDRLEN)
        self._hdr_view = memoryview(self._hdr)
        self._head = bytearray(148)  # POSDATA prefix: h, h^-1, nat (or only nat when batched)
        self._head_view = memoryview(self._head)
        self._buffers_for = None  # (batch_size, nat) the buffers below are sized for
        self._mode_checked = False  # the first POSDATA is checked against --shm
        #: False: each POSDATA is evaluated at once; True: its frames wait in :attr:`pending` for
        #: :meth:`deliver` (a :mod:`.fanin` worker evaluates the frames of several connections together)
        self.deferred = False
        self.pending = None  # (positions [n, nat, 3], cells [n, 3, 3] or None) read and not yet evaluated

    def fileno(self) -> int:
        """The socket's: a client can be waited on with ``select``."""
        return self.sock.fileno()

    # ---- low-level I/O
    def _recv_into(self, view: memoryview, what: str) -> None:
        got, n = 0, len(view)
        recv_into = self.sock.recv_into
        while got < n:
            k = recv_into(view[got:], n - got)
            if k == 0:
                raise ConnectionLost(
                    f"i-PI closed the connection without sending EXIT (while reading {what}); "
                    "i-PI stopped, crashed or dropped this worker; see the i-PI output"
                )
            got += k

    def _send_parts(self, parts) -> None:
        views = [memoryview(p).cast("B") for p in parts if len(p)]
        try:
            while views:
                sent = self.sock.sendmsg(views)
                while views and sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                if sent:
                    views[0] = views[0][sent:]
        except (BrokenPipeError, ConnectionResetError) as err:
            raise ConnectionLost(f"i-PI closed the connection without sending EXIT ({err})") from err

    # ---- buffers, sized once per (batch size, atom count)
    def _allocate(self, batch: int, nat: int) -> None:
        if self._buffers_for == (batch, nat):
            return
        self._pos = np.empty((batch, nat, 3), dtype=np.float64)
        self._pos_view = memoryview(self._pos).cast("B")
        self._hih = np.empty((batch, 2, 3, 3), dtype=np.float64)
        self._hih_view = memoryview(self._hih).cast("B")
        self._cells = np.empty((batch, 3, 3), dtype=np.float64)
        # reply: FORCEREADY, U[B], nat, f[B,nat,3], vir[B,3,3] (+ the extras, sent separately)
        size = HDRLEN + 8 * batch + 4 + 24 * batch * nat + 72 * batch
        self._reply = bytearray(size)
        self._reply[:HDRLEN] = FORCEREADY
        off = HDRLEN
        self._r_pot = np.frombuffer(self._reply, np.float64, batch, off)
        off += 8 * batch
        np.frombuffer(self._reply, np.int32, 1, off)[0] = nat
        off += 4
        self._r_force = np.frombuffer(self._reply, np.float64, batch * nat * 3, off).reshape(batch, nat, 3)
        off += 24 * batch * nat
        self._r_vir = np.frombuffer(self._reply, np.float64, batch * 9, off).reshape(batch, 3, 3)
        self._buffers_for = (batch, nat)

    def _check_nat(self, nat: int) -> None:
        if nat != self.system.n_atoms:
            self.system.check_atoms(nat)  # raises StructureError naming both counts and the file
        if 24 * nat * self.batch_size > MAX_POSDATA_BYTES:
            raise ProtocolError(f"i-PI announced {self.batch_size} x {nat} atoms, beyond what a worker accepts")

    # ---- messages
    def _on_init(self) -> None:
        head = bytearray(8)
        self._recv_into(memoryview(head), "INIT")
        _rid, length = np.frombuffer(head, np.int32, 2)
        if length < 0:
            raise ProtocolError(f"i-PI sent an INIT string of length {int(length)}")
        if length > MAX_INIT_BYTES:
            raise InitError(f"i-PI announced an INIT string of {int(length)} bytes; qmmm-driver accepts up to "
                            f"{MAX_INIT_BYTES} (the <parameters> of an <ffsocket> are a few key: value pairs)")
        text = bytearray(int(length))
        self._recv_into(memoryview(text), "INIT")
        init = parse_init(bytes(text))
        from ..evaluator import check_parameters

        try:
            self.params = check_parameters(self.ev, {**self.defaults, **init.params},
                                           f"the <parameters> of the i-PI <ffsocket> (INIT {bytes(text)[:200]!r})")
        except InputError as err:
            raise InitError(str(err)) from None
        self.batch_size = init.batch_size
        self.initialised = True

    def _on_posdata(self) -> None:
        with stage("ipi:read"):
            cells = self._read_posdata()
        n = self._distinct_frames()
        pos = self._pos if n == self.batch_size else self._pos[:n]
        cells = cells if cells is None or n == self.batch_size else cells[:n]
        self.pending = (pos, cells)
        if not self.deferred:
            self.deliver(self.ev.compute(pos, cells, self.params))  # NonFiniteResult propagates: nothing sent

    def deliver(self, results) -> None:
        """Take the results of the :attr:`pending` frames; i-PI gets them at its next GETFORCE."""
        self._results, self.pending = results, None
        self.requests += 1
        self.structures += len(results.energy)

    def _distinct_frames(self) -> int:
        """The frames of a batch before i-PI's padding.

        i-PI fills a partial batch with copies of its last request; identical frames have identical results, so
        only the first of a trailing run of equal frames is evaluated and its results are sent for the rest.
        """
        n = self.batch_size
        pos, hih = self._pos, self._hih
        while n > 1 and np.array_equal(pos[n - 1], pos[n - 2]) and np.array_equal(hih[n - 1], hih[n - 2]):
            n -= 1
        return n

    def _attach_segments(self, nat: int) -> None:
        """Read the segment names of the first shm-mode POSDATA and make the buffers views of the segments."""
        from .shm import KINDS, Segments

        names = []
        for kind in KINDS:
            self._recv_into(self._head_view[:4], "POSDATA segment names")
            length = int(np.frombuffer(self._head, np.int32, 1)[0])
            if not 0 < length <= 255:
                raise ProtocolError(f"i-PI sent a shared-memory segment name of {length} bytes ({kind})")
            name = bytearray(length)
            self._recv_into(memoryview(name), "POSDATA segment names")
            names.append(name.decode("utf-8"))
        B = self.batch_size
        try:
            self._segments = Segments(names, B, nat)
        except (OSError, ValueError) as err:
            raise ProtocolError(f"cannot use i-PI's shared memory {names}: {err} (is the worker on the machine "
                                "that runs i-PI?)") from err
        views = self._segments.views
        self._pos, self._r_pot, self._r_force, self._r_vir = views["pos"], views["pot"], views["force"], views["vir"]
        self._hih = np.empty((B, 2, 3, 3), dtype=np.float64)
        self._cells = np.empty((B, 3, 3), dtype=np.float64)
        self._reply = FORCEREADY  # the numbers go into the segments; the socket carries the extras
        self._buffers_for = (B, nat)

    def _check_mode(self) -> None:
        """Refuse a worker whose ``--shm`` does not match the ``<ffsocket>``'s mode, on the first POSDATA.

        Read the wrong way, one layout's bytes look like a wrong atom count or leave the worker waiting for
        bytes that never come. The two are told apart without consuming anything: in shm mode the first
        POSDATA is ``nat``, then the first segment name as ``len``, ``name``, and i-PI's names start with
        ``ipi_shm_``; in the socket layouts the same bytes are parts of float64 cells.
        """
        from .shm import NAME_PREFIX

        prefix = NAME_PREFIX.encode()
        need = 8 + 1 + len(prefix)
        peek = self.sock.recv(need, socket.MSG_PEEK | socket.MSG_WAITALL)
        if len(peek) < need:
            raise ConnectionLost("i-PI closed the connection without sending EXIT (while reading POSDATA)")
        length = int(np.frombuffer(peek, np.int32, 1, 4)[0])
        shm_layout = 0 < length <= 255 and peek[8:].lstrip(b"/").startswith(prefix)
        if shm_layout and not self.shm:
            raise ProtocolError("i-PI serves this socket in shared-memory mode (<ffsocket mode='shm'>): start the "
                                "worker with --shm, on the machine that runs i-PI")
        if self.shm and not shm_layout:
            raise ProtocolError("this worker was started with --shm, but i-PI sends the positions on the socket "
                                "(<ffsocket mode='unix'>): drop --shm, or set mode='shm' in the i-PI input")
        self._mode_checked = True

    def _read_posdata(self):
        B = self.batch_size
        head = self._head
        if not self._mode_checked:
            self._check_mode()
        if self.shm:
            self._recv_into(self._head_view[:4], "POSDATA")
            nat = int(np.frombuffer(head, np.int32, 1)[0])
            self._check_nat(nat)
            if self._segments is None:
                self._attach_segments(nat)
            views = self._segments.views
            np.copyto(self._hih[:, 0], views["h"])
            np.copyto(self._hih[:, 1], views["ih"])
        elif B == 1:
            self._recv_into(self._head_view, "POSDATA")
            nat = int(np.frombuffer(head, np.int32, 1, 144)[0])
            self._check_nat(nat)
            self._allocate(1, nat)
            self._hih.reshape(-1)[:] = np.frombuffer(head, np.float64, 18)
            self._recv_into(self._pos_view, "POSDATA positions")
        else:
            self._recv_into(self._head_view[:4], "POSDATA")
            nat = int(np.frombuffer(head, np.int32, 1)[0])
            self._check_nat(nat)
            self._allocate(B, nat)
            self._recv_into(self._hih_view, "POSDATA cells")
            self._recv_into(self._pos_view, "POSDATA positions")
        if not self.system.periodic:
            return None
        np.copyto(self._cells, self._hih[:, 0].transpose(0, 2, 1))  # i-PI h has lattice vectors as columns
        return self._cells

    def _on_getforce(self) -> None:
        with stage("ipi:reply"):
            self._reply_forces()

    def _reply_forces(self) -> None:
        res = self._results
        if res is None:
            raise ProtocolError("i-PI asked for forces (GETFORCE) before sending positions (POSDATA)")
        self._results = None
        B, n = self.batch_size, len(res.energy)  # frames n..B-1 repeat frame n-1 (i-PI's padding)
        self._r_pot[:n], self._r_pot[n:] = res.energy, res.energy[-1]
        self._r_force[:n], self._r_force[n:] = res.forces, res.forces[-1]
        self._r_vir[:n], self._r_vir[n:] = res.virial, res.virial[-1]
        payload = []
        for b in range(B):
            extras = res.extras(min(b, n - 1), self.system)
            text = json.dumps(extras).encode("utf-8") if extras else b""  # none: i-PI records no extras
            payload.append(np.int32(len(text)).tobytes())
            payload.append(text)
        payload = b"".join(payload)
        if self.deferred:
            self._check_room(len(self._reply) + len(payload))
        self._send_parts((self._reply, payload))  # one sendmsg, no copy of the forces

    def _check_room(self, nbytes: int) -> None:
        """A worker on several connections must never wait for i-PI to read one of them: i-PI may be waiting on
        another connection for an answer (a STATUS), which the worker, blocked, would never give. So a reply must
        fit the socket's send buffer whole (:mod:`.fanin` enlarges it as far as the kernel allows)."""
        room = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) * 9 // 10
        if nbytes > room:
            raise InputError(
                f"--connections: a reply of {nbytes / 1e6:.2f} MB ({self.batch_size} structure(s) of "
                f"{self.system.n_atoms} atoms) does not fit this connection's send buffer ({room / 1e6:.2f} MB, "
                "capped by the kernel's net.core.wmem_max), and a worker on several connections must not wait on "
                "one of them. Use shared memory (--shm with <ffsocket mode='shm'>), or one connection "
                "(<batch_size> in the <ffsocket> batches on i-PI's side)")

    def step(self) -> bool:
        """Read and answer one message; False after EXIT. Raises on errors without sending a reply."""
        hdr, sendall = self._hdr, self.sock.sendall
        try:
            self._recv_into(self._hdr_view, "a message header")
            if hdr == STATUS:
                if not self.initialised:
                    sendall(NEEDINIT)
                elif self._results is not None:
                    sendall(HAVEDATA)
                else:
                    sendall(READY)
            elif hdr == POSDATA:
                self._on_posdata()
            elif hdr == GETFORCE:
                self._on_getforce()
            elif hdr == INIT:
                self._on_init()
            elif hdr == EXIT:
                return False
            else:
                raise ProtocolError(f"unexpected message {bytes(hdr)!r} from i-PI")
        except (ConnectionResetError, BrokenPipeError) as err:
            raise ConnectionLost(f"i-PI closed the connection without sending EXIT ({err})") from err
        return True

    def close(self) -> None:
        """Detach i-PI's shared memory, if any (i-PI removes the segments); the socket is the caller's."""
        if self._segments is not None:
            self._pos = self._r_pot = self._r_force = self._r_vir = None
            self._segments.close()
            self._segments = None

    def serve(self) -> int:
        """Answer i-PI until EXIT (returns 0); raises on errors without sending a reply."""
        try:
            while self.step():
                pass
            return 0
        finally:
            self.close()
