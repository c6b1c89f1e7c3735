"""`qmmm-driver launch`: one command runs i-PI and its workers, shows progress, and cleans up after the end of
the run, Ctrl-C, SIGTERM, SIGHUP, a killed worker or a stalled run, leaving the outputs and a checkpoint; a
restart continues from the newest checkpoint with every step exactly once."""

import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from conftest import SMALL_MM_ARGS, read_ipi_properties

from qmmm_driver.ipi.outputs import checkpoint_step
from qmmm_driver.ipi.shm import NAME_PREFIX, SHM_DIR
from qmmm_driver.launcher import TEMPLATES, auto_batch

LAUNCH = [sys.executable, "-m", "qmmm_driver.cli", "launch"]


@pytest.fixture
def example(tmp_path, small_box, small_model_file):
    d = tmp_path / "example"
    d.mkdir()
    mm = [a for a in SMALL_MM_ARGS if a not in ("--forcefield", "amber14/tip3p.xml")]
    (d / "example.toml").write_text(
        f'model = "{small_model_file}"\nsystem = "{small_box["extxyz"]}"\npdb = "{small_box["pdb"]}"\n'
        f'forcefield = ["amber14/tip3p.xml"]\nmm_options = {mm!r}\n'.replace("'", '"'))
    return d


def short_input(tmp_path, template: str, steps: int, checkpoint_stride: int = 1, nbeads: int | None = None) -> Path:
    root = ET.parse(TEMPLATES / template).getroot()
    root.find("total_steps").text = f" {steps} "
    if steps > 1000:  # a run to be interrupted: nothing but the untrained model holds the QM water together, so
        # keep it from flying apart (in ~250 steps of 0.5 fs) before a slow machine has delivered the fault
        for dt in root.iter("timestep"):
            dt.text = " 0.05 "
    for out in root.find("output"):
        out.set("stride", str(checkpoint_stride) if out.tag == "checkpoint" else "1")
    if nbeads is not None:
        for init in root.iter("initialize"):
            init.set("nbeads", str(nbeads))
    path = tmp_path / template
    ET.ElementTree(root).write(path)
    return path


def steps_done(run_dir: Path) -> list[int]:
    out = run_dir / "simulation.out"
    if not out.exists() or "column" not in out.read_text():
        return []
    try:
        return [int(s) for s in read_ipi_properties(out)["step"]]
    except (ValueError, KeyError, IndexError):  # i-PI is writing the last line
        return []


def leftovers(run_dir: Path) -> list[str]:
    """Processes and socket files of this run still around."""
    tags = set(re.findall(r"qd[0-9a-f]{8}-\w+", " ".join(p.read_text() for p in run_dir.glob("*input.xml"))))
    alive = subprocess.run(["pgrep", "-af", str(run_dir)], capture_output=True, text=True).stdout.splitlines()
    alive += [line for t in tags for line in
              subprocess.run(["pgrep", "-af", t], capture_output=True, text=True).stdout.splitlines()]
    sockets = [str(p) for t in tags for p in Path("/tmp").glob(f"ipi_{t}")]
    # shared memory of shm sockets (NAME_PREFIX + <i-PI pid>_...) whose i-PI is gone
    segments = [str(p) for p in SHM_DIR.glob(NAME_PREFIX + "*")
                if not Path(f"/proc/{p.name[len(NAME_PREFIX):].split('_')[0]}").exists()]
    return [line for line in alive if "pgrep" not in line] + sockets + segments


def wait_for_steps(run_dir: Path, n: int, proc, timeout: float = 180.0) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if len(steps_done(run_dir)) >= n:
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.5)
    raise AssertionError(f"fewer than {n} steps in {timeout} s")


