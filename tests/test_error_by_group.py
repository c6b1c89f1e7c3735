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
