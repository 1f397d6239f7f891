"""A checkpoint provider backed by PostgreSQL: one store for runs on many machines.

Theory of operation
-------------------
*Storage.* Tables ``playbooks_checkpoints`` and ``playbooks_journal`` hold ``(execution_id, counter,
data bytea)`` under the primary key ``(execution_id, counter)``; ``playbooks_heads`` holds one head per
execution. Every write is one statement in autocommit mode (an upsert, so a write retried after a lost
connection lands once), hence atomic. The journal is a table of its own: an append is an ``INSERT``, and
pruning deletes rows, never rewrites anything.

*Durability.* A commit is durable when PostgreSQL has flushed its WAL record: that is the "fsync" of
this provider. A save with ``sync=True`` commits with ``synchronous_commit = on``. Saves with
``sync=False`` (journal entries, heads) go through connections whose ``synchronous_commit`` is ``off``:
the server has them (they survive the death of this process) and flushes them within a few hundred
milliseconds, and :meth:`sync` makes them durable at once with one synchronous commit of an empty
transaction (the WAL is flushed in order, so that flush covers every earlier commit). A durable call
therefore costs one WAL flush, like one ``fdatasync`` of the filesystem provider's journal.

*Leases, not process locks.* A lock here is a lease: ``playbooks_leases(execution_id, generation,
owner, expires_at)``. Taking it succeeds when nobody holds it or the holder's lease expired, and adds
one to ``generation``. While held, a thread of the provider renews it every third of
``lease_seconds``; a holder that stops renewing (killed, its machine gone, paused with SIGSTOP, cut off
from the database) loses it once ``lease_seconds`` have passed, and another worker may take it. Time is
the server's clock (``now()``), so the workers' clocks do not matter. A lease row is never deleted
(releasing it clears the owner), so generations only grow.

*Fencing.* Every write of an execution whose lease this provider holds carries the lease's generation:
the statement takes the lease row ``FOR SHARE`` and writes only if the generation is still ours.
A takeover updates that row, so it waits for a write in flight and every later write of the old holder
is refused with :class:`~playbooks.errors.LeaseLostError`: a worker that wakes up after its lease was
taken cannot overwrite what the new owner writes. Writes of an execution whose lease this provider
does not hold (a tool deleting a finished run) are not fenced.

*Connections.* psycopg 3 with two small ``psycopg_pool`` pools per process and database (synchronous
commits and the others), opened on first use and shared by every provider of that database. Calls run in a worker thread (``anyio.to_thread``), so the provider works under
asyncio and trio alike. When the server cannot be reached (a restart, a failover), a call retries with
backoff for up to ``wait_seconds`` before it raises; every statement is safe to run twice.

The DSN is a libpq connection string or URI (``postgresql://user@host/db``); an empty one uses the
``PG*`` environment variables (``PGHOST``, ``PGPASSWORD``...). Passwords belong in ``PGPASSWORD`` or
``~/.pgpass``, not in ``playbooks.toml``; messages never show one.
"""

from __future__ import annotations

import atexit
import functools
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Collection, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import anyio.to_thread

from playbooks.checkpoints.provider import (
    CheckpointProvider,
    ExecutionLock,
    checkpoint_id,
    split_checkpoint_id,
)
from playbooks.errors import (
    CheckpointError,
    CheckpointWriteError,
    ExecutionLockedError,
    LeaseLostError,
    StoragePathError,
)

if TYPE_CHECKING:
    import psycopg
    from psycopg_pool import ConnectionPool

__all__ = ("PostgresCheckpointProvider", "redact_dsn")

_log = logging.getLogger(__name__)
_T = TypeVar("_T")

SCHEMA_VERSION = 1
"""The newest schema this provider creates; a database at a newer one is refused."""

_MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        """CREATE TABLE playbooks_checkpoints (
            execution_id text NOT NULL,
            counter bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (execution_id, counter))""",
        """CREATE TABLE playbooks_journal (
            execution_id text NOT NULL,
            counter bigint NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (execution_id, counter))""",
        """CREATE TABLE playbooks_heads (
            execution_id text PRIMARY KEY,
            data bytea NOT NULL)""",
        """CREATE TABLE playbooks_leases (
            execution_id text PRIMARY KEY,
            generation bigint NOT NULL,
            owner text,
            expires_at timestamptz NOT NULL,
            acquired_at timestamptz NOT NULL)""",
        """CREATE TABLE playbooks_runs (
            run_id text PRIMARY KEY,
            record jsonb NOT NULL,
            status text NOT NULL,
            queued boolean NOT NULL DEFAULT false,
            submitted_at timestamptz NOT NULL DEFAULT now(),
            worker text NOT NULL DEFAULT '',
            claimed_until timestamptz)""",
        "CREATE INDEX playbooks_runs_queue ON playbooks_runs (submitted_at) WHERE queued",
    ),
}
"""Schema version -> the statements that bring a database from the version before to it. Applied in
one transaction under an advisory lock, so workers starting together migrate once."""

_ENSURED: set[str] = set()  # the DSNs whose schema this process checked
_MIGRATION_LOCK = 0x706C6179  # "play": the advisory lock key serializing migrations
_MAX_COUNTER = 2**63 - 1


def redact_dsn(dsn: str) -> str:
    """``dsn`` without its password, for messages: ``host=db user=app dbname=runs``."""
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    try:
        params = conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - a malformed DSN: say nothing of its content
        return "<malformed connection string>"
    params.pop("password", None)
    return make_conninfo("", **{k: v for k, v in params.items() if v is not None}) or "<PG* environment>"


