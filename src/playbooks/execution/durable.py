"""Durable frames: the journal of awaits, snapshots, replay and the call stack of nested executors.

A :class:`DurableFrame` is the durability side of one :class:`StreamingPythonExecutor`. Its
:class:`DurableInterceptor` sees every call of a tool (and ``print``) by the LLM's code:

* live, an async call is preceded by an ``intent`` record and followed by a ``result`` record, both
  written without fsync (a killed process loses neither: they are in the kernel's page cache); the
  records of earlier calls are fsynced before a new call starts, so a power loss can only lose a call
  that produced no later side effect. Sync calls (``print``, sync tools) cannot await a write: their
  records are written at the frame's next await or statement end.
* after a top-level statement that awaited a durable call, the frame writes a ``snapshot`` (namespace,
  executed offset, response, next sequence number), which supersedes the journal; in a fast run only
  after every ``_SNAPSHOT_EVERY``-th such statement (see :meth:`DurableFrame._snapshot_due`), the
  journal covering those between. Every snapshot survives a killed process and is fsynced with the
  journal before the next durable call (the last one is fsynced at once), so the per-await cost is one
  journal fsync, and a power loss falls back to the last snapshot before the last fsync.
* resumed, the frame starts from its newest snapshot; a call whose sequence number is in the journal
  returns the recorded result (or raises the recorded exception) instead of running; a call that had
  started but not finished runs again with the same idempotency key; a call whose name or arguments
  differ from the journal raises :class:`~playbooks.errors.NonDeterminismError`.

A tool that creates an executor while it runs makes a *child frame*: its id is the parent's frame id
plus the call's sequence number, so after a resume the parent's replay re-enters the tool and the child
executor re-attaches to its own checkpoints. That is how the whole call stack comes back.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import hashlib
import itertools
import logging
import pickle
import re
import time
import warnings
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

from playbooks.checkpoints.manager import CheckpointManager, PreparedRecord
from playbooks.checkpoints.model import FrameRef, FrameState, JournalEntry, Record
from playbooks.checkpoints.outcome import dump_outcome, load_outcome
from playbooks.errors import CheckpointCorruptError, CheckpointWarning, InterpreterError, NonDeterminismError
from playbooks.execution.fingerprint import fingerprint
from playbooks.execution.hash_seed import record_hash_seed, seed_mismatch
from playbooks.execution.mutations import ArgumentWatch, apply_mutations
from playbooks.execution.retry import RetryPolicy, policy_of
from playbooks.execution.tool_calls import ToolCall, ToolCallInterceptor, is_cheap, when_output_written

if TYPE_CHECKING:
    from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

__all__ = ("DurableFrame", "DurableInterceptor", "current_durable_call", "outside_durable_calls")

_logger = logging.getLogger("playbooks.checkpoints")

_SMALL_NAMESPACE = 256 * 1024  # pickled bytes: a snapshot of a namespace this small is cheap
_SNAPSHOT_EVERY = 8  # awaited statements the journal covers between two snapshots in a fast run...
_SNAPSHOT_INTERVAL = 0.02  # ...unless the last snapshot is this old (s): a slow run snapshots every await
_SNAPSHOT_SPACING = 4  # a big namespace's snapshot waits this many times its cost since the previous one
_MAX_JOURNAL = 256  # journal records after which a snapshot is taken whatever it costs
_RESPONSE_DELTA_MAX = 4096  # characters a snapshot adds to its host's response before holding it whole


@dataclass(slots=True)
class _CallContext:
    """The durable call being served: which frame made it, its call id, and how many child executors it
    has created so far."""

    frame: DurableFrame
    seq: str
    children: Iterator[int]


_ACTIVE_CALL: contextvars.ContextVar[_CallContext | None] = contextvars.ContextVar(
    "playbooks_durable_call", default=None
)


@contextlib.contextmanager
def outside_durable_calls() -> Iterator[None]:
    """Within this block no durable call is current: for a host running a tool for an isolated
    worker's call, so an executor the tool creates is not taken for a child of whatever host call
    happened to start the worker."""
    token = _ACTIVE_CALL.set(None)
    try:
        yield
    finally:
        _ACTIVE_CALL.reset(token)


def current_durable_call() -> _CallContext | None:
    """The durable call whose tool is running now (``None`` outside one)."""
    return _ACTIVE_CALL.get()


class DurableFrame:
    """The checkpoints of one executor: its id, place in the call stack, journal and snapshots."""

    def __init__(
        self,
        manager: CheckpointManager,
        executor: StreamingPythonExecutor,
        *,
        frame_id: str,
        parent: _CallContext | None,
        state: FrameState | None,
    ) -> None:
        self.manager = manager
        self.executor = executor
        self.frame_id = frame_id
        self.parent = parent
        self.state = state
        self.journal: dict[str, JournalEntry] = dict(state.journal) if state else {}
        # A replay hands recorded outcomes back in the order the calls finished (sync calls, which
        # cannot wait, excepted): ``_order`` is that order, ``_waiting`` the replayed calls waiting
        # for their turn (see also :meth:`task_ended`).
        self._order: list[str] = [
            e.seq for e in sorted(self.journal.values(), key=lambda e: e.counter)
            if e.outcome in ("value", "raise", "cancelled") and not e.sync
        ]
        self._waiting: dict[str, anyio.Event] = {}
        self._progress = 0
        self._cancelled_live: list[ToolCall] = []
        self.encoder = manager.new_encoder()
        self.fatal: InterpreterError | None = None
        self.awaited = False
        self._saved_response = len(state.response) if state else 0
        self._started = state is not None
        self._pending: list[Record] = []
        self._seeded = False
        self._unsynced_snapshots = 0
        self._calls: dict[str, tuple[tuple[str, str], ArgumentWatch]] = {}
        self._attempts: dict[str, int] = {}  # unfinished calls popped from the journal: attempts made
        self.overridden = False
        """Whether the restore set variables (``save_overrides``): an unfinished call may then change."""
        self._response_host: tuple[int, int] | None = None  # (counter, length) of a whole response
        self._journal_since = 0
        self._awaited_since = 0  # statements that awaited since the last snapshot
        self._last_snapshot_at = time.perf_counter()
        self._last_snapshot_cost = 0.0
        self._last_snapshot_size = 0
        self.direct_tool: str | None = None
        """The tool the running statement awaits directly (``x = await Tool(...)``), if that is all it
        awaits: see :meth:`after_call`. Set by the executor for each statement."""
        self._deferred: tuple[ToolCall, Any, tuple[tuple[str, str], ArgumentWatch]] | None = None

    @property
    def agent_id(self) -> str:
        return self.executor.agent.id

    def call_stack(self) -> tuple[FrameRef, ...]:
        """The frames from the root to this one, each with its executed offset and last statement."""
        ex = self.executor
        me = FrameRef(
            self.frame_id,
            self.agent_id,
            self.parent.seq if self.parent else None,
            ex.executed_offset,
            ex.last_statement,
        )
        return (self.parent.frame.call_stack() if self.parent else ()) + (me,)

    def seed(self, values: Mapping[str, Any]) -> None:
        """Start the encoder from the restored snapshot, so unchanged variables stay references."""
        if self.state is not None and not self._seeded:
            self.encoder.seed(self.state.variables, values, self.state.snapshot_counter)
            self._seeded = True

    # ----------------------------------------------------------------- records

    def _record(self, kind: str, **fields: Any) -> Record:
        text = self.executor.response
        if kind == "snapshot":
            # A snapshot holds the whole response, or refers to the frame's last snapshot that held
            # it whole and adds what came since (until that is long), so a long response is not
            # written again on every await.
            host = self._response_host
            if host is not None and len(text) - host[1] <= _RESPONSE_DELTA_MAX:
                start, delta = host[1], text[host[1] :]
                fields["response_host"] = host[0]
            else:
                start, delta = 0, text
        else:
            start, delta = self._saved_response, text[self._saved_response :]
        self._saved_response = len(text)
        return Record(
            kind=kind,  # type: ignore[arg-type]
            execution_id=self.manager.execution_id,
            counter=self.manager.allocate_counter(),
            timestamp=time.time(),
            frame_id=self.frame_id,
            agent_id=self.agent_id,
            call_stack=self.call_stack(),
            response_start=start,
            response_text=delta,
            **fields,
        )

    async def start(self, *, next_seq: int | None = None) -> None:
        """Take the lock and, for a new frame, write its starting snapshot (the namespace it got).

        ``next_seq`` is the first call the snapshot does not cover, when a call was numbered before the
        frame started (a host calling a tool before feeding any code).
        """
        await self.manager.open()
        if self.parent is None:
            await record_hash_seed(self.manager)
        if not self._started:
            self._started = True
            await self.snapshot(sync=False, next_seq=next_seq)

    async def snapshot(
        self, *, sync: bool = True, done: bool = False, error: bytes | None = None, next_seq: int | None = None
    ) -> None:
        """Write the frame's state at its current statement boundary; it supersedes the journal."""
        ex = self.executor
        began = time.perf_counter()
        encoded = self.encoder.encode(ex.namespace, bound=ex.bound, unsaved=ex.unsaved)
        self.manager.check_snapshot(encoded, self.frame_id)
        record = self._record(
            "snapshot",
            executed_offset=ex.executed_offset,
            statement=ex.last_statement,
            next_seq=ex.interceptor.next_seq if next_seq is None else next_seq,
            statements_executed=ex.statements_executed,
            variables=dict(encoded.blobs),
            skipped=tuple((s.name, s.type_name, s.reason) for s in encoded.skipped),
            done=done,
            error=error,
        )
        await self.manager.write(record, sync=sync)
        self._deferred = None  # the snapshot holds the statement's result: its record is not needed
        if record.response_host is None:
            self._response_host = (record.counter, len(record.response_text))
        self.encoder.commit(encoded, record.counter)
        self._pending.clear()
        self._unsynced_snapshots = 0 if sync else self._unsynced_snapshots + 1
        self._journal_since = self._awaited_since = 0
        self._last_snapshot_at = time.perf_counter()
        self._last_snapshot_cost = self._last_snapshot_at - began
        self._last_snapshot_size = encoded.total_size()
        await self.manager.prune()

    def _snapshot_due(self) -> bool:
        """Whether to snapshot after this statement, or leave it to the journal.

        The journal covers the statements between two snapshots (a resume runs them again, replaying
        their calls). A snapshot costs more than the result record it replaces (the namespace diff, the
        response, pruning), so in a fast run, where awaits follow each other within microseconds, one
        is written after every ``_SNAPSHOT_EVERY``-th statement that awaited; when the last snapshot is
        older than ``_SNAPSHOT_INTERVAL`` (slow tools, a streaming model), after every one. A big
        namespace (its mutable values are pickled again to find what changed, which takes
        milliseconds) also waits ``_SNAPSHOT_SPACING`` times what its last snapshot took, so snapshots
        stay a small share of the run. ``_MAX_JOURNAL`` bounds the replay whatever the rest says.
        """
        if self._journal_since >= _MAX_JOURNAL:
            return True
        elapsed = time.perf_counter() - self._last_snapshot_at
        if self._last_snapshot_size >= _SMALL_NAMESPACE and elapsed < _SNAPSHOT_SPACING * self._last_snapshot_cost:
            return False
        return self._awaited_since + 1 >= _SNAPSHOT_EVERY or elapsed >= _SNAPSHOT_INTERVAL

    async def flush(self) -> None:
        """Write the records of sync calls made since the last await (unsynced), after the deferred
        result of a direct call if there is one."""
        await self.write_deferred()
        while self._pending:
            self._journal_since += 1
            await self.manager.write(self._pending.pop(0), sync=False)

    def _snapshot_blocked(self) -> bool:
        """A snapshot now would lose something: recorded calls not handed back yet (a snapshot
        supersedes the journal before it), or tasks of the LLM's code still running (a snapshot cannot
        hold a running task; a resume must run the statement that created it again)."""
        return bool(self.journal) or bool(self.executor.interceptor.root.pending)

    async def after_statement(self) -> None:
        """Snapshot after a statement that awaited a durable call; otherwise just flush."""
        self._cancelled_live.clear()  # the statement ended normally: its cancellations were its own
        self.direct_tool = None
        try:
            await self._after_statement()
        finally:
            if self._deferred is not None:  # no snapshot took its place (or it failed)
                with anyio.CancelScope(shield=True):
                    await self.write_deferred()

    async def _after_statement(self) -> None:
        if self.awaited and self._snapshot_blocked():
            self.encoder.settle_sets(self.executor.namespace, bound=self.executor.bound, unsaved=self.executor.unsaved)
            await self.flush()
        elif self.awaited and self._snapshot_due():  # the snapshot puts sets in their layout too
            self.awaited = False
            # Every snapshot survives a killed process, and the journal's fsync before the next
            # durable call covers it; with ``snapshot_sync_every`` set, every n-th is also a file.
            every = self.manager.snapshot_sync_every
            due = every is not None and self._unsynced_snapshots + 1 >= every
            await self.snapshot(sync=due)
        else:
            # Sets are put in their layout after every statement, snapshot or not, so that the live
            # run and a resumed one fix their orders at the same points of the code.
            self.encoder.settle_sets(self.executor.namespace, bound=self.executor.bound, unsaved=self.executor.unsaved)
            self._awaited_since += self.awaited
            self.awaited = False
            await self.flush()

    async def finish(self, error: BaseException | None) -> None:
        """The executor finished: a final, synced snapshot marks the frame done."""
        await self.snapshot(done=True, error=dump_outcome(error) if error is not None else None)

    # ----------------------------------------------------------------- calls

    def replay(self, call: ToolCall) -> JournalEntry | None:
        """The recorded outcome of ``call`` if it finished before the crash; ``None`` to run it live.

        Raises :class:`NonDeterminismError` if the journal has a different call under this call id.
        """
        entry = self.journal.pop(call.call_id, None)
        if entry is None:
            return None
        self._progress += 1
        digest, display = fingerprint(call.name, call.args, call.kwargs)
        if self.overridden and not entry.finished:
            if entry.name != call.name or entry.fingerprint != digest:
                # Variables were set for this resume, so an unfinished call may now get other
                # arguments: it runs as the code now makes it.
                warnings.warn(
                    f"call {entry.display} (idempotency key {entry.key}) had started but not finished "
                    f"when the process stopped, and may have run; with the variables set for this "
                    f"resume the code now calls {display} instead",
                    CheckpointWarning,
                    stacklevel=4,
                )
                return None
        if entry.name != call.name or entry.fingerprint != digest:
            error = NonDeterminismError(
                f"replay of frame {self.frame_id!r} diverged at call {call.call_id}: the journal has "
                f"{entry.display} but the code now calls {display}. The code before this call must "
                f"make the same durable calls with the same arguments as before the crash: read clocks "
                f"and random numbers through a tool.{_seed_hint(self.manager)}"
            )
            self.fatal = error
            raise error
        if entry.outcome is None or entry.outcome in ("unrecorded", "interrupted"):
            self._attempts[call.call_id] = entry.attempts
            reason = {
                None: "had started but not finished",
                "unrecorded": "returned a value that could not be saved",
                "interrupted": "was interrupted when the host cancelled the execution",
            }[entry.outcome]
            warnings.warn(
                f"call {entry.display} (idempotency key {entry.key}) {reason} when the process stopped; "
                f"it may have run, and runs again with the same idempotency key",
                CheckpointWarning,
                stacklevel=4,
            )
            return None
        return entry

    def forget(self, call_id: str) -> None:
        """A cheap call (not journaled) runs again: drop what an earlier run may have recorded of it,
        so it neither waits in the replay order nor holds snapshots back."""
        if self.journal.pop(call_id, None) is not None:
            self._drop_from_order([call_id])

    def attempts_made(self, call_id: str) -> int:
        """How many attempts of an unfinished call the journal recorded before the crash (0: none)."""
        return self._attempts.pop(call_id, 0)

    async def turn(self, entry: JournalEntry) -> None:
        """Wait until every call that finished before ``entry`` in the recorded run has been handed
        back, so concurrent code sees its results in the same order as before the crash."""
        if entry.sync or entry.seq not in self._order:
            return
        while self._order and self._order[0] != entry.seq:
            event = self._waiting.setdefault(entry.seq, anyio.Event())
            seen = self._progress
            with anyio.move_on_after(_REPLAY_STALL):
                await event.wait()
            if event.is_set():
                self._waiting.pop(entry.seq, None)
                # Let the code woken by the call before this one run on first (live, this call
                # returned later: a timeout's handler, a task's result passed on, take a few turns
                # of the event loop).
                for _ in range(_SETTLE_TURNS):
                    await anyio.lowlevel.checkpoint()
            elif self._progress == seen and self._order and self._order[0] in self.journal:
                front = self.journal[self._order[0]]
                error = NonDeterminismError(
                    f"replay of frame {self.frame_id!r} is stuck: call {entry.display} finished after "
                    f"{front.display} before the crash, but the code has not made that call again in "
                    f"{_REPLAY_STALL:g} s. The code must make the same durable calls as before the crash."
                )
                self.fatal = error
                raise error

    def task_ended(self, path: str) -> None:
        """A task of the LLM's code (node ``path``) ended. Its calls still in the replay order were not
        made again and cannot be any more: a replayed call returns at once, so the replay can cancel a
        task before it reaches a call that the live run, slower, had made (and seen cancelled). They
        must not hold up the calls recorded after them."""
        self._drop_from_order([seq for seq in self._order if seq.rpartition(".")[0] == path])

    def _drop_from_order(self, gone: list[str]) -> None:
        """Take calls that will not be handed back out of the replay order; wake the new front."""
        gone = [seq for seq in gone if seq in self._order]
        if not gone:
            return
        front = self._order[0]
        for seq in gone:
            self._order.remove(seq)
        if self._order and self._order[0] != front:
            event = self._waiting.pop(self._order[0], None)
            if event is not None:
                event.set()

    def release(self, entry: JournalEntry) -> None:
        """``entry`` was handed back: the next call in the recorded order may go."""
        self._progress += 1
        try:
            self._order.remove(entry.seq)
        except ValueError:
            return
        if self._order:
            event = self._waiting.pop(self._order[0], None)
            if event is not None:
                event.set()

    def _outcome_fields(
        self,
        call: ToolCall,
        value: Any,
        raised: BaseException | None,
        before: tuple[tuple[str, str], ArgumentWatch],
        *,
        cancelled: bool = False,
    ) -> dict[str, Any]:
        (digest, display), watch = before
        if cancelled:
            blob, outcome = None, "cancelled"
        else:
            blob = dump_outcome(raised if raised is not None else value, what=display)
            outcome = "unrecorded" if blob is None else ("raise" if raised is not None else "value")
        return dict(
            seq=call.call_id, name=call.name, fingerprint=digest, display=display,
            key=call.idempotency_key, outcome=outcome, value=blob, mutations=watch.changes(),
        )

    async def before_call(self, call: ToolCall) -> None:
        """Make earlier calls durable (fsync), then record that this one starts."""
        await self.start(next_seq=_root_next(call))  # a host may call tools before feeding any code
        await self.flush()
        await self.manager.sync()
        before = self._calls[call.call_id] = _watch(call)
        digest, display = before[0]
        record = self._record(
            "intent", seq=call.call_id, name=call.name, fingerprint=digest, display=display,
            key=call.idempotency_key,
        )
        self._journal_since += 1
        await self.manager.write(record, sync=False)

    async def after_call(
        self, call: ToolCall, value: Any, raised: BaseException | None, *, cancelled: bool = False
    ) -> None:
        """Record how the call ended (unsynced: the next call or snapshot makes it durable).

        The value of a statement's direct call (``x = await Tool(...)`` or ``await Tool(...)``: nothing
        of the LLM's code runs between the tool's return and the statement's end) is not written now:
        the snapshot after the statement holds it, which saves a record per await. If no snapshot is
        written there (a big namespace, running tasks, a failure), the result is written instead,
        before anything else. A kill in between, within the host's own code, leaves the call in
        flight: it runs again with the same idempotency key and is reported, as a kill just before a
        result record is written always did.
        """
        self._journal_since += 1
        # The fingerprint of the arguments as they were when the call started (a tool may mutate them).
        before = self._calls.pop(call.call_id)
        if (
            raised is None and not cancelled and call.name == self.direct_tool and self._deferred is None
            and call.call_id.isdigit() and not self._snapshot_blocked()
        ):
            self._deferred = (call, value, before)
            return
        await self._write_result(call, value, raised, before, cancelled=cancelled)

    async def write_deferred(self) -> None:
        """Write the result held back by :meth:`after_call`, if any."""
        if self._deferred is not None:
            (call, value, before), self._deferred = self._deferred, None
            await self._write_result(call, value, None, before)

    async def _write_result(
        self,
        call: ToolCall,
        value: Any,
        raised: BaseException | None,
        before: tuple[tuple[str, str], ArgumentWatch],
        *,
        cancelled: bool = False,
    ) -> None:
        fields = self._outcome_fields(call, value, raised, before, cancelled=cancelled)
        await self.manager.write(self._record("result", **fields), sync=False)
        if cancelled:
            self._cancelled_live.append(call)

    def after_sync_call(
        self, call: ToolCall, value: Any, raised: BaseException | None, before: tuple[tuple[str, str], ArgumentWatch]
    ) -> None:
        """Record a sync call: at once when the provider writes without suspending (the frame must have
        started), else at the next await or statement end."""
        fields = self._outcome_fields(call, value, raised, before)
        self._pending.append(self._record("result", sync=True, **fields))
        if self.writes_now():
            _run_to_completion(self.flush())

    def writes_now(self) -> bool:
        """Whether records can be written from sync code at once (see :func:`_run_to_completion`)."""
        return self._started and self.manager.provider.completes_without_suspending

    def prepare_output(self, call: ToolCall, before: tuple[tuple[str, str], ArgumentWatch]) -> PreparedRecord:
        """The record of an output call (``print``), made before the output is written: then only one
        append separates the line on the screen from its record (at least once, in microseconds)."""
        _run_to_completion(self.flush())
        fields = self._outcome_fields(call, None, None, before)
        return self.manager.prepare(self._record("result", sync=True, **fields))

    def store_output(self, prepared: PreparedRecord) -> None:
        self._journal_since += 1
        _run_to_completion(self.manager.store(prepared))

    async def interrupted(self) -> None:
        """The host cancelled the execution: calls recorded as cancelled in this statement were not
        cancelled by the LLM's code, so a replay must not replay that cancellation; they run again."""
        calls, self._cancelled_live = self._cancelled_live, []
        self.direct_tool = None
        with anyio.CancelScope(shield=True):
            await self.write_deferred()
            for call in calls:
                digest, display = fingerprint(call.name, call.args, call.kwargs)
                record = self._record(
                    "result", seq=call.call_id, name=call.name, fingerprint=digest, display=display,
                    key=call.idempotency_key, outcome="interrupted",
                )
                await self.manager.write(record, sync=False)


