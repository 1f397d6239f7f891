"""After a crash: is there something to resume, and what state does it come back in?

:class:`RecoveryCoordinator` reads an execution's checkpoints (skipping corrupt ones, and saying so),
takes the execution's lock so the dead process's successor is the only writer, and reports where the
run stopped: the checkpoint, the call stack, the last statement that ran, and the calls that were in
flight (they may have run, and will run again with the same idempotency key).
:meth:`StreamingPythonExecutor.resume_from_checkpoint
<playbooks.execution.streaming_python_executor.StreamingPythonExecutor.resume_from_checkpoint>` then
continues it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from playbooks.agent import AgentLike
from playbooks.checkpoints.manager import CheckpointManager
from playbooks.checkpoints.model import Checkpoint
from playbooks.errors import CheckpointCorruptError, ExecutorStateError

__all__ = ("InFlightCall", "RecoveryCoordinator", "RecoveryReport")

_logger = logging.getLogger("playbooks.checkpoints")


@dataclass(frozen=True, slots=True)
class InFlightCall:
    """A durable call that had started but not finished: it may have run."""

    frame_id: str
    seq: str
    call: str
    idempotency_key: str


@dataclass(slots=True)
class RecoveryReport:
    """Where a recovered execution stopped, and what recovery had to skip."""

    execution_id: str
    checkpoint: Checkpoint
    call_stack: list[dict[str, Any]]
    in_flight: list[InFlightCall] = field(default_factory=list)
    fallbacks: list[str] = field(default_factory=list)
    skipped_variables: list[str] = field(default_factory=list)

    @property
    def statement(self) -> str:
        """The last statement of the root frame that ran before the crash."""
        return str(self.call_stack[0]["statement"]) if self.call_stack else ""

    def __str__(self) -> str:
        lines = [f"resuming execution {self.execution_id!r} from checkpoint {self.checkpoint.checkpoint_id}"]
        for depth, frame in enumerate(self.call_stack):
            last = str(frame["statement"]).strip().splitlines()
            shown = (last[0][:70] + (" ..." if len(last) > 1 else "")) if last else "(nothing ran yet)"
            lines.append(f"{'  ' * depth}frame {frame['frame_id']} ({frame['agent_id']}): after {shown}")
        for call in self.in_flight:
            lines.append(f"may have run: {call.call} (idempotency key {call.idempotency_key}); it runs again")
        lines.extend(f"skipped: {message}" for message in self.fallbacks)
        lines.extend(f"not restored: {name}" for name in self.skipped_variables)
        return "\n".join(lines)


class RecoveryCoordinator:
    """Finds and prepares the state to resume for one :class:`CheckpointManager`'s execution."""

    def __init__(self, manager: CheckpointManager) -> None:
        self.manager = manager

    async def can_recover(self) -> bool:
        """Whether the execution has a readable checkpoint and had not finished.

        Never a silent ``False`` for checkpoints that exist but cannot be read: records signed with
        another key raise :class:`~playbooks.errors.CheckpointKeyError`, and an execution whose every
        stored record failed its checks raises :class:`~playbooks.errors.CheckpointCorruptError`
        listing why (starting over would run its finished calls again).
        """
        latest = await self.manager.get_latest_checkpoint()
        if latest is None:
            # (Readable records and no snapshot: killed before the first one, when no call had run.)
            if await self.manager.unread_counters():
                reasons = "; ".join(self.manager.fallbacks)
                raise CheckpointCorruptError(
                    f"execution {self.manager.execution_id!r} has checkpoints but none can be read, so "
                    f"it cannot be resumed ({reasons}). Starting it over would run its finished calls "
                    "again: clear its checkpoints first if that is what you want"
                )
            return False
        root = self.manager.frame_state(latest.root_frame_id)
        return root is not None and not root.done

    def in_flight(self) -> list[InFlightCall]:
        """The calls of unfinished frames (of the loaded records) that had started but not finished."""
        calls: list[InFlightCall] = []
        for frame_id in sorted(self.manager.loaded_frame_ids()):
            state = self.manager.frame_state(frame_id)
            if state is None or state.done:
                continue
            calls.extend(
                InFlightCall(frame_id, e.seq, e.display, e.key)
                for e in sorted(state.in_flight, key=lambda e: e.counter)
            )
        return calls

    async def recover_execution_state(self, agent: AgentLike) -> RecoveryReport:
        """Load the checkpoints, take the execution's lock and report where ``agent``'s run stopped.

        Raises :class:`~playbooks.errors.ExecutionLockedError` if another process still runs it and
        :class:`~playbooks.errors.ExecutorStateError` if there is nothing to recover or it belongs to
        another agent.
        """
        manager = self.manager
        latest = await manager.get_latest_checkpoint()
        if latest is None:
            raise ExecutorStateError(
                f"execution {manager.execution_id!r} has no readable checkpoint to recover from"
            )
        root = manager.frame_state(latest.root_frame_id)
        assert root is not None
        if root.agent_id != agent.id:
            raise ExecutorStateError(
                f"execution {manager.execution_id!r} was run by agent {root.agent_id!r}, not {agent.id!r}"
            )
        await manager.open()
        in_flight = self.in_flight()
        report = RecoveryReport(
            execution_id=manager.execution_id,
            checkpoint=latest,
            call_stack=[ref.to_dict() for ref in latest.state.call_stack],
            in_flight=in_flight,
            fallbacks=list(manager.fallbacks),
            skipped_variables=[name for name, _, _ in root.skipped],
        )
        _logger.info("%s", report)
        return report
