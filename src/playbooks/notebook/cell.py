"""A durable notebook cell: run it, or after a kernel crash resume it, in the notebook's namespace.

This module knows nothing of IPython (``playbooks.notebook.magics`` is the IPython side). A cell is
one execution of the checkpoint store, named by the cell's id; its source is the executor's whole
response, so a resume needs nothing but the store. A ``state`` record (:data:`CELL_STATE`) says
which kernel ran the cell last, so that running a finished cell again in the same kernel changes
nothing, while after a restart it puts back the variables the cell ended with.

What happens when a cell runs (:func:`run_durable_cell`):

* nothing stored: it runs from the start, checkpointing at every durable call;
* stored and not finished (the kernel died, the cell was interrupted): the same source resumes from
  its last completed durable call; other source is refused (:class:`CellChangedError`), unless
  ``force``, which forgets the stored run and starts over;
* stored and finished: not run again. In the kernel that ran it nothing happens; in another (after a
  restart) the variables it ended with are restored. ``force`` runs it again from the start.
"""

from __future__ import annotations

import hashlib
import re
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from playbooks.agent import Agent
from playbooks.checkpoints.manager import CheckpointManager
from playbooks.checkpoints.model import FrameState
from playbooks.checkpoints.namespace import shared_names
from playbooks.checkpoints.provider import validate_execution_id
from playbooks.checkpoints.recovery import RecoveryCoordinator
from playbooks.errors import CheckpointWarning, LLMCodeError, PlaybooksError
from playbooks.execution.fingerprint import fingerprint
from playbooks.execution.hash_seed import seed_mismatch
from playbooks.execution.statement_splitter import Statement
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import ToolCall

__all__ = (
    "CELL_STATE",
    "CellChangedError",
    "CellProgress",
    "CellReport",
    "CellStatus",
    "cell_status",
    "derive_cell_id",
    "error_text",
    "run_durable_cell",
)

CELL_STATE = "notebook_cell"
"""Name of the ``state`` record a durable cell keeps: ``{"session", "notebook", "cell_id", "started"}``."""

Outcome = Literal["ran", "resumed", "restored", "unchanged"]


class CellChangedError(PlaybooksError):
    """The cell's source is not the source of its stored, unfinished run."""


@dataclass(slots=True)
class CellProgress:
    """Where a running cell is: updated before every statement and after every durable call."""

    cell: str
    statement: Statement | None = None
    statements: int = 0
    """Statements run in this kernel."""
    calls: int = 0
    """Durable calls that ran in this kernel (``print`` excluded)."""
    replayed: int = 0
    """Durable calls whose outcome came back from the journal instead (``print`` excluded)."""
    printed: int = 0
    prints_replayed: int = 0
    last_call: str = ""
    """The durable call that ended last, as the journal shows it (``charge(3)``)."""

    def __str__(self) -> str:
        where = f"line {self.statement.lineno}" if self.statement is not None else "starting"
        text = f"durable cell {self.cell!r}: {where}, {self.statements} statements, {self.calls} calls"
        if self.replayed:
            text += f" ({self.replayed} more replayed from the journal)"
        if self.last_call:
            text += f"; last call: {self.last_call}"
        return text


