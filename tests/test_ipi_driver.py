"""i-PI drives QM/MM dynamics through ``qmmm-driver run``: real i-PI, real workers.

Every test starts the ``i-pi`` command and ``python -m qmmm_driver.cli run``
workers as subprocesses (see the ``procs`` fixture in conftest.py), with unix
sockets under unique names; outputs go to ``tmp_path``.
"""

from __future__ import annotations

import ast
import json
import re
import socket
import threading

import numpy as np
import pytest
import torch

from conftest import (CLUSTER_BOX, Procs, finish_run, ipi_input, read_ipi_bin, read_ipi_properties, served_counts,
                      start_workers_then_ipi, tiny_model, water_box, water_cluster, write_frame)
from qmmm_driver.evaluator import ModelEvaluator, NonFiniteResult
from qmmm_driver.ipi.client import (EXIT, FORCEREADY, GETFORCE, HAVEDATA, INIT, MAX_BATCH, NEEDINIT, POSDATA, READY,
                                    STATUS, ConnectionLost, InitError, IPIClient, ProtocolError, parse_init)
from qmmm_driver.nn.io import load_model
from qmmm_driver.structures import QMMMStructure
from qmmm_driver.units import ANGSTROM_TO_BOHR, HARTREE


# --------------------------------------------------------------------------- INIT string (fast)


def test_parse_init_forms():
    assert parse_init(" ").params == {} and parse_init(" ").batch_size == 1
    assert parse_init("").batch_size == 1
    p = parse_init(" coupling : 0.5 , ")  # i-PI's own format, trailing separator
    assert p.params == {"coupling": "0.5"} and p.batch_size == 1
    p = parse_init(" coupling : 0.25 , , batch_size:4")  # batched: i-PI appends ", batch_size:N"
    assert p.params == {"coupling": "0.25"} and p.batch_size == 4
    p = parse_init("batch_size:2")  # no <parameters>: no separator
    assert p.params == {} and p.batch_size == 2


@pytest.mark.parametrize("text, words", [
    (" coupling , ", ["expected 'key : value'"]),
    (" , batch_size:x", ["batch_size", "not an integer"]),
    (" , batch_size:0", ["batch_size 0", "1 to"]),
    (" , batch_size:100000000", ["batch_size 100000000", f"1 to {MAX_BATCH}", "<batch_size>"]),
])
def test_parse_init_errors(text, words):
    with pytest.raises(InitError) as info:
        parse_init(text)
    for w in words:
        assert w in str(info.value)


@pytest.mark.parametrize("text, words", [
    (" foo : 1 , ", ["unknown parameter(s) ['foo']", "coupling ("]),
    (" coupling : abc , ", ["'coupling'", "abc", "float"]),
    (" coupling : nan , ", ["coupling", "finite"]),
])
def test_init_parameters_are_checked_by_the_evaluator(box_case, text, words):
    """Names and values of <parameters> are the evaluator's to accept; errors end the session before any
    position is read."""
    atoms, system, model, pos, rows = box_case
    a, b = socket.socketpair()
    with a, b:
        client = IPIClient(b, ModelEvaluator(model, system, "cpu", torch.float64))
        thread, out = _serve_in_thread(client)
        _FakeIPI(a).init(text)
        thread.join(10)
    assert isinstance(out.get("error"), InitError)
    for w in words:
        assert w in str(out["error"])


def test_an_oversized_init_string_is_refused_before_it_is_read(box_case):
    atoms, system, model, pos, rows = box_case
    a, b = socket.socketpair()
    with a, b:
        client = IPIClient(b, ModelEvaluator(model, system, "cpu", torch.float64))
        thread, out = _serve_in_thread(client)
        _FakeIPI(a).send(INIT, np.int32(0), np.int32(2**31 - 1))  # announced, never sent
        thread.join(10)
    assert isinstance(out.get("error"), InitError) and "2147483647 bytes" in str(out["error"])


# --------------------------------------------------------------------------- protocol against a scripted server (fast)


