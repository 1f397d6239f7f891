"""The storage extension interface: where encoded checkpoints live.

A provider stores opaque, already-encoded checkpoint records (bytes) under ids of the form
``{execution_id}_ckpt_{n}``, where ``n`` is a counter that only grows. Integrity (format version,
checksum, HMAC) and meaning are the manager's business, so a provider is a small, dumb, atomic store:

* ``save_checkpoint`` is atomic (see its ``sync`` flag for durability): a reader sees the old state or the new record, never a torn one, and a
  failure raises :class:`~playbooks.errors.CheckpointWriteError` leaving earlier records intact.
* ``list_checkpoints`` returns ids in ascending counter order (numeric, so ``_ckpt_10`` follows ``_ckpt_9``).
* ``acquire_lock`` gives one process at a time the right to write an execution; a lock held by a process
  that died is free again.
* The journal methods (``append_journal`` and friends) hold the small records written around every
  durable call. Their defaults store them as ordinary records; a provider can keep them in one
  append-only file or table instead, so a durable call costs an append, not a file.
* Ids are canonical: a method given a checkpoint id that is not exactly ``checkpoint_id(e, n)`` for some
  execution id ``e`` and counter ``n`` (say ``x_ckpt_01``) raises ``ValueError``, as does an execution id
  the provider cannot store (:func:`validate_execution_id` refuses an empty id, a leading dot, path
  separators and control characters with :class:`~playbooks.errors.InvalidExecutionIdError`).
* The *head* of an execution (:meth:`~CheckpointProvider.write_head`) is one small record, rewritten at
  every write, that names the newest record: it is how a truncated or rolled-back store is told apart
  from one that simply has fewer records. The default keeps it as record 0 (counters start at 1).

Third-party providers register a class in the ``playbooks.checkpoint_providers`` entry-point group.
"""

from __future__ import annotations

import abc
import re
from collections.abc import Callable, Collection
from types import TracebackType
from typing import ClassVar

from playbooks.errors import InvalidExecutionIdError

__all__ = (
    "CheckpointProvider",
    "ExecutionLock",
    "HEAD_COUNTER",
    "checkpoint_id",
    "parse_checkpoint_id",
    "split_checkpoint_id",
    "validate_execution_id",
)

HEAD_COUNTER = 0
"""The counter under which the default head is stored; records are numbered from 1."""

_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")  # Unicode category Cc
_ID_RE = re.compile(r"^(?P<execution_id>.+)_ckpt_(?P<counter>\d+)$")


def checkpoint_id(execution_id: str, counter: int) -> str:
    """Return the id of record ``counter`` of ``execution_id``: ``{execution_id}_ckpt_{counter}``."""
    return f"{execution_id}_ckpt_{counter}"


def parse_checkpoint_id(cid: str) -> tuple[str, int]:
    """Split a checkpoint id into ``(execution_id, counter)``; raise ``ValueError`` if malformed."""
    match = _ID_RE.match(cid)
    if match is None:
        raise ValueError(f"not a checkpoint id (expected '<execution_id>_ckpt_<n>'): {cid!r}")
    return match["execution_id"], int(match["counter"])


def split_checkpoint_id(cid: str, *, max_counter: int | None = None) -> tuple[str, int]:
    """:func:`parse_checkpoint_id` for a store: also refuse a spelling that is not canonical
    (``x_ckpt_01`` would alias ``x_ckpt_1``) and, with ``max_counter``, a counter the store cannot
    hold; ``ValueError`` either way."""
    execution_id, counter = parse_checkpoint_id(cid)
    if checkpoint_id(execution_id, counter) != cid:
        raise ValueError(f"not a canonical checkpoint id: {cid!r}")
    if max_counter is not None and counter > max_counter:
        raise ValueError(f"checkpoint counter too large for this store (max {max_counter}): {cid!r}")
    return execution_id, counter


