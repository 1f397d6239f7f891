"""The IPython side of durable cells: ``%load_ext playbooks``, ``%%durable`` and ``%durable``.

IPython calls magics synchronously, but a durable cell must run in the kernel's own event loop
(its tools may use clients made in earlier cells) and may ``await`` at top level. So the extension
adds an input transformer: a cell that starts with ``%%durable`` (or holds nothing but a ``%durable``
line) becomes one top-level ``await`` of :func:`durable_cell_async` (or :func:`durable_line_async`),
which IPython and ipykernel run in the running loop like any cell with ``await``. The registered magics
are the fallback when something runs a magic without transforming the cell (``run_cell_magic``): with
no loop running they run the cell to its end at once, else they explain what to do.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from playbooks.checkpoints.manager import CheckpointManager
from playbooks.checkpoints.namespace import shared_names
from playbooks.config import Config, ConfigError, load_config
from playbooks.errors import LLMCodeError, PlaybooksError
from playbooks.notebook.cell import (
    CELL_STATE,
    CellChangedError,
    CellProgress,
    CellReport,
    error_text,
    cell_status,
    derive_cell_id,
    run_durable_cell,
)

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__all__ = (
    "DurableCellError",
    "durable_cell_async",
    "durable_line_async",
    "load_ipython_extension",
    "unload_ipython_extension",
)

SESSION = secrets.token_hex(8)
"""This kernel process: a finished cell is not touched again by the kernel that ran it."""

_HISTORY = re.compile(r"_(?:_{0,2}|i{1,3}|i?\d+|ih|oh|dh|exit_code)")
"""IPython's history and output variables (``_``, ``__``, ``_i``, ``_i3``, ``_3``, ``_oh`` ...)."""
_CELL = re.compile(r"%%durable(?=\s|$)(.*)")
_LINE = re.compile(r"\s*%durable(?=\s|$)(.*)")
_PROGRESS_EVERY = 0.2  # seconds between two updates of the progress line
_MODULE = __name__


class DurableCellError(PlaybooksError):
    """A durable cell failed: its code raised, or the host could not run it (shown without our frames)."""

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self._lines = lines if lines is not None else [message]

    def _render_traceback_(self) -> list[str]:  # IPython shows these lines instead of a traceback
        return self._lines


class _Frontend:
    """What the front end told the kernel about the cell running now (``pre_run_cell``)."""

    cell_id: str | None = None

    @classmethod
    def pre_run_cell(cls, info: Any) -> None:
        cls.cell_id = getattr(info, "cell_id", None)


# ----------------------------------------------------------------------------- loading


def load_ipython_extension(ip: InteractiveShell) -> None:
    """``%load_ext playbooks``: register ``%%durable``/``%durable`` and the transformer that runs them
    in the kernel's event loop; idempotent."""
    if _transform not in ip.input_transformers_cleanup:
        ip.input_transformers_cleanup.append(_transform)
    ip.magics_manager.register_function(_durable_magic, magic_kind="line_cell", magic_name="durable")
    ip.events.register("pre_run_cell", _Frontend.pre_run_cell)


def unload_ipython_extension(ip: InteractiveShell) -> None:
    """``%unload_ext playbooks``: cells starting with ``%%durable`` are not transformed any more."""
    if _transform in ip.input_transformers_cleanup:
        ip.input_transformers_cleanup.remove(_transform)
    try:
        ip.events.unregister("pre_run_cell", _Frontend.pre_run_cell)
    except ValueError:
        pass


def _transform(lines: list[str]) -> list[str]:
    """Turn a ``%%durable`` cell (or a cell of one ``%durable`` line) into one top-level await."""
    if not lines:
        return lines
    cell = _CELL.match(lines[0])
    if cell is not None and not lines[0].rstrip().endswith("?"):
        body = "".join(lines[1:])
        options = cell.group(1).strip()
        return [f"await __import__({_MODULE!r}, fromlist=['_']).durable_cell_async({options!r}, {body!r})\n"]
    code = [line for line in lines if line.strip()]
    if len(code) == 1 and (line := _LINE.match(code[0])) is not None and not code[0].rstrip().endswith("?"):
        return [f"await __import__({_MODULE!r}, fromlist=['_']).durable_line_async({line.group(1).strip()!r})\n"]
    return lines


