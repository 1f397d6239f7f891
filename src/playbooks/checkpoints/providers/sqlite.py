"""A checkpoint provider backed by one SQLite file: the embedded choice for many runs on one machine.

Theory of operation
-------------------
*Storage.* Table ``checkpoints(execution_id, counter, data)`` with primary key ``(execution_id,
counter)``; each save is one ``INSERT OR REPLACE`` statement in autocommit mode, so it is atomic. The
database runs in WAL mode: readers never block the writer, and a commit is one append to the ``-wal``
file. An execution's head is the row ``head:{execution_id}`` of table ``meta``, updated in place (an
``UPDATE`` dirties the row's page only). The manager hands over the head that names the record it is
about to write (:meth:`stage_head`); record and head are then one transaction, one commit: a commit
costs its locks and its WAL frames, so a record with its head costs one commit of three frames where
the two apart cost two commits of four. Journal entries are records; dropping them is one transaction.

*Page size.* A database this provider creates has 2 KiB pages (SQLite's default is 4 KiB; a database
made otherwise keeps its own). A commit appends every page it changed to the WAL (a record with its
head changes three to six: table and index leaves, the head's row, the free list when pruned pages
are reused), and the ``fdatasync`` of a growing WAL pays for the blocks it allocates. Measured on
ext4 with ``benchmarks/bench_checkpoint.py``'s awaits: 31 KB of WAL per await with 4 KiB pages, 21 KB
with 2 KiB, 18 KB with 1 KiB, and the fdatasync 228, 183 and 172 us (medians of five runs); but a
record of ~600 bytes fills a 1 KiB page alone, so 1 KiB pages take twice the frames (and ``pwrite``
calls) of 2 KiB for a little less. A record bigger than a page spans more pages; such records are rare
beside journal entries.

*Durability.* In WAL mode SQLite's ``synchronous`` setting decides whether a commit fsyncs the WAL.
A save with ``sync=True`` runs with ``PRAGMA synchronous=FULL``: the WAL is fsynced at commit, so the
record is on stable storage when the call returns. A save with ``sync=False`` runs with
``synchronous=NORMAL``: the commit is written to the WAL but not fsynced, so it survives the death of the
process (it is in the OS) but not necessarily a power failure. The WAL is an append-only file replayed in
order, so the fsync of a later ``FULL`` commit also makes every earlier ``NORMAL`` commit durable; that
is how a ``sync=True`` save covers the ``sync=False`` records before it. :meth:`sync` makes them
durable without a commit of its own: one ``fdatasync`` of the ``-wal`` file, which is what a ``FULL``
commit would do after writing its own frame (a WAL checkpoint, which copies the WAL into the main file,
fsyncs the WAL before and the main file after, so commits it moved are durable too). Switching the
pragma costs no I/O and is done only when the mode changes.

*Locks.* Whether an execution's lock is held is decided by the kernel, never by a PID: the holder
keeps ``flock(LOCK_EX)`` on ``{db}.locks/{sha256(execution_id)[:32]}.lock`` (folder 0700, file 0600)
for as long as it holds the lock, and the kernel drops it when the process dies, however it dies
(``kill -9``, OOM, a container restart where it was PID 1; a killed process that nobody has reaped yet
holds nothing either). A lock is taken over iff that ``flock`` can be taken. The lock file is never
deleted (unlinking a lock file races with a process that has just opened it). ``flock`` binds every
process of one kernel, which is all a WAL database can be shared by anyway (WAL needs shared memory);
on NFS Linux maps it to the server's byte-range locks.
Table ``locks(execution_id, pid, hostname, acquired_at, process_token)`` is metadata for messages only:
who holds the lock and since when. The holder writes its row after taking the ``flock`` and deletes it
before giving the ``flock`` back; a row left by a killed holder is replaced (with a logged warning) by the
next one that takes the ``flock``. ``process_token`` is no longer written (it kept the PID-based check
of earlier versions) and stays in the table so their databases open unchanged. An in-memory database
(``":memory:"``) is private to its provider, so its row alone decides.

*Threads and blocking.* One connection per provider, opened lazily on first use and used from the
thread that opened it (the event loop's thread). Statements run inline: SQLite calls for records of
ordinary size take microseconds plus the fsync, and a thread hop would cost more than it saves.
Writers in other processes are waited for up to ``timeout`` seconds.

The file and its ``-wal``/``-shm`` companions are created with mode 0600 (SQLite gives the companions
the main file's mode), and a missing parent folder with mode 0700.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import socket
import sqlite3
import time
from collections.abc import Callable, Collection, Iterator
from contextlib import contextmanager

from playbooks.checkpoints.provider import (
    CheckpointProvider,
    ExecutionLock,
    checkpoint_id,
    split_checkpoint_id,
)
from playbooks.checkpoints.providers._sync import DIR_FLAGS, fsync_path
from playbooks.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointWriteError,
    ExecutionLockedError,
    StoragePathError,
)

__all__ = ("SQLiteCheckpointProvider",)

_log = logging.getLogger(__name__)

_SCHEMA_VERSION = 1
_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS checkpoints (
        execution_id TEXT NOT NULL,
        counter INTEGER NOT NULL,
        data BLOB NOT NULL,
        PRIMARY KEY (execution_id, counter)
    )""",
    """CREATE TABLE IF NOT EXISTS locks (
        execution_id TEXT PRIMARY KEY,
        pid INTEGER NOT NULL,
        hostname TEXT NOT NULL,
        acquired_at REAL NOT NULL,
        process_token TEXT
    )""",
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value)",
)
_PAGE_SIZE = 2048
_MAX_COUNTER = 2**63 - 1  # SQLite INTEGER is a signed 64-bit value
_SAVE = "INSERT OR REPLACE INTO checkpoints (execution_id, counter, data) VALUES (?, ?, ?)"
_UPDATE_HEAD = "UPDATE meta SET value = ? WHERE key = ?"
_INSERT_HEAD = "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)"
_DELETE = "DELETE FROM checkpoints WHERE execution_id = ? AND counter = ?"