def start(args, **kw):
    return subprocess.Popen(LAUNCH + [str(a) for a in args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, **kw)


def test_launch_runs_to_the_end_and_cleans_up(tmp_path, example):
    run_dir = tmp_path / "run"
    # a relative --run-dir, as the default is (the workers run inside it)
    res = subprocess.run(LAUNCH + [str(short_input(tmp_path, "md-nvt.xml", 4)), "--example", str(example),
                                   "--run-dir", "run", "--no-progress"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert steps_done(run_dir) == [0, 1, 2, 3, 4]
    assert "running md-nvt.xml on example" in res.stderr
    assert leftovers(run_dir) == []
    # the workers saw i-PI's EXIT
    assert "served" in (run_dir / "qmmm-w0.log").read_text()


# the "ignored" case (SIGINT ignored by the parent, as for a script's background job) runs by default; the plain
# case is the same path and runs with -m slow, to keep the default run within its budget
@pytest.mark.parametrize("inherited", [pytest.param("default", marks=pytest.mark.slow), "ignored"])
def test_ctrl_c_stops_softly_and_restart_continues(tmp_path, example, inherited):
    """Also when the launcher starts with SIGINT ignored (a job a script started with '&')."""
    run_dir = tmp_path / "run"
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if inherited == "ignored" else None
    proc = start([short_input(tmp_path, "md-nvt.xml", 100000), "--example", example, "--run-dir", run_dir,
                  "--no-progress"], preexec_fn=ignore)
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "interrupted" in err
    done = steps_done(run_dir)
    restart = (run_dir / "RESTART").read_text()
    step = int(re.search(r"<step>\s*(\d+)\s*</step>", restart).group(1))
    assert step >= 2 and done[-1] >= step - 1
    assert leftovers(run_dir) == []
    # continue two more steps from the checkpoint
    (run_dir / "RESTART").write_text(re.sub(r"<total_steps>\s*\d+\s*</total_steps>",
                                            f"<total_steps>{step + 2}</total_steps>", restart))
    res = subprocess.run(LAUNCH + ["--restart", "--example", str(example), "--run-dir", str(run_dir),
                                   "--no-progress", str(TEMPLATES / "md-nvt.xml")],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    after = steps_done(run_dir)
    assert after[-1] == step + 2 and after[:len(done)] == done
    assert leftovers(run_dir) == []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_scheduler_signals_stop_softly(tmp_path, example, sig):
    """What a batch scheduler sends at the wall-time limit (SIGTERM) or a closed terminal (SIGHUP) is a Ctrl-C:
    i-PI writes RESTART, every process stops, no socket file is left."""
    run_dir = tmp_path / "run"
    proc = start([short_input(tmp_path, "md-nvt.xml", 100000), "--example", example, "--run-dir", run_dir,
                  "--no-progress"])
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err[-3000:]
    assert f"stopped by {signal.Signals(sig).name}" in err
    assert (run_dir / "RESTART").exists() and leftovers(run_dir) == []


def test_a_killed_launcher_leaves_no_orphans(tmp_path, example):
    """kill -9 of the launcher itself: its watchdog stops the run in order (i-PI writes RESTART), nothing keeps
    running (the watchdog neither), no socket file stays."""
    run_dir = tmp_path / "run"
    proc = start([short_input(tmp_path, "md-nvt.xml", 100000), "--example", example, "--run-dir", run_dir,
                  "--no-progress"])
    wait_for_steps(run_dir, 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    deadline = time.time() + 60
    while time.time() < deadline and leftovers(run_dir):
        time.sleep(0.5)
    assert leftovers(run_dir) == []
    assert (run_dir / "RESTART").exists()
    assert "the launcher is gone" in (run_dir / "watchdog.log").read_text()


def test_killed_worker_stops_the_run_cleanly(tmp_path, example):
    run_dir = tmp_path / "run"
    proc = start([short_input(tmp_path, "md-nvt.xml", 100000), "--example", example, "--run-dir", run_dir,
                  "--no-progress"])
    wait_for_steps(run_dir, 2, proc)
    address = re.search(r"qd[0-9a-f]{8}-qmmm", (run_dir / "input.xml").read_text()).group(0)
    pids = subprocess.run(["pgrep", "-f", f"run .*--unix {address}"], capture_output=True, text=True).stdout.split()
    assert pids
    for pid in pids:
        os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 1, err[-3000:]
    assert re.search(r"worker qmmm-w0 exited with code -9", err)
    assert "continue with: qmmm-driver launch --restart" in err
    assert (run_dir / "RESTART").exists() and len(steps_done(run_dir)) >= 2
    assert leftovers(run_dir) == []


@pytest.mark.slow  # about 50 s: waits out a stall timeout
def test_a_stalled_run_is_stopped(tmp_path, example):
    """A worker frozen (as one killed in a way i-PI does not notice): no step for --stall-timeout seconds ends
    the run cleanly, with a message, instead of a launcher printing the same step forever."""
    run_dir = tmp_path / "run"
    proc = start([short_input(tmp_path, "md-nvt.xml", 100000), "--example", example, "--run-dir", run_dir,
                  "--no-progress", "--stall-timeout", "15"])
    wait_for_steps(run_dir, 2, proc)
    address = re.search(r"qd[0-9a-f]{8}-qmmm", (run_dir / "input.xml").read_text()).group(0)
    pids = subprocess.run(["pgrep", "-f", f"run .*--unix {address}"], capture_output=True, text=True).stdout.split()
    for pid in pids:
        os.kill(int(pid), signal.SIGSTOP)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 1, err[-3000:]
    assert "has not advanced for 15 s" in err
    assert leftovers(run_dir) == []


def test_restart_after_ipi_died_continues_from_the_periodic_checkpoint(tmp_path, example):
    """i-PI killed (no RESTART written): --restart takes simulation.chk, cuts the outputs back to its step, and
    the finished run has every step exactly once, in properties and trajectories."""
    run_dir = tmp_path / "run"
    proc = start([short_input(tmp_path, "md-nvt.xml", 100000, checkpoint_stride=4), "--example", example,
                  "--run-dir", run_dir, "--no-progress"])
    wait_for_steps(run_dir, 11, proc)
    # i-PI writes its checkpoint at step 0 too, and a kill while it serialises leaves an empty file: the launcher's
    # copy (polled every 0.5 s) is then the restart point, and with this test's fast steps a whole stride can pass
    # between two polls, so wait until the copy has seen a checkpoint past the start
    kept = run_dir / "simulation.chk.complete"
    deadline = time.time() + 60
    while not (kept.is_file() and (checkpoint_step(kept) or 0) >= 4):
        assert time.time() < deadline and proc.poll() is None, "the launcher kept no checkpoint past step 0"
        time.sleep(0.1)
    ipi = subprocess.run(["pgrep", "-f", "i-pi input.xml"], capture_output=True, text=True).stdout.split()
    for pid in ipi:
        if str(run_dir) in Path(f"/proc/{pid}/cwd").resolve().as_posix():
            os.kill(int(pid), signal.SIGKILL)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and "i-PI exited with code -9" in err, err[-3000:]
    assert not (run_dir / "RESTART").exists() and leftovers(run_dir) == []
    total = steps_done(run_dir)[-1] + 5  # a few steps beyond where the killed run got
    res = subprocess.run(LAUNCH + ["--restart", "--example", str(example), "--run-dir", str(run_dir),
                                   "--total-steps", str(total)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    # i-PI's periodic checkpoint, or the launcher's verified copy of it where the kill tore i-PI's file
    chk = int(re.search(r"from simulation\.chk(?:\.complete)? at step (\d+)", res.stderr).group(1))
    # >= 4, not necessarily the newest one the run had passed: the kill can tear i-PI's file while the launcher's
    # copy is still one before
    assert chk % 4 == 0 and 4 <= chk <= total - 5
    assert re.search(rf"\b{chk}/{total}\b", res.stderr)  # the progress bar starts where the run left off
    assert steps_done(run_dir) == list(range(total + 1))
    for traj in ("simulation.pos_0.extxyz",):
        steps = [int(m) for m in re.findall(r"Step:\s+(\d+)", (run_dir / traj).read_text())]
        assert steps == list(range(total + 1)), traj
    assert leftovers(run_dir) == []


def test_launch_refuses_bad_input(tmp_path, example):
    res = subprocess.run(LAUNCH + [str(tmp_path / "missing.xml"), "--example", str(example)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "missing.xml does not exist" in res.stderr and "shipped templates" in res.stderr
    res = subprocess.run(LAUNCH + [str(TEMPLATES / "md-nvt.xml"), "--example", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "has no example.toml" in res.stderr
    res = subprocess.run(LAUNCH + ["md-nvt", "--example", str(example), "--workers", "0"],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "--workers 0" in res.stderr
    res = subprocess.run(LAUNCH + ["--restart", "--example", str(example), "--run-dir", str(tmp_path)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 2 and "holds no checkpoint" in res.stderr


def test_a_failed_launch_leaves_a_directory_launch_takes_again(tmp_path, example):
    """A launch that fails before i-PI wrote anything (here: the model file is not a model) can simply be run
    again in the same directory once the cause is fixed."""
    bad = tmp_path / "bad"
    bad.mkdir()
    text = (example / "example.toml").read_text()
    (bad / "broken.pt").write_text("not a model")
    (bad / "example.toml").write_text(re.sub(r'model = "[^"]*"', f'model = "{bad / "broken.pt"}"', text))
    run_dir = tmp_path / "run"
    res = subprocess.run(LAUNCH + [str(short_input(tmp_path, "md-nvt.xml", 2)), "--example", str(bad),
                                   "--run-dir", str(run_dir), "--no-progress"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 1 and "exited with code 2" in res.stderr, res.stderr[-2000:]
    assert leftovers(run_dir) == []
    res = subprocess.run(LAUNCH + [str(short_input(tmp_path, "md-nvt.xml", 2)), "--example", str(example),
                                   "--run-dir", str(run_dir), "--no-progress"], capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert steps_done(run_dir) == [0, 1, 2]


def test_pimd_beads_go_to_the_model_in_batches_and_padding_is_not_evaluated(tmp_path, example):
    run_dir = tmp_path / "run"
    res = subprocess.run(LAUNCH + [str(short_input(tmp_path, "pimd.xml", 6, nbeads=4)), "--example", str(example),
                                   "--run-dir", str(run_dir), "--no-progress"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    ff = next(f for f in ET.parse(run_dir / "input.xml").getroot().iter("ffsocket") if f.get("name") == "qmmm")
    assert int(ff.findtext("batch_size")) == 4 and float(ff.findtext("latency")) > 1e-4
    # a batch goes through shared memory (a worker slow to read it off the socket would be dropped by i-PI)
    assert ff.get("mode") == "shm" and "+ shared memory" in (run_dir / "qmmm-w0.log").read_text()
    served, requests = map(int, re.search(r"served (\d+) structures in (\d+) requests",
                                          (run_dir / "qmmm-w0.log").read_text()).groups())
    # 7 force evaluations of 4 beads; i-PI pads a partial batch with copies, which the worker does not evaluate
    assert requests >= 7 and served <= 4 * 7


def test_auto_batch_fills_whole_batches():
    """The batch the launcher picks divides the beads, so a step's structures fill whole batches."""
    for nbeads in (1, 2, 4, 8, 16, 32):
        for systems in (1, 4):
            for workers in (1, 2, 3, 4):
                b = auto_batch(nbeads, systems, workers)
                assert nbeads % b == 0 and b <= -(-nbeads * systems // workers)
    assert auto_batch(16, 1, 1) == 16 and auto_batch(16, 1, 2) == 8 and auto_batch(16, 4, 2) == 16


def test_worker_warnings_reach_the_launcher_once_each(tmp_path):
    """The launcher echoes the warning lines its workers log (a model extrapolating): only new ones, whole
    lines, and not those a previous run left in the same log."""
    from qmmm_driver.launcher import Run

    log = tmp_path / "model-w0.log"
    log.write_text("qmmm-driver run: warning: from the previous run\n")
    run = Run(tmp_path)
    run.watch_log("model-w0")
    assert run.new_warnings() == []
    with open(log, "a") as fh:
        fh.write("qmmm-driver run: cpu, 1 thread\nqmmm-driver run: warning: the model is extrapolating: A\n"
                 "qmmm-driver run: warning: half a li")
    assert run.new_warnings() == [("model-w0", "qmmm-driver run: warning: the model is extrapolating: A")]
    with open(log, "a") as fh:
        fh.write("ne\n")
    assert run.new_warnings() == [("model-w0", "qmmm-driver run: warning: half a line")]
    assert run.new_warnings() == []