class _FakeIPI:
    """The server side of one connection, scripted from the test (i-PI's wire format)."""

    def __init__(self, sock):
        self.sock = sock

    def send(self, *parts):
        self.sock.sendall(b"".join(p if isinstance(p, bytes) else np.ascontiguousarray(p).tobytes() for p in parts))

    def recv(self, n):
        buf = b""
        while len(buf) < n:
            chunk = self.sock.recv(n - len(buf))
            assert chunk, "client closed the connection"
            buf += chunk
        return buf

    def status(self):
        self.send(STATUS)
        return self.recv(12)

    def init(self, text):
        self.send(INIT, np.int32(0), np.int32(len(text)), text.encode())

    def forces(self, batch, nat):
        assert self.recv(12) == FORCEREADY
        pot = np.frombuffer(self.recv(8 * batch), np.float64)
        assert int(np.frombuffer(self.recv(4), np.int32)[0]) == nat
        f = np.frombuffer(self.recv(24 * nat * batch), np.float64).reshape(batch, nat, 3)
        vir = np.frombuffer(self.recv(72 * batch), np.float64).reshape(batch, 3, 3)
        extras = []
        for _ in range(batch):
            n = int(np.frombuffer(self.recv(4), np.int32)[0])
            extras.append(json.loads(self.recv(n)))
        return pot, f, vir, extras


def _serve_in_thread(client):
    out = {}

    def run():
        try:
            out["rc"] = client.serve()
        except BaseException as err:  # noqa: BLE001 - reported to the test
            out["error"] = err

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, out


@pytest.fixture(scope="module")
def box_case():
    atoms = water_box(triclinic=True)
    system = QMMMStructure.from_atoms(atoms, source="box")
    model = tiny_model()
    pos = atoms.positions * ANGSTROM_TO_BOHR
    rows = atoms.cell.array * ANGSTROM_TO_BOHR
    return atoms, system, model, pos, rows


