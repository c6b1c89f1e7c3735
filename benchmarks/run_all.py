"""All benchmarks, one command: `python benchmarks/run_all.py [--quick]`.

Runs profile_call.py (one force call, eager and compiled, with its breakdown), mm_cost.py (the OpenMM worker
against OpenMM alone; ring-polymer contraction), layers.py (the packed layers against e3nn's), model_cost.py
(cost growth with N_QM, N_MM, batch), batch_call.py (32 SN2 beads in 20 000 MM charges; --device cuda on a
GPU, --compile for the compiled potential), vs_pyscf.py (model against the reference calculation), ipi_pimd.py (i-PI
PIMD throughput against i-PI's dummy floor and its stock driver hosting the same evaluator, batched) and
fault_injection.py (killed processes, restarts). Each prints its table and writes JSON under benchmarks/results/.
The shipped models and their compiled forms (``qmmm-driver compile``) must be in place.
"""

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> None:
    quick = "--quick" in sys.argv[1:]
    runs = [
        ["profile_call.py"] + (["--calls", "50"] if quick else []),
        ["mm_cost.py"],
        ["layers.py"],
        ["batch_call.py", "--repeats", "5"] + (["--beads", "8", "--mm", "5000"] if quick else []),
        ["model_cost.py", "--threads", "1"] + (["--qm", "3,12", "--mm", "1000,20000", "--batch", "1,8"] if quick else []),
        ["vs_pyscf.py"] + (["--systems", "water"] if quick else []),
        ["ipi_pimd.py"] + (["--only", "fair"] if quick else []),
        ["fault_injection.py"] + (["--trials", "3"] if quick else []),
    ]
    for args in runs:
        print(f"\n=== benchmarks/{args[0]} {' '.join(args[1:])}", flush=True)
        subprocess.run([sys.executable, str(HERE / args[0]), *args[1:]], check=True)


if __name__ == "__main__":
    main()
