"""examples/sn2/free_energy.py: MBAR recovers a known free-energy profile from umbrella samples, with error bars
that cover the truth."""

import subprocess
import sys

import numpy as np

from conftest import REPO, load_example


def test_mbar_recovers_a_known_double_well():
    script = load_example("examples/sn2/free_energy.py")
    kT, k = 0.025852, 3.0
    grid = np.linspace(-2.6, 2.6, 5201)
    truth = 0.35 * (grid**2 - 1.2**2) ** 2 / 1.2**4  # eV: minima at +-1.2, barrier 0.35 eV at 0
    rng = np.random.default_rng(0)
    centres = np.linspace(-2.0, 2.0, 17)
    samples = []
    for c in centres:  # exact draws from each biased distribution, with some correlation (pairs repeated)
        w = np.exp(-(truth + 0.5 * k * (grid - c) ** 2) / kT)
        draws = rng.choice(grid, size=1500, p=w / w.sum())
        samples.append(np.repeat(draws, 2))
    bins = np.linspace(-2.4, 2.4, 49)
    mid, free, err, independent = script.free_energy(samples, centres, k, kT, bins)
    half = 0.5 * (bins[1] - bins[0])  # the histogram's free energy is that of the whole bin
    exact = np.array([-kT * np.log(np.mean(np.exp(-truth[np.abs(grid - m) < half] / kT))) for m in mid])
    exact -= exact.min()
    inner = np.abs(mid) < 1.8
    assert np.all(independent < 2000) and np.all(independent > 500)  # the repeated pairs were seen as correlated
    assert np.abs((free - free[inner].min() - exact)[inner]).max() < 0.01  # eV
    assert 0 < np.median(err[inner]) < 0.01


def test_an_earlier_run_is_refused_before_minutes_of_equilibration(tmp_path):
    """The launcher refuses a run directory with an earlier run's outputs; the script says so at once, not after
    equilibrating every window, and leaves that run as it was."""
    earlier = tmp_path / "ipi"
    earlier.mkdir()
    (earlier / "simulation.out").write_text("# an earlier run\n")
    res = subprocess.run([sys.executable, str(REPO / "examples/sn2/free_energy.py"), "--runs", str(tmp_path)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert str(earlier) in res.stderr and "--analyse-only" in res.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ipi"]  # no window was started
    assert (earlier / "simulation.out").read_text() == "# an earlier run\n"