def validate_execution_id(execution_id: object) -> str:
    """Return ``execution_id`` if it can name a run in any store, else raise
    :class:`~playbooks.errors.InvalidExecutionIdError` saying why (empty, a leading dot, a path
    separator, a NUL or other control character)."""
    if not isinstance(execution_id, str) or not execution_id:
        raise InvalidExecutionIdError(
            f"a run (execution) id must be a non-empty string, got {execution_id!r}"
        )
    for bad in ("/", "\\"):
        if bad in execution_id:
            raise InvalidExecutionIdError(
                f"run id {execution_id!r} contains {bad!r}: a run id is one name, not a path"
            )
    if execution_id.startswith("."):
        raise InvalidExecutionIdError(
            f"run id {execution_id!r} starts with '.', which is reserved for hidden files; choose a "
            "name that starts with a letter or digit"
        )
    if _CONTROL.search(execution_id):
        raise InvalidExecutionIdError(
            f"run id {execution_id!r} contains a control character (NUL, newline, ...); use printable "
            "characters only"
        )
    return execution_id


class ExecutionLock(abc.ABC):
    """Exclusive right of this process to write one execution; released explicitly, at process death,
    or (for a lease) when its holder stops renewing it for the provider's lease time."""

    execution_id: str
    generation: int = 0
    """For a lease: how many times the execution's lease was taken, this one included. A provider
    whose locks expire refuses writes that carry an older generation (fencing). 0 for locks that die
    with their process: nobody can take those from a live holder."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Give the lock up; idempotent."""

    @property
    def lost(self) -> bool:
        """Whether the lock was taken from this holder (a lease not renewed in time, then taken by
        another process). A lock that dies with its process is never lost while it lives."""
        return False

    async def renew(self) -> None:
        """Extend a lease now (its provider renews held leases on its own; this is for a holder that
        wants to know at once). Raises :class:`~playbooks.errors.LeaseLostError` when it was taken.
        Default: nothing, as a lock that dies with its process needs no renewal."""

    async def __aenter__(self) -> "ExecutionLock":
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.release()


