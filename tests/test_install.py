"""`pip install .` (not editable) in a fresh virtual environment runs the main job: templates and shipped models
are package data. Slow: it builds and installs the package."""

import os
import subprocess
import sys

import pytest

from conftest import REPO

pytestmark = pytest.mark.slow


def test_a_plain_install_runs_the_shipped_main_job(tmp_path):
    venv = tmp_path / "venv"
    # the heavy dependencies (torch, OpenMM, PySCF, i-PI) come from this environment; qmmm-driver itself is copied
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
    python = venv / "bin" / "python"
    res = subprocess.run([str(python), "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--quiet",
                          str(REPO)], capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    work = tmp_path / "elsewhere"  # not the source tree
    work.mkdir()
    where = subprocess.run([str(python), "-c", "import qmmm_driver; print(qmmm_driver.__file__)"], cwd=work,
                           capture_output=True, text=True, check=True).stdout.strip()
    assert where.startswith(str(venv)), where
    env = {**os.environ, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([str(venv / "bin" / "qmmm-driver"), "launch", "md-nvt", "--example", "water",
                          "--total-steps", "10", "--run-dir", "run", "--no-progress"], cwd=work, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    steps = [line.split()[0] for line in (work / "run" / "simulation.out").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert [int(float(s)) for s in steps] == [0, 10]  # the template writes properties every 10 steps
    assert "<step>10</step>" in (work / "run" / "RESTART").read_text()
