"""One execution's checkpoints: numbering, integrity, locking, loading with fallback, and pruning.

The manager is the only writer of an execution id. It numbers records with one counter that never
restarts (it continues after the newest stored record, across executors, LLM calls and resumes, so the
latest is always the last), holds the execution's lock from its first write (a second process on the
same id is refused), signs every record with the codec (checksum or HMAC, checked before anything is
unpickled), and prunes: ``keep_last_n`` snapshots are kept, plus whatever a kept snapshot refers to and
whatever an unfinished frame still needs to resume.

Theory of operation: records bound to their place
-------------------------------------------------
Every record is signed (:mod:`playbooks.checkpoints.codec`) together with its place: the execution id,
its counter, the *lineage* (a random id of this execution's history in this store, chosen at its first
write and kept by every resume) and its predecessor (the counter and digest of the record written just
before it). After every write the manager rewrites the execution's *head*, which names the newest
record by counter and digest. Pruning first appends a *tombstone* listing every counter it deletes. Loading then
checks, before anything is unpickled:

* each record where it was found (a record of another run, or of the same run id in another store or
  an earlier cleared history, is refused: a transplant);
* the head's newest record is there, and every predecessor named by a record is there or tombstoned
  (otherwise records were truncated or rolled back: a ``CheckpointWarning`` names the missing counters
  and the state is rebuilt from what verifies, which ``report.fallbacks`` lists);
* a record signed with another key raises :class:`~playbooks.errors.CheckpointKeyError` at once: a run
  is never silently started over because its key is missing.

What cannot be detected: a rollback of the whole folder (head and records together) to an older copy
of itself, and deletion of a whole run. docs/durability.md ("Trust model") says so.

Replay order. A snapshot written while a frame replays its journal (a resumed process snapshots a big
namespace as soon as the throttle allows) has a higher counter than journal records it has not replayed
yet. Such a snapshot is never used as a frame's base: a base must cover every call record written
before it (its next call number is above theirs), so unreplayed records stay visible however many
kills follow. Pruning applies the same rule.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import secrets
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, Literal

from playbooks.checkpoints.secrets import Secret, check_secrets, secrets_from_env
from playbooks.checkpoints.codec import (
    KEY_ENV_VAR,
    Place,
    RecordKey,
    decode_head,
    decode_record,
    derive_run_key,
    encode_head,
    new_lineage,
    resolve_key,
    seal,
)
from playbooks.checkpoints.counter_ranges import CounterRanges
from playbooks.checkpoints.model import (
    Checkpoint,
    FrameState,
    JournalEntry,
    Record,
    StoredVar,
)
from playbooks.checkpoints.provider import (
    HEAD_COUNTER,
    CheckpointProvider,
    ExecutionLock,
    checkpoint_id,
    parse_checkpoint_id,
    validate_execution_id,
)
from playbooks.checkpoints.wire import decode_fields, encode_fields, encode_record, record_from_fields
from playbooks.errors import (
    CheckpointCorruptError,
    CheckpointForeignError,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointTooLargeError,
    CheckpointWarning,
    StoragePathError,
    UnknownProviderError,
)

if TYPE_CHECKING:
    from playbooks.checkpoints.namespace import EncodedNamespace, NamespaceEncoder
    from playbooks.config import DurabilityConfig

__all__ = ("CheckpointManager", "PreparedRecord")

_logger = logging.getLogger("playbooks.checkpoints")

UnpicklablePolicy = Literal["skip", "strict"]
_COMPRESS_OVER = 64 * 1024
"""Default size from which a snapshot is compressed (docs/benchmarks.md: what it costs and saves)."""
_STATE_PREFIX = "@"
_OVERRIDE_STATE = "override:"
"""Names of the ``state`` records that set variables at the next restore (see ``save_overrides``)."""
_JOURNAL_SNAPSHOT_MAX = 64 * 1024
"""An unsynced snapshot up to this size (encoded) is a journal entry: an append, not a new file."""
_PRUNE_EVERY = 16
_NO_HOSTS: frozenset[int] = frozenset()  # a journal record refers to no other record


def _root_number(call_id: str) -> int:
    """The frame's own call count a call id starts with (``"3"`` and ``"3-9f2c1a07.0"``: 3)."""
    head = call_id.split(".", 1)[0].split("-", 1)[0]
    return int(head) if head.isdigit() else -1




_TOMBSTONE_KEY: Final = b'"tombstone"'
"""How a tombstone's payload names its list (a JSON key): a cheap test before decoding one."""


def _tombstone_ranges(fields: dict[str, Any]) -> CounterRanges:
    """The records a tombstone's fields list as pruned."""
    try:
        return CounterRanges.from_ranges(fields["tombstone"])
    except (TypeError, ValueError) as exc:
        raise CheckpointCorruptError(f"its list of pruned records is malformed ({exc})") from exc


def _tombstone_list(payload: bytes, cid: str) -> CounterRanges:
    """The records a verified payload lists as pruned if it is a tombstone, else none (a record
    whose text merely holds the key; a malformed one is reported when it is read in order)."""
    try:
        fields = decode_fields(payload, cid)
        return _tombstone_ranges(fields) if "tombstone" in fields else CounterRanges()
    except CheckpointCorruptError:
        return CounterRanges()


def _spell(counters: set[int]) -> str:
    """``{1, 2, 3, 7}`` as ``"1-3, 7"``."""
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in CounterRanges(counters).ranges())


@dataclass(slots=True)
class PreparedRecord:
    """A record encoded and signed as the next in its execution's chain, not stored yet.

    ``append`` is its journal write made ready by the provider (see
    :meth:`~playbooks.checkpoints.provider.CheckpointProvider.prepare_append`), run by
    :meth:`CheckpointManager.land`; ``landed`` says it ran.
    """

    record: Record
    data: bytes
    previous_tip: tuple[int, bytes] | None
    append: Callable[[], None] | None = None
    landed: bool = False
    head_staged: bool = False  # ``append`` writes the head too (see CheckpointProvider.stage_head)


@dataclass(slots=True)
class _IndexEntry:
    kind: str
    frame_id: str
    hosts: frozenset[int]
    done: bool
    in_journal: bool  # stored as a journal entry (else a checkpoint file or record)
    durable: bool = True  # fsynced when written, or with the journal, or found by a later process
    seq: str = ""  # intent / result: the call id
    next_seq: int = 0  # snapshot: the next call number of its frame


