"""examples/pimd_frames.py: the PIMD input it runs, the example it runs from another start, and random beads cut as
the cluster frames the model sees."""

import xml.etree.ElementTree as ET

import ase.io
import numpy as np

from qmmm_driver.units import ANGSTROM_TO_BOHR

from conftest import load_example


def test_the_input_is_the_pimd_template_with_its_steps_seed_and_every_beads_positions(tmp_path):
    script = load_example("examples/pimd_frames.py")
    root = ET.parse(script.prepare(300, 20, 5, tmp_path / "pimd.xml")).getroot()
    assert root.find("total_steps").text.strip() == "300"
    assert root.find("prng/seed").text.strip() == "5"
    assert [(t.text.strip(), t.get("stride")) for t in root.iter("trajectory")] == [("positions", "20")]
    assert root.find("system/initialize").get("nbeads") == "16"
    assert root.find("output/checkpoint") is not None


def test_random_beads_after_the_discarded_steps_become_cluster_frames(tmp_path):
    script = load_example("examples/pimd_frames.py")
    system = ase.io.read(script.MODELS / "water" / "system.extxyz")
    qm = np.flatnonzero(system.arrays["qm"])
    rng = np.random.default_rng(0)
    script.prepare(50, 25, 3, tmp_path / "input.xml")  # the run's input, as the launcher copies it
    stored = {}  # (bead, step) -> positions, A
    for bead in range(4):
        frames = []
        for step in (0, 25, 50):
            atoms = system.copy()
            atoms.positions += rng.normal(0.0, 0.02, atoms.positions.shape)
            atoms.info = {"ipi_comment": f"Step: {step:11d}  Bead: {bead:7d} positions{{ase}}  cell{{ase}}"}
            stored[bead, step] = atoms.positions.copy()
            frames.append(atoms)
        ase.io.write(tmp_path / f"simulation.pos_{bead:02d}.extxyz", frames, format="extxyz")

    out = script.bead_frames(tmp_path, "water", 25, 2, 3)

    assert [f.info["step"] for f in out] == [25, 25, 50, 50]
    for step in (25, 50):
        assert len({f.info["bead"] for f in out if f.info["step"] == step}) == 2
    for f in out:
        assert f.cell is None and f.n_qm == 3 and f.info["environment"] == "PIMD bead" and f.info["nbeads"] == 4
        np.testing.assert_allclose(f.positions[f.qm_indices], stored[f.info["bead"], f.info["step"]][qm] * ANGSTROM_TO_BOHR,
                                   atol=1e-6)
        assert 0 < len(f.mm_indices) < len(system) - 3
        assert abs(f.mm_charge.sum()) < 1e-6  # whole neutral molecules


def test_another_start_runs_the_shipped_model_and_force_field_on_its_own_system_files(tmp_path):
    import pytest

    from qmmm_driver.launcher import Example

    script = load_example("examples/pimd_frames.py")
    start = tmp_path / "start"
    start.mkdir()
    with pytest.raises(SystemExit, match="no system.extxyz there"):
        script.example_with_start("sn2", start, tmp_path / "empty.example")
    shipped = Example.find("sn2")
    (start / "system.extxyz").write_bytes(shipped.system.read_bytes())
    (start / "system.pdb").write_bytes(shipped.pdb.read_bytes())

    example = Example.find(script.example_with_start("sn2", start, tmp_path / "run.example"))

    assert example.model == shipped.model
    assert example.system == (start / "system.extxyz").resolve() and example.pdb == (start / "system.pdb").resolve()
    assert example.forcefield == shipped.forcefield and example.mm_options == shipped.mm_options
