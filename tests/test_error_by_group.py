"""examples/error_by_group.py: frames grouped by trajectory, and the groups add up to the whole."""

import re
import sys

import pytest

from qmmm_driver.launcher import MODELS

from conftest import REPO, load_example

DATA = REPO / "examples" / "water" / "data" / "water_acetonitrile2.extxyz.xz"


def test_groups_are_the_trajectories_and_add_up(monkeypatch, capsys):
    script = load_example("examples/error_by_group.py")
    monkeypatch.setattr(sys, "argv", ["error_by_group.py", str(MODELS / "water" / "model.pt"), str(DATA)])
    script.main()
    rows = {m[0]: (int(m[1]), float(m[2]), float(m[3])) for m in
            re.findall(r"^(seed \d+|all)\s+n=\s*(\d+) E MAE\s+(\S+) MSE\s+(\S+)", capsys.readouterr().out, re.M)}
    assert set(rows) == {"seed 91", "seed 92", "seed 93", "seed 94", "all"}
    groups = [rows[k] for k in rows if k != "all"]
    assert [n for n, _, _ in groups] == [25] * 4 and rows["all"][0] == 100
    # equal groups: the whole's MAE and mean signed error are the means of the groups' (printed to 0.01 meV)
    assert rows["all"][1] == pytest.approx(sum(g[1] for g in groups) / 4, abs=0.01)
    assert rows["all"][2] == pytest.approx(sum(g[2] for g in groups) / 4, abs=0.01)


def test_far_c_cl_is_the_longer_carbon_chloride_distance_and_bins_sort_in_order():
    import ase.io
    from qmmm_driver.structures import read_structures

    script = load_example("examples/error_by_group.py")
    path = REPO / "examples" / "sn2" / "data" / "sn2_pimd4.extxyz.xz"
    frames = read_structures(path, require_labels=True)[:20]
    atoms = ase.io.read(path, index=":20")  # ASE's own reader and units (Angstrom)
    for s, a in zip(frames, atoms):
        qm = a.arrays["qm"] == 1
        carbon = [i for i in range(len(a)) if qm[i] and a.numbers[i] == 6]
        chlorides = [i for i in range(len(a)) if qm[i] and a.numbers[i] == 17]
        assert script.far_c_cl(s) == pytest.approx(a.get_distances(carbon[0], chlorides).max(), abs=1e-6)
    edges = [3.5, 4.13, 4.5]
    names = [script.bin_name(d, edges) for d in (5.0, 3.0, 4.2, 3.9, 4.13)]
    assert names[4] == names[2] and names[4].startswith("2:") and "4.13- 4.50" in names[4]
    assert sorted(set(names)) == [names[1], names[3], names[2], names[0]]


def test_cl_c_cl_is_the_angle_at_the_carbon():
    import ase.io
    from qmmm_driver.structures import read_structures

    script = load_example("examples/error_by_group.py")
    path = REPO / "examples" / "sn2" / "data" / "sn2_pimd13.extxyz.xz"
    frames = read_structures(path, require_labels=True)
    atoms = ase.io.read(path, index=":")
    angles = []
    for s, a in zip(frames, atoms):
        qm = a.arrays["qm"] == 1
        carbon = [i for i in range(len(a)) if qm[i] and a.numbers[i] == 6][0]
        first, second = [i for i in range(len(a)) if qm[i] and a.numbers[i] == 17]
        angles.append(a.get_angle(first, carbon, second))
        assert script.cl_c_cl(s) == pytest.approx(angles[-1], abs=1e-6)
    assert max(angles) > 150 and min(angles) < 90  # the trajectory where the free chloride went round
    assert script.bin_name(120.0, [90.0, 150.0], "deg") == "1: 90.00-150.00 deg"


def test_far_c_cl_refuses_a_qm_region_without_two_chlorides(monkeypatch):
    script = load_example("examples/error_by_group.py")
    monkeypatch.setattr(sys, "argv", ["error_by_group.py", str(MODELS / "water" / "model.pt"), str(DATA),
                                      "--by", "far-c-cl"])
    with pytest.raises(SystemExit, match="one C and two Cl"):
        script.main()


def test_blocks_are_consecutive_frames_in_the_order_given(monkeypatch, capsys):
    from qmmm_driver.evaluator import load
    from qmmm_driver.structures import read_structures
    from qmmm_driver.training.metrics import evaluate_structures
    from qmmm_driver.units import ANGSTROM_TO_BOHR

    script = load_example("examples/error_by_group.py")
    model = MODELS / "water" / "model.pt"
    monkeypatch.setattr(sys, "argv", ["error_by_group.py", str(model), str(DATA), "--by", "block", "--blocks", "3"])
    script.main()
    rows = {m[0]: (int(m[1]), float(m[2]), float(m[3])) for m in
            re.findall(r"^(block \d+|all)\s+n=\s*(\d+) E MAE\s+(\S+) MSE\s+(\S+)", capsys.readouterr().out, re.M)}
    assert [rows[k][0] for k in ("block 0", "block 1", "block 2", "all")] == [34, 33, 33, 100]
    # the middle block is frames 34..66 of the file, scored on their own
    middle = evaluate_structures(load(model), read_structures(DATA, require_labels=True)[34:67],
                                 6.0 * ANGSTROM_TO_BOHR)[0].summary()
    assert rows["block 1"][1:] == (pytest.approx(middle["energy_mae_meV"], abs=0.006),
                                   pytest.approx(middle["energy_mean_signed_meV"], abs=0.006))
    monkeypatch.setattr(sys, "argv", ["error_by_group.py", str(model), str(DATA), "--by", "block", "--blocks", "0"])
    with pytest.raises(SystemExit, match="--blocks 0: give 1 to 100"):
        script.main()
