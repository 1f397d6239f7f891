"""The ``playbooks`` command line: run .pb programs durably (run, runs, answer, fork, checkpoints, init),
queue them for workers on many machines (submit, worker) and stream a recorded LLM response through
the executor (exec)."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from playbooks import __version__

__all__ = ("main",)

EXIT_OK = 0
EXIT_PROGRAM_ERROR = 1
EXIT_USAGE = 2

_COMMANDS: dict[str, tuple[str, str | None, str]] = {
    # name: (help, description, where its arguments are defined: module:function)
    "exec": ("stream a recorded LLM response through the executor", None, "exec_command:configure_exec"),
    "run": (
        "run a .pb program",
        "Run a .pb program: its first agent's Main playbook (and every other agent's).",
        "run_command:configure_run",
    ),
    "init": ("write a commented default playbooks.toml", None, "init_command:configure_init"),
    "runs": ("list the runs of playbooks run", "List the runs of playbooks run.", "checkpoints_command:configure_runs"),
    "answer": (
        "answer the question a suspended run is waiting for, and continue it",
        "Answer the question a run started with --suspend is waiting for (see playbooks runs), and "
        "continue the run until it ends or asks again.",
        "answer_command:configure_answer",
    ),
    "fork": (
        "start a new run from a checkpoint of another",
        "Start a new run from a checkpoint of another (the original is not changed); continue it with "
        "playbooks run PROGRAM --resume NEW_RUN.",
        "fork_command:configure_fork",
    ),
    "submit": (
        "queue runs of a .pb program for workers (PostgreSQL store)",
        "Queue runs of a .pb program in the PostgreSQL store; playbooks worker processes run them, on any "
        "machine, and take over the runs of a worker that died.",
        "worker_command:configure_submit",
    ),
    "worker": (
        "run queued runs, and take over those of workers that died",
        "Take queued runs from the PostgreSQL store and run them durably (each in its own process, under a "
        "renewed lease); resume the runs of workers whose lease expired. SIGTERM: finish or hand back.",
        "worker_command:configure_worker",
    ),
    "checkpoints": (
        "list, show, prune or clear stored checkpoints",
        "List, show, prune or clear the checkpoints of runs.",
        "checkpoints_command:configure_checkpoints",
    ),
}
"""Every sub-command. Only the one invoked is imported and given its arguments: ``playbooks --help``
and ``playbooks init`` do not load the runtime, the LLM client or the storage code."""


def _invoked(argv: Sequence[str]) -> str | None:
    """The sub-command named on the command line, if any (skipping the global ``--config`` value)."""
    args = iter(argv)
    for arg in args:
        if len(arg) > 2 and "--config".startswith(arg):  # argparse accepts any unambiguous prefix
            next(args, None)
        elif arg in _COMMANDS:
            return arg
        elif not arg.startswith("-"):
            return None
    return None


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
    invoked = _invoked(sys.argv[1:] if argv is None else argv)
    for name, (help_text, description, where) in _COMMANDS.items():
        command = commands.add_parser(name, help=help_text, description=description)
        if name == invoked:
            module, function = where.split(":")
            getattr(importlib.import_module(f"playbooks.cli.{module}"), function)(command)
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

