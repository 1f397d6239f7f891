"""``playbooks checkpoints list|show|history|prune|clear`` and ``playbooks runs``: look at and tidy stored runs.

Both read the storage of ``[durability]`` in ``playbooks.toml`` (``--config``). ``runs`` prints one line
per run of ``playbooks run``: its id, status (running, crashed, failed, completed), progress and last
statement. ``checkpoints show`` prints a checkpoint's metadata, call stack, journal and variables as JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path
from collections.abc import Callable
from typing import Any

import anyio

from playbooks.checkpoints import Checkpoint, CheckpointManager
from playbooks.checkpoints.provider import parse_checkpoint_id
from playbooks.cli.run_store import RunRecord, RunStore, open_run_store, run_status
from playbooks.config import Config, ConfigError, load_config
from playbooks.errors import CheckpointConfigError, ExecutionLockedError, PlaybooksError

__all__ = ("code_executions", "configure_checkpoints", "configure_runs", "delete_completed_runs", "first_line")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


def _error(command: str, message: str) -> None:
    print(f"playbooks {command}: {message}", file=sys.stderr, flush=True)


def configure_runs(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks runs``."""
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    parser.add_argument("--json", action="store_true", help="one JSON array of the runs, for scripts")
    parser.set_defaults(handler=_runs)


