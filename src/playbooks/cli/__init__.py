"""The ``playbooks`` command line: run .pb programs durably (run, runs, checkpoints, init) and stream a
recorded LLM response through the executor (exec)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from playbooks.cli.checkpoints_command import add_checkpoints_parser, add_runs_parser
from playbooks.cli.exec_command import add_exec_parser
from playbooks.cli.init_command import add_init_parser
from playbooks.cli.run_command import add_run_parser

__all__ = ("main",)

EXIT_OK = 0
EXIT_PROGRAM_ERROR = 1
EXIT_USAGE = 2


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; return the process exit code (0 ok, 1 the program or the LLM's code
    failed, 2 usage or configuration error)."""
    parser = argparse.ArgumentParser(
        prog="playbooks", description="Run .pb programs durably, and stream LLM responses through the executor."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_exec_parser(commands)
    add_run_parser(commands)
    add_init_parser(commands)
    add_runs_parser(commands)
    add_checkpoints_parser(commands)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code