def test_protocol_unbatched_and_batched_against_scripted_server(box_case):
    """Bytes on the wire: cell transposition, batch layout, coupling from INIT, extras JSON, EXIT."""
    atoms, system, model, pos, rows = box_case
    ev = ModelEvaluator(model, system, "cpu", torch.float64)
    ref = ModelEvaluator(tiny_model(), system, "cpu", torch.float64)
    half = {"coupling": 0.5}
    n = len(atoms)
    h = rows.T.copy()  # i-PI's h: lattice vectors as columns
    ih = np.linalg.inv(h)
    rng = np.random.default_rng(3)
    frames = pos[None] + rng.normal(scale=0.05, size=(4, n, 3))

    a, b = socket.socketpair()
    with a, b:
        client = IPIClient(b, ev)
        thread, out = _serve_in_thread(client)
        srv = _FakeIPI(a)
        assert srv.status() == NEEDINIT
        srv.init(" coupling : 0.5 , ")
        assert srv.status() == READY
        # consolidated i-PI: POSDATA and GETFORCE in one send, no STATUS in between
        srv.send(POSDATA, h, ih, np.int32(n), frames[0], GETFORCE)
        pot, f, vir, extras = srv.forces(1, n)
        r = ref.compute(frames[:1], rows[None], half)
        np.testing.assert_allclose(pot, r.energy, rtol=1e-13)
        np.testing.assert_allclose(f, r.forces, rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(vir, r.virial, rtol=1e-10, atol=1e-13)
        assert extras[0] == json.loads(json.dumps(r.extras(0, system)))
        # classic (threaded) i-PI: STATUS between the messages
        srv.send(POSDATA, h, ih, np.int32(n), frames[1])
        assert srv.status() == HAVEDATA
        srv.send(GETFORCE)
        pot1, f1, _, _ = srv.forces(1, n)
        np.testing.assert_allclose(f1, ref.compute(frames[1:2], rows[None], half).forces, rtol=1e-10, atol=1e-13)
        # batched: i-PI re-initialises nothing, but a new INIT with batch_size switches the layout
        srv.init(" coupling : 0.5 , , batch_size:4")
        cells = np.concatenate([np.stack([h, ih])] * 4)
        srv.send(POSDATA, np.int32(n), cells, frames, GETFORCE)
        pots, fs, virs, extras = srv.forces(4, n)
        rb = ref.compute(frames, np.repeat(rows[None], 4, 0), half)
        np.testing.assert_allclose(pots, rb.energy, rtol=1e-13)
        np.testing.assert_allclose(fs, rb.forces, rtol=1e-10, atol=1e-13)
        assert len(extras) == 4 and extras[3]["qm_charges"] == pytest.approx(rb.qm_charges[3].tolist())
        # a partial batch that i-PI padded with copies of its last request: two frames evaluated, four answered
        padded = frames[[2, 0, 0, 0]]
        srv.send(POSDATA, np.int32(n), cells, padded, GETFORCE)
        pots, fs, virs, extras = srv.forces(4, n)
        rp = ref.compute(padded[:2], np.repeat(rows[None], 2, 0), half)
        np.testing.assert_allclose(pots, rp.energy[[0, 1, 1, 1]], rtol=1e-13)
        np.testing.assert_allclose(fs, rp.forces[[0, 1, 1, 1]], rtol=1e-10, atol=1e-13)
        np.testing.assert_allclose(virs, rp.virial[[0, 1, 1, 1]], rtol=1e-10, atol=1e-13)
        assert extras[1] == extras[3] == json.loads(json.dumps(rp.extras(1, system)))
        srv.send(EXIT)
        thread.join(10)
    assert out.get("rc") == 0, out
    assert client.structures == 8 and client.requests == 4  # the padding was not evaluated



def test_fan_in_against_scripted_server(box_case):
    """One worker on three connections (`run --connections 3`): what arrives together is evaluated in one call
    per set of INIT parameters, each connection gets its own frame's results; when fewer requests come than
    expected, the worker evaluates them together once no more have come for its quiet gap, learned from the
    complete round before (its shortest, since that round's requests came at once)."""
    from qmmm_driver.ipi.fanin import FanIn

    atoms, system, model, pos, rows = box_case
    ev = ModelEvaluator(model, system, "cpu", torch.float64)
    ref = ModelEvaluator(tiny_model(), system, "cpu", torch.float64)
    calls = []
    compute = ev.compute

    def counted(positions, cells, params):
        calls.append((len(positions), params["coupling"]))
        return compute(positions, cells, params)

    ev.compute = counted
    n = len(atoms)
    h = rows.T.copy()
    ih = np.linalg.inv(h)
    frames = pos[None] + np.random.default_rng(5).normal(scale=0.05, size=(5, n, 3))
    pairs = [socket.socketpair() for _ in range(3)]
    fan = FanIn([IPIClient(b, ev) for _, b in pairs], window=0.5, min_gap=0.1)
    assert fan.quiet_gap == 0.5  # nothing learned yet: the window
    thread, out = _serve_in_thread(fan)
    srv = [_FakeIPI(a) for a, _ in pairs]
    for k, s in enumerate(srv):
        assert s.status() == NEEDINIT
        s.init(" coupling : 0.5 " if k < 2 else " coupling : 1.0 ")
        assert s.status() == READY
    # all three at once: two evaluations (two couplings), three answers
    for k, s in enumerate(srv):
        s.send(POSDATA, h, ih, np.int32(n), frames[k], GETFORCE)
    got = [s.forces(1, n) for s in srv]
    # two of three (the classic way on one of them): evaluated together after the quiet gap
    srv[0].send(POSDATA, h, ih, np.int32(n), frames[3])
    srv[1].send(POSDATA, h, ih, np.int32(n), frames[4], GETFORCE)
    assert srv[0].status() == HAVEDATA
    srv[0].send(GETFORCE)
    got += [srv[0].forces(1, n), srv[1].forces(1, n)]
    for s in srv:
        s.send(EXIT)
    thread.join(10)
    for a, b in pairs:
        a.close()
        b.close()
    assert out.get("rc") == 0, out
    assert sorted(calls[:2]) == [(1, 1.0), (2, 0.5)] and calls[2:] == [(2, 0.5)]
    assert (fan.structures, fan.requests, fan.calls) == (5, 5, 3)
    assert 0.1 <= fan.quiet_gap < 0.5  # learned from one complete round, whose requests came together
    for (pot, f, vir, extras), frame, coupling in zip(got, frames[[0, 1, 2, 3, 4]], (0.5, 0.5, 1.0, 0.5, 0.5)):
        r = ref.compute(frame[None], rows[None], {"coupling": coupling})
        np.testing.assert_allclose(pot, r.energy, rtol=1e-10)
        np.testing.assert_allclose(f, r.forces, rtol=1e-8, atol=1e-12)
        np.testing.assert_allclose(vir, r.virial, rtol=1e-8, atol=1e-12)
        assert extras[0]["qm_charges"] == pytest.approx(r.qm_charges[0].tolist(), rel=1e-8)


def test_fan_in_refuses_a_reply_it_could_block_on(box_case):
    """A worker on several connections writes each reply whole or not at all: blocked on one connection while i-PI
    waits on another for a STATUS answer, both would wait for ever (seen with <batch_size> 32 and two
    connections). The connections' send buffers are enlarged; a reply that still does not fit is an input error
    that says what to use instead, and nothing is sent."""
    from qmmm_driver.errors import InputError
    from qmmm_driver.ipi.fanin import FanIn

    atoms, system, model, pos, rows = box_case
    ev = ModelEvaluator(model, system, "cpu", torch.float64)
    n = len(atoms)
    h = rows.T.copy()
    pairs = [socket.socketpair() for _ in range(2)]
    before = pairs[0][1].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    fan = FanIn([IPIClient(b, ev) for _, b in pairs], window=0.05)
    assert pairs[0][1].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) >= before
    pairs[0][1].setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024)  # the kernel's smallest: ~4.6 kB
    assert 24 * n > pairs[0][1].getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)  # this reply cannot fit
    srv = [_FakeIPI(a) for a, _ in pairs]
    thread, out = _serve_in_thread(fan)
    for s in srv:
        assert s.status() == NEEDINIT
        s.init(" ")
        s.send(POSDATA, h, np.linalg.inv(h), np.int32(n), pos, GETFORCE)
    thread.join(20)
    assert isinstance(out.get("error"), InputError), out
    message = str(out["error"])
    assert "--connections" in message and "--shm" in message and f"{n} atoms" in message
    srv[0].sock.settimeout(0.5)
    with pytest.raises(socket.timeout):  # nothing of the reply was sent
        srv[0].sock.recv(1)
    for a, b in pairs:
        a.close()
        b.close()


