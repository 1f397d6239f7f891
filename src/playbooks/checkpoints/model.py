"""What a checkpoint holds: records as stored, a frame's state rebuilt from them, and the user's view.

Every stored record (one checkpoint id, one counter) is one of three kinds:

* ``snapshot``: a frame's state at a statement boundary: the executed offset, the whole response so far,
  the next call sequence number and the namespace, one pickle per variable. A variable that did not
  change since the frame's previous snapshot is stored as a reference (``host``) to the snapshot that
  holds its bytes, so an untouched namespace is not copied on every await.
* ``intent``: a durable call is about to run (call id, name, argument fingerprint).
* ``result``: a durable call finished: its value or exception, pickled, or ``cancelled``; the changes
  it made to its arguments in place; whether it was a sync call. Results are written in the order the
  calls finished, and a replay hands them back in that order.
* ``state``: a value the host keeps for the whole execution (``name``; the newest one counts), such as
  the messages between agents that are not read yet.

Each record also carries the part of the frame's LLM response received since the frame's previous
record, so the response is stored as it streams, and the frame's place in the call stack.

A :class:`FrameState` is a frame rebuilt from its newest valid snapshot plus the journal after it; a
:class:`Checkpoint` is the mapping users read (``checkpoint["namespace"]``,
``checkpoint["execution_state"]["call_stack"]``, ``checkpoint["metadata"]["llm_response"]``, ...).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Mapping
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Literal

__all__ = ("Checkpoint", "FrameState", "JournalEntry", "Record", "RecordKind", "StoredVar")

RecordKind = Literal["snapshot", "intent", "result", "state"]
Outcome = Literal["value", "raise", "cancelled", "unrecorded", "interrupted"]


@dataclass(frozen=True, slots=True)
class StoredVar:
    """One variable of a snapshot: its pickle inline, or a reference to the snapshot that holds it.

    ``digest`` is the hex blake2b (16 bytes) of the pickle and ``size`` its length; ``data`` is the
    pickle itself, or ``None`` when the snapshot numbered ``host`` holds it.
    """

    digest: str
    size: int
    data: bytes | None
    host: int | None


@dataclass(frozen=True, slots=True)
class FrameRef:
    """One frame of a call stack, as seen when a record was written."""

    frame_id: str
    agent_id: str
    parent_seq: str | None  # the call id in the parent frame that this frame serves
    executed_offset: int
    statement: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "frame_id": self.frame_id,
            "agent_id": self.agent_id,
            "parent_seq": self.parent_seq,
            "executed_offset": self.executed_offset,
            "statement": self.statement,
        }


@dataclass(slots=True)
class Record:
    """One stored record, decoded (the codec verified its integrity before :mod:`~playbooks.checkpoints.wire` read it)."""

    kind: RecordKind
    execution_id: str
    counter: int
    timestamp: float
    frame_id: str
    agent_id: str
    call_stack: tuple[FrameRef, ...]
    response_start: int
    response_text: str
    # snapshot
    executed_offset: int = 0
    statement: str = ""
    next_seq: int = 0
    statements_executed: int = 0
    variables: dict[str, StoredVar] = field(default_factory=dict)
    skipped: tuple[tuple[str, str, str], ...] = ()
    done: bool = False
    error: bytes | None = None
    response_host: int | None = None  # the snapshot whose response is this one's up to response_start
    # intent / result
    seq: str = ""  # the call id (see playbooks.execution.tasks)
    name: str = ""
    fingerprint: str = ""
    display: str = ""
    key: str = ""
    outcome: Outcome = "unrecorded"
    value: bytes | None = None
    mutations: bytes | None = None  # what the call changed in its arguments (execution.mutations)
    sync: bool = False  # a sync call (print, a sync tool): it has no intent and is not ordered

    @property
    def parent_frame(self) -> str | None:
        return self.call_stack[-2].frame_id if len(self.call_stack) > 1 else None

    @property
    def hosts(self) -> set[int]:
        """Counters of the earlier snapshots this snapshot's variables (and response) refer to."""
        hosts = {v.host for v in self.variables.values() if v.data is None and v.host is not None}
        if self.response_host is not None:
            hosts.add(self.response_host)
        return hosts


@functools.cache
def _defaults() -> dict[str, Any]:
    """The default of every :class:`Record` field that has one."""
    found: dict[str, Any] = {}
    for f in fields(Record):
        if f.default is not MISSING:
            found[f.name] = f.default
        elif f.default_factory is not MISSING:
            found[f.name] = f.default_factory()
    return found


@dataclass(frozen=True, slots=True)
class JournalEntry:
    """A durable call of a frame after its snapshot: started (``outcome is None``) or finished.

    ``seq`` is the call id; ``counter`` the number of the record that holds the outcome (results are
    numbered in the order the calls finished).
    """

    seq: str
    name: str
    fingerprint: str
    display: str
    key: str
    outcome: Outcome | None
    value: bytes | None
    counter: int
    mutations: bytes | None = None
    sync: bool = False
    attempts: int = 1
    """How many attempts of the call were recorded (its ``intent`` records after the snapshot)."""

    @property
    def finished(self) -> bool:
        """Whether a replay hands back its outcome; otherwise it runs again (it had not finished, was
        interrupted by the host, or returned a value that could not be saved) and may have run."""
        return self.outcome in ("value", "raise", "cancelled")


