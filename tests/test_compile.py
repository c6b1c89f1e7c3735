"""qmmm-driver compile: the AOT-compiled potential equals the eager one (any batch size, any MM count), the
worker uses it, and a package that does not fit the model is refused. Slow: one compile takes minutes."""

import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import CLUSTER_BOX, served_counts, start_workers_then_ipi, finish_run, ipi_input, tiny_model, \
    water_box, water_cluster, write_frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    from qmmm_driver.nn.compile import compiled_path
    from qmmm_driver.nn.io import load_model, save_model

    d = tmp_path_factory.mktemp("compiled")
    path = save_model(tiny_model(), d / "tiny.pt")
    res = subprocess.run([sys.executable, "-m", "qmmm_driver.cli", "compile", "--model", str(path), "--n-qm", "3"],
                         capture_output=True, text=True, timeout=1800)
    assert res.returncode == 0, res.stderr[-3000:]
    package = compiled_path(path, 3, "cpu", torch.float32)
    assert package.exists() and f"wrote {package}" in res.stdout
    return load_model(path), path, package


@pytest.mark.parametrize("atoms", [water_cluster(), water_box()], ids=["cluster", "periodic"])
def test_compiled_equals_eager(compiled, atoms):
    from qmmm_driver.evaluator import ModelEvaluator
    from qmmm_driver.nn.compile import load_compiled
    from qmmm_driver.structures import QMMMStructure

    model, _, package = compiled
    structure = QMMMStructure.from_atoms(atoms)
    runner = load_compiled(package, model.checksum, 3, "cpu", torch.float32)
    eager = ModelEvaluator(model, structure)
    fast = ModelEvaluator(model, structure, compiled=runner)
    rng = np.random.default_rng(0)
    for batch in (1, 5):
        pos = structure.positions + rng.normal(scale=0.2, size=(batch,) + structure.positions.shape)
        cells = None if structure.cell is None else np.repeat(structure.cell[None], batch, 0)
        a, b = eager.compute(pos, cells), fast.compute(pos, cells)
        scale = np.abs(a.forces).max()
        assert np.allclose(a.energy, b.energy, rtol=0, atol=2e-5)
        assert np.abs(a.forces - b.forces).max() < 1e-4 * scale
        assert np.allclose(a.qm_charges, b.qm_charges, atol=1e-5)


def test_a_package_for_another_model_is_refused(compiled):
    from qmmm_driver.nn.compile import CompiledModelError, load_compiled

    model, _, package = compiled
    with pytest.raises(CompiledModelError, match="model_checksum"):
        load_compiled(package, "0" * 64, 3, "cpu", torch.float32)
    with pytest.raises(CompiledModelError, match="n_qm 3 \\(need 6\\)"):
        load_compiled(package, model.checksum, 6, "cpu", torch.float32)


def test_the_worker_serves_the_compiled_model(procs, tmp_path, compiled):
    _, path, package = compiled
    frame = write_frame(water_cluster(), tmp_path / "cluster.extxyz", box=CLUSTER_BOX)
    name = procs.socket_name()
    xml = ipi_input(name, frame.name, steps=4, dt_fs=0.25, nbeads=2, batch_size=2, trajectories=False)
    ipi, workers = start_workers_then_ipi(procs, ["--model", path, "--system", frame, "--unix", name], xml)
    finish_run(procs, ipi, workers)
    log = procs.log(workers[0])
    assert f"compiled {package.name}" in log, log
    assert served_counts(log) == [(9, 5)]  # 2 beads x 5 evaluations; step 0's two identical beads evaluated once
