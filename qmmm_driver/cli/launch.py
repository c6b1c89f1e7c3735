"""``qmmm-driver launch``: i-PI plus all its workers in one command (see :mod:`qmmm_driver.launcher`).

    qmmm-driver launch                          # water PIMD (16 beads, MM nonbonded on 4) on the shipped water model
    qmmm-driver launch remd --example sn2 --workers 4
    qmmm-driver launch --restart --run-dir runs/pimd-contracted-water

INPUT is an i-PI input file or a shipped template name (md-nvt, nve, pimd, pimd-contracted, remd, pimd-remd,
hremd); --example a shipped model name (water, sn2) or a directory with an example.toml::

    model = "model.pt"
    system = "system.extxyz"
    pdb = "system.pdb"
    forcefield = ["amber14/tip3p.xml"]   # OpenMM names, files of the example, or of qmmm_driver/data
    mm_options = []                      # extra options of `qmmm-driver mm` (e.g. ["--cutoff", "8"])

Exit status: 0 at the end of the run; 2 for input to fix; 1 when a worker or i-PI failed or the run stalled;
130 after Ctrl-C, 143 after SIGTERM, 129 after SIGHUP (in every case i-PI wrote RESTART and nothing is left
running).
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("input", nargs="?", default=None,
                        help="i-PI input XML or a shipped template name (default: pimd-contracted)")
    parser.add_argument("--example", default=None,
                        help="shipped model name (water, sn2) or example directory with example.toml (default: water)")
    parser.add_argument("--workers", type=int, default=1, help="model workers per model forcefield (default 1)")
    parser.add_argument("--mm-workers", type=int, default=1, help="OpenMM workers per MM forcefield (default 1)")
    parser.add_argument("--run-dir", default=None, help="run directory (default runs/INPUT-EXAMPLE)")
    parser.add_argument("--restart", action="store_true",
                        help="continue the run directory from its newest checkpoint (RESTART or <checkpoint>)")
    parser.add_argument("--total-steps", type=int, default=None, help="override <total_steps> (e.g. to run longer)")
    parser.add_argument("--device", default="auto", help="device of the model workers (default auto)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    parser.add_argument("--no-batch", action="store_true",
                        help="do not add a <batch_size> to model sockets (one structure per request)")
    parser.add_argument("--stall-timeout", type=float, default=600.0,
                        help="stop the run when no step completes for this many seconds (default 600)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (log lines instead)")


def main(args: argparse.Namespace) -> int:
    from ..launcher import launch

    return launch(args)