class CheckpointProvider(abc.ABC):
    """Async storage of encoded checkpoint records; see the module docstring for the contract."""

    completes_without_suspending: bool = False
    """Whether every write method finishes without suspending (it does its I/O synchronously). Then a
    record of a sync call (``print``) is written the moment the call returns, not at the next await,
    so a kill in between cannot show the line twice. A provider that awaits real I/O leaves it False."""

    @abc.abstractmethod
    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        """Store ``data`` under ``checkpoint_id`` atomically (replacing a record of the same id).

        With ``sync=True`` the record is on stable storage when this returns (fsync). With
        ``sync=False`` it survives the death of this process (it is in the OS) but may be lost by a
        power failure until :meth:`sync`; a later synced save need not make it durable (a provider may
        do so when it costs nothing, as a database commit does). The manager saves snapshots synced
        and journal records unsynced, and calls :meth:`sync` before a new durable call starts, so the
        journal records a snapshot supersedes never cost an fsync each.
        """

    async def sync(self, execution_id: str) -> None:
        """Make every record of ``execution_id`` saved with ``sync=False`` durable; default: nothing."""

    @abc.abstractmethod
    async def load_checkpoint(self, checkpoint_id: str) -> bytes | None:
        """Return the stored bytes, or ``None`` if there is no such record."""

    @abc.abstractmethod
    async def list_checkpoints(self, execution_id: str) -> list[str]:
        """Return the ids stored for ``execution_id``, ascending by counter."""

    @abc.abstractmethod
    async def delete_checkpoint(self, checkpoint_id: str) -> bool:
        """Delete one record; return whether it existed."""

    @abc.abstractmethod
    async def list_executions(self) -> list[str]:
        """Return every execution id that has at least one record, sorted."""

    @abc.abstractmethod
    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        """Take the execution's lock or raise :class:`~playbooks.errors.ExecutionLockedError`."""

    # ----------------------------------------------------------------- journal

    journal_drop_batch: ClassVar[int] = 1
    """How many pruned journal entries the manager gathers before calling :meth:`drop_journal`: 1 when
    dropping costs one delete per entry (the default), more when it rewrites a file."""

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        """Append a journal entry (a small record, numbered ``counter``) of ``execution_id``.

        The manager appends two per durable call, so this must be cheap. An entry survives the death of
        this process at once; :meth:`sync_journal` makes the entries so far durable. A torn last entry
        (the process died while appending) is dropped by :meth:`read_journal`. The default stores each
        entry as a checkpoint record (``checkpoint_id(execution_id, counter)``, unsynced); a provider
        with an append-only file or table overrides the four journal methods.
        """
        await self.save_checkpoint(checkpoint_id(execution_id, counter), data, sync=False)

    def prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        """Do now everything of :meth:`append_journal` but the write, and return the write.

        Only for a provider that :attr:`completes_without_suspending`. The manager uses it for the
        record of an output (``print``): the record is ready before the line is shown and lands right
        after it, so the window in which a kill shows the line twice is one write. The default
        returns :meth:`append_journal` itself, run to completion when called.
        """

        def append() -> None:
            step = self.append_journal(execution_id, counter, data)
            try:
                step.send(None)
            except StopIteration:
                return
            step.close()
            raise RuntimeError(
                f"{type(self).__name__}.append_journal suspended, but the provider declares "
                "completes_without_suspending"
            )

        return append

    async def sync_journal(self, execution_id: str) -> None:
        """Make the journal entries appended so far durable (default: :meth:`sync`)."""
        await self.sync(execution_id)

    async def read_journal(self, execution_id: str) -> list[tuple[int, bytes]]:
        """The journal entries kept apart from the checkpoint records, oldest first.

        The default keeps none apart (they are checkpoint records, read with :meth:`load_checkpoint`).
        """
        return []

    async def drop_journal(self, execution_id: str, counters: Collection[int]) -> None:
        """Forget these journal entries (the default deletes their records)."""
        for counter in counters:
            await self.delete_checkpoint(checkpoint_id(execution_id, counter))

    # ----------------------------------------------------------------- head

    async def write_head(self, execution_id: str, data: bytes) -> None:
        """Replace the execution's head (a small record naming its newest record); not fsynced.

        Called after every write, so it must be cheap. The default stores it as record
        ``checkpoint_id(execution_id, HEAD_COUNTER)``.
        """
        await self.save_checkpoint(checkpoint_id(execution_id, HEAD_COUNTER), data, sync=False)

    def stage_head(self, execution_id: str, data: bytes) -> bool:
        """Offer the head that names the record the manager is about to write, to go with that record.

        Return ``True`` to take it: then the next call of :meth:`save_checkpoint`,
        :meth:`append_journal` or :meth:`prepare_append` for ``execution_id`` (whose returned write
        carries it) writes ``data`` as the head in the same atomic step as its record, so one commit
        stores both; that call consumes the head whether it succeeds or not (a failed write stores
        neither), and the manager does not call :meth:`write_head` for it. The head then has its
        record's durability. The default takes nothing (``False``): the manager writes the record,
        then calls :meth:`write_head`.
        """
        return False

    async def read_head(self, execution_id: str) -> bytes | None:
        """The execution's head as last written, or ``None``."""
        return await self.load_checkpoint(checkpoint_id(execution_id, HEAD_COUNTER))

    async def check_writable(self) -> None:
        """Raise :class:`~playbooks.errors.StoragePathError` if this store cannot be written (a run
        calls it before it starts); the default checks nothing."""

    async def cleanup_old_checkpoints(self, execution_id: str, keep_last_n: int) -> int:
        """Delete all but the newest ``keep_last_n`` records; return how many were deleted.

        This is the raw, record-level operation. :class:`~playbooks.checkpoints.CheckpointManager`
        prunes with knowledge of which records a kept snapshot still needs; prefer it.
        """
        if keep_last_n < 0:
            raise ValueError("keep_last_n must be >= 0")
        ids = await self.list_checkpoints(execution_id)
        doomed = ids[: max(0, len(ids) - keep_last_n)]
        deleted = 0
        for cid in doomed:
            deleted += bool(await self.delete_checkpoint(cid))
        return deleted

    async def delete_execution(self, execution_id: str) -> int:
        """Delete every record and journal entry of ``execution_id``; return how many went.

        Refused (:class:`~playbooks.errors.ExecutionLockedError`) while a live process holds the
        execution. A head left behind names no record of a lineage any more, so a new execution under
        the same id starts clean.
        """
        lock = await self.acquire_lock(execution_id)
        deleted = 0
        try:
            for cid in await self.list_checkpoints(execution_id):
                deleted += bool(await self.delete_checkpoint(cid))
            journal = [counter for counter, _ in await self.read_journal(execution_id)]
            await self.drop_journal(execution_id, journal)
            deleted += len(journal)
        finally:
            await lock.release()
        return deleted

    async def close(self) -> None:
        """Release connections or handles, and every lock still held through this provider.

        The default does nothing. It does not :meth:`sync`; records saved with ``sync=False`` keep their
        weaker guarantee.
        """