def ensure_schema(dsn: str) -> None:
    """Create or upgrade the playbooks tables of ``dsn``'s database, in one transaction under an
    advisory lock (workers starting together migrate once); refuse a schema newer than this code.
    Done once per process and database."""
    import psycopg

    if dsn in _ENSURED:
        return

    try:
        with psycopg.connect(dsn, autocommit=False, connect_timeout=10) as conn:
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            conn.execute("CREATE TABLE IF NOT EXISTS playbooks_schema (version integer NOT NULL)")
            row = conn.execute("SELECT max(version) FROM playbooks_schema").fetchone()
            version = (row[0] if row else None) or 0
            if version > SCHEMA_VERSION:
                raise CheckpointError(
                    f"the playbooks tables in {redact_dsn(dsn)} are at schema version {version}, newer "
                    f"than this playbooks understands ({SCHEMA_VERSION}); upgrade playbooks"
                )
            for target in range(version + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[target]:
                    conn.execute(statement)
                conn.execute("INSERT INTO playbooks_schema (version) VALUES (%s)", (target,))
            conn.commit()
        _ENSURED.add(dsn)
    except psycopg.OperationalError as exc:
        raise StoragePathError(
            f"cannot reach PostgreSQL at {redact_dsn(dsn)}: {_first_line(exc)}; check durability.dsn (or "
            "PLAYBOOKS_DURABILITY_DSN, or the PG* variables) and that the server runs"
        ) from exc
    except psycopg.Error as exc:
        raise StoragePathError(
            f"cannot create the playbooks tables in {redact_dsn(dsn)}: {_first_line(exc)}; the database "
            "user needs the right to create tables (or run playbooks once as one that has it)"
        ) from exc


_POOLS: dict[tuple[str, bool], ConnectionPool[Any]] = {}
_POOLS_GUARD = threading.Lock()


def _shared_pool(dsn: str, synchronous: bool) -> ConnectionPool[Any]:
    """The process's pool of connections to ``dsn`` that commit synchronously (or not), opened on
    first use and shared by every provider of that database: a command that opens a manager per run
    opens no connection per run. Closed when the process exits."""
    pool = _POOLS.get((dsn, synchronous))
    if pool is not None:
        return pool
    from psycopg_pool import ConnectionPool

    with _POOLS_GUARD:
        pool = _POOLS.get((dsn, synchronous))
        if pool is None:
            setting = "on" if synchronous else "off"
            pool = ConnectionPool(
                dsn,
                min_size=1,
                max_size=4,
                kwargs={
                    "autocommit": True,
                    "options": f"-c synchronous_commit={setting}",
                    "application_name": "playbooks",
                    "connect_timeout": 5,
                },
                open=False,
                name=f"playbooks-{setting}",
            )
            pool.open(wait=False)
            if not _POOLS:
                atexit.register(_close_pools)
            _POOLS[(dsn, synchronous)] = pool
    return pool


def _close_pools() -> None:
    with _POOLS_GUARD:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.close(timeout=1.0)


def _split(cid: str) -> tuple[str, int]:
    """Parse ``cid``; reject non-canonical spellings (``x_ckpt_01``) and counters a bigint cannot hold."""
    execution_id, counter = split_checkpoint_id(cid, max_counter=_MAX_COUNTER)
    if "\0" in execution_id:
        raise ValueError(f"an execution id cannot hold a NUL character: {cid!r}")
    return execution_id, counter


class _Lease(ExecutionLock):
    """A lease this provider holds: its generation fences every write of the execution."""

    def __init__(self, execution_id: str, owner: PostgresCheckpointProvider, generation: int, token: str) -> None:
        self.execution_id = execution_id
        self.generation = generation
        self.token = token
        self._owner = owner
        self._released = False

    @property
    def lost(self) -> bool:
        """Whether a renewal found the lease taken over by another worker."""
        return self._owner._lost.get(self.execution_id) == self.generation

    async def renew(self) -> None:
        """Extend the lease now (the provider's thread does so every third of ``lease_seconds``);
        raise :class:`LeaseLostError` if another worker took it."""
        if not await self._owner._call(self._owner._renew_one, self):
            raise self._owner._lost_error(self.execution_id)

    async def release(self) -> None:
        """Give the lease up (others may take it at once); idempotent."""
        if self._released:
            return
        self._released = True
        await self._owner._release(self)


class PostgresCheckpointProvider(CheckpointProvider):
    """Records, journal, heads, leases and run records in one PostgreSQL database.

    ``dsn``: a libpq connection string or URI ("" uses the ``PG*`` environment variables).
    ``lease_seconds``: how long a lease outlives its last renewal. ``wait_seconds``: how long a call
    keeps retrying while the server cannot be reached. ``worker``: a name for this process in lease
    owners and messages (default ``host:pid``).
    """

    def __init__(
        self,
        dsn: str | None = None,
        *,
        lease_seconds: float = 30.0,
        wait_seconds: float = 120.0,
        worker: str | None = None,
    ) -> None:
        if dsn is None:  # created by name with no arguments: the setting's environment variable
            dsn = os.environ.get("PLAYBOOKS_DURABILITY_DSN", "")
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be > 0")
        self.dsn = dsn
        self.lease_seconds = float(lease_seconds)
        self.wait_seconds = float(wait_seconds)
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        self._migrated = False
        self._unsynced = False
        self._leases: dict[str, _Lease] = {}
        self._lost: dict[str, int] = {}
        self._pending_heads: dict[str, bytes] = {}
        self._renewer: threading.Thread | None = None
        self._renewer_guard = threading.Lock()
        self._stop_renewing = threading.Event()

    def __repr__(self) -> str:
        return f"PostgresCheckpointProvider({redact_dsn(self.dsn)!r})"

    # ----------------------------------------------------------------- connections

    def _pool(self, synchronous: bool) -> ConnectionPool[Any]:
        return _shared_pool(self.dsn, synchronous)

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T], *, synchronous: bool = True) -> _T:
        """Run ``work`` on a pooled connection (in the calling thread). Once the database was reached,
        a lost connection is retried with backoff for up to ``wait_seconds`` (a restart, a failover);
        a first connection that fails raises at once (most likely a wrong DSN)."""
        import psycopg
        from psycopg_pool import PoolTimeout

        if not self._migrated:
            self._migrate()
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.05
        while True:
            try:
                with self._pool(synchronous).connection(timeout=min(5.0, self.wait_seconds)) as conn:
                    return work(conn)
            except (psycopg.OperationalError, PoolTimeout) as exc:
                if isinstance(exc, psycopg.errors.QueryCanceled) or time.monotonic() + delay > deadline:
                    raise CheckpointWriteError(
                        f"cannot reach PostgreSQL ({redact_dsn(self.dsn)}) for {self.wait_seconds:g} s: "
                        f"{_first_line(exc)}; earlier checkpoints are intact"
                    ) from exc
                _log.warning("PostgreSQL unreachable (%s); retrying in %.2f s", _first_line(exc), delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    async def _call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` (blocking database work) in a worker thread."""
        return await anyio.to_thread.run_sync(functools.partial(fn, *args))

    def _migrate(self) -> None:
        """Create or upgrade the schema, once per provider."""
        ensure_schema(self.dsn)
        self._migrated = True

    async def check_writable(self) -> None:
        """Connect, and create or upgrade the tables."""
        await self._call(self._migrate)

    @property
    def schema_version(self) -> int:
        """The schema version this provider writes."""
        return SCHEMA_VERSION

    # ----------------------------------------------------------------- fencing

    def _write(self, execution_id: str, sql: str, params: Sequence[Any], synchronous: bool) -> int:
        """Run one write of ``execution_id`` (``sql``, whose ``%(fence)s`` is its guard), together with
        the execution's pending head if there is one; return the rows ``sql`` changed.

        When this provider holds the execution's lease, the statement writes only if the lease's
        generation is still current (``FOR SHARE`` on the lease row makes a takeover wait for it),
        else :class:`LeaseLostError`.
        """
        lease = self._leases.get(execution_id)
        head = self._pending_heads.pop(execution_id, None)
        parts: list[str] = []
        args: list[Any] = []
        guard = "true"
        if lease is not None:
            parts.append(
                "fence AS (SELECT 1 FROM playbooks_leases WHERE execution_id = %s AND generation = %s FOR SHARE)"
            )
            args += [execution_id, lease.generation]
            guard = "EXISTS (SELECT 1 FROM fence)"
        if sql:
            parts.append("w AS (" + sql.replace("%(fence)s", guard) + " RETURNING 1)")
            args += params
        if head is not None:
            parts.append(
                "h AS (INSERT INTO playbooks_heads (execution_id, data) SELECT %s, %s WHERE " + guard
                + " ON CONFLICT (execution_id) DO UPDATE SET data = EXCLUDED.data RETURNING 1)"
            )
            args += [execution_id, head]
        if not parts:
            return 0
        statement = (
            "WITH " + ", ".join(parts) + " SELECT "
            + ("(SELECT count(*) FROM fence)" if lease is not None else "1")
            + (", (SELECT count(*) FROM w)" if sql else ", 0")
        )

        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(statement, args).fetchone()
            assert row is not None
            if not row[0]:
                assert lease is not None
                self._lost[execution_id] = lease.generation
                raise self._lost_error(execution_id)
            return int(row[1])

        try:
            return self._run(work, synchronous=synchronous)
        except BaseException:
            if head is not None:  # not written: it goes with the next write, unless a newer one came
                self._pending_heads.setdefault(execution_id, head)
            raise

    def _lost_error(self, execution_id: str) -> LeaseLostError:
        return LeaseLostError(
            f"this process's lease on {execution_id!r} expired and another worker took the run over "
            f"(no renewal for {self.lease_seconds:g} s: paused, or cut off from the database); its "
            "writes are refused and it must stop. The new owner continues the run from its checkpoints."
        )

    # ----------------------------------------------------------------- records

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        execution_id, counter = _split(checkpoint_id)
        await self._upsert("playbooks_checkpoints", execution_id, counter, bytes(data), sync, checkpoint_id)

    async def _upsert(
        self, table: str, execution_id: str, counter: int, data: bytes, sync: bool, what: str
    ) -> None:
        sql = (
            f"INSERT INTO {table} (execution_id, counter, data) SELECT %s, %s, %s WHERE %(fence)s "
            "ON CONFLICT (execution_id, counter) DO UPDATE SET data = EXCLUDED.data"
        )
        import psycopg

        try:
            await self._call(self._write, execution_id, sql, (execution_id, counter, data), sync)
        except psycopg.Error as exc:  # not a lost connection (_run retries those): the server refused it
            raise CheckpointWriteError(
                f"cannot write {what!r} to PostgreSQL: {_first_line(exc)}; earlier checkpoints are intact"
            ) from exc
        if not sync:
            self._unsynced = True

    async def sync(self, execution_id: str) -> None:
        """One synchronous commit: the server flushes its WAL up to it, which makes every earlier
        ``sync=False`` write durable. The commit is the execution's pending head if it has one, else a
        transaction that only takes an id."""
        head_pending = execution_id in self._pending_heads
        if not (self._unsynced or head_pending):
            return
        self._unsynced = False
        try:
            if head_pending:
                await self._call(self._write, execution_id, "", (), True)
            else:
                await self._call(self._run, lambda conn: conn.execute("SELECT txid_current()"))
        except BaseException:
            self._unsynced = True
            raise

    async def load_checkpoint(self, checkpoint_id: str) -> bytes | None:
        execution_id, counter = _split(checkpoint_id)
        row = await self._read(
            "SELECT data FROM playbooks_checkpoints WHERE execution_id = %s AND counter = %s",
            (execution_id, counter),
        )
        return None if not row else bytes(row[0][0])

    async def list_checkpoints(self, execution_id: str) -> list[str]:
        rows = await self._read(
            "SELECT counter FROM playbooks_checkpoints WHERE execution_id = %s ORDER BY counter", (execution_id,)
        )
        return [checkpoint_id(execution_id, int(counter)) for (counter,) in rows]

    async def delete_checkpoint(self, checkpoint_id: str) -> bool:
        execution_id, counter = _split(checkpoint_id)
        sql = "DELETE FROM playbooks_checkpoints WHERE execution_id = %s AND counter = %s AND %(fence)s"
        return bool(await self._call(self._write, execution_id, sql, (execution_id, counter), False))

    async def list_executions(self) -> list[str]:
        rows = await self._read(
            "SELECT execution_id FROM playbooks_checkpoints UNION SELECT execution_id FROM playbooks_journal", ()
        )
        return sorted(execution_id for (execution_id,) in rows)

    async def _read(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        def work(conn: psycopg.Connection[Any]) -> list[tuple[Any, ...]]:
            return conn.execute(sql, params).fetchall()

        try:
            return await self._call(self._run, work)
        except CheckpointWriteError as exc:  # unreachable: a read error, in a reader's words
            raise CheckpointError(str(exc).replace("; earlier checkpoints are intact", "")) from exc.__cause__

    # ----------------------------------------------------------------- journal and head

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        if counter > _MAX_COUNTER or counter < 0:
            raise ValueError(f"journal counter out of range: {counter}")
        await self._upsert("playbooks_journal", execution_id, counter, bytes(data), False, f"journal {counter}")

    async def read_journal(self, execution_id: str) -> list[tuple[int, bytes]]:
        rows = await self._read(
            "SELECT counter, data FROM playbooks_journal WHERE execution_id = %s ORDER BY counter", (execution_id,)
        )
        return [(int(counter), bytes(data)) for counter, data in rows]

    async def drop_journal(self, execution_id: str, counters: Collection[int]) -> None:
        if not counters:
            return
        sql = "DELETE FROM playbooks_journal WHERE execution_id = %s AND counter = ANY(%s) AND %(fence)s"
        await self._call(self._write, execution_id, sql, (execution_id, list(counters)), False)

    async def write_head(self, execution_id: str, data: bytes) -> None:
        """Keep the head to write with the execution's next statement (a record, or the commit of
        :meth:`sync`): the manager rewrites it after every record, and a statement of its own each time
        would double the round trips of an await. A head not written yet when the process dies names
        an older record than the newest: the rollback check it serves then checks less, never wrongly."""
        self._pending_heads[execution_id] = bytes(data)

    async def read_head(self, execution_id: str) -> bytes | None:
        if execution_id in self._pending_heads:
            return self._pending_heads[execution_id]
        rows = await self._read("SELECT data FROM playbooks_heads WHERE execution_id = %s", (execution_id,))
        return bytes(rows[0][0]) if rows else None

    async def delete_execution(self, execution_id: str) -> int:
        """Delete the execution's records, journal and head under its lease (the lease row stays, so a
        later holder's generation is still above any earlier one)."""
        lock = await self.acquire_lock(execution_id)
        self._pending_heads.pop(execution_id, None)
        try:
            deleted = 0
            for table in ("playbooks_checkpoints", "playbooks_journal"):
                deleted += await self._call(
                    self._write, execution_id,
                    f"DELETE FROM {table} WHERE execution_id = %s AND %(fence)s", (execution_id,), True,
                )
            await self._call(
                self._write, execution_id,
                "DELETE FROM playbooks_heads WHERE execution_id = %s AND %(fence)s", (execution_id,), True,
            )
        finally:
            await lock.release()
        return deleted

    # ----------------------------------------------------------------- leases

    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        """Take the execution's lease, or raise :class:`ExecutionLockedError` naming its holder and when
        the lease ends if that holder stops renewing it."""
        if not execution_id:
            raise ValueError("execution id must not be empty")
        if "\0" in execution_id:
            raise ValueError("an execution id cannot hold a NUL character")
        if execution_id in self._leases:
            raise ExecutionLockedError(
                f"execution {execution_id!r} is locked: this process already holds its lease; release it first"
            )
        token = f"{self.worker}:{secrets.token_hex(4)}"
        generation = await self._call(self._acquire, execution_id, token)
        lease = _Lease(execution_id, self, generation, token)
        self._leases[execution_id] = lease
        self._lost.pop(execution_id, None)
        self._start_renewer()
        return lease

    def _acquire(self, execution_id: str, token: str) -> int:
        def work(conn: psycopg.Connection[Any]) -> int:
            row = conn.execute(
                """INSERT INTO playbooks_leases AS l (execution_id, generation, owner, expires_at, acquired_at)
                   VALUES (%(e)s, 1, %(o)s, now() + make_interval(secs => %(ttl)s), now())
                   ON CONFLICT (execution_id) DO UPDATE
                   SET generation = l.generation + 1, owner = EXCLUDED.owner,
                       expires_at = EXCLUDED.expires_at, acquired_at = EXCLUDED.acquired_at
                   WHERE l.owner IS NULL OR l.expires_at <= now()
                   RETURNING generation""",
                {"e": execution_id, "o": token, "ttl": self.lease_seconds},
            ).fetchone()
            if row is not None:
                return int(row[0])
            held = conn.execute(
                "SELECT generation, owner, expires_at, expires_at - now() FROM playbooks_leases "
                "WHERE execution_id = %s",
                (execution_id,),
            ).fetchone()
            if held is not None and held[1] == token:  # our own take, retried after a lost connection
                return int(held[0])
            who = "another worker"
            if held is not None:
                left = max(0.0, held[3].total_seconds())
                who = (
                    f"worker {held[1].rsplit(':', 1)[0]} holds its lease (generation {held[0]}; it ends "
                    f"{left:.1f} s from now unless renewed)"
                )
            raise ExecutionLockedError(
                f"execution {execution_id!r} is locked: {who}. A holder that stops renewing loses it "
                f"after {self.lease_seconds:g} s"
            )

        return self._run(work)

    def _renew_one(self, lease: _Lease) -> bool:
        renewed = self._renew([lease])
        return lease.execution_id in renewed

    def _renew(self, leases: Collection[_Lease]) -> set[str]:
        """Extend ``leases``; return the execution ids still ours (the others are marked lost)."""
        if not leases:
            return set()
        ids = [lease.execution_id for lease in leases]
        gens = [lease.generation for lease in leases]

        def work(conn: psycopg.Connection[Any]) -> set[str]:
            rows = conn.execute(
                """UPDATE playbooks_leases AS l SET expires_at = now() + make_interval(secs => %s)
                   FROM unnest(%s::text[], %s::bigint[]) AS mine(execution_id, generation)
                   WHERE l.execution_id = mine.execution_id AND l.generation = mine.generation
                     AND l.owner IS NOT NULL
                   RETURNING l.execution_id""",
                (self.lease_seconds, ids, gens),
            ).fetchall()
            return {r[0] for r in rows}

        kept = self._run(work)
        for lease in leases:
            if lease.execution_id not in kept:
                self._lost[lease.execution_id] = lease.generation
        return kept

    def _start_renewer(self) -> None:
        with self._renewer_guard:
            if self._renewer is not None:
                return
            self._stop_renewing.clear()
            self._renewer = threading.Thread(target=self._renew_loop, name="playbooks-lease-renewer", daemon=True)
            self._renewer.start()

    def _renew_loop(self) -> None:
        """Renew every held lease each third of ``lease_seconds``, until the provider closes or holds
        no lease any more (the next :meth:`acquire_lock` starts a new thread): a host that leaves
        providers open keeps no idle threads."""
        interval = self.lease_seconds / 3
        try:
            while not self._stop_renewing.wait(interval):
                with self._renewer_guard:
                    leases = list(self._leases.values())
                    if not leases:
                        return
                try:
                    self._renew(leases)
                except Exception as exc:  # noqa: BLE001 - the database away: the next round tries again
                    _log.warning("could not renew leases: %s", _first_line(exc))
        finally:
            with self._renewer_guard:
                if self._renewer is threading.current_thread():
                    self._renewer = None

    async def _release(self, lease: _Lease) -> None:
        if self._leases.get(lease.execution_id) is lease:
            del self._leases[lease.execution_id]

        def work(conn: psycopg.Connection[Any]) -> None:
            conn.execute(
                "UPDATE playbooks_leases SET owner = NULL, expires_at = now() "
                "WHERE execution_id = %s AND generation = %s",
                (lease.execution_id, lease.generation),
            )

        await self._call(self._run, work)

    async def close(self) -> None:
        """Write the heads still pending, release every lease still held and stop renewing. The
        connections stay in the process's pools for the next provider of the same database (they
        close when the process exits)."""
        try:
            for execution_id in list(self._pending_heads):
                try:
                    await self._call(self._write, execution_id, "", (), False)
                except CheckpointError as exc:  # a lost lease, the server gone: the head is only a check
                    _log.warning("could not write the head of %r: %s", execution_id, exc)
            self._pending_heads.clear()
            for lease in list(self._leases.values()):
                try:
                    await lease.release()
                except CheckpointError as exc:  # the server gone: the lease simply expires
                    _log.warning("could not release the lease of %r: %s", lease.execution_id, exc)
        finally:
            self._stop_renewing.set()
            renewer, self._renewer = self._renewer, None
            if renewer is not None:
                await anyio.to_thread.run_sync(renewer.join)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]