@dataclass(slots=True)
class CellReport:
    """What running a durable cell did, for the summary shown under the cell."""

    cell: str
    outcome: Outcome
    progress: CellProgress
    error: LLMCodeError | None = None
    checkpoint: str | None = None
    """The checkpoint a resume or restore started from."""
    checkpoint_time: float | None = None
    skipped_statements: int = 0
    """Statements that had run before the crash and were not run again."""
    restored: list[str] = field(default_factory=list)
    """Variables put back from the checkpoint."""
    not_restored: list[tuple[str, str, bool]] = field(default_factory=list)
    """Variables that could not be saved: ``(name, reason, kept the live value)``."""
    in_flight: list[str] = field(default_factory=list)
    """Calls that had started but not finished: they ran again, with the same idempotency key."""
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0
    durable: bool = True

    def __str__(self) -> str:
        p = self.progress
        head = {
            "ran": f"durable cell {self.cell!r} ran",
            "resumed": f"durable cell {self.cell!r} resumed from checkpoint {self.checkpoint}",
            "restored": f"durable cell {self.cell!r} had finished; restored from checkpoint {self.checkpoint}",
            "unchanged": f"durable cell {self.cell!r} had finished in this kernel; not run again",
        }[self.outcome]
        if self.checkpoint_time is not None and self.outcome in ("resumed", "restored"):
            head += f" (written {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.checkpoint_time))})"
        if not self.durable:
            head += " without checkpoints (durability.enabled = false)"
        lines = [head]
        if self.outcome in ("resumed", "restored"):
            lines.append(f"  restored {_count(len(self.restored), 'variable')}" + (
                f": {_names(self.restored)}" if self.restored else ""
            ))
        for name, reason, kept in self.not_restored:
            fate = "kept the value this kernel has" if kept else "using it raises UnrestoredValueError"
            lines.append(f"  not restored: {name} ({reason}); {fate}")
        if self.outcome == "resumed":
            lines.append(
                f"  skipped {_count(self.skipped_statements, 'statement')} that had run; replayed "
                f"{_count(p.replayed, 'call')} and {_count(p.prints_replayed, 'printed line')} from the journal"
            )
        for call in self.in_flight:
            lines.append(f"  may have run before the crash, ran again with the same idempotency key: {call}")
        if self.outcome in ("ran", "resumed"):
            lines.append(
                f"  ran {_count(p.statements, 'statement')} and {_count(p.calls, 'durable call')} "
                f"in {self.seconds:.2f} s" + (f"; failed: {error_text(self.error)}" if self.error is not None else "")
            )
        elif self.error is not None:
            lines.append(f"  it had failed: {error_text(self.error)}")
        lines.extend(f"  note: {note}" for note in self.notes)
        return "\n".join(lines)