_SQLITE_WORDS = {
    "SQLITE_FULL": "disk full",
    "SQLITE_READONLY": "the database is read-only (check the file's permissions)",
    "SQLITE_PERM": "permission denied",
    "SQLITE_CANTOPEN": "cannot open the database file (missing folder or permission denied)",
    "SQLITE_IOERR": "I/O error from the storage device",
    "SQLITE_BUSY": "another process held the database's write lock longer than the timeout",
    "SQLITE_LOCKED": "the database is locked by another connection of this process",
    "SQLITE_CORRUPT": "the database file is corrupt",
    "SQLITE_NOTADB": "the file is not a SQLite database",
}


def _describe(exc: BaseException) -> str:
    """Say what went wrong in plain words, with SQLite's error name: 'disk full (SQLITE_FULL: ...)'."""
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc} (errno {exc.errno})"
    name = getattr(exc, "sqlite_errorname", None)
    if not isinstance(name, str):
        return str(exc)
    base = "_".join(name.split("_")[:2])  # SQLITE_IOERR_FSYNC -> SQLITE_IOERR
    words = _SQLITE_WORDS.get(base)
    return f"{words} ({name}: {exc})" if words else f"{exc} ({name})"


def _is_corruption(exc: sqlite3.Error) -> bool:
    name = getattr(exc, "sqlite_errorname", "")
    return isinstance(name, str) and name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))


@contextmanager
def _transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """One explicit transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``: the write lock taken at once, so
    two writers never deadlock upgrading), rolled back if its block fails."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _put_head(conn: sqlite3.Connection, execution_id: str, data: bytes) -> None:
    """Write ``execution_id``'s head: an ``UPDATE`` of its row in place when there is one (it dirties
    the row's page only, where a replace would move the row and dirty the key's index page too)."""
    key = f"head:{execution_id}"
    if conn.execute(_UPDATE_HEAD, (data, key)).rowcount == 0:
        conn.execute(_INSERT_HEAD, (key, data))


def _split(cid: str) -> tuple[str, int]:
    """Parse ``cid``; reject non-canonical spellings (``x_ckpt_01``) and counters SQLite cannot store."""
    return split_checkpoint_id(cid, max_counter=_MAX_COUNTER)


_HELD: dict[str, set[_SQLiteLock]] = {}
"""Database path -> the locks this process holds on it, to tell "this process holds it" in a message."""
_LOCKS_SUFFIX = ".locks"  # {db}.locks/: one flock file per execution, beside the database
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)


def lock_file_name(execution_id: str) -> str:
    """The name of ``execution_id``'s flock file in ``{db}.locks``: a hash, so any id makes a safe name."""
    return hashlib.sha256(execution_id.encode("utf-8", "surrogatepass")).hexdigest()[:32] + ".lock"