def _run_to_completion(step: Coroutine[Any, Any, None]) -> None:
    """Run a coroutine that does not suspend (a write to a provider that completes without
    suspending) from sync code; one that suspends is a broken provider promise."""
    try:
        step.send(None)
    except StopIteration:
        return
    step.close()
    raise InterpreterError(
        "a checkpoint provider that declares completes_without_suspending suspended during a write"
    )


_REPLAY_STALL = 60.0
"""Seconds a replayed call waits for an earlier-finished call that the code does not make again."""
_SETTLE_TURNS = 8
"""Turns of the event loop a replayed call lets pass when its turn comes (see :meth:`DurableFrame.turn`)."""


def _root_next(call: ToolCall) -> int | None:
    """For a call of the frame's own code, the number after it (where its frame's snapshot resumes)."""
    return int(call.call_id) if call.call_id.isdigit() else None


def _watch(call: ToolCall) -> tuple[tuple[str, str], ArgumentWatch]:
    return fingerprint(call.name, call.args, call.kwargs), ArgumentWatch(call.args, call.kwargs)


def _seed_hint(manager: CheckpointManager) -> str:
    """A note for a divergence that another hash seed could explain (set and dict-of-str order)."""
    note = seed_mismatch(manager)
    return f" {note}" if note else ""


