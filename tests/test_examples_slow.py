"""Long end-to-end runs on the shipped examples (pytest -m slow; minutes each, not in CI's default run)."""

import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, read_ipi_properties
from qmmm_driver.launcher import MODELS, TEMPLATES
from qmmm_driver.nn.io import load_model

pytestmark = pytest.mark.slow


def short(template: str, steps: int, tmp_path: Path, nbeads: int | None = None) -> Path:
    root = ET.parse(TEMPLATES / template).getroot()
    root.find("total_steps").text = f" {steps} "
    for out in root.find("output"):
        out.set("stride", "1")
    if nbeads:
        for init in root.iter("initialize"):
            init.set("nbeads", str(nbeads))
    path = tmp_path / template
    ET.ElementTree(root).write(path)
    return path


@pytest.mark.parametrize("example", ["water", "sn2"])
def test_shipped_model_runs_pimd(tmp_path, example):
    """The main job on each shipped model: PIMD (16 beads) through the launcher, with OpenMM, stays physical."""
    model = MODELS / example / "model.pt"
    if not model.exists():
        pytest.fail(f"{model} is missing: the shipped model is part of the package")
    run = tmp_path / "run"
    res = subprocess.run([sys.executable, "-m", "qmmm_driver.cli", "launch", str(short("pimd.xml", 20, tmp_path)),
                          "--example", example, "--run-dir", str(run), "--no-progress"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    props = read_ipi_properties(run / "simulation.out")
    assert list(props["step"]) == list(range(21))
    assert np.all(np.isfinite(props["conserved"]))
    assert 100 < props["temperature"].mean() < 600  # no blow-up
    dipoles = (run / "simulation.dipole").read_text()
    assert dipoles.count("#EXTRAS_COMPONENT_RAW") == 21


@pytest.mark.parametrize("example", ["water", "sn2"])
def test_shipped_metrics_are_reproduced(example):
    """`evaluate` on a shipped model and its training run's test split reproduces the metrics stored with it."""
    folder = REPO / "examples" / example
    shipped = json.loads((folder / "test_metrics.json").read_text())
    # the files of the config the shipped model was trained with (the last of its fine-tuning runs)
    data = load_model(MODELS / example / "model.pt").metadata["config"]["data"]["files"]
    res = subprocess.run([sys.executable, "-m", "qmmm_driver.cli", "evaluate", "--model", str(MODELS / example / "model.pt"),
                          "--data", *[str(folder / f) for f in data], "--split", str(folder / "split.json"), "--json"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout)
    assert got["n_frames"] == shipped["n_frames"]
    assert got["energy_mae_meV"] == pytest.approx(shipped["energy_mae_meV"], rel=1e-3)
    assert got["force_mae_meV_per_A"] == pytest.approx(shipped["force_mae_meV_per_A"], rel=1e-3)