class CheckpointManager:
    """Writes and reads the checkpoints of one execution id through a :class:`CheckpointProvider`.

    ``key`` signs records with an HMAC (default: the ``key_env`` environment variable,
    ``PLAYBOOKS_CHECKPOINT_KEY``, if set, else the per-user key file, created on first use: see
    :func:`playbooks.checkpoints.codec.resolve_key`); ``snapshot_sync_every``: ``None`` (the default) leaves every snapshot but a frame's last in the
    journal, fsynced with it before the next durable call; ``n`` also writes every ``n``-th as a
    checkpoint file, fsynced on its own (that costs two more fsyncs, for no stronger guarantee while the
    journal is intact); ``unpicklable`` is ``"skip"`` (leave the variable out, warn, and make a later use of it
    fail clearly) or ``"strict"`` (fail the checkpoint); ``max_checkpoint_size_mb`` bounds a snapshot.
    """

    def __init__(
        self,
        execution_id: str,
        provider: CheckpointProvider | None = None,
        *,
        keep_last_n: int | None = 10,
        max_checkpoint_size_mb: float = 100.0,
        unpicklable: UnpicklablePolicy = "skip",
        key: str | bytes | RecordKey | None = None,
        snapshot_sync_every: int | None = None,
        key_env: str = KEY_ENV_VAR,
    ) -> None:
        validate_execution_id(execution_id)
        if keep_last_n is not None and keep_last_n < 1:
            raise ValueError("keep_last_n must be at least 1 (or None to keep every checkpoint)")
        if unpicklable not in ("skip", "strict"):
            raise ValueError('unpicklable must be "skip" or "strict"')
        if provider is None:
            from playbooks.checkpoints.providers.filesystem import FilesystemCheckpointProvider

            provider = FilesystemCheckpointProvider()
        self.execution_id = execution_id
        self.provider = provider
        self.keep_last_n = keep_last_n
        self.max_checkpoint_size_mb = max_checkpoint_size_mb
        self.unpicklable: UnpicklablePolicy = unpicklable
        if snapshot_sync_every is not None and snapshot_sync_every < 1:
            raise ValueError("snapshot_sync_every must be at least 1 (or None: only with the journal)")
        self.snapshot_sync_every = snapshot_sync_every
        self.journal_sync_every = 1
        """Fsync the journal before every n-th durable call (1: every one). See :meth:`sync`."""
        self.journal_sync_interval: float | None = None
        """Also fsync when this many seconds passed since the last fsync (``None``: by count only)."""
        self._calls_since_sync = 0
        self._synced_at = time.monotonic()
        self.compress_over: int | None = _COMPRESS_OVER
        """Snapshots whose record is at least this many bytes are stored zlib-compressed when that
        saves a tenth or more (``None``: never)."""
        self._key = key if isinstance(key, RecordKey) else resolve_key(key, env_var=key_env)
        self._run_key: RecordKey | None = None
        self._isolated: set[int] = set()  # records signed by an isolated worker (never unpickled here)
        self._lineage: bytes | None = None
        self._tip: tuple[int, bytes] | None = None  # the record written last: (counter, digest)
        self._head_counter = 0
        self._places: dict[int, Place] = {}  # verified places of the loaded records
        self._written: dict[int, bytes] = {}  # digests of the records this manager wrote
        self._tombstones: set[int] = set()  # counters of the tombstones loaded
        self._pruned = CounterRanges()  # every counter a tombstone lists (or will: see prune)
        self._checked = False
        self._eid = b""
        self._unreadable: set[int] = set()  # stored but failed verification (already reported)
        self._missing: set[int] = set()  # named by a record or the head, but neither here nor pruned
        self._highest_named = 0  # the highest counter the head or a record names
        self._lock: ExecutionLock | None = None
        self._next_counter: int | None = None
        self._index: dict[int, _IndexEntry] = {}
        self._records: dict[int, Record] = {}
        self._stale: set[int] = set()
        self._dead_journal: set[int] = set()
        self._since_prune = 0
        self._unsynced = False
        self._warned_skips: set[tuple[str, str]] = set()
        self._overrides: list[tuple[int, dict[str, Any]]] = []  # written by this manager (not loaded)
        self.secrets: tuple[Secret, ...] = ()
        """Values no record may hold (:mod:`playbooks.checkpoints.secrets`): a record holding one is
        refused with :class:`~playbooks.errors.SecretStoredError`. ``from_config`` sets them."""
        self.fallbacks: list[str] = []
        """Every corrupt or missing checkpoint that loading skipped, as a message (newest last)."""

    def for_execution(self, execution_id: str) -> CheckpointManager:
        """A manager of another execution in the same store, with this one's key and settings (the
        records of a run's isolated LLM code live in executions of their own: one writer each)."""
        other = CheckpointManager(
            execution_id, self.provider, keep_last_n=self.keep_last_n,
            max_checkpoint_size_mb=self.max_checkpoint_size_mb, unpicklable=self.unpicklable, key=self._key,
            snapshot_sync_every=self.snapshot_sync_every,
        )
        other.journal_sync_every = self.journal_sync_every
        other.journal_sync_interval = self.journal_sync_interval
        other.compress_over = self.compress_over
        other.secrets = self.secrets
        return other

    @classmethod
    def from_config(
        cls,
        durability: DurabilityConfig,
        execution_id: str,
        *,
        provider: CheckpointProvider | None = None,
        storage_path: str | os.PathLike[str] | None = None,
    ) -> CheckpointManager:
        """A manager with the settings of a ``[durability]`` table (its provider and storage path;
        ``storage_path`` overrides the table's, for a path resolved against the config file)."""
        from playbooks.checkpoints.providers import create_provider

        if provider is None:
            storage = os.fspath(storage_path) if storage_path is not None else durability.storage_path
            if "\0" in storage:
                raise StoragePathError(
                    f"durability.storage_path {storage!r} contains a NUL byte, which no path can hold"
                )
            if durability.provider == "memory":
                provider = create_provider("memory")
            elif durability.provider == "postgres":
                provider = create_provider(
                    "postgres", dsn=durability.dsn, lease_seconds=durability.lease_seconds
                )
            elif durability.provider == "sqlite":
                path = storage
                if not path.endswith((".sqlite3", ".sqlite", ".db")):
                    path = os.path.join(path, "checkpoints.sqlite3")
                provider = create_provider("sqlite", path=path)
            else:
                try:
                    provider = create_provider(durability.provider, base_path=storage)
                except LookupError as exc:
                    raise UnknownProviderError(
                        f"durability.provider: {exc.args[0] if exc.args else exc}"
                    ) from exc
        manager = cls(
            execution_id,
            provider,
            keep_last_n=None if durability.keep_history else durability.keep_last_n,
            max_checkpoint_size_mb=durability.max_checkpoint_size_mb,
            unpicklable=durability.unpicklable,
            key_env=durability.hmac_key_env,
        )
        manager.secrets = secrets_from_env((durability.hmac_key_env, *durability.secret_env))
        if not durability.compress_snapshots:
            manager.compress_over = None
        manager.journal_sync_every = durability.journal_sync_every
        manager.journal_sync_interval = durability.journal_sync_interval
        return manager

    def __repr__(self) -> str:
        return f"CheckpointManager({self.execution_id!r}, {self.provider!r})"

    # ----------------------------------------------------------------- writing

    async def open(self) -> None:
        """Take the execution's lock and find where numbering continues; idempotent.

        Raises :class:`~playbooks.errors.ExecutionLockedError` when another live process (or another
        manager in this one) holds the execution.
        """
        await self.lock()
        if self._next_counter is None:
            counters = await self._stored_counters()
            if counters and not self._checked:
                await self.load_records()  # the chain continues from the newest verified record
            if self._lineage is None:
                self._lineage = new_lineage()
            if self._places:
                newest = max(self._places)
                self._tip = (newest, self._places[newest].digest)
            self._eid = self.execution_id.encode("utf-8")
            # Never reuse the number of a record that was lost (the head or a successor named it):
            # a copy of it put back later must not collide with a new record.
            self._next_counter = max([*counters, self._highest_named, 0]) + 1
            # The losses were reported; the next tombstone acknowledges them, so later loads do not
            # report them again.
            self._pruned |= self._missing
            # Stale: stored, not loaded. Pruned records still in the journal (dropped only in batches)
            # are among them, and go with the next prune as before; the others are reported.
            self._stale = set(counters) - set(self._records) - set(self._index)
            unresumed = [c for c in self._stale if c not in self._pruned]
            if unresumed:
                _logger.info(
                    "execution %s has %d checkpoint(s) from an earlier run that were not resumed; "
                    "numbering continues at %d",
                    self.execution_id, len(unresumed), self._next_counter,
                )

    @property
    def held_lock(self) -> ExecutionLock | None:
        """The execution's lock (a lease, with PostgreSQL) while this manager holds it."""
        return self._lock

    async def lock(self) -> None:
        """Take the execution's lock (idempotent) without starting to write: for a host whose worker
        process writes the records (an isolated executor), so the host reads them but never picks
        where their chain continues."""
        if self._lock is None:
            self._lock = await self.provider.acquire_lock(self.execution_id)

    def allocate_counter(self) -> int:
        """Reserve the next counter (call :meth:`open` first)."""
        if self._next_counter is None:
            raise RuntimeError("CheckpointManager.open() must be awaited before writing")
        counter = self._next_counter
        self._next_counter += 1
        return counter

    async def write(self, record: Record, *, sync: bool = False) -> None:
        """Store ``record`` (its counter comes from :meth:`allocate_counter`).

        A synced snapshot is a checkpoint record (a ``.pkl`` file), fsynced; an unsynced snapshot of up
        to ``_JOURNAL_SNAPSHOT_MAX`` bytes, and any other record, is appended to the journal and made
        durable by the next :meth:`sync` (a bigger unsynced snapshot is a record, not fsynced). All
        survive a killed process at once. A failed write raises
        :class:`~playbooks.errors.CheckpointWriteError` and leaves earlier records intact.
        """
        await self.store(self.prepare(record), sync=sync)

    def prepare(self, record: Record) -> PreparedRecord:
        """Encode and sign ``record`` as the next one in the chain, without storing it yet.

        For a side effect whose record must be ready the moment it happens (a durable ``print``):
        prepare, do it, then :meth:`store` at once. Nothing else may be written in between; if the side
        effect fails, :meth:`discard` it.
        """
        before = self._tip
        payload = encode_record(record)
        if self.secrets:
            where = f"frame {record.frame_id!r}" if record.frame_id else f"execution {self.execution_id!r}"
            check_secrets(payload, self.secrets, f"a checkpoint record ({record.kind}) of {where}")
        data = self._encode(record.counter, payload, compress=record.kind == "snapshot")
        prepared = PreparedRecord(record, data, before)
        if record.kind != "snapshot" and self.provider.completes_without_suspending:
            try:
                prepared.head_staged = self._stage_head(record.counter)
                prepared.append = self.provider.prepare_append(self.execution_id, record.counter, data)
            except BaseException:
                self.discard(prepared)
                raise
        return prepared

    def land(self, prepared: PreparedRecord) -> None:
        """Write a prepared journal record now (one write, no suspension); :meth:`store` then only
        indexes it. For the record of an output, the instant the output is out."""
        if prepared.append is None or prepared.landed:
            return
        try:
            prepared.append()
        except BaseException:
            self.discard(prepared)
            raise
        prepared.landed = True
        self._unsynced = True

    def discard(self, prepared: PreparedRecord) -> None:
        """Forget a prepared record that will not be stored: the next one chains to its predecessor."""
        if self._tip is not None and self._tip[0] == prepared.record.counter:
            self._tip = prepared.previous_tip
        self._written.pop(prepared.record.counter, None)

    async def store(self, prepared: PreparedRecord, *, sync: bool = False) -> None:
        """Store a record made by :meth:`prepare` (see :meth:`write`)."""
        record, data, before = prepared.record, prepared.data, prepared.previous_tip
        snapshot = record.kind == "snapshot"
        in_journal = not snapshot or (not sync and len(data) <= _JOURNAL_SNAPSHOT_MAX)
        head_staged = prepared.head_staged
        try:
            if prepared.landed:
                pass
            elif prepared.append is not None:
                prepared.append()
                self._unsynced = True
            elif in_journal:
                head_staged = self._stage_head(record.counter)
                await self.provider.append_journal(self.execution_id, record.counter, data)
                self._unsynced = True
            else:
                cid = checkpoint_id(self.execution_id, record.counter)
                head_staged = self._stage_head(record.counter)
                await self.provider.save_checkpoint(cid, data, sync=sync)
        except BaseException:
            # Not stored: the next record must not name it as its predecessor (a resume would
            # report it lost).
            if self._tip is not None and self._tip[0] == record.counter:
                self._tip = before
            self._written.pop(record.counter, None)
            raise
        self._index[record.counter] = _IndexEntry(
            record.kind, record.frame_id, frozenset(record.hosts) if snapshot else _NO_HOSTS, record.done, in_journal,
            durable=sync or in_journal, seq=record.seq, next_seq=record.next_seq,
        )
        if head_staged:
            self._head_counter = record.counter  # written with the record
        else:
            await self._write_head(record.counter)

    def _encode(self, counter: int, payload: bytes, *, compress: bool = False) -> bytes:
        """Sign ``payload`` as record ``counter``, chained to the record encoded before it; a
        ``compress``-ible payload (a snapshot) of ``compress_over`` bytes or more is stored
        zlib-compressed when that saves a tenth or more."""
        if self._lineage is None:
            raise RuntimeError("CheckpointManager.open() must be awaited before writing")
        prev_counter, prev_digest = self._tip if self._tip is not None else (0, bytes(32))
        squeeze = compress and self.compress_over is not None and len(payload) >= self.compress_over
        data, digest = seal(
            payload, self._key, self._eid, counter, self._lineage, prev_counter, prev_digest, compress=squeeze
        )
        self._tip = (counter, digest)
        self._written[counter] = digest
        return data

    async def _write_head(self, counter: int) -> None:
        """Point the head at record ``counter`` if it is the newest written so far."""
        if counter <= self._head_counter or self._lineage is None:
            return
        self._head_counter = counter
        await self.provider.write_head(
            self.execution_id, encode_head(self._lineage, counter, self._written[counter])
        )

    def _stage_head(self, counter: int) -> bool:
        """Offer the provider the head naming record ``counter``, about to be written, to write with
        it in one commit (:meth:`CheckpointProvider.stage_head`); whether it took it. Nothing is
        offered when ``counter`` is not the newest record: then no head is written either."""
        if counter <= self._head_counter or self._lineage is None:
            return False
        return self.provider.stage_head(
            self.execution_id, encode_head(self._lineage, counter, self._written[counter])
        )

    async def sync(self) -> None:
        """Make the journal durable (one fsync) before a new durable call starts: before every one
        (the default), or, with ``journal_sync_every = n`` / ``journal_sync_interval = t``, before
        every n-th or when t seconds passed since the last fsync. Records survive a killed process
        either way; after a power loss, calls whose results were not fsynced yet run again."""
        if not self._unsynced:
            return
        self._calls_since_sync += 1
        if self._calls_since_sync < self.journal_sync_every and (
            self.journal_sync_interval is None
            or time.monotonic() - self._synced_at < self.journal_sync_interval
        ):
            return
        await self.provider.sync_journal(self.execution_id)
        self._unsynced = False
        self._calls_since_sync = 0
        self._synced_at = time.monotonic()

    async def save_state(self, name: str, value: Any) -> None:
        """Store a value of the whole execution under ``name`` (unsynced, like a journal record: it
        survives a killed process, and the next durable call fsyncs it); the newest one counts."""
        import cloudpickle

        await self.open()
        record = Record(
            kind="state",
            execution_id=self.execution_id,
            counter=self.allocate_counter(),
            timestamp=time.time(),
            frame_id=_STATE_PREFIX + name,
            agent_id="",
            call_stack=(),
            response_start=0,
            response_text="",
            name=name,
            value=bytes(cloudpickle.dumps(value)),
        )
        await self.write(record, sync=False)

    async def save_overrides(self, values: Mapping[str, Any]) -> None:
        """Record new values for variables, to be set when the execution is next restored: each frame
        restored from a snapshot older than this record sets them (its root frame always; other
        frames where the name exists), so they hold until the next snapshot takes them in, also
        across a crash before it. A resume or a fork with ``--set NAME=VALUE`` does this; the record
        stays in the execution's history (``playbooks checkpoints list``)."""
        await self.save_state(f"{_OVERRIDE_STATE}{secrets.token_hex(4)}", dict(values))
        self._overrides.append((self._next_counter_written(), dict(values)))

    def overrides_after(self, counter: int) -> dict[str, Any]:
        """The variables set by :meth:`save_overrides` after record ``counter``, later ones winning."""
        found = [
            (r.counter, pickle.loads(r.value)) for r in self._records.values()
            if r.kind == "state" and r.name.startswith(_OVERRIDE_STATE) and r.value is not None
        ]
        merged: dict[str, Any] = {}
        for at, values in sorted([*found, *self._overrides], key=lambda item: item[0]):
            if at > counter:
                merged.update(values)
        return merged

    def _next_counter_written(self) -> int:
        """The counter of the record written last by this manager."""
        assert self._next_counter is not None
        return self._next_counter - 1

    def loaded_state(self, name: str) -> Any:
        """The newest stored value of ``name`` among the loaded records (``None`` if there is none)."""
        found = [r for r in self._records.values() if r.kind == "state" and r.name == name]
        if not found:
            return None
        newest = max(found, key=lambda r: r.counter)
        return pickle.loads(newest.value) if newest.value is not None else None

    def new_encoder(self) -> NamespaceEncoder:
        """A namespace encoder with this manager's unpicklable-value policy."""
        from playbooks.checkpoints.namespace import NamespaceEncoder

        return NamespaceEncoder(policy=self.unpicklable)

    def check_snapshot(self, encoded: EncodedNamespace, frame_id: str) -> None:
        """Refuse a snapshot over ``max_checkpoint_size_mb``; warn once per skipped variable."""
        limit = int(self.max_checkpoint_size_mb * 1024 * 1024)
        total = encoded.total_size()
        if total > limit:
            largest = ", ".join(f"{name} ({size / 1048576:.2f} MB)" for name, size in encoded.largest(3))
            raise CheckpointTooLargeError(
                f"the checkpoint of frame {frame_id!r} of execution {self.execution_id!r} would be "
                f"{total / 1048576:.2f} MB, over max_checkpoint_size_mb = {self.max_checkpoint_size_mb:g}. "
                f"Largest variables: {largest}. Delete what is not needed (del name) or raise the limit; "
                f"the previous checkpoint is intact."
            )
        for skipped in encoded.skipped:
            if (frame_id, skipped.name) in self._warned_skips:
                continue
            self._warned_skips.add((frame_id, skipped.name))
            warnings.warn(
                f"variable {skipped.name!r} ({skipped.type_name}) is not saved in the checkpoints of "
                f"execution {self.execution_id!r}: {skipped.reason}. After a resume, using it raises "
                f"UnrestoredValueError; set durability.unpicklable = \"strict\" to fail instead.",
                CheckpointWarning,
                stacklevel=2,
            )

    async def prune(self, *, force: bool = False) -> int:
        """Delete what no kept snapshot and no unfinished frame needs; return how many were deleted.

        Called after every snapshot, it does the work every ``_PRUNE_EVERY`` calls (unless ``force``),
        so at most that many snapshots beyond ``keep_last_n`` are on disk at any time.
        """
        self._since_prune += 1
        if self.keep_last_n is None or not self._index or (self._since_prune < _PRUNE_EVERY and not force):
            return 0
        self._since_prune = 0
        needed = self._needed()
        newest = max(self._index)
        doomed = sorted((set(self._index) | self._stale) - needed - {newest})
        if all(c in self._index and self._index[c].kind == "tombstone" for c in doomed):
            doomed = []  # a tombstone goes only when a newer one (which lists it) is written
        await self._forget(doomed)
        return len(doomed)

    async def _forget(self, doomed: list[int]) -> None:
        """Delete these records after a tombstone lists them (so their absence is not a loss)."""
        if doomed:
            await self._write_tombstone(doomed)
        for counter in doomed:
            entry = self._index.pop(counter, None)
            self._records.pop(counter, None)
            self._places.pop(counter, None)
            self._stale.discard(counter)
            if entry is None or entry.in_journal:
                self._dead_journal.add(counter)  # dropped in batches: a journal rewrite is not free
            if entry is None or not entry.in_journal:
                await self.provider.delete_checkpoint(checkpoint_id(self.execution_id, counter))
        if len(self._dead_journal) >= self.provider.journal_drop_batch:
            await self._drop_dead_journal()

    def _failure_tail(self) -> tuple[Record | None, list[Record]]:
        """The failing call's result (see :meth:`failure`) and the records of the failure's tail."""
        failing: Record | None = None
        tail: list[Record] = []
        for counter in sorted(self._records, reverse=True):
            record = self._records[counter]
            if record.kind == "state":
                continue
            if record.kind == "snapshot" and record.done:
                tail.append(record)
                continue
            if record.kind == "result" and record.outcome == "raise":
                tail.append(record)
                failing = record
                continue
            break
        return failing, tail

    def failure(self) -> Record | None:
        """The result record of the durable call whose exception ended the execution, if it ended so.

        An execution that failed ends with that call's ``raise`` result and what the exception did on
        its way out: more ``raise`` results (the durable calls it passed through) and the final
        snapshots of the frames it finished. This is the earliest ``raise`` result of that tail (among
        the loaded records); call it only for an execution known to have failed.
        """
        return self._failure_tail()[0]

    async def rewind_failure(self) -> Record | None:
        """Forget how a failed execution failed, so that a resume calls the failing call again.

        The records from the failing call's result (:meth:`failure`) on, and the final snapshots of the
        frames that call ran, are deleted (a tombstone lists them); the call's ``intent`` stays, so a
        resume finds it unfinished and runs it again with the same idempotency key, after replaying
        everything before it. Returns that result record, or ``None`` when the execution did not end
        with a failed call. Takes the execution's lock.
        """
        await self.load_records()
        failing, tail = self._failure_tail()
        if failing is None:
            return None
        await self.open()
        # Also the final snapshots of the frames the failing call ran (a tool that runs code): they
        # finished because it failed, and resume from their earlier snapshots.
        child = f"{failing.frame_id}/{failing.seq}"
        doomed = sorted(
            r.counter for r in tail
            if r.counter >= failing.counter or r.frame_id == child or r.frame_id.startswith((child + ".", child + "/"))
        )
        await self._forget(doomed)
        return failing

    async def _write_tombstone(self, doomed: list[int]) -> None:
        """Append a record listing every counter pruned so far (these, and all earlier ones), before
        they are deleted: a counter that is missing and listed here was pruned, not lost."""
        self._pruned.update(doomed)
        counter = self.allocate_counter()
        data = self._encode(counter, encode_fields({"tombstone": self._pruned.ranges()}))
        head_staged = self._stage_head(counter)
        await self.provider.append_journal(self.execution_id, counter, data)
        self._unsynced = True
        self._index[counter] = _IndexEntry("tombstone", "", frozenset(), False, True)
        self._tombstones.add(counter)
        if head_staged:
            self._head_counter = counter
        else:
            await self._write_head(counter)

    async def _drop_dead_journal(self) -> None:
        dead, self._dead_journal = self._dead_journal, set()
        if dead:
            await self.provider.drop_journal(self.execution_id, dead)

    def _needed(self) -> set[int]:
        assert self.keep_last_n is not None
        snapshots = sorted(c for c, e in self._index.items() if e.kind == "snapshot")
        kept = set(snapshots[-self.keep_last_n :])
        by_frame: dict[str, list[int]] = {}
        states: dict[str, int] = {}
        for counter, entry in self._index.items():
            if entry.kind == "state":  # only the newest value of each state counts
                states[entry.frame_id] = max(counter, states.get(entry.frame_id, 0))
                continue
            by_frame.setdefault(entry.frame_id, []).append(counter)
        finished = {e.frame_id for e in self._index.values() if e.done}
        needed = set(kept) | set(states.values())
        for frame_id, counters in by_frame.items():
            if frame_id in finished and "/" in frame_id and frame_id.rsplit("/", 1)[0] not in finished:
                # A finished child of an unfinished frame: a resume of the parent re-attaches to it
                # (the call that ran it may have no result yet), so its final snapshot stays.
                needed.add(max(c for c in counters if self._index[c].done))
                continue
            if frame_id in finished or frame_id == "":
                continue
            own = self._usable_bases(counters)
            if not own:
                needed.update(counters)
                continue
            kept_own = [c for c in own if c in kept]
            base = kept_own[0] if kept_own else own[-1]
            # After a power loss only a durable snapshot is sure to be there: keep the newest one and
            # the journal after it, so the frame can always fall back to them.
            durable = [c for c in own if self._index[c].durable]
            if durable:
                base = min(base, durable[-1])
            needed.update(c for c in counters if c >= base)
        for counter in list(needed):
            kept_entry = self._index.get(counter)
            if kept_entry is not None:
                needed |= kept_entry.hosts
        return needed

    async def fork_into(self, target: CheckpointManager, *, upto: int | None = None) -> int:
        """Copy this execution's records up to counter ``upto`` (default: its newest snapshot) into
        ``target``, a new, empty execution; return the counter it forked at.

        The copy is this execution as a process killed right after record ``upto`` would have left
        it, under the target's id (records are signed again for their new place): resuming the target
        continues from there, with its own idempotency keys, while this execution is not changed.
        Snapshots, journal records and run-level state are copied; tombstones are not.
        """
        await self.load_records()
        snapshots = [c for c, r in self._records.items() if r.kind == "snapshot"]
        if upto is None:
            if not snapshots:
                raise CheckpointCorruptError(f"execution {self.execution_id!r} has no snapshot to fork from")
            upto = max(snapshots)
        elif upto not in self._records:
            known = ", ".join(str(c) for c in sorted(snapshots)[-10:]) or "none"
            raise CheckpointCorruptError(
                f"execution {self.execution_id!r} has no readable checkpoint {upto} (snapshots: {known})"
            )
        self._check_forkable(upto)
        if await target._stored_counters():
            raise StoragePathError(
                f"cannot fork into {target.execution_id!r}: that execution already has checkpoints"
            )
        await target.open()
        for counter in sorted(c for c in self._records if c <= upto):
            record = self._records[counter]
            target._next_counter = max(target._next_counter or 0, counter + 1)
            await target.write(dataclasses.replace(record, execution_id=target.execution_id), sync=False)
        await target.sync()
        return upto

    def _check_forkable(self, upto: int) -> None:
        """Refuse to fork at ``upto`` when pruning removed records the state at that point needs: a
        call between a frame's snapshot and ``upto``, or the value a run-level state had then."""
        pruned = [(lo, hi) for lo, hi in self._pruned.ranges() if lo <= upto]
        if not pruned:
            return
        hint = (
            f"checkpoint {upto} of execution {self.execution_id!r} is older than what the execution keeps "
            "(pruning removed records it needs"
        )
        frames = {r.frame_id for c, r in self._records.items() if c <= upto and r.kind != "state"}
        states = {frame_id: self.frame_state(frame_id, upto=upto) for frame_id in frames}
        done = {frame_id for frame_id, state in states.items() if state is not None and state.done}
        for frame_id, state in states.items():
            parts = frame_id.split("/")
            if any("/".join(parts[:n]) in done for n in range(1, len(parts) + 1)):
                continue  # finished, or under a finished frame: a resume does not run it
            base = state.snapshot_counter if state is not None else 0
            if any(hi > base and lo <= upto for lo, hi in pruned):
                raise CheckpointCorruptError(
                    f"{hint}: frame {frame_id!r}'s calls after its snapshot {base}); fork at a later "
                    "checkpoint, or set durability.keep_history = true in runs you mean to fork"
                )
        names = {
            r.name for c, r in self._records.items()
            if r.kind == "state" and c > upto and not r.name.startswith(_OVERRIDE_STATE)
        }
        kept = {r.name for c, r in self._records.items() if r.kind == "state" and c <= upto}
        if names - kept:
            raise CheckpointCorruptError(
                f"{hint}: the run-level state {', '.join(sorted(names - kept))} as it was then); fork at a "
                "later checkpoint, or set durability.keep_history = true in runs you mean to fork"
            )

    async def flush(self) -> None:
        """Drop pruned journal entries and make everything written durable, keeping the lock: for a
        host that records how the run ended while it still holds the run (a lease released first
        would let another worker take a finished run for a crashed one)."""
        if self._lock is not None:
            await self._drop_dead_journal()
            await self.provider.sync(self.execution_id)
        self._unsynced = False

    async def close(self) -> None:
        """Drop pruned journal entries, flush everything to disk and release the execution's lock."""
        try:
            await self.flush()
        finally:
            if self._lock is not None:
                lock, self._lock = self._lock, None
                await lock.release()

    # ----------------------------------------------------------------- reading

    async def list_checkpoints(self) -> list[str]:
        """The ids of every stored record of this execution (files and journal entries), oldest first."""
        return [checkpoint_id(self.execution_id, c) for c in await self._stored_counters()]

    def _usable_bases(self, frame_counters: list[int]) -> list[int]:
        """The frame's snapshots that cover every call record of the frame written before them
        (ascending); one pass: a snapshot covers them when the highest call number so far is below
        its next call number."""
        usable: list[int] = []
        highest = -1
        for c in sorted(frame_counters):
            entry = self._index[c]
            if entry.kind == "snapshot":
                if highest < entry.next_seq:
                    usable.append(c)
            elif entry.kind in ("intent", "result"):
                highest = max(highest, _root_number(entry.seq))
        return usable

    async def unread_counters(self) -> list[int]:
        """Stored records that loading could not use (unreadable, or refused as another store's)."""
        await self.load_records()
        return [
            c for c in await self._stored_counters()
            if c not in self._records and c not in self._tombstones and c not in self._pruned
        ]

    async def _stored_counters(self, journal: Mapping[int, bytes] | None = None) -> list[int]:
        """Counters of the stored records (files and journal entries; ``journal`` if read already)."""
        ids = await self.provider.list_checkpoints(self.execution_id)
        files = {parse_checkpoint_id(cid)[1] for cid in ids}
        if journal is None:
            journal = dict(await self.provider.read_journal(self.execution_id))
        return sorted((files | journal.keys()) - {HEAD_COUNTER})

    async def load_records(self) -> dict[int, Record]:
        """Load and verify every stored record not loaded yet; corrupt ones are skipped and reported.

        Raises :class:`~playbooks.errors.CheckpointKeyError` when records were signed with another key
        than the configured one (resuming without them would run finished calls again). A record of
        another place (a transplant) is refused, and a missing record (truncation, rollback) is
        reported; both with a :class:`~playbooks.errors.CheckpointWarning`, listed in
        :attr:`fallbacks`.
        """
        journal = dict(await self.provider.read_journal(self.execution_id))
        head = await self._read_head()
        first_load = not self._checked
        self._checked = True
        found: dict[int, tuple[Place, bytes]] = {}
        unreadable: dict[int, str] = {}
        # Newest first, so that a tombstone is met before the records it lists: those are pruned,
        # though still in the journal until it is rewritten in a batch, and are neither read nor
        # verified (a resume would otherwise decode up to a batch of dead records).
        lineage = self._lineage if self._lineage is not None else (head[0] if head is not None else None)
        dead = CounterRanges()
        for counter in reversed(await self._stored_counters(journal)):
            if counter in self._records or counter in self._tombstones or counter in self._pruned or counter in dead:
                continue
            cid = checkpoint_id(self.execution_id, counter)
            try:
                data = journal[counter] if counter in journal else await self.provider.load_checkpoint(cid)
                if data is None:
                    continue
                found[counter] = place, payload = self._decode(data, counter)
            except CheckpointKeyError as exc:
                raise CheckpointKeyError(f"cannot read checkpoint {cid}: {exc}") from None
            except CheckpointFormatError as exc:
                # Not damage: a store of another version. Falling back to fewer records would
                # silently resume an older state.
                raise CheckpointFormatError(f"cannot read checkpoint {cid}: {exc}") from None
            except CheckpointCorruptError as exc:
                unreadable[counter] = f"checkpoint {cid} is unreadable and was skipped: {exc}"
                continue
            if lineage is not None and place.lineage == lineage and _TOMBSTONE_KEY in payload:
                dead |= _tombstone_list(payload, cid)
        for counter in sorted(unreadable):
            self._unreadable.add(counter)
            self._report(unreadable[counter])
        if self._lineage is None:
            if head is not None:
                self._lineage = head[0]
            elif found:
                self._lineage = found[max(found)][0].lineage
                if first_load:
                    self._report(
                        f"execution {self.execution_id!r} has no readable head, so a truncated or "
                        "rolled-back store cannot be detected; trusting its newest verified record"
                    )
        for counter, (place, payload) in sorted(found.items()):
            cid = checkpoint_id(self.execution_id, counter)
            if place.lineage != self._lineage:
                self._report(
                    f"checkpoint {cid} was refused: {CheckpointForeignError.__name__}: it belongs to "
                    f"another history of execution {self.execution_id!r} (lineage "
                    f"{place.lineage.hex()[:12]}, this store's is {(self._lineage or b'').hex()[:12]}): "
                    "copied from another store, or left from a run of the same id that was cleared"
                )
                continue
            try:
                fields = decode_fields(payload, cid)
                if "tombstone" in fields:
                    listed = _tombstone_ranges(fields)
                    self._tombstones.add(counter)
                    self._pruned |= listed
                    self._places[counter] = place
                    self._index.setdefault(
                        counter, _IndexEntry("tombstone", "", frozenset(), False, counter in journal)
                    )
                    self._stale.discard(counter)
                    continue
                record = record_from_fields(fields, cid)
            except CheckpointCorruptError as exc:
                self._report(f"checkpoint {cid} is unreadable and was skipped: {exc}")
                continue
            self._places[counter] = place
            self._records[counter] = record
            self._index.setdefault(
                counter,
                _IndexEntry(
                    record.kind, record.frame_id, frozenset(record.hosts), record.done, counter in journal,
                    seq=record.seq, next_seq=record.next_seq,
                ),
            )
            self._stale.discard(counter)
        if found or self._places or self._written:
            self._check_chain(head)  # (no record at all: the run was cleared or never wrote)
        return self._records

    @property
    def run_key(self) -> RecordKey:
        """The key an isolated worker signs this execution's records with (derived from this
        manager's key: see :func:`~playbooks.checkpoints.codec.derive_run_key`)."""
        if self._run_key is None:
            self._run_key = derive_run_key(self._key, self.execution_id)
        return self._run_key

    def _decode(self, data: bytes, counter: int) -> tuple[Place, bytes]:
        """Verify a record with this manager's key, or else with the run key of an isolated worker
        (such a record is then marked: its pickles are never opened in this process)."""
        try:
            return decode_record(data, key=self._key, execution_id=self.execution_id, counter=counter)
        except CheckpointKeyError as exc:
            try:
                decoded = decode_record(data, key=self.run_key, execution_id=self.execution_id, counter=counter)
            except CheckpointKeyError:
                raise exc from None
        self._isolated.add(counter)
        return decoded

    async def _read_head(self) -> tuple[bytes, int, bytes] | None:
        """The head, ``(lineage, newest counter, its digest)``, or ``None`` (reported when it exists
        but cannot be read)."""
        data = await self.provider.read_head(self.execution_id)
        if data is None:
            return None
        try:
            return decode_head(data)
        except CheckpointFormatError as exc:
            raise CheckpointFormatError(f"cannot read the head of execution {self.execution_id!r}: {exc}") from None
        except CheckpointCorruptError as exc:
            self._report(
                f"the head of execution {self.execution_id!r} is unreadable ({exc}); a truncated or "
                "rolled-back store cannot be detected"
            )
            return None

    def _digest_of(self, counter: int) -> bytes | None:
        place = self._places.get(counter)
        return place.digest if place is not None else self._written.get(counter)

    def _check_chain(self, head: tuple[bytes, int, bytes] | None) -> None:
        """Report records that a verified record (or the head) names but that are neither here nor
        pruned: they were lost to a truncation or a rollback."""
        named: dict[int, tuple[bytes, str]] = {}
        if head is not None and head[0] == self._lineage:
            named[head[1]] = (head[2], "the head")
        for counter, place in self._places.items():
            if place.prev_counter:
                named.setdefault(place.prev_counter, (place.prev_digest, f"record {counter}"))
        missing: set[int] = set()
        for counter, (digest, by) in named.items():
            stored = self._digest_of(counter)
            if stored is None:
                if counter not in self._pruned and counter not in self._unreadable:
                    missing.add(counter)
            elif stored != digest:
                self._report(
                    f"checkpoint {checkpoint_id(self.execution_id, counter)} is not the record that "
                    f"{by} follows: it was replaced by another copy"
                )
        self._missing = missing
        self._highest_named = max(named, default=0)
        if missing:
            newest = max(self._places) if self._places else 0
            self._report(
                f"execution {self.execution_id!r} lost records {_spell(missing)} (the store was truncated "
                f"or a file was rolled back to an older copy): their calls and statements may run "
                f"again; the state is rebuilt from the records that verify (newest: {newest})"
            )

    def _report(self, message: str) -> None:
        if message not in self.fallbacks:
            self.fallbacks.append(message)
            warnings.warn(message, CheckpointWarning, stacklevel=3)

    async def get_latest_checkpoint(self) -> Checkpoint | None:
        """The newest valid checkpoint (a corrupt newest one is skipped, with a warning), or ``None``."""
        records = await self.load_records()
        frames = [c for c, r in records.items() if r.kind != "state"]
        if not frames:
            return None
        return self._checkpoint(max(frames))

    async def load_checkpoint(self, checkpoint: str | int) -> Checkpoint:
        """The checkpoint with this id or counter, as the frame's state at that record.

        Raises :class:`~playbooks.errors.CheckpointCorruptError` if it is missing or unreadable.
        """
        counter = checkpoint if isinstance(checkpoint, int) else parse_checkpoint_id(checkpoint)[1]
        records = await self.load_records()
        if counter not in records:
            raise CheckpointCorruptError(
                f"checkpoint {checkpoint_id(self.execution_id, counter)} is missing or unreadable"
            )
        return self._checkpoint(counter)

    def _checkpoint(self, counter: int) -> Checkpoint:
        record = self._records[counter]
        state = self.frame_state(record.frame_id, upto=counter)
        assert state is not None
        return Checkpoint(checkpoint_id(self.execution_id, counter), counter, record.kind, state)

    def last_statement(self) -> str:
        """The source of the newest statement that ran, among the loaded records (``""`` if none)."""
        for counter in sorted(self._records, reverse=True):
            record = self._records[counter]
            if record.kind == "snapshot" and record.statement:
                return record.statement
        return ""

    def loaded_frame_ids(self) -> set[str]:
        """Frames with at least one loaded record."""
        return {r.frame_id for r in self._records.values() if r.kind != "state"}

    def frame_state(self, frame_id: str, *, upto: int | None = None) -> FrameState | None:
        """Rebuild ``frame_id`` from the loaded records (up to counter ``upto``), or ``None``.

        The newest snapshot whose variables all resolve is the base (a broken newer one is reported and
        skipped); the journal is every call record of the frame after it; the response is the
        snapshot's plus the text carried by the later records, as far as it is contiguous.
        """
        own = sorted(
            (r for c, r in self._records.items() if r.frame_id == frame_id and (upto is None or c <= upto)),
            key=lambda r: r.counter,
        )
        if not own:
            return None
        base: Record | None = None
        resolved: dict[str, bytes] = {}
        # A snapshot written during a replay does not cover the journal records before it that it
        # has not replayed: it is no base (see the module docstring, "Replay order").
        highest, uncovered = -1, set()
        for record in own:
            if record.kind == "snapshot" and highest >= record.next_seq:
                uncovered.add(record.counter)
            elif record.kind in ("intent", "result"):
                highest = max(highest, _root_number(record.seq))
        for record in reversed(own):
            if record.kind != "snapshot" or record.counter in uncovered:
                continue
            try:
                resolved = self._resolve(record)
                snapshot_response = self._snapshot_response(record)
            except CheckpointCorruptError as exc:
                self._report(f"{exc}; falling back to an earlier snapshot of frame {frame_id!r}")
                continue
            base = record
            break
        if base is None:
            self._report(
                f"frame {frame_id!r} of execution {self.execution_id!r} has no readable snapshot: "
                f"it starts again from the beginning of its code, with the journal of its calls"
            )
        start = base.counter if base is not None else 0
        next_seq = base.next_seq if base is not None else 0
        response = snapshot_response if base is not None else ""
        journal: dict[str, JournalEntry] = {}
        for record in own:
            if record.counter <= start:
                continue
            if record.response_start <= len(response):
                response = response[: record.response_start] + record.response_text
            if record.kind == "snapshot" or _root_number(record.seq) < next_seq:
                continue
            finished = record.kind == "result"
            if not finished and record.seq in journal:  # another attempt (a retry, or a resumed call)
                earlier = journal[record.seq]
                journal[record.seq] = dataclasses.replace(earlier, attempts=earlier.attempts + 1)
                continue
            journal[record.seq] = JournalEntry(
                record.seq, record.name, record.fingerprint, record.display, record.key,
                record.outcome if finished else None, record.value, record.counter,
                record.mutations, record.sync,
            )
        last = own[-1]
        return FrameState(
            isolated=any(r.counter in self._isolated for r in own),
            execution_id=self.execution_id,
            frame_id=frame_id,
            agent_id=last.agent_id,
            call_stack=last.call_stack,
            snapshot_counter=start,
            timestamp=last.timestamp,
            response=response,
            executed_offset=base.executed_offset if base is not None else 0,
            statement=base.statement if base is not None else "",
            next_seq=next_seq,
            statements_executed=base.statements_executed if base is not None else 0,
            variables=dict(base.variables) if base is not None else {},
            resolved=resolved,
            skipped=base.skipped if base is not None else (),
            journal=journal,
            done=base.done if base is not None else False,
            error=base.error if base is not None else None,
        )

    def _snapshot_response(self, snapshot: Record) -> str:
        """A snapshot's whole response: its own text, after its host snapshot's prefix if it has one."""
        if snapshot.response_host is None:
            return snapshot.response_text
        host = self._records.get(snapshot.response_host)
        if host is None or host.response_host is not None or len(host.response_text) < snapshot.response_start:
            raise CheckpointCorruptError(
                f"checkpoint {checkpoint_id(self.execution_id, snapshot.counter)} continues the response "
                f"of checkpoint {checkpoint_id(self.execution_id, snapshot.response_host)}, which is "
                f"missing or unreadable"
            )
        return host.response_text[: snapshot.response_start] + snapshot.response_text

    def _resolve(self, snapshot: Record) -> dict[str, bytes]:
        resolved: dict[str, bytes] = {}
        for name, var in snapshot.variables.items():
            data = var.data
            if data is None:
                host = self._records.get(var.host) if var.host is not None else None
                hosted: StoredVar | None = host.variables.get(name) if host is not None else None
                data = hosted.data if hosted is not None else None
                if data is None or hosted is None or hosted.digest != var.digest:
                    raise CheckpointCorruptError(
                        f"checkpoint {checkpoint_id(self.execution_id, snapshot.counter)} refers to "
                        f"variable {name!r} in checkpoint "
                        f"{checkpoint_id(self.execution_id, var.host or 0)}, which is missing or unreadable"
                    )
            resolved[name] = data
        return resolved

