"""``playbooks fork RUN [--at CHECKPOINT] [--set NAME=VALUE]``: a new run from a checkpoint of another.

The new run is a copy of the old one's records up to that checkpoint, as a process killed right after
it would have left them, under a new run id (``CheckpointManager.fork_into``); ``playbooks run PROGRAM
--resume NEW`` continues it from there, with its own idempotency keys, and may use another model
(``PLAYBOOKS_MODEL_NAME``, or another ``[model]``); ``--set`` changes variables at that point
(``CheckpointManager.save_overrides``). The old run is not changed; the new run's record says where it
came from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import anyio

from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.provider import parse_checkpoint_id
from playbooks.cli.assignments import parse_assignments
from playbooks.cli.run_store import RunRecord, RunStore, find_run, run_status
from playbooks.config import Config
from playbooks.errors import PlaybooksError

__all__ = ("configure_fork",)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def configure_fork(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks fork``."""
    parser.add_argument("run_id", help="the run to fork (see: playbooks runs)")
    parser.add_argument(
        "--at", metavar="CHECKPOINT",
        help="the checkpoint to start from: its number or id (see: playbooks checkpoints list RUN); "
        "default: the run's latest",
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="NAME=VALUE",
        help="set a variable of the run at the fork point (VALUE is JSON, or else text); repeatable",
    )
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    parser.set_defaults(handler=_fork)


def _error(message: str) -> None:
    print(f"playbooks fork: {message}", file=sys.stderr, flush=True)


def _counter(text: str | None, run_id: str) -> int | None:
    """``--at`` as a record counter (a number, or a checkpoint id of the run)."""
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    parsed = parse_checkpoint_id(text)
    if parsed is None or parsed[0] != run_id:
        raise ValueError(f"--at {text!r} is neither a checkpoint number nor a checkpoint id of run {run_id}")
    return parsed[1]


def _fork(args: argparse.Namespace) -> int:
    found = find_run(args.config, args.run_id)
    if isinstance(found, str):
        _error(found)
        return EXIT_USAGE
    config, store, source = found
    if source.isolated:
        _error(f"run {source.run_id} ran its LLM code isolated, and fork copies in-process runs only (an "
               "isolated run's code keeps its checkpoints in executions of their own, which a fork point of "
               "the run does not place); to fork runs, start them with playbooks run --in-process")
        return EXIT_USAGE
    try:
        upto = _counter(args.at, source.run_id)
        overrides = parse_assignments(args.set, "--set")
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    try:
        fork, at = anyio.run(_copy, config, store, source, upto, overrides)
    except PlaybooksError as exc:
        _error(str(exc))
        return EXIT_ERROR
    except OSError as exc:  # the store cannot be read or written: say where, no traceback
        _error(f"cannot fork in {config.durability.storage_path}: {exc.strerror or exc}")
        return EXIT_USAGE
    print(f"forked run {source.run_id} at checkpoint {at} into {fork.run_id}; continue it with: "
          f"playbooks run {source.program} --resume {fork.run_id}")
    return EXIT_OK


async def _copy(
    config: Config, store: RunStore, source: RunRecord, upto: int | None, overrides: dict[str, Any]
) -> tuple[RunRecord, int]:
    original = _manager(config, source.run_id)
    if await run_status(source, original.provider) == "running":
        # Forking reads a prefix of records that a live run is still appending to: allowed, but say
        # the copy is of this instant.
        print(f"playbooks fork: run {source.run_id} is running; the fork copies it as it is now",
              file=sys.stderr, flush=True)
    fork = store.new_run(source.program, source.source_hash)
    fork.status, fork.pid, fork.hash_seed = "forked", 0, source.hash_seed
    target = _manager(config, fork.run_id)
    try:
        at = await original.fork_into(target, upto=upto)
        if overrides:
            await target.save_overrides(overrides)
    finally:
        await target.close()
        await original.provider.close()
        await target.provider.close()
    fork.forked_from = f"{source.run_id} at checkpoint {at}"
    store.save(fork)
    return fork, at


def _manager(config: Config, run_id: str) -> CheckpointManager:
    return CheckpointManager.from_config(
        config.durability, run_id, storage_path=config.resolve_path(config.durability.storage_path)
    )