def _unwrap(interceptor: ToolCallInterceptor, call: ToolCall, entry: JournalEntry) -> Any:
    """The recorded outcome of a replayed call: its value, or its exception raised again.

    The call's recorded changes to its arguments are applied first. A record that cannot be loaded
    is a failure of the interpreter, never an exception of the tool.
    """
    if entry.mutations is not None:
        apply_mutations(entry.mutations, call.args, call.kwargs, entry.display)
    try:
        value = load_outcome(entry.value) if entry.value is not None else None
    except Exception as exc:
        raise CheckpointCorruptError(
            f"the recorded outcome of {entry.display} (idempotency key {entry.key}) cannot be loaded "
            f"({type(exc).__name__}: {exc}); the code that defined its class may have changed since"
        ) from exc
    if entry.outcome == "raise":
        assert isinstance(value, BaseException)
        interceptor.observe(call, None, value)
        raise value
    interceptor.observe(call, value, None)
    return value


class DurableInterceptor(ToolCallInterceptor):
    """Journals live calls and replays recorded ones for a :class:`DurableFrame`."""

    def task_ended(self, path: str) -> None:
        """Called by the task hooks when a task of this frame's LLM code ends."""
        self.frame.task_ended(path)

    def _output(self, call: ToolCall, fn: Callable[..., Any], before: tuple[tuple[str, str], ArgumentWatch]) -> Any:
        """An output call (``print``): its record is made first and written the instant the output is
        out (:func:`~playbooks.execution.tool_calls.output_written`), then indexed."""
        frame = self.frame
        prepared = frame.prepare_output(call, before)
        try:
            with when_output_written(functools.partial(frame.manager.land, prepared)):
                value = super().call_sync(call, fn)
        except BaseException:
            if prepared.landed:  # the output was out and its record written: index it
                frame.store_output(prepared)
            else:
                frame.manager.discard(prepared)
            raise
        frame.store_output(prepared)  # writes it first if the output function did not
        return value

    def __init__(
        self,
        frame: DurableFrame,
        *,
        run_id: str,
        frame_id: str,
        next_seq: int = 0,
        observer: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        super().__init__(run_id=run_id, frame_id=frame_id, next_seq=next_seq, observer=observer, retry=retry)
        self.frame = frame
        self.resumed = frame.state is not None

    async def call_async(self, call: ToolCall, fn: Callable[..., Awaitable[Any]]) -> Any:
        frame = self.frame
        if is_cheap(fn):  # not journaled: runs again after a resume
            frame.forget(call.call_id)
            return await super().call_async(call, fn)
        entry = frame.replay(call)
        frame.awaited = True
        if entry is not None:
            return await self._replay_async(call, entry)
        attempts = frame.attempts_made(call.call_id)
        if attempts:
            call = dataclasses.replace(call, attempt=attempts + 1)
        policy = policy_of(fn, self.retry)
        while True:  # every attempt is journaled (an intent each), so a crash does not reset the count
            await frame.before_call(call)
            token = _ACTIVE_CALL.set(_CallContext(frame, call.call_id, itertools.count()))
            try:
                value = await self.attempt_async(call, fn)
            except InterpreterError as exc:  # the interpreter failed (a child's storage, a divergence)
                _ACTIVE_CALL.reset(token)
                frame.fatal = frame.fatal or exc
                raise
            except anyio.get_cancelled_exc_class():
                _ACTIVE_CALL.reset(token)
                with anyio.CancelScope(shield=True):
                    await frame.after_call(call, None, None, cancelled=True)
                raise
            except Exception as exc:
                _ACTIVE_CALL.reset(token)
                if policy is not None and policy.retries(exc, call.attempt):
                    await anyio.sleep(policy.delay(call.attempt))
                    call = dataclasses.replace(call, attempt=call.attempt + 1)
                    continue
                await frame.after_call(call, None, exc)
                self.observe(call, None, exc)
                raise
            except BaseException:
                _ACTIVE_CALL.reset(token)
                raise
            _ACTIVE_CALL.reset(token)
            await frame.after_call(call, value, None)
            self.observe(call, value, None)
            return value

    async def _replay_async(self, call: ToolCall, entry: JournalEntry) -> Any:
        frame = self.frame
        try:
            await frame.turn(entry)
            if entry.outcome == "cancelled":
                # Cancelled before the crash (a timeout, a cancelled task): wait for the same
                # cancellation, which the same code brings about again.
                await anyio.sleep_forever()
            return _unwrap(self, call, entry)
        finally:
            frame.release(entry)

    def call_sync(self, call: ToolCall, fn: Callable[..., Any]) -> Any:
        frame = self.frame
        if is_cheap(fn):
            frame.forget(call.call_id)
            return super().call_sync(call, fn)
        entry = frame.replay(call)
        if entry is not None:
            frame.release(entry)
            return _unwrap(self, call, entry)
        before = _watch(call)
        if getattr(fn, "__playbooks_output__", False) and frame.writes_now():
            return self._output(call, fn, before)
        try:
            value = super().call_sync(call, fn)
        except InterpreterError as exc:
            frame.fatal = frame.fatal or exc
            raise
        except Exception as exc:
            frame.after_sync_call(call, None, exc, before)
            raise
        frame.after_sync_call(call, value, None, before)
        return value