def _durable_magic(line: str, cell: str | None = None) -> None:
    """Run a durable cell (``%%durable [--id ID] [--force] ...``) or manage stored ones
    (``%durable list | show ID | resume ID | forget ID``); see docs/notebooks.md."""
    if cell is not None:
        _run_sync(lambda: durable_cell_async(line, cell), cell_code=True)
    else:
        _run_sync(lambda: durable_line_async(line), cell_code=line.split()[:1] == ["resume"])


def _run_sync(make: Callable[[], Awaitable[None]], *, cell_code: bool) -> None:
    """Run a magic's coroutine from the synchronous magic: at once when no loop runs in this thread;
    storage-only commands in a thread of their own otherwise; cell code never leaves this thread."""
    import asyncio

    import anyio

    async def main() -> None:
        await make()

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        anyio.run(main)
        return
    if cell_code:
        raise DurableCellError(
            "a durable cell runs in the kernel's event loop: put %%durable on the first line of its own "
            "cell (or %durable resume alone in a cell), with the playbooks extension loaded"
        )
    failure: list[BaseException] = []

    def target() -> None:
        try:
            anyio.run(main)
        except BaseException as exc:  # raised again in the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=target, name="playbooks-durable-magic")
    worker.start()
    worker.join()
    if failure:
        raise failure[0]


# ----------------------------------------------------------------------------- options


def _parse(line: str, *, cell: bool) -> dict[str, Any]:
    """Options of ``%%durable`` / ``%durable``: a small getopt, so errors read like the CLI's."""
    try:
        words = shlex.split(line)
    except ValueError as exc:
        _fail(f"%durable: cannot read the options ({exc})")
    options: dict[str, Any] = {"id": None, "storage": None, "provider": None, "config": None, "tools": [],
                               "force": False, "quiet": False, "args": []}
    takes_value = {"--id": "id", "--storage": "storage", "--provider": "provider", "--config": "config",
                   "--tools": "tools"}
    flags = {"--force": "force", "--quiet": "quiet"}
    i = 0
    while i < len(words):
        word = words[i]
        key, eq, value = word.partition("=")
        if key in takes_value:
            if not eq:
                if i + 1 >= len(words):
                    _fail(f"%durable: {key} needs a value")
                i += 1
                value = words[i]
            if key == "--tools":
                options["tools"].extend(v for v in value.replace(",", " ").split() if v)
            else:
                options[takes_value[key]] = value
        elif word in flags and cell:
            options[flags[word]] = True
        elif word.startswith("-"):
            known = sorted(takes_value) + (sorted(flags) if cell else [])
            _fail(f"%durable: unknown option {word!r} (known: {', '.join(known)})")
        else:
            options["args"].append(word)
        i += 1
    if cell and options["args"]:
        _fail(f"%%durable takes options only, not {options['args'][0]!r} (a name is given with --id NAME)")
    return options


def _fail(message: str) -> NoReturn:
    raise DurableCellError(message)


def _config(options: dict[str, Any]) -> Config:
    overrides = {}
    if options["storage"]:
        overrides["durability.storage_path"] = options["storage"]
    if options["provider"]:
        overrides["durability.provider"] = options["provider"]
    try:
        return load_config(Path(options["config"]) if options["config"] else None, overrides=overrides)
    except ConfigError as exc:
        _fail(f"%durable: {exc}")


def _manager_factory(config: Config, cell: str) -> Callable[[], CheckpointManager]:
    durability = config.durability
    storage = config.resolve_path(durability.storage_path)

    def make() -> CheckpointManager:
        try:
            return CheckpointManager.from_config(durability, cell, storage_path=storage)
        except PlaybooksError as exc:
            _fail(f"%durable: {exc}")

    return make


def _shell() -> InteractiveShell:
    from IPython import get_ipython

    shell = get_ipython()
    if shell is None:
        _fail("%durable needs an IPython shell or a Jupyter kernel")
    return shell  # type: ignore[no-any-return]