def test_protocol_errors_against_scripted_server(box_case):
    """Wrong atom count and NaN results are refused without a reply; EOF without EXIT is reported."""
    atoms, system, model, pos, rows = box_case
    n = len(atoms)
    h = rows.T.copy()
    ih = np.linalg.inv(h)

    # atom count
    a, b = socket.socketpair()
    with a, b:
        client = IPIClient(b, ModelEvaluator(model, system, "cpu", torch.float64))
        thread, out = _serve_in_thread(client)
        srv = _FakeIPI(a)
        srv.init(" ")
        srv.send(POSDATA, h, ih, np.int32(n - 3), pos[:-3])
        thread.join(10)
        assert "i-PI sent 1533 atoms but the system file box has 1536" in str(out.get("error"))

    # non-finite result: nothing is sent back
    class NaNEvaluator:
        structure = system
        parameters = {}

        def compute(self, positions, cells, params):
            raise NonFiniteResult("the model gave a non-finite energy or force for frame 0")

    a, b = socket.socketpair()
    with a:
        client = IPIClient(b, NaNEvaluator())
        thread, out = _serve_in_thread(client)
        srv = _FakeIPI(a)
        srv.init(" ")
        srv.send(POSDATA, h, ih, np.int32(n), pos, GETFORCE)
        thread.join(10)
        assert isinstance(out.get("error"), NonFiniteResult)
        b.close()
        a.settimeout(5)
        try:
            data = a.recv(12)
        except ConnectionResetError:  # closed with GETFORCE unread
            data = b""
        assert data == b""  # nothing was sent before the worker closed its end
    # EOF without EXIT
    a, b = socket.socketpair()
    with b:
        client = IPIClient(b, ModelEvaluator(model, system, "cpu", torch.float64))
        thread, out = _serve_in_thread(client)
        srv = _FakeIPI(a)
        assert srv.status() == NEEDINIT
        a.close()
        thread.join(10)
        assert isinstance(out.get("error"), ConnectionLost)
        assert "without sending EXIT" in str(out["error"])


