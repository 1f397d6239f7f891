"""``playbooks answer RUN TEXT``: answer the question a suspended run is waiting for, and continue it.

A run started with ``playbooks run agent.pb --suspend`` stops at ``AskUser``: the question is stored in
its record (``playbooks runs`` lists it) and the process exits with status 3. Any process that sees
the same store answers it: this command is ``playbooks run PROGRAM --resume RUN --answer TEXT
--suspend``, which replays the run up to the question, records the answer as ``AskUser``'s result
(once: it is never asked again) and goes on, until the run ends or asks the next question.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from playbooks.cli.run_store import find_run

__all__ = ("configure_answer",)

EXIT_USAGE = 2


def configure_answer(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks answer``."""
    parser.add_argument("run_id", help="the waiting run (see: playbooks runs)")
    parser.add_argument("text", help="the answer")
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    parser.set_defaults(handler=_answer)


def _error(message: str) -> None:
    print(f"playbooks answer: {message}", file=sys.stderr, flush=True)


def _answer(args: argparse.Namespace) -> int:
    found = find_run(args.config, args.run_id)
    if isinstance(found, str):
        _error(found)
        return EXIT_USAGE
    record = found[2]
    if record.status != "waiting":
        _error(f"run {record.run_id} is not waiting for an answer (it is {record.status})")
        return EXIT_USAGE
    argv = ["run", record.program, "--resume", record.run_id, "--answer", args.text, "--suspend"]
    if args.config is not None:
        argv += ["--config", str(args.config)]
    if getattr(args, "reexec", False):  # the command line: become that command (it re-executes under
        sys.stdout.flush()                # the run's hash seed, as any resume does)
        sys.stderr.flush()
        os.execv(sys.executable, [sys.executable, "-m", "playbooks.cli", *argv])
    from playbooks.cli import main

    return main(argv)
