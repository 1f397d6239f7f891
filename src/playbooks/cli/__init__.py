"""The ``playbooks`` command line: run .pb programs durably (run, runs, checkpoints, init) and stream a
recorded LLM response through the executor (exec)."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from playbooks import __version__

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
    failed, 2 usage or configuration error).

    Called without ``argv`` (the ``playbooks`` command), ``playbooks run`` may re-execute the process
    under the run's hash seed; with ``argv`` (embedding, tests) it never does.
    """
    parser = argparse.ArgumentParser(
        prog="playbooks", description="Run .pb programs durably, and stream LLM responses through the executor."
    )
    parser.add_argument("--version", action="version", version=f"playbooks {__version__}")
    parser.add_argument(
        "--config", dest="global_config", type=Path, help="configuration file (also accepted after the command)"
    )
    commands = parser.add_subparsers(dest="command", required=True)
    add_exec_parser(commands)
    add_run_parser(commands)
    add_init_parser(commands)
    add_runs_parser(commands)
    add_checkpoints_parser(commands)
    args = parser.parse_args(argv)
    args.reexec = argv is None
    if getattr(args, "config", None) is None and args.global_config is not None:
        args.config = args.global_config
    try:
        code: int = args.handler(args)
        sys.stdout.flush()
    except BrokenPipeError:
        # Standard output was closed (``playbooks checkpoints show RUN | head``): stop quietly, and keep
        # the interpreter from reporting the failed flush at exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_PROGRAM_ERROR
    return code