class _SQLiteLock(ExecutionLock):
    """An execution's lock held by this process: an open descriptor holding ``flock(LOCK_EX)`` on the
    execution's lock file (``-1`` for an in-memory database), and the ``locks`` row that names us."""

    def __init__(
        self, execution_id: str, owner: SQLiteCheckpointProvider, acquired_at: float, fd: int
    ) -> None:
        self.execution_id = execution_id
        self._owner = owner
        self._acquired_at = acquired_at
        self._fd = fd
        self._released = False

    async def release(self) -> None:
        """Delete our row, then give the ``flock`` back (in that order, so the next holder's row is
        never deleted by us); idempotent."""
        if self._released:
            return
        self._released = True
        try:
            self._owner._release(self)
        finally:
            if self._fd >= 0:
                fd, self._fd = self._fd, -1
                try:
                    # Explicit unlock: a forked child sharing the descriptor would otherwise keep it.
                    fcntl.flock(fd, fcntl.LOCK_UN)
                finally:
                    os.close(fd)


class SQLiteCheckpointProvider(CheckpointProvider):
    """Records in one SQLite database file; see the module docstring for durability and locking.

    ``timeout`` is how long (seconds) a write waits for another process's write to finish.
    """

    completes_without_suspending = True

    def __init__(
        self,
        path: str | os.PathLike[str] = ".checkpoints/checkpoints.sqlite3",
        *,
        timeout: float = 10.0,
    ) -> None:
        raw = os.fspath(path)
        if "\0" in raw:
            raise StoragePathError(f"storage path {raw!r} contains a NUL byte, which no path can hold")
        self._path = raw if raw == ":memory:" else os.path.abspath(raw)
        self._timeout = timeout
        self._conn: sqlite3.Connection | None = None
        self._synchronous = ""
        self._unsynced = False  # a sync=False commit has not been made durable yet
        self._wal = False  # the database is in WAL mode (known once opened)
        self._wal_named = False  # the folder was fsynced since the WAL file exists
        self._locks: set[_SQLiteLock] = set()
        self._hostname = socket.gethostname()
        self._staged: tuple[str, bytes] | None = None  # the head to write with the next record (stage_head)

    @property
    def path(self) -> str:
        """The absolute path of the database file."""
        return self._path

    def _connection(self) -> sqlite3.Connection:
        """Return the connection, opening and initialising the database on first use."""
        if self._conn is None:
            self._conn = self._open()
        return self._conn

    def _open(self) -> sqlite3.Connection:
        if self._path != ":memory:":
            self._create_file()
        conn = sqlite3.connect(self._path, timeout=self._timeout, isolation_level=None)
        try:
            # A new database gets small pages (an existing one keeps its own): see "Page size" above.
            conn.execute(f"PRAGMA page_size={_PAGE_SIZE}")
            (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
            self._wal = mode == "wal"
            if mode != "wal" and self._path != ":memory:":
                _log.warning(
                    "checkpoint database %s cannot use WAL mode (got %r); writes will block readers",
                    self._path,
                    mode,
                )
            conn.execute("PRAGMA synchronous=NORMAL")
            self._synchronous = "NORMAL"
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            if version > _SCHEMA_VERSION:
                raise CheckpointError(
                    f"checkpoint database {self._path} has schema version {version}, newer than this "
                    f"playbooks understands ({_SCHEMA_VERSION}); upgrade playbooks"
                )
            if version < _SCHEMA_VERSION:
                # Statement by statement (executescript would commit the transaction first), so that
                # two processes creating the same database do not interleave.
                with _transaction(conn):
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _create_file(self) -> None:
        """Create the database file with mode 0600 (and its folder with 0700) before SQLite opens it."""
        folder = os.path.dirname(self._path)
        os.makedirs(folder, mode=0o700, exist_ok=True)
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return
        os.close(fd)
        fsync_path(folder, DIR_FLAGS)  # the new file's name must survive a power failure too

    async def check_writable(self) -> None:
        """Open (creating if needed) the database and check this process can write it."""
        try:
            conn = self._connection()
            conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('writable', 1)")
        except (sqlite3.Error, OSError) as exc:
            raise StoragePathError(
                f"cannot store checkpoints in {self._path}: {_describe(exc)}; choose another "
                "durability.storage_path or fix its permissions"
            ) from exc

    def _set_synchronous(self, conn: sqlite3.Connection, mode: str) -> None:
        if self._synchronous != mode:
            conn.execute(f"PRAGMA synchronous={mode}")
            self._synchronous = mode

    def _read_error(self, exc: sqlite3.Error | OSError) -> CheckpointError:
        message = f"cannot read checkpoint database {self._path}: {_describe(exc)}"
        if isinstance(exc, sqlite3.Error) and _is_corruption(exc):
            return CheckpointCorruptError(message)
        return CheckpointError(message)

    def stage_head(self, execution_id: str, data: bytes) -> bool:
        """Take the head to write in the transaction of the execution's next record (one commit)."""
        self._staged = (execution_id, bytes(data))
        return True

    def _take_staged(self, execution_id: str) -> bytes | None:
        """The head staged for ``execution_id``'s next record, if any; a staged head is used once."""
        staged, self._staged = self._staged, None
        return staged[1] if staged is not None and staged[0] == execution_id else None

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        staged, self._staged = self._staged, None  # consumed even by a write that fails
        execution_id, counter = _split(checkpoint_id)
        head = staged[1] if staged is not None and staged[0] == execution_id else None
        self._save(execution_id, counter, data, sync=sync, head=head)

    def _save(self, execution_id: str, counter: int, data: bytes, *, sync: bool, head: bytes | None) -> None:
        """Store one record, and with it the execution's ``head`` if given: one transaction, one commit
        (fsynced iff ``sync``)."""
        try:
            conn = self._connection()
            self._set_synchronous(conn, "FULL" if sync else "NORMAL")
            if head is None:
                conn.execute(_SAVE, (execution_id, counter, data))
            else:
                with _transaction(conn):
                    conn.execute(_SAVE, (execution_id, counter, data))
                    _put_head(conn, execution_id, head)
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointWriteError(
                f"cannot write checkpoint {checkpoint_id(execution_id, counter)!r} to {self._path}: "
                f"{_describe(exc)}; earlier checkpoints are intact"
            ) from exc
        self._unsynced = not sync

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        """A journal entry is a record (unsynced), written with the head staged for it if any."""
        head = self._take_staged(execution_id)
        _split(checkpoint_id(execution_id, counter))  # a counter SQLite can store
        self._save(execution_id, counter, data, sync=False, head=head)

    def prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        head = self._take_staged(execution_id)
        _split(checkpoint_id(execution_id, counter))
        return lambda: self._save(execution_id, counter, data, sync=False, head=head)

    async def drop_journal(self, execution_id: str, counters: Collection[int]) -> None:
        """Delete these journal entries (records) in one transaction: one commit, not one per entry."""
        rows = [(execution_id, counter) for counter in counters]
        if not rows:
            return
        try:
            conn = self._connection()
            with _transaction(conn):
                conn.executemany(_DELETE, rows)
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointWriteError(
                f"cannot delete {len(rows)} journal entries of {execution_id!r} from {self._path}: "
                f"{_describe(exc)}"
            ) from exc

    async def sync(self, execution_id: str) -> None:
        """Make every ``sync=False`` save of this provider durable: one ``fdatasync`` of the WAL, which
        holds every commit since the last WAL checkpoint (and a checkpoint syncs the database file
        itself). Without WAL (a file system that cannot share memory), one fsynced commit."""
        if not self._unsynced:
            return
        try:
            conn = self._connection()
            if self._path == ":memory:":
                pass
            elif self._wal:
                fsync_path(self._path + "-wal", data_only=True)
                if not self._wal_named:  # the WAL's name, once, like the database file's
                    fsync_path(os.path.dirname(self._path), DIR_FLAGS, data_only=True)
                    self._wal_named = True
            else:
                self._set_synchronous(conn, "FULL")
                conn.execute("INSERT OR REPLACE INTO meta (key, value) VALUES ('last_sync', ?)", (time.time(),))
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointWriteError(
                f"cannot flush checkpoints of {execution_id!r} in {self._path}: {_describe(exc)}"
            ) from exc
        self._unsynced = False

    async def write_head(self, execution_id: str, data: bytes) -> None:
        """The head lives in the ``meta`` table (key ``head:{execution_id}``), not among the records."""
        try:
            conn = self._connection()
            self._set_synchronous(conn, "NORMAL")
            _put_head(conn, execution_id, data)
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointWriteError(
                f"cannot write the head of {execution_id!r} to {self._path}: {_describe(exc)}"
            ) from exc
        self._unsynced = True

    async def read_head(self, execution_id: str) -> bytes | None:
        try:
            row = (
                self._connection()
                .execute("SELECT value FROM meta WHERE key = ?", (f"head:{execution_id}",))
                .fetchone()
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._read_error(exc) from exc
        return None if row is None or not isinstance(row[0], bytes) else bytes(row[0])

    async def load_checkpoint(self, checkpoint_id: str) -> bytes | None:
        execution_id, counter = _split(checkpoint_id)
        try:
            row = (
                self._connection()
                .execute(
                    "SELECT data FROM checkpoints WHERE execution_id = ? AND counter = ?",
                    (execution_id, counter),
                )
                .fetchone()
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._read_error(exc) from exc
        return None if row is None else bytes(row[0])

    async def list_checkpoints(self, execution_id: str) -> list[str]:
        try:
            rows = (
                self._connection()
                .execute(
                    "SELECT counter FROM checkpoints WHERE execution_id = ? ORDER BY counter",
                    (execution_id,),
                )
                .fetchall()
            )
        except (sqlite3.Error, OSError) as exc:
            raise self._read_error(exc) from exc
        return [checkpoint_id(execution_id, counter) for (counter,) in rows]

    async def delete_checkpoint(self, checkpoint_id: str) -> bool:
        execution_id, counter = _split(checkpoint_id)
        try:
            cursor = self._connection().execute(
                "DELETE FROM checkpoints WHERE execution_id = ? AND counter = ?",
                (execution_id, counter),
            )
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointWriteError(
                f"cannot delete checkpoint {checkpoint_id!r} from {self._path}: {_describe(exc)}"
            ) from exc
        return cursor.rowcount > 0

    async def list_executions(self) -> list[str]:
        try:
            rows = self._connection().execute("SELECT DISTINCT execution_id FROM checkpoints").fetchall()
        except (sqlite3.Error, OSError) as exc:
            raise self._read_error(exc) from exc
        return sorted(execution_id for (execution_id,) in rows)

    @property
    def locks_path(self) -> str | None:
        """The folder of the execution lock files (``{db}.locks``); ``None`` for an in-memory database."""
        return None if self._path == ":memory:" else self._path + _LOCKS_SUFFIX

    def _holder(self, execution_id: str) -> str:
        """Who the ``locks`` row says holds ``execution_id``'s lock, for a message (never for a decision)."""
        try:
            row = (
                self._connection()
                .execute(
                    "SELECT pid, hostname, acquired_at FROM locks WHERE execution_id = ?", (execution_id,)
                )
                .fetchone()
            )
        except (sqlite3.Error, OSError):
            row = None
        if row is None:
            return "another process (not yet recorded)"
        pid, hostname, acquired_at = row
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(acquired_at))
        host = "this host" if hostname == self._hostname else f"host {hostname!r}"
        return f"process {pid} on {host} (since {since})"

    def _flock(self, execution_id: str) -> int:
        """Open ``execution_id``'s lock file and take ``flock(LOCK_EX | LOCK_NB)`` on it.

        Raises :class:`ExecutionLockedError` when another open lock (another process, or another
        provider or lock of this process) holds it, naming the holder from the ``locks`` row.
        """
        folder = self.locks_path
        assert folder is not None
        try:
            if not os.path.isdir(folder):
                os.makedirs(folder, mode=0o700, exist_ok=True)
                os.chmod(folder, 0o700)  # whatever the umask
        except OSError as exc:
            raise StoragePathError(
                f"cannot create the lock folder {folder}: {_describe(exc)}; choose another "
                "durability.storage_path or fix its permissions"
            ) from exc
        path = os.path.join(folder, lock_file_name(execution_id))
        try:
            fd = os.open(path, _LOCK_FLAGS, 0o600)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot open lock file {path}: {_describe(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            if execution_id in self._held_ids():
                who = "this process already holds it; release that lock first"
            else:
                who = (
                    f"{self._holder(execution_id)} is running it; wait for that process to finish or "
                    "stop it (the lock is freed as soon as it exits)"
                )
            raise ExecutionLockedError(
                f"execution {execution_id!r} is locked: {who}. Lock file: {path}"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise CheckpointWriteError(f"cannot lock {path}: {_describe(exc)}") from exc
        return fd

    def _held_ids(self) -> set[str]:
        """Execution ids whose lock this process holds through any SQLite provider of this database."""
        return {lock.execution_id for lock in _HELD.get(self._path, ())}

    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        """Take ``flock`` on the execution's lock file, then record this process in its ``locks`` row.

        A lock whose holder died is free (the kernel dropped its ``flock``); its leftover row is replaced
        with a logged warning. A live holder's lock is refused with :class:`ExecutionLockedError`.
        """
        if not execution_id:
            raise ValueError("execution id must not be empty")
        if self._conn is None:
            await self.check_writable()  # a path that cannot hold the database: StoragePathError
        fd = -1 if self._path == ":memory:" else self._flock(execution_id)
        try:
            acquired_at = self._write_row(execution_id, fd >= 0)
        except BaseException:
            if fd >= 0:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)
            raise
        lock = _SQLiteLock(execution_id, self, acquired_at, fd)
        self._locks.add(lock)
        _HELD.setdefault(self._path, set()).add(lock)
        return lock

    def _write_row(self, execution_id: str, flocked: bool) -> float:
        """Record this process as the holder; return the time recorded.

        With the ``flock`` held, a row already there was left by a holder that died: it is replaced.
        Without one (an in-memory database), a row means the lock is held.
        """
        try:
            conn = self._connection()
            with _transaction(conn):
                row = conn.execute(
                    "SELECT pid, hostname, acquired_at FROM locks WHERE execution_id = ?",
                    (execution_id,),
                ).fetchone()
                if row is not None:
                    pid, hostname, since = row
                    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since))
                    if not flocked:
                        raise ExecutionLockedError(
                            f"execution {execution_id!r} is locked: this process already holds it "
                            f"(since {since}); release that lock first"
                        )
                    _log.warning(
                        "taking over the lock of execution %r from process %d on %s, which is no "
                        "longer running (its lock was free; held since %s)",
                        execution_id,
                        pid,
                        hostname,
                        since,
                    )
                acquired_at = time.time()
                conn.execute(
                    "INSERT OR REPLACE INTO locks (execution_id, pid, hostname, acquired_at, process_token)"
                    " VALUES (?, ?, ?, ?, NULL)",
                    (execution_id, os.getpid(), self._hostname, acquired_at),
                )
        except (sqlite3.Error, OSError) as exc:
            raise CheckpointWriteError(
                f"cannot take the lock of {execution_id!r} in {self._path}: {_describe(exc)}"
            ) from exc
        return acquired_at

    def _release(self, lock: _SQLiteLock) -> None:
        """Delete ``lock``'s row (the caller gives the ``flock`` back afterwards)."""
        self._locks.discard(lock)
        _HELD.get(self._path, set()).discard(lock)
        if self._conn is None:
            return
        try:
            self._conn.execute(
                "DELETE FROM locks WHERE execution_id = ? AND pid = ? AND hostname = ? AND acquired_at = ?",
                (lock.execution_id, os.getpid(), self._hostname, lock._acquired_at),
            )
        except sqlite3.Error as exc:
            raise CheckpointWriteError(
                f"cannot release the lock of {lock.execution_id!r} in {self._path}: {_describe(exc)}"
            ) from exc

    async def close(self) -> None:
        """Release every lock still held through this provider and close the connection.

        Saves made with ``sync=False`` are not flushed: call :meth:`sync` first if they must survive
        a power failure. The provider reopens the database if it is used again.
        """
        try:
            for lock in list(self._locks):
                await lock.release()
        finally:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
                self._synchronous = ""
                self._wal_named = False  # the last connection's close may delete the WAL file
