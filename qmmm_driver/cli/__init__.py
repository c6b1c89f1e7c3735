"""The ``qmmm-driver`` command line: one subcommand per task, each in its own module.

Every subcommand module defines ``configure(parser)`` and ``main(args) -> int``
and keeps its heavy imports (torch, PySCF, OpenMM) inside functions, so that
building the parser stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ..errors import InputError
from ..signals import describe, exit_status, stop_like_ctrl_c

#: subcommand -> (module, one-line help)
COMMANDS = {
    "run": ("qmmm_driver.cli.run", "serve the model to i-PI over a socket (one worker per MPI rank)"),
    "mm": ("qmmm_driver.cli.mm", "serve the MM force field (OpenMM, QM terms removed) to i-PI as a second forcefield"),
    "launch": ("qmmm_driver.cli.launch", "start i-PI and all its workers for an input, with progress and clean shutdown"),
    "compile": ("qmmm_driver.cli.compile", "compile a model ahead of time for fast force calls"),
    "sample": ("qmmm_driver.cli.sample", "unlabelled QM/MM frames from OpenMM MD (solvents, ions, field noise)"),
    "label": ("qmmm_driver.cli.label", "reference energies, forces and charges with PySCF (electrostatic embedding)"),
    "train": ("qmmm_driver.cli.train", "train the model on labelled frames (TOML config)"),
    "evaluate": ("qmmm_driver.cli.evaluate", "errors of a model on labelled frames"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qmmm-driver",
        description="Machine-learned QM/MM forces for i-PI (equivariant multiscale model).")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(_module=module)
        importlib.import_module(module).configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = importlib.import_module(args._module)
    try:
        with stop_like_ctrl_c():  # SIGTERM/SIGHUP clean up like Ctrl-C, in every command
            return int(module.main(args) or 0)
    except InputError as err:
        print(f"qmmm-driver {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(f"qmmm-driver {args.command}: {describe(err)}", file=sys.stderr)
        return exit_status(err)


if __name__ == "__main__":
    sys.exit(main())
