"""A checkpoint provider that keeps records in a dict: for tests and for embedding without a disk.

Records live as long as the provider object and are lost with the process, so ``sync`` has nothing to do.
Locks, however, are process-global per execution id: two providers in one process (for example two
executors that were given separate stores by mistake) cannot run the same execution at once, exactly
as two processes could not with a durable provider.
"""

from __future__ import annotations

import threading

from playbooks.checkpoints.provider import (
    CheckpointProvider,
    ExecutionLock,
    checkpoint_id,
    split_checkpoint_id,
)
from playbooks.errors import ExecutionLockedError

__all__ = ("MemoryCheckpointProvider",)

# execution id -> the lock object holding it; guarded by _HOLDERS_GUARD because providers may be used
# from several threads, each with its own event loop.
_HOLDERS: dict[str, _MemoryLock] = {}
_HOLDERS_GUARD = threading.Lock()


_split = split_checkpoint_id


class _MemoryLock(ExecutionLock):
    """An entry in the process-global holder table."""

    def __init__(self, execution_id: str, owner: MemoryCheckpointProvider) -> None:
        self.execution_id = execution_id
        self._owner = owner

    async def release(self) -> None:
        with _HOLDERS_GUARD:
            if _HOLDERS.get(self.execution_id) is self:
                del _HOLDERS[self.execution_id]
        self._owner._locks.discard(self)


class MemoryCheckpointProvider(CheckpointProvider):
    """Records in a dict of ``{execution_id: {counter: bytes}}``; nothing survives the process."""

    completes_without_suspending = True

    def __init__(self) -> None:
        self._records: dict[str, dict[int, bytes]] = {}
        self._heads: dict[str, bytes] = {}
        self._locks: set[_MemoryLock] = set()

    async def write_head(self, execution_id: str, data: bytes) -> None:
        self._heads[execution_id] = bytes(data)

    async def read_head(self, execution_id: str) -> bytes | None:
        return self._heads.get(execution_id)

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        execution_id, counter = _split(checkpoint_id)
        # bytes() copies a bytearray or memoryview the caller might mutate later; bytes pass through.
        self._records.setdefault(execution_id, {})[counter] = bytes(data)

    async def load_checkpoint(self, checkpoint_id: str) -> bytes | None:
        execution_id, counter = _split(checkpoint_id)
        return self._records.get(execution_id, {}).get(counter)

    async def list_checkpoints(self, execution_id: str) -> list[str]:
        records = self._records.get(execution_id, {})
        return [checkpoint_id(execution_id, n) for n in sorted(records)]

    async def delete_checkpoint(self, checkpoint_id: str) -> bool:
        execution_id, counter = _split(checkpoint_id)
        records = self._records.get(execution_id)
        if records is None or counter not in records:
            return False
        del records[counter]
        if not records:
            del self._records[execution_id]
        return True

    async def list_executions(self) -> list[str]:
        return sorted(self._records)

    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        if not execution_id:
            raise ValueError("execution id must not be empty")
        lock = _MemoryLock(execution_id, self)
        with _HOLDERS_GUARD:
            holder = _HOLDERS.get(execution_id)
            if holder is not None:
                where = "this provider" if holder._owner is self else "another provider in this process"
                raise ExecutionLockedError(
                    f"execution {execution_id!r} is already running: {where} holds its lock; "
                    "release that lock first"
                )
            _HOLDERS[execution_id] = lock
        self._locks.add(lock)
        return lock

    async def close(self) -> None:
        """Release every lock still held through this provider; the records stay readable."""
        for lock in list(self._locks):
            await lock.release()