def error_text(error: LLMCodeError) -> str:
    """An error of the cell's code, with its line in the cell."""
    return error.message + (f" (line {error.lineno} of the cell)" if error.lineno is not None else "")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _names(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def derive_cell_id(*, explicit: str | None, notebook: str | None, cell_id: str | None, source: str) -> str:
    """The execution id of a cell: ``explicit`` (``--id``) if given, else one stable across kernel
    restarts: from the notebook's name and the front end's cell id when both are known, else from the
    cell's source (editing such a cell then makes it a new durable cell)."""
    if explicit:
        return validate_execution_id(explicit)
    if cell_id:
        stem = notebook.rsplit("/", 1)[-1].removesuffix(".ipynb") if notebook else "cell"
        return f"{_UNSAFE.sub('_', stem)[:40] or 'cell'}-{_UNSAFE.sub('_', cell_id)[:36]}"
    return "cell-" + hashlib.sha256(source.encode("utf-8", "surrogatepass")).hexdigest()[:12]


@dataclass(frozen=True, slots=True)
class CellStatus:
    """A stored durable cell as ``%durable list`` shows it."""

    cell: str
    status: Literal["finished", "failed", "unfinished", "not started"]
    statements: int
    updated: float | None
    source: str
    session: str


def cell_status(manager: CheckpointManager, root: FrameState | None) -> CellStatus:
    """The status of the cell whose records ``manager`` has loaded (``root``: its root frame)."""
    meta = manager.loaded_state(CELL_STATE) or {}
    if root is None:
        return CellStatus(manager.execution_id, "not started", 0, None, "", str(meta.get("session", "")))
    status: Literal["finished", "failed", "unfinished"] = (
        ("failed" if root.error is not None else "finished") if root.done else "unfinished"
    )
    return CellStatus(
        manager.execution_id, status, root.statements_executed, root.timestamp, root.response,
        str(meta.get("session", "")),
    )


class _Tracker:
    """Counts statements and calls for the progress display (``replayable``: call ids in the journal)."""

    def __init__(
        self, progress: CellProgress, replayable: set[str], on_progress: Callable[[CellProgress], None] | None
    ) -> None:
        self.progress = progress
        self.replayable = replayable
        self.on_progress = on_progress

    def statement(self, statement: Statement) -> None:
        self.progress.statement = statement
        self.progress.statements += 1
        self._tell()

    def call(self, call: ToolCall, value: Any, error: BaseException | None) -> None:
        replayed = call.call_id in self.replayable
        p = self.progress
        if call.name == "print":
            p.prints_replayed += replayed
            p.printed += not replayed
        else:
            if replayed:
                p.replayed += 1
            else:
                p.calls += 1
            display = fingerprint(call.name, call.args, call.kwargs)[1]
            p.last_call = display if len(display) <= 60 else display[:57] + "..."
        self._tell()

    def _tell(self) -> None:
        if self.on_progress is not None:
            self.on_progress(self.progress)


async def run_durable_cell(
    source: str,
    namespace: dict[str, Any],
    *,
    cell: str,
    open_manager: Callable[[], CheckpointManager] | None,
    tools: Mapping[str, Callable[..., Any]] | None = None,
    unsaved: Callable[[str], bool] | None = None,
    force: bool = False,
    session: str = "",
    meta: Mapping[str, Any] | None = None,
    on_progress: Callable[[CellProgress], None] | None = None,
) -> CellReport:
    """Run (or resume, or restore) the durable cell ``cell`` whose code is ``source``, in ``namespace``.

    ``open_manager`` makes the cell's checkpoint manager (``None``: run without checkpoints); ``tools`` are
    callables bound by name as durable calls (functions marked with
    :func:`~playbooks.execution.tool_calls.durable_call` are durable calls wherever they are);
    ``unsaved`` names the host's own variables; ``session`` identifies this interpreter (a finished
    cell is not touched again in the session that ran it). Errors in the cell's code are in the
    report's ``error``; a failure of the host (storage, a replay that diverged) raises.
    """
    began = time.perf_counter()
    progress = CellProgress(cell)
    report = CellReport(cell, "ran", progress, durable=open_manager is not None)
    agent = Agent(cell, tools=dict(tools or {}))
    bound_names = [*agent.tools, "print"]
    previous = {name: namespace[name] for name in bound_names if name in namespace}
    executor: StreamingPythonExecutor | None = None
    managers: list[CheckpointManager] = []
    caught = warnings.catch_warnings(record=True)
    seen = caught.__enter__()
    warnings.simplefilter("always", CheckpointWarning)
    try:
        if open_manager is None:
            tracker = _Tracker(progress, set(), on_progress)
            executor = StreamingPythonExecutor(
                agent, namespace=namespace, on_statement=tracker.statement, on_call=tracker.call
            )
            executor = await _run_fresh(executor, source)
        else:
            executor = await _run_stored(
                source, namespace, open_manager, managers, agent, report, unsaved=unsaved, force=force,
                meta=dict(meta or {}, session=session), on_progress=on_progress,
            )
        if executor is not None:
            report.error = executor.error
    finally:
        # The names the executor bound are the notebook's again, also after an interrupt (then no
        # executor was returned, but its bindings are in the namespace).
        for name in bound_names:
            if getattr(namespace.get(name), "__playbooks_tool__", None) == name:
                if name in previous:
                    namespace[name] = previous[name]
                else:
                    del namespace[name]
        for manager in managers:
            await manager.close()
            await manager.provider.close()
        caught.__exit__(None, None, None)
        _sort_warnings(seen, report)
    report.seconds = time.perf_counter() - began
    return report


def _sort_warnings(seen: list[warnings.WarningMessage], report: CellReport) -> None:
    """Checkpoint warnings go in the cell's summary (once each; an in-flight call is there
    already); any other warning is issued again as it was."""
    for caught in seen:
        if issubclass(caught.category, CheckpointWarning):
            text = str(caught.message)
            if "had started but not finished" not in text and text not in report.notes:
                report.notes.append(text)
        else:
            warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)


async def _run_fresh(executor: StreamingPythonExecutor, source: str) -> StreamingPythonExecutor:
    try:
        await executor.add_chunk(source)
    except LLMCodeError:
        pass  # kept for finalize, which reports it
    await executor.finalize()
    return executor


