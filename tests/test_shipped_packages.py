"""The compiled packages shipped beside the water and SN2 models (AOTInductor, untuned) give the eager
models' energies, forces and charges on their own systems, one frame and a batch; a package that disagrees with
its model is refused."""

import logging

import numpy as np
import pytest
import torch

from qmmm_driver.evaluator import ModelEvaluator, load
from qmmm_driver.launcher import MODELS
from qmmm_driver.nn.compile import _wider_isa, compiled_path, load_compiled
from qmmm_driver.structures import QMMMStructure


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record.getMessage())


@pytest.mark.parametrize("name", ["water", "sn2"])
def test_shipped_package_equals_eager_model(name):
    structure = QMMMStructure.read(MODELS / name / "system.extxyz")
    model_path = MODELS / name / "model.pt"
    model = load(model_path)
    package = compiled_path(model_path, structure.n_qm, "cpu", torch.float32)
    seen = Records()
    torch_logger = logging.getLogger("torch.export.pt2_archive._package")  # torch's own, not propagated to root
    torch_logger.addHandler(seen)
    try:
        runner = load_compiled(package, model.checksum, structure.n_qm, "cpu", torch.float32)
    finally:
        torch_logger.removeHandler(seen)
    assert not seen.records, seen.records  # an AVX2 package on an AVX-512 CPU is expected, not worth a warning
    eager, fast = ModelEvaluator(model, structure), ModelEvaluator(model, structure, compiled=runner)
    rng = np.random.default_rng(1)
    for batch in (1, 3):
        pos = structure.positions + rng.normal(scale=0.05, size=(batch,) + structure.positions.shape)
        cells = np.repeat(structure.cell[None], batch, 0)
        a, b = eager.compute(pos, cells), fast.compute(pos, cells)
        assert np.allclose(a.energy, b.energy, rtol=0, atol=2e-5)           # Hartree: 0.5 meV
        assert np.abs(a.forces - b.forces).max() < 1e-4 * np.abs(a.forces).max()
        assert np.allclose(a.qm_charges, b.qm_charges, atol=1e-5)


def test_a_package_that_disagrees_with_its_model_is_refused():
    """compile_model checks every package against the eager model before writing it (a tuned compile of torch
    2.13 once produced a package that gave wrong gradients): the check passes for the shipped water package
    and refuses it for a model whose weights differ slightly."""
    from qmmm_driver.nn.compile import CompiledModelError, verify_package

    model_path = MODELS / "water" / "model.pt"
    model = load(model_path)
    package = compiled_path(model_path, 3, "cpu", torch.float32)
    verify_package(model, package, model.checksum, 3)
    with torch.no_grad():
        model.energy_head[0].weight.mul_(1.05)
    with pytest.raises(CompiledModelError, match="disagrees with the eager model"):
        verify_package(model, package, model.checksum, 3)


def test_a_check_that_kills_its_process_is_a_refusal():
    """The check of a new package runs in a process of its own: a compiled kernel that aborts (as one of torch
    2.13's tuned water compiles did) or a refusal there becomes a CompiledModelError here, and this process
    lives on."""
    import os

    from qmmm_driver.nn.compile import CompiledModelError, run_isolated

    with pytest.raises(CompiledModelError, match="died \\(signal SIGABRT\\)"):
        run_isolated(os.abort, (), "checking a package")
    with pytest.raises(CompiledModelError, match="ZeroDivisionError"):
        run_isolated(divmod, (1, 0), "checking a package")


def test_an_interrupted_check_leaves_no_process():
    """Ctrl-C while the checking process runs stops it too (no orphan keeps the package open)."""
    import multiprocessing
    import signal
    import threading
    import time

    from qmmm_driver.nn.compile import run_isolated

    def interrupt():
        time.sleep(2.0)  # the child runs (still importing torch, or sleeping)
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    # Ctrl-C as KeyboardInterrupt even where SIGINT came in ignored (a run started in the background)
    held = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt, daemon=True).start()
        with pytest.raises(KeyboardInterrupt):
            run_isolated(time.sleep, (600.0,), "checking a package")
    finally:
        signal.signal(signal.SIGINT, held)
    assert multiprocessing.active_children() == []  # the sleeping child was stopped, not left behind


def test_only_the_expected_isa_mismatch_is_silenced():
    """The filter drops torch's warning for an AVX2 package on an AVX-512 CPU and nothing else: a package made
    for more than the CPU has, or any other mismatch, is still reported."""
    def record(*args):
        return logging.LogRecord("torch", logging.WARNING, "", 0, "Device information mismatch for %s: %s vs %s.",
                                 args, None)
    assert not _wider_isa(record("AOTI_CPU_ISA", "AVX512 AVX512_VNNI", "AVX2"))
    assert _wider_isa(record("AOTI_CPU_ISA", "AVX2", "AVX512"))
    assert _wider_isa(record("AOTI_DEVICE_NAME", "AVX512", "AVX2"))


@pytest.mark.parametrize("name, n_qm", [("water", 3), ("sn2", 6)])
def test_shipped_packages_hold_avx2_kernels(name, n_qm):
    """The shipped packages run on any AVX2 machine: inductor's kernels were written for 256-bit vectors (its
    recorded ISA), whatever CPU compiled them (AVX-512 code from a bare -march once slipped into both)."""
    import json
    import zipfile

    package = compiled_path(MODELS / name / "model.pt", n_qm, "cpu", torch.float32)
    with zipfile.ZipFile(package) as archive:
        recorded = {json.loads(archive.read(f)).get("AOTI_CPU_ISA") for f in archive.namelist()
                    if f.endswith("_metadata.json")}
    assert recorded == {"AVX2"}