@dataclass(slots=True)
class FrameState:
    """A frame rebuilt from its newest valid snapshot and the journal written after it."""

    execution_id: str
    frame_id: str
    agent_id: str
    call_stack: tuple[FrameRef, ...]
    snapshot_counter: int
    timestamp: float
    response: str
    executed_offset: int
    statement: str
    next_seq: int
    statements_executed: int
    variables: dict[str, StoredVar]
    resolved: dict[str, bytes]
    skipped: tuple[tuple[str, str, str], ...]
    journal: dict[str, JournalEntry]
    done: bool
    error: bytes | None
    isolated: bool = False
    """Whether an isolated worker wrote this frame: its values are then unpickled only in a worker."""

    def check_openable(self) -> None:
        """Raise :class:`~playbooks.errors.IsolatedRunError` if this process must not unpickle this
        frame's values (an isolated worker wrote them; this is not one)."""
        if self.isolated:
            from playbooks.errors import IsolatedRunError

            raise IsolatedRunError(
                f"execution {self.execution_id!r} was written by an isolated worker: its values came from "
                "untrusted code and are unpickled only inside a worker; resume it with "
                "IsolatedPythonExecutor.resume_from_checkpoint"
            )

    @property
    def in_flight(self) -> list[JournalEntry]:
        """Calls that will run again on resume (started but not finished, interrupted by the host, or
        whose value could not be saved): they may have run."""
        return [e for e in self.journal.values() if not e.finished]


class Checkpoint(Mapping[str, Any]):
    """A stored checkpoint as users read it: a mapping with ``namespace``, ``execution_state`` and
    ``metadata``, plus attributes (:attr:`checkpoint_id`, :attr:`counter`, :attr:`state`).

    The namespace is unpickled on first access, into a fresh dict (tools are not in it: they are bound
    again by the executor that resumes).
    """

    def __init__(self, checkpoint_id: str, counter: int, kind: RecordKind, state: FrameState) -> None:
        self.checkpoint_id = checkpoint_id
        self.counter = counter
        self.kind = kind
        self.state = state
        self._namespace: dict[str, Any] | None = None

    @property
    def execution_id(self) -> str:
        return self.state.execution_id

    @property
    def frame_id(self) -> str:
        return self.state.frame_id

    @property
    def root_frame_id(self) -> str:
        return self.state.call_stack[0].frame_id if self.state.call_stack else self.state.frame_id

    def _load_namespace(self) -> dict[str, Any]:
        if self._namespace is None:
            self.state.check_openable()
            from playbooks.checkpoints.namespace import decode_namespace

            target: dict[str, Any] = {}
            decode_namespace(self.state.resolved, target)
            self._namespace = target
        return self._namespace

    def _execution_state(self) -> dict[str, Any]:
        s = self.state
        return {
            "frame_id": s.frame_id,
            "call_stack": [ref.to_dict() for ref in s.call_stack],
            "executed_offset": s.executed_offset,
            "next_seq": s.next_seq,
            "statements_executed": s.statements_executed,
            "done": s.done,
            "journal": [
                {"seq": e.seq, "name": e.name, "args": e.display, "idempotency_key": e.key,
                 "finished": e.finished}
                for e in sorted(s.journal.values(), key=lambda e: e.counter)
            ],
            "skipped_variables": [
                {"name": n, "type": t, "reason": r} for n, t, r in s.skipped
            ],
        }

    def _metadata(self) -> dict[str, Any]:
        s = self.state
        return {
            "checkpoint_id": self.checkpoint_id,
            "execution_id": s.execution_id,
            "agent_id": s.agent_id,
            "frame_id": s.frame_id,
            "kind": self.kind,
            "counter": self.counter,
            "snapshot_counter": s.snapshot_counter,
            "timestamp": s.timestamp,
            "llm_response": s.response,
            "executed_code": s.response[: s.executed_offset],
            "statement": s.statement,
        }

    _KEYS = ("namespace", "execution_state", "metadata")

    def __getitem__(self, key: str) -> Any:
        if key == "namespace":
            return self._load_namespace()
        if key == "execution_state":
            return self._execution_state()
        if key == "metadata":
            return self._metadata()
        raise KeyError(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._KEYS)

    def __len__(self) -> int:
        return len(self._KEYS)

    def __repr__(self) -> str:
        s = self.state
        return (
            f"<Checkpoint {self.checkpoint_id} frame={s.frame_id!r} offset={s.executed_offset} "
            f"statement={s.statement[:40]!r}{' done' if s.done else ''}>"
        )