async def _run_stored(
    source: str,
    namespace: dict[str, Any],
    open_manager: Callable[[], CheckpointManager],
    managers: list[CheckpointManager],
    agent: Agent,
    report: CellReport,
    *,
    unsaved: Callable[[str], bool] | None,
    force: bool,
    meta: dict[str, Any],
    on_progress: Callable[[CellProgress], None] | None,
) -> StreamingPythonExecutor | None:
    manager = open_manager()
    managers.append(manager)
    cell = manager.execution_id
    latest = await manager.get_latest_checkpoint()
    root = manager.frame_state(latest.root_frame_id) if latest is not None else None
    if (root is not None or await manager.provider.list_checkpoints(cell)) and force:
        await manager.provider.delete_execution(cell)
        manager = open_manager()  # a new execution under the same id
        managers.append(manager)
        root = latest = None
        report.notes.append("the stored run was forgotten (--force): its durable calls ran again")
    if root is not None and latest is not None:
        if root.response != source:
            stored_run = "finished" if root.done else "unfinished"
            raise CellChangedError(
                f"durable cell {cell!r} was changed since its stored run ({stored_run}). "
                "Put the original code back to "
                + ("restore its variables" if root.done else "resume it")
                + ", or run it with %%durable --force to forget the stored run and start over "
                "(its durable calls then run again)"
            )
        stored = manager.loaded_state(CELL_STATE) or {}
        if root.done and stored.get("session") == meta["session"]:
            report.outcome = "unchanged"
            report.progress.statements = 0
            from playbooks.checkpoints.outcome import load_outcome

            error = load_outcome(root.error) if root.error is not None else None
            report.error = error if isinstance(error, LLMCodeError) else None
            return None
        return await _resume(source, namespace, manager, agent, report, root, latest.checkpoint_id,
                             unsaved=unsaved, meta=meta, on_progress=on_progress)
    await manager.open()
    await manager.save_state(CELL_STATE, dict(meta, started=time.time()))
    tracker = _Tracker(report.progress, set(), on_progress)
    executor = StreamingPythonExecutor(
        agent, namespace=namespace, checkpoint_manager=manager, unsaved=unsaved,
        on_statement=tracker.statement, on_call=tracker.call,
    )
    return await _run_fresh(executor, source)


async def _resume(
    source: str,
    namespace: dict[str, Any],
    manager: CheckpointManager,
    agent: Agent,
    report: CellReport,
    root: FrameState,
    checkpoint_id: str,
    *,
    unsaved: Callable[[str], bool] | None,
    meta: dict[str, Any],
    on_progress: Callable[[CellProgress], None] | None,
) -> StreamingPythonExecutor:
    report.outcome = "restored" if root.done else "resumed"
    report.checkpoint = checkpoint_id
    report.checkpoint_time = root.timestamp
    report.skipped_statements = root.statements_executed
    coordinator = RecoveryCoordinator(manager)
    recovery = await coordinator.recover_execution_state(agent)
    report.in_flight = [call.call for call in recovery.in_flight]
    report.notes.extend(recovery.fallbacks)
    live = {name for name, _, _ in root.skipped if name in namespace}
    report.not_restored = [(name, reason, name in live) for name, _, reason in root.skipped]
    skipped = {name for name, _, _ in root.skipped}
    report.restored = sorted(
        name for key in root.variables for name in (shared_names(key) or [key])
        if name not in skipped and not (unsaved is not None and unsaved(name))
    )
    if not root.done and seed_mismatch(manager):
        report.notes.append(
            "this kernel's hash seed differs from (or, like the first kernel's, is not) a fixed one, so "
            "code that iterates over sets of strings may replay in another order and stop with "
            "NonDeterminismError: give kernels a fixed PYTHONHASHSEED (docs/notebooks.md)"
        )
    await manager.save_state(CELL_STATE, dict(manager.loaded_state(CELL_STATE) or {}, **meta))
    replayable = {entry.seq for entry in root.journal.values() if entry.finished}
    tracker = _Tracker(report.progress, replayable, on_progress)
    latest = await manager.load_checkpoint(checkpoint_id)
    executor = await StreamingPythonExecutor.resume_from_checkpoint(
        agent, latest, checkpoint_manager=manager, namespace=namespace, unsaved=unsaved,
        on_statement=tracker.statement, on_call=tracker.call,
    )
    await executor.finalize()
    return executor