def configure_checkpoints(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks checkpoints list|show|prune|clear``."""
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    actions = parser.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the runs with checkpoints, or the checkpoints of one run")
    listing.add_argument("run_id", nargs="?")
    listing.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    show = actions.add_parser("show", help="a checkpoint (or a run's latest) as JSON")
    show.add_argument("checkpoint", help="a checkpoint id (RUN_ckpt_N) or a run id (its latest checkpoint)")
    prune = actions.add_parser(
        "prune", help="keep only the newest snapshots of a run (and what they need), or delete old completed runs"
    )
    prune.add_argument("run_id", nargs="?")
    prune.add_argument("--keep", type=int, default=None, help="snapshots to keep (default: durability.keep_last_n)")
    prune.add_argument(
        "--older-than", type=_age, default=None, metavar="AGE",
        help="instead: delete every completed run that finished more than AGE ago (30d, 12h, 45m, 90s); "
        "failed and crashed runs are kept, they may still resume",
    )
    history_ = actions.add_parser(
        "history", help="a run's history: each checkpoint with the calls made since the last and the step reached"
    )
    history_.add_argument("run_id")
    history_.add_argument("--json", action="store_true", help="one JSON array, for scripts")
    clear = actions.add_parser("clear", help="delete every checkpoint of a run (or of all runs)")
    clear.add_argument("run_id", nargs="?")
    clear.add_argument("--all", action="store_true", help="every run (asks first, unless --yes)")
    clear.add_argument("--yes", "-y", action="store_true", help="with --all: do not ask")
    for action in (listing, show, prune, history_, clear):
        action.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="configuration file")
    parser.set_defaults(handler=_checkpoints)


def _config(args: argparse.Namespace, command: str) -> Config | None:
    try:
        return load_config(args.config)
    except ConfigError as exc:
        _error(command, f"configuration error: {exc}")
        return None


def _manager(config: Config, run_id: str, keep_last_n: int | None = None) -> CheckpointManager:
    manager = CheckpointManager.from_config(
        config.durability, run_id, storage_path=config.resolve_path(config.durability.storage_path)
    )
    if keep_last_n is not None:
        manager.keep_last_n = keep_last_n
    return manager


def first_line(text: str, width: int = 60) -> str:
    """The first line of ``text``, with `` ...`` when more follow, cut to ``width`` characters."""
    lines = text.strip().splitlines()
    if not lines:
        return ""
    line = lines[0] + (" ..." if len(lines) > 1 else "")
    return line if len(line) <= width else line[: width - 3] + "..."


# ----------------------------------------------------------------------- runs


def _runs(args: argparse.Namespace) -> int:
    config = _config(args, "runs")
    if config is None:
        return EXIT_USAGE
    try:
        return _list_runs(args, config)
    except CheckpointConfigError as exc:  # a storage path or database that cannot be used
        _error("runs", str(exc))
        return EXIT_USAGE
    except PlaybooksError as exc:
        _error("runs", str(exc))
        return EXIT_ERROR


def _list_runs(args: argparse.Namespace, config: Config) -> int:
    store = open_run_store(config)
    try:
        records = store.all()
        holders = store.lease_holders()
    finally:
        store.close()
    if args.json:
        listed = []
        for record in records:
            status, count, statement = anyio.run(_progress, config, record)
            listed.append({
                **asdict(record), "status": status, "checkpoints": count, "last_statement": statement,
                "held_by": holders.get(record.run_id, ""),
            })
        print(json.dumps(listed, indent=2))
        return EXIT_OK
    if not records:
        print(f"no runs in {store.where}")
        return EXIT_OK
    workers = any(record.queued for record in records)  # a column of its own once runs go to workers
    rows = [("RUN", "STATUS", *(("WORKER",) if workers else ()), "CHECKPOINTS", "LLM CALLS", "TOKENS IN/OUT",
             "STARTED", "PROGRAM", "LAST STATEMENT (or what failed, or the question waiting)")]
    for record in records:
        status, count, statement = anyio.run(_progress, config, record)
        statement = first_line(statement)
        if status == "failed" and record.error:
            where = f"in {record.failed_call}: " if record.failed_call else ""
            statement = first_line(f"failed {where}{record.error}")
        elif status == "waiting":
            statement = first_line(f"waiting for an answer to: {record.question}")
        holder = holders.get(record.run_id, "")
        worker = f"{record.worker} ({holder})" if holder and record.worker else holder or record.worker
        rows.append((
            record.run_id,
            status,
            *((worker or "-",) if workers else ()),
            str(count),
            str(record.llm_calls),
            f"{record.prompt_tokens}/{record.completion_tokens}",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(record.started)),
            record.program,
            statement,
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths)) + "  " + row[-1])
    return EXIT_OK


async def _progress(config: Config, record: RunRecord) -> tuple[str, int, str]:
    """A run's status (by its checkpoint lock), number of checkpoints and last statement (whole)."""
    manager = _manager(config, record.run_id)
    try:
        status = await run_status(record, manager.provider)
        count = len(await manager.list_checkpoints())
        stores = [manager]
        if record.isolated:  # its LLM code's checkpoints are in executions of their own
            stores += [
                manager.for_execution(code)
                for code in code_executions(await manager.provider.list_executions(), record.run_id)
            ]
            for store in stores[1:]:
                count += len(await store.list_checkpoints())
        if not count:
            return status, 0, ""
        newest: tuple[float, str] = (0.0, "")
        for store in stores:
            records = await store.load_records()
            if records:
                when = max(r.timestamp for r in records.values())
                statement = store.last_statement()
                if statement and when >= newest[0]:
                    newest = (when, statement)
        return status, count, newest[1]
    finally:
        await manager.provider.close()


# ----------------------------------------------------------------------- checkpoints


def _checkpoints(args: argparse.Namespace) -> int:
    config = _config(args, "checkpoints")
    if config is None:
        return EXIT_USAGE
    try:
        code: int = anyio.run(_checkpoint_action, args, config)
    except CheckpointConfigError as exc:  # a bad run id, storage path or provider
        _error("checkpoints", str(exc))
        return EXIT_USAGE
    except PlaybooksError as exc:
        _error("checkpoints", str(exc))
        return EXIT_ERROR
    except OSError as exc:
        _error("checkpoints", f"cannot read the checkpoints in {config.durability.storage_path}: {exc.strerror or exc}")
        return EXIT_USAGE
    return code


async def _checkpoint_action(args: argparse.Namespace, config: Config) -> int:
    if args.action == "list":
        return await _list(config, args.run_id, as_json=args.json)
    if args.action == "show":
        return await _show(config, args.checkpoint)
    if args.action == "history":
        return await _history(config, args.run_id, as_json=args.json)
    if args.action == "prune" and args.older_than is not None:
        if args.run_id is not None or args.keep is not None:
            _error("checkpoints", "prune --older-than applies to every completed run: give no run id or --keep")
            return EXIT_USAGE
        deleted = await delete_completed_runs(config, older_than=args.older_than)
        print(f"deleted {len(deleted)} completed run{'' if len(deleted) == 1 else 's'}"
              + (f": {', '.join(deleted)}" if deleted else ""))
        return EXIT_OK
    if args.action == "prune":
        if args.run_id is None:
            _error("checkpoints", "prune needs a run id, or --older-than AGE")
            return EXIT_USAGE
        return await _prune(config, args.run_id, args.keep)
    return await _clear(config, args.run_id, args.all, args.yes)


async def _list(config: Config, run_id: str | None, *, as_json: bool = False) -> int:
    if run_id is None:
        manager = _manager(config, "_")
        executions = await manager.provider.list_executions()
        counts: dict[str, int] = {}  # files and journal entries, an isolated run's code's included
        for execution in executions:
            run = execution.split("~", 1)[0] if _is_code_execution(execution, set(executions)) else execution
            counts[run] = counts.get(run, 0) + len(await _manager(config, execution).list_checkpoints())
        store = open_run_store(config)
        try:
            holders = store.lease_holders()  # where locks are leases: which worker process runs what
        finally:
            store.close()
        if as_json:
            print(json.dumps(
                [{"run_id": r, "checkpoints": n, "held_by": holders.get(r, "")} for r, n in counts.items()], indent=2
            ))
        elif not counts:
            print("no checkpoints")
        else:
            for execution, count in counts.items():
                held = f"  held by {holders[execution]}" if execution in holders else ""
                print(f"{execution}  {count} checkpoint{'' if count == 1 else 's'}{held}")
        return EXIT_OK
    manager = _manager(config, run_id)
    records = await manager.load_records()
    if not records:
        _error("checkpoints", f"run {run_id!r} has no checkpoints")
        return EXIT_USAGE
    if as_json:
        print(json.dumps([
            {
                "checkpoint_id": f"{run_id}_ckpt_{counter}", "counter": counter, "time": record.timestamp,
                "kind": record.kind, "frame_id": record.frame_id, "statement": record.statement,
                "call": record.display, "tool": record.name, "done": record.done,
            }
            for counter, record in sorted(records.items())
        ], indent=2))
        return EXIT_OK
    for counter, record in sorted(records.items()):
        what = record.display or first_line(record.statement) or record.name
        stamp = time.strftime("%H:%M:%S", time.localtime(record.timestamp))
        print(f"{run_id}_ckpt_{counter}  {stamp}  {record.kind:<8}  {record.frame_id:<24}  {what}")
    return EXIT_OK


async def _history(config: Config, run_id: str, *, as_json: bool) -> int:
    from playbooks.cli.history import history

    manager = _manager(config, run_id)
    records = await manager.load_records()
    if not records:
        _error("checkpoints", f"run {run_id!r} has no checkpoints")
        return EXIT_USAGE
    rows = history(records, _steps_of(open_run_store(config).get(run_id)))
    if as_json:
        print(json.dumps([row.to_dict() for row in rows], indent=2))
        return EXIT_OK
    for row in rows:
        stamp = time.strftime("%H:%M:%S", time.localtime(row.time))
        step = f"step {row.step}" if row.step else ""
        made = ", ".join(row.calls[:4]) + (f" and {len(row.calls) - 4} more" if len(row.calls) > 4 else "")
        if row.printed:
            made += ("; " if made else "") + f"{row.printed} line{'' if row.printed == 1 else 's'} printed"
        print(f"{row.counter:>6}  {stamp}  {row.event:<8}  {row.frame_id:<22}  {step:<14}  "
              f"{first_line(row.statement, 40):<40}  {made}".rstrip())
    return EXIT_OK


def _steps_of(record: RunRecord | None) -> Callable[[str], int | None]:
    """How many top-level steps the main playbook of a frame's agent has, from the run's program
    (``None`` when the program cannot be read, or for frames of nested playbooks)."""
    counts: dict[str, int] = {}
    if record is not None:
        try:
            from playbooks.program import load_program

            program = load_program(Path(record.program))
            for agent in program.agents:
                try:
                    counts[agent.name] = len(agent.main_playbook().steps)
                except PlaybooksError:
                    continue
        except (OSError, PlaybooksError):
            pass

    def known(frame_id: str) -> int | None:
        parts = frame_id.split("/")
        return counts.get(parts[0]) if len(parts) <= 2 else None

    return known


def _describe(checkpoint: Checkpoint) -> dict[str, Any]:
    namespace = {
        name: repr(value)[:200]
        for name, value in checkpoint["namespace"].items()
        if not name.startswith("__")
    }
    return {
        "metadata": checkpoint["metadata"],
        "execution_state": checkpoint["execution_state"],
        "namespace": namespace,
    }


async def _show(config: Config, name: str) -> int:
    try:
        run_id, counter = parse_checkpoint_id(name)
    except ValueError:
        run_id, counter = name, None
    manager = _manager(config, run_id)
    checkpoint = await manager.get_latest_checkpoint() if counter is None else await manager.load_checkpoint(counter)
    if checkpoint is None:
        _error("checkpoints", f"run {run_id!r} has no readable checkpoint")
        return EXIT_USAGE
    print(json.dumps(_describe(checkpoint), indent=2, default=repr))
    return EXIT_OK


async def _prune(config: Config, run_id: str, keep: int | None) -> int:
    if keep is not None and keep < 1:
        _error("checkpoints", "--keep must be at least 1")
        return EXIT_USAGE
    manager = _manager(config, run_id, keep or config.durability.keep_last_n)
    await manager.load_records()
    await manager.open()  # the lock: a running run is not pruned under its feet
    try:
        deleted = await manager.prune(force=True)
    finally:
        await manager.close()
    print(f"deleted {deleted} checkpoint{'' if deleted == 1 else 's'} of {run_id}")
    return EXIT_OK


async def _delete_run(config: Config, store: RunStore, run_id: str) -> int:
    """Delete a run's checkpoints and record; return how many records went. Refused (an
    :class:`~playbooks.errors.ExecutionLockedError`) while the run holds its lock."""
    provider = _manager(config, run_id).provider
    try:
        deleted = await provider.delete_execution(run_id)
        for code in code_executions(await provider.list_executions(), run_id):
            deleted += await provider.delete_execution(code)
    finally:
        await provider.close()
    store.delete(run_id)
    return deleted


def code_executions(executions: list[str], run_id: str) -> list[str]:
    """The executions that hold the checkpoints of an isolated run's LLM code (``RUN~FRAME``: one per
    markdown playbook call, written by its worker processes): part of the run ``run_id``."""
    return [execution for execution in executions if execution.startswith(f"{run_id}~")]


def _is_code_execution(execution: str, executions: set[str]) -> bool:
    return "~" in execution and execution.split("~", 1)[0] in executions


async def delete_completed_runs(config: Config, *, older_than: float, keep: str = "") -> list[str]:
    """Delete every run recorded as completed that finished more than ``older_than`` seconds ago (but
    ``keep``); return their ids. Failed and crashed runs stay (they may resume), and so does a run
    that holds its lock."""
    store = open_run_store(config)
    cutoff = time.time() - older_than
    deleted = []
    for record in store.all():
        if record.status != "completed" or record.updated >= cutoff or record.run_id == keep:
            continue
        try:
            await _delete_run(config, store, record.run_id)
        except ExecutionLockedError:
            continue
        deleted.append(record.run_id)
    return deleted


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def _age(text: str) -> float:
    """An age on the command line: a number and a unit (s, m, h, d, w), in seconds."""
    number, unit = text[:-1], text[-1:].lower()
    try:
        seconds = float(number) * _UNITS[unit]
    except (KeyError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not an age such as 30d, 12h, 45m or 90s") from None
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: an age must be more than 0")
    return seconds


async def _clear(config: Config, run_id: str | None, every: bool, yes: bool = False) -> int:
    if (run_id is None) == (not every):
        _error("checkpoints", "clear needs a run id, or --all")
        return EXIT_USAGE
    probe = _manager(config, "_")
    if every:
        executions = await probe.provider.list_executions()
        run_ids: list[str | None] = [e for e in executions if not _is_code_execution(e, set(executions))]
    else:
        run_ids = [run_id]
    if every and run_ids and not yes:
        where = config.resolve_path(config.durability.storage_path)
        if not sys.stdin.isatty():
            _error("checkpoints", f"clear --all would delete the checkpoints of {len(run_ids)} run(s) in {where}; "
                   "pass --yes to do it without a terminal to confirm")
            return EXIT_USAGE
        answer = input(f"delete the checkpoints of {len(run_ids)} run(s) in {where}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("nothing deleted")
            return EXIT_OK
    store = open_run_store(config)
    total = 0
    for rid in run_ids:
        assert rid is not None
        total += await _delete_run(config, store, rid)
    print(f"deleted {total} checkpoint{'' if total == 1 else 's'} of {len(run_ids)} run{'' if len(run_ids) == 1 else 's'}")
    return EXIT_OK
