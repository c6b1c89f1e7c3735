"""All benchmarks, one command: `python benchmarks/run_all.py [--quick]`.

Runs model_cost.py (cost growth with N_QM, N_MM, batch), vs_pyscf.py (model
against the reference calculation) and ipi_pimd.py (i-PI PIMD throughput
against i-PI's dummy and stock Python drivers, and worker scaling). Each prints
its table and writes JSON under benchmarks/results/.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    runs = [
        ["model_cost.py", "--threads", "1"] + (["--qm", "3,12", "--mm", "1000,20000", "--batch", "1,8"] if quick else []),
        ["vs_pyscf.py"] + (["--systems", "water"] if quick else []),
        ["ipi_pimd.py"] + (["--quick"] if quick else []),
    ]
    for args in runs:
        print(f"\n=== benchmarks/{args[0]} {' '.join(args[1:])}", flush=True)
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], check=True)


if __name__ == "__main__":
    main()
