"""The architecture's rules that code can check: the model package is a leaf; the commands start without torch."""

import subprocess
import sys


def test_the_model_package_imports_nothing_from_the_rest_of_qmmm_driver():
    code = ("import sys\nimport qmmm_driver.nn, qmmm_driver.nn.io, qmmm_driver.nn.compile, qmmm_driver.nn.potential\n"
            "mods = sorted(m for m in sys.modules if m.startswith('qmmm_driver') and not m.startswith('qmmm_driver.nn'))\n"
            "print(mods)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    # only the package's own lazy __init__ and the standard-library file writer
    assert out == "['qmmm_driver', 'qmmm_driver.files']", out
    code = "import sys\nimport qmmm_driver.nn\nprint(sorted({m.split('.')[0] for m in sys.modules} & {'ase', 'numpy', 'scipy'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert "ase" not in out and "scipy" not in out, out


def test_the_command_line_starts_without_torch():
    code = "import sys\nfrom qmmm_driver.cli import build_parser\nbuild_parser()\nprint('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


def test_the_launch_watchdog_has_loaded_what_it_needs_before_it_acts():
    """The watchdog imports everything its clean-up uses when it starts (the installed files may be gone when the
    launcher dies: a failed import then would leave i-PI running)."""
    code = "import sys\nimport qmmm_driver.reaper\nprint('qmmm_driver.ipi.shm' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "True"