def _unsaved(shell: InteractiveShell) -> Callable[[str], bool]:
    """IPython's own names, never saved or restored: its hidden namespace and the history variables."""
    hidden = shell.user_ns_hidden

    def unsaved(name: str) -> bool:
        return (
            name in hidden
            or _HISTORY.fullmatch(name) is not None
            or (name.startswith("__") and name.endswith("__"))  # __name__, __session__: the kernel's
        )

    return unsaved


def _notebook(shell: InteractiveShell) -> str | None:
    session = shell.user_ns.get("__session__") or os.environ.get("JPY_SESSION_NAME")
    return str(session) if session else None


# ----------------------------------------------------------------------------- display


class _Display:
    """One line under the cell: progress while it runs, then the summary."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self._handle: Any = None
        self._shown = time.monotonic()  # a quick cell shows its summary only

    def _show(self, text: str) -> None:
        from IPython.display import display

        data = {"text/plain": text}
        if self._handle is None:
            self._handle = display(data, raw=True, display_id=True)  # type: ignore[no-untyped-call]
        else:
            self._handle.update(data, raw=True)

    def progress(self, progress: CellProgress) -> None:
        now = time.monotonic()
        if self.quiet or now - self._shown < _PROGRESS_EVERY:
            return
        self._shown = now
        self._show(str(progress))

    def summary(self, report: CellReport) -> None:
        if self.quiet and report.outcome == "ran" and report.error is None:
            if self._handle is not None:
                self._show("")
            return
        self._show(str(report))

    def interrupted(self, cell: str) -> None:
        self._show(
            f"durable cell {cell!r} was interrupted: run it again to resume from its last completed "
            "durable call"
        )


def _error_lines(error: LLMCodeError) -> list[str]:
    text = error.traceback_text.rstrip("\n")
    return [text] if text else [error_text(error)]


# ----------------------------------------------------------------------------- the cell magic


async def durable_cell_async(line: str, body: str) -> None:
    """Run ``body`` as a durable cell with the options of ``line`` (what ``%%durable`` becomes)."""
    shell = _shell()
    options = _parse(line, cell=True)
    notebook = _notebook(shell)
    cell = derive_cell_id(explicit=options["id"], notebook=notebook, cell_id=_Frontend.cell_id, source=body)
    # A blank first line stands for the %%durable line, so line numbers are the cell's as shown.
    await _run(shell, options, cell, "\n" + body, notebook)


async def _run(shell: InteractiveShell, options: dict[str, Any], cell: str, body: str, notebook: str | None) -> None:
    config = _config(options)
    tools = {}
    for name in options["tools"]:
        value = shell.user_ns.get(name)
        if not callable(value):
            _fail(f"%%durable --tools: the notebook has no function named {name!r}")
        tools[name] = value
    display = _Display(options["quiet"])
    try:
        report = await run_durable_cell(
            body,
            shell.user_ns,
            cell=cell,
            open_manager=_manager_factory(config, cell) if config.durability.enabled else None,
            tools=tools,
            unsaved=_unsaved(shell),
            force=options["force"],
            session=SESSION,
            meta={"notebook": notebook, "cell_id": _Frontend.cell_id},
            on_progress=display.progress,
        )
    except (KeyboardInterrupt, _cancelled()):
        display.interrupted(cell)
        raise
    except DurableCellError:
        raise
    except CellChangedError as exc:
        raise DurableCellError(str(exc)) from None
    except PlaybooksError as exc:
        raise DurableCellError(f"durable cell {cell!r}: {type(exc).__name__}: {exc}") from exc
    display.summary(report)
    if report.error is not None:
        raise DurableCellError(error_text(report.error), _error_lines(report.error))


def _cancelled() -> type[BaseException]:
    import anyio

    return anyio.get_cancelled_exc_class()


# ----------------------------------------------------------------------------- %durable


async def durable_line_async(line: str) -> None:
    """``%durable list | show ID | resume ID | forget ID`` (what a cell of one ``%durable`` line becomes)."""
    shell = _shell()
    options = _parse(line, cell=False)
    args = options["args"]
    command = args[0] if args else "list"
    commands = ("list", "show", "resume", "forget")
    if command not in commands:
        _fail(f"%durable: unknown command {command!r} (commands: {', '.join(commands)})")
    if command == "list":
        if len(args) > 1:
            _fail("%durable list takes no argument")
        print(await _list(_config(options)))
        return
    if len(args) != 2:
        _fail(f"%durable {command} needs the cell's id: %durable {command} ID (see %durable list)")
    cell = args[1]
    config = _config(options)
    if command == "show":
        print(await _show(config, cell))
    elif command == "forget":
        manager = _manager_factory(config, cell)()
        try:
            deleted = await manager.provider.delete_execution(cell)
        except PlaybooksError as exc:
            _fail(f"%durable forget: {exc}")
        finally:
            await manager.provider.close()
        print(f"forgot durable cell {cell!r} ({deleted} records deleted)" if deleted else f"no durable cell {cell!r}")
    else:
        source = await _stored_source(config, cell)
        await _run(shell, dict(options, force=False, quiet=False, tools=[]), cell, source, _notebook(shell))


async def _load(config: Config, cell: str) -> tuple[CheckpointManager, Any]:
    manager = _manager_factory(config, cell)()
    latest = await manager.get_latest_checkpoint()
    root = manager.frame_state(latest.root_frame_id) if latest is not None else None
    return manager, root


async def _stored_source(config: Config, cell: str) -> str:
    manager, root = await _load(config, cell)
    await manager.provider.close()
    if root is None:
        _fail(f"%durable resume: no stored durable cell {cell!r} (see %durable list)")
    return str(root.response)


async def _list(config: Config) -> str:
    manager = _manager_factory(config, "_")()
    try:
        executions = await manager.provider.list_executions()
    finally:
        await manager.provider.close()
    rows: list[tuple[str, ...]] = []
    others = 0
    for execution in executions:
        loaded, root = await _load(config, execution)
        await loaded.provider.close()
        if loaded.loaded_state(CELL_STATE) is None:
            others += 1
            continue
        status = cell_status(loaded, root)
        first = next((ln.strip() for ln in status.source.splitlines() if ln.strip()), "")
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(status.updated)) if status.updated else "-"
        rows.append((status.cell, status.status, str(status.statements), when, first[:40]))
    if not rows:
        text = "no durable cells stored in " + str(config.resolve_path(config.durability.storage_path))
    else:
        header = ("cell", "status", "statements", "updated", "first line")
        widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
        text = "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows))
    if others:
        text += f"\n({others} other run{'' if others == 1 else 's'} in the store: see playbooks runs)"
    return text


async def _show(config: Config, cell: str) -> str:
    manager, root = await _load(config, cell)
    await manager.provider.close()
    if root is None:
        _fail(f"%durable show: no stored durable cell {cell!r} (see %durable list)")
    status = cell_status(manager, root)
    lines = [f"durable cell {cell!r}: {status.status}, {status.statements} statements run"]
    meta = manager.loaded_state(CELL_STATE) or {}
    if meta.get("notebook"):
        lines.append(f"notebook: {meta['notebook']}")
    lines.append(f"last checkpoint: {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(root.timestamp))}")
    if root.statement:
        lines.append(f"last statement run: {root.statement.strip().splitlines()[0][:80]}")
    finished = sorted(
        (e for e in root.journal.values() if e.finished and e.name != "print"), key=lambda e: e.counter
    )
    if finished:
        lines.append(
            f"after that checkpoint: {len(finished)} finished durable call{'' if len(finished) == 1 else 's'} "
            f"in the journal (a resume replays them), the last {finished[-1].display}"
        )
    names = sorted(name for key in root.variables for name in shared_names(key) or [key])
    lines.append(f"variables: {', '.join(names) if names else '(none)'}")
    lines.extend(f"not saved: {name} ({reason})" for name, _, reason in root.skipped)
    lines.extend(f"in flight (runs again on resume): {entry.display}" for entry in root.in_flight)
    executed = root.executed_offset
    lines.append("source (>> ran):" if executed else "source:")
    offset = 0
    for number, text in enumerate(root.response.splitlines(keepends=True), 1):
        if number > 1 or text.strip():  # (a durable cell's first line stands for %%durable)
            mark = ">> " if offset + len(text.rstrip("\n")) <= executed and text.strip() else "   "
            lines.append(f"{mark}{number:>3}  {text.rstrip()}")
        offset += len(text)
    return "\n".join(lines)