def test_a_worker_whose_shm_does_not_match_the_socket_is_refused(box_case):
    """A worker without --shm on a mode='shm' socket, or with --shm on a plain one, stops at the first POSDATA
    with a message that says which way to fix it (read the wrong way, the bytes gave a wrong atom count or a hang).
    """
    atoms, system, model, pos, rows = box_case
    n = len(atoms)
    h = rows.T.copy()
    names = [f"ipi_shm_4242_7_{kind}".encode() for kind in ("pos", "h", "ih", "pot", "force", "vir")]
    shm_posdata = [POSDATA, np.int32(n)] + [p for name in names for p in (np.int32(len(name)), name)]
    cases = (
        (False, "4", shm_posdata, "start the worker with --shm"),
        (False, "1", shm_posdata, "start the worker with --shm"),
        (True, "1", [POSDATA, h, np.linalg.inv(h), np.int32(n), pos], "drop --shm"),
        (True, "4", [POSDATA, np.int32(n)] + [h, np.linalg.inv(h)] * 4 + [pos] * 4, "drop --shm"),
    )
    for shm, batch, message, words in cases:
        a, b = socket.socketpair()
        with a, b:
            client = IPIClient(b, ModelEvaluator(model, system, "cpu", torch.float64), shm=shm)
            thread, out = _serve_in_thread(client)
            srv = _FakeIPI(a)
            srv.init(f" batch_size:{batch} ")
            srv.send(*message)
            thread.join(10)
            assert not thread.is_alive(), (shm, batch)
            assert isinstance(out.get("error"), ProtocolError) and words in str(out["error"]), (shm, batch, out)
            assert client.requests == 0


# --------------------------------------------------------------------------- real i-PI


def test_ipi_records_evaluator_forces_and_energy(procs, tmp_path, tiny_model_file):
    """Forces/potential i-PI records for a triclinic periodic box equal Evaluator.compute (float64)."""
    atoms = water_box(triclinic=True)
    frame = write_frame(atoms, tmp_path / "box.extxyz")
    name = procs.socket_name()
    xml = ipi_input(name, frame.name, steps=3, parameters="{coupling: 0.5}")
    ipi, workers = start_workers_then_ipi(
        procs, ["--model", tiny_model_file, "--system", frame, "--unix", name, "--dtype", "float64"], xml)
    finish_run(procs, ipi, workers)

    pos = read_ipi_bin(tmp_path / "sim.pos_0.bin")
    frc = read_ipi_bin(tmp_path / "sim.frc_0.bin")
    props = read_ipi_properties(tmp_path / "sim.out")
    assert len(pos) == len(frc) == len(props["potential"]) == 4

    system = QMMMStructure.read(frame)
    ev = ModelEvaluator(load_model(tiny_model_file), system, "cpu", torch.float64)
    q = np.stack([p[1] for p in pos])
    cells = np.stack([p[0].T for p in pos])  # i-PI h has lattice vectors as columns
    res = ev.compute(q, cells, {"coupling": 0.5})
    f_ipi = np.stack([f[1] for f in frc])
    scale = np.abs(res.forces).max()
    np.testing.assert_allclose(f_ipi, res.forces, rtol=1e-8, atol=1e-8 * scale)
    np.testing.assert_allclose(props["potential"], res.energy, rtol=1e-10)
    assert np.abs(np.diff(props["potential"])).max() > 1e-6  # the structures really changed

    # the extras travelled: qm_charges of every step as JSON
    blocks = re.split(r"#EXTRAS\(raw\)# Step:\s+\d+", (tmp_path / "sim.xtr_0").read_text())[1:]
    assert len(blocks) == 4
    for k, block in enumerate(blocks):
        raw = ast.literal_eval(block.strip())["raw"]
        extras = json.loads(raw[0] if isinstance(raw, list) else raw)
        assert extras["qm_charges"] == pytest.approx(res.qm_charges[k].tolist(), rel=1e-10)
        assert extras["qm_indices"] == [0, 1, 2]

    # the comparison is sensitive to what it checks: coupling and the cell convention
    assert np.abs(ev.compute(q, cells).forces - f_ipi).max() > 1e-6 * scale
    try:
        wrong = ev.compute(q, cells.transpose(0, 2, 1), {"coupling": 0.5})
        assert np.abs(wrong.forces - f_ipi).max() > 1e-6 * scale
    except Exception as err:  # the untransposed matrix may not even be a valid cell for the cutoff
        assert "cell" in str(err)


def test_nve_conserves_energy(procs, tmp_path, tiny_model_file):
    """NVE with the model (+ a harmonic tether that keeps the untrained model's water intact).

    The untrained model has no repulsive wall, so without the tether the QM water
    dissociates within ~20 fs; the tether (i-PI's own ffdebye, exact forces) keeps
    every atom near its start so the run samples a sane region of the model. The
    tether is not translation invariant, so i-PI's fixcom (which removes the
    centre-of-mass momentum it imparts) must be off for the energy to be conserved.
    """
    atoms = water_cluster()
    frame = write_frame(atoms, tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    n = len(atoms)
    k = 10.0 / HARTREE / ANGSTROM_TO_BOHR**2  # 10 eV/A^2 in Hartree/Bohr^2
    np.savetxt(tmp_path / "hessian.txt", np.eye(3 * n) * k)
    np.savetxt(tmp_path / "xref.txt", (atoms.positions * ANGSTROM_TO_BOHR).reshape(-1))
    tether = (f"<ffdebye name='tether'><hessian mode='file' shape='({3 * n},{3 * n})'> hessian.txt </hessian>"
              f"<x_reference mode='file'> xref.txt </x_reference></ffdebye>")
    dt_fs, steps = 0.25, 200
    name = procs.socket_name()
    xml = ipi_input(name, frame.name, steps=steps, dt_fs=dt_fs, temperature=300.0, trajectories=False,
                    extra_forcefields=tether, extra_forces="<force forcefield='tether'/>", fixcom=False,
                    properties="step, time{picosecond}, conserved{atomic_unit}, potential{atomic_unit}, "
                               "kinetic_md{atomic_unit}")
    ipi, workers = start_workers_then_ipi(
        procs, ["--model", tiny_model_file, "--system", frame, "--unix", name, "--dtype", "float64"], xml)
    finish_run(procs, ipi, workers, timeout=150)

    props = read_ipi_properties(tmp_path / "sim.out")
    t, e = props["time"], props["conserved"]
    assert len(t) == steps + 1
    slope = np.polyfit(t, e, 1)[0]  # Hartree / ps
    drift = slope / n
    fluct = np.std(e - np.polyval(np.polyfit(t, e, 1), t)) / n
    kin_range = np.ptp(props["kinetic_md"])
    print(f"\nNVE drift: {drift:.3e} Ha/atom/ps = {drift * HARTREE * 1e3:.3e} meV/atom/ps "
          f"(float64, {n} atoms, dt {dt_fs} fs, {steps} steps, 300 K, tether 10 eV/A^2); "
          f"residual fluctuation {fluct * HARTREE * 1e3:.2e} meV/atom; kinetic energy range {kin_range:.2e} Ha")
    assert kin_range > 1e-3  # energy really flows between kinetic and potential
    # measured ~1.5e-6 Ha/atom/ps and ~6e-7 Ha/atom (Verlet error, ~dt^2); the same run with the MM
    # forces dropped drifts by 3e-5 to 3e-4, with forces off by a Bohr/Angstrom factor by ~1e-3
    assert abs(drift) < 5e-6  # Ha/atom/ps
    assert fluct < 2e-6  # Ha/atom


def test_a_worker_killed_by_hand_does_not_stall_ipi(procs, tmp_path, tiny_model_file):
    """The shipped templates set <consolidate_messages>false: kill -9 of a worker started by hand leaves i-PI
    waiting for another, which finishes the run (i-PI hands it the interrupted request again)."""
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    name = procs.socket_name()
    xml = ipi_input(name, frame.name, steps=40, dt_fs=0.25, nbeads=2, trajectories=False)
    xml = xml.replace(f"<address>{name}</address>", f"<address>{name}</address> "
                                                    "<consolidate_messages> false </consolidate_messages>")
    args = ["--model", tiny_model_file, "--system", frame, "--unix", name]
    ipi, workers = start_workers_then_ipi(procs, args, xml)
    props = tmp_path / "sim.out"
    procs.wait_for(lambda: props.exists() and sum(1 for line in props.read_text().splitlines()
                                                  if line.strip() and not line.startswith("#")) >= 5,
                   "5 steps", timeout=90, procs=[ipi])
    procs.kill(workers[0])
    second = procs.start_worker(args, log="second.log")
    assert procs.finish(ipi, 120) == 0, procs.log(ipi)[-3000:]
    assert procs.finish(second, 60) == 0
    steps = [int(s) for s in read_ipi_properties(props)["step"]]
    assert steps == list(range(41))


@pytest.mark.parametrize("launch", ["two processes", "mpiexec -n 2"])
def test_two_workers_serve_pimd(procs, tmp_path, tiny_model_file, launch):
    """Two workers serve one i-PI running 4-bead PIMD; both get requests."""
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    name = procs.socket_name()
    xml = ipi_input(name, frame.name, steps=12, dt_fs=0.25, nbeads=4, trajectories=False)
    args = ["--model", tiny_model_file, "--system", frame, "--unix", name]
    mpi = 2 if launch.startswith("mpiexec") else None
    ipi, workers = start_workers_then_ipi(procs, args, xml, n_workers=2, mpi=mpi)
    finish_run(procs, ipi, workers)
    log = "\n".join(procs.log(w) for w in workers)
    counts = served_counts(log)
    assert len(counts) == 2, log
    assert all(s > 0 for s, _ in counts), log
    assert sum(s for s, _ in counts) == 4 * 13, log  # 4 beads x (initial + 12 steps), each exactly once
    if mpi:
        assert "rank 0/2" in log and "rank 1/2" in log, log
        assert "[rank 0/2] served" in log and "[rank 1/2] served" in log, log


def test_batched_equals_unbatched(procs, tmp_path, tiny_model_file):
    """<batch_size>4</batch_size>: one compute call per 4 beads, same forces as one-by-one; the same through
    i-PI's mode='shm' (positions and forces in shared memory, `run --shm`), batched and not; and an unbatched
    socket served by one worker on four connections (`run --connections 4`), with i-PI's default messaging, with
    <consolidate_messages> false and in shm mode: the beads that arrive together evaluated in one call."""
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    forces, counts, extras, logs = {}, {}, {}, {}
    cases = ((1, "unix"), (4, "unix"), (1, "shm"), (4, "shm"), (1, "fan-in"), (1, "fan-in, polled"),
             (1, "fan-in, shm"))
    runs = {}  # the seven runs side by side, each with its own socket and folder
    try:
        for batch, mode in cases:
            run_dir = tmp_path / f"batch{batch}-{mode.replace(', ', '-')}"
            run_dir.mkdir()
            sub = Procs(run_dir)
            runs[batch, mode] = sub, run_dir
            name = sub.socket_name()
            xml = ipi_input(name, str(frame), steps=4, dt_fs=0.25, nbeads=4, batch_size=batch,
                            mode="shm" if "shm" in mode else "unix")
            if mode.endswith("polled"):
                xml = xml.replace("</address>", "</address> <consolidate_messages>false</consolidate_messages>")
            args = ["--model", tiny_model_file, "--system", frame, "--unix", name, "--dtype", "float64"]
            args += (["--shm"] if "shm" in mode else []) + (["--connections", "4"] if "fan-in" in mode else [])
            runs[batch, mode] += start_workers_then_ipi(sub, args, xml)
        for key, (sub, run_dir, ipi, workers) in runs.items():
            finish_run(sub, ipi, workers)
            forces[key] = np.stack([[f[1] for f in read_ipi_bin(run_dir / f"sim.frc_{b}.bin")] for b in range(4)])
            logs[key] = sub.log(workers[0])
            counts[key] = served_counts(logs[key])[0]
            extras[key] = (run_dir / "sim.xtr_0").read_text()
    finally:
        for sub, *_ in runs.values():
            sub.cleanup()
    ref = forces[1, "unix"]
    assert ref.shape == (4, 5, 93, 3)
    scale = np.abs(ref).max()
    for key in cases[1:]:
        np.testing.assert_allclose(forces[key], ref, rtol=1e-8, atol=1e-9 * scale, err_msg=str(key))
    for key in cases[4:]:  # 20 structures, 20 requests, in fewer calls
        assert counts[key] == (20, 20), logs[key]
        calls = int(re.search(r"\((\d+) batched calls\)", logs[key]).group(1))
        assert 5 <= calls <= 10, logs[key]
        numbers = [np.array(re.findall(r"-?\d+\.\d+(?:e-?\d+)?", extras[k]), dtype=float) for k in (key, (1, "unix"))]
        np.testing.assert_allclose(*numbers, rtol=1e-8, atol=1e-12)  # the same extras (charges, dipoles)
    for batch in (1, 4):  # the same numbers either way, and the JSON extras still go through the socket
        assert np.array_equal(forces[batch, "shm"], forces[batch, "unix"])
        assert extras[batch, "shm"] == extras[batch, "unix"]
    assert np.abs(ref[0] - ref[1]).max() > 1e-6 * scale  # beads differ: a real batch
    assert counts[1, "unix"] == counts[1, "shm"] == (20, 20)
    # 4 structures per request; step 0's four identical beads evaluated once
    assert counts[4, "unix"] == counts[4, "shm"] == (17, 5)


def test_ipi_stock_driver_hosts_the_evaluator_batched(tmp_path, tiny_model_file):
    """i-PI's own driver with the batched PES (`i-pi-py_driver -m custom -P qmmm_driver/ipi/pes.py`, the fair
    baseline of benchmarks/ipi_pimd.py) loads the file by path and gives the forces `qmmm-driver run` gives."""
    import qmmm_driver.ipi.pes as pes

    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    forces = {}
    for client in ("run", "stock"):
        run_dir = tmp_path / client
        run_dir.mkdir()
        sub = Procs(run_dir)
        try:
            name = sub.socket_name()
            ipi = sub.start_ipi(ipi_input(name, str(frame), steps=2, dt_fs=0.25, nbeads=4, batch_size=4))
            sub.wait_for(lambda: sub.sockets[-1].exists(), "i-PI's socket", procs=[ipi])
            if client == "run":
                worker = sub.start_worker(["--model", tiny_model_file, "--system", frame, "--unix", name,
                                           "--dtype", "float64"])
            else:
                worker = sub._start(["i-pi-py_driver", "-u", "-a", name, "-m", "custom", "-P", pes.__file__,
                                     "-o", f"model={tiny_model_file},system={frame},dtype=float64"], "stock.log")
            finish_run(sub, ipi, [worker])
            forces[client] = np.stack([[f[1] for f in read_ipi_bin(run_dir / f"sim.frc_{b}.bin")] for b in range(4)])
        finally:
            sub.cleanup()
    scale = np.abs(forces["run"]).max()
    np.testing.assert_allclose(forces["stock"], forces["run"], rtol=1e-8, atol=1e-9 * scale)


@pytest.mark.slow
def test_shm_mismatch_against_a_real_ipi(tmp_path, tiny_model_file):
    """A real i-PI, batched: a worker without --shm on a mode='shm' socket (it used to wait for bytes that never
    came) and one with --shm on a unix socket both exit 3 at once, saying how to fix it."""
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    for mode, flag, words in (("shm", [], "start the worker with --shm"), ("unix", ["--shm"], "drop --shm")):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        sub = Procs(run_dir)
        try:
            name = sub.socket_name()
            xml = ipi_input(name, str(frame), steps=4, dt_fs=0.25, nbeads=4, batch_size=4, mode=mode)
            args = ["--model", tiny_model_file, "--system", frame, "--unix", name, "--dtype", "float64"] + flag
            ipi, workers = start_workers_then_ipi(sub, args, xml)
            assert sub.finish(workers[0], 60) == 3
            assert words in sub.log(workers[0])
        finally:
            sub.cleanup()
