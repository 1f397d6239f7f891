"""A checkpoint provider that stores one file per record, in the seed-compatible layout.

Layout::

    {base}/{execution_id}/{execution_id}_ckpt_{n}.pkl    one record (an encoded checkpoint)
    {base}/{execution_id}/{execution_id}.journal         the journal: entries appended one after another
    {base}/{execution_id}/.lock                          the execution's lock: the holder's pid, then the head
    {base}/.locks/{execution_id}                         a second lock, outside the run folder
    {base}/{execution_id}/.{record}.{random}.tmp         a write in progress (or left by a killed writer)

Theory of operation
-------------------
*Atomic writes.* A record is written to a temporary file in its own folder (so the rename never crosses
file systems), then renamed over its final name with ``os.replace``. A reader, or a process resuming after
a crash, therefore sees either the previous file or the complete new one. Temporary names start with a
dot and end with ``.tmp``, which :meth:`~FilesystemCheckpointProvider.list_checkpoints` never reports; the
ones a killed writer left behind are removed when the execution's lock is next acquired.

*Durability.* With ``sync=True`` the temporary file is fsynced before the rename and the folder after
it, so the record survives a power failure once the call returns. With ``sync=False`` both fsyncs are
skipped (the record survives the death of the process, since it is in the OS page cache) and its name is
remembered; the next ``sync=True`` save of the same execution, or :meth:`sync`, fsyncs those files and
then the folder once. Creating an execution's folder fsyncs the base folder, once per execution.
Deletes are not fsynced: losing one to a power failure only brings back an old record, which the
manager tolerates. (On macOS ``fsync`` does not flush the drive's cache; this provider does not use
``F_FULLFSYNC``.)

*Blocking I/O.* Writing and fsyncing a small file costs a few syscalls, far less than a hop to a worker
thread, so records up to ``inline_write_limit`` bytes (1 MiB by default) are written directly on the
event loop thread; larger ones are written in a worker thread (``anyio.to_thread``) so the loop is not
stalled while megabytes are copied and flushed. The folder fsync and all bookkeeping always run on the
loop thread, so concurrent saves need no locking. Loads, listings and deletes run inline: they happen at
resume and pruning time, not on the hot path.

*Locking.* :meth:`~FilesystemCheckpointProvider.acquire_lock` takes ``flock(LOCK_EX | LOCK_NB)`` on
``{base}/.locks/{execution_id}`` and then on the execution's ``.lock`` file and keeps both descriptors
open; the first one stays locked when the run folder is deleted or replaced under a running process,
so a second process cannot take the run over while the first one still runs. The kernel drops the lock when the process dies,
however it dies (``kill -9`` included), so there is never a stale lock to clean up. The lock file is never
deleted: unlinking a lock file races with a process that has just opened it. ``flock`` is local to one
machine; on network file systems use a provider built for many machines.

*Journal.* Journal entries (two per durable call) are appended to one file per execution, each framed
by a marker, its counter, its length and a CRC-32 of its bytes, through a descriptor kept open;
:meth:`sync_journal` is one ``fdatasync`` (plus a folder fsync the first time, for the file's name).
A short or failed write (disk full, a file-size limit, a kill during the write) can leave a torn last
entry. It never hides the entries written after it: a failed append is cut off again at once
(``ftruncate`` to the length before it), a process that opens the journal to append first cuts off a
torn tail left by another (with a warning), and :meth:`read_journal` never stops at a damaged entry: it
skips to the next marker whose entry checks out, and warns about the bytes it skipped. Dropping entries
rewrites the file (temporary file, fsync, rename), which the manager does in batches.

*Head.* The ``.lock`` file holds, after the holder's pid (bytes 0..31), the manager's head record
(which record is the newest) at byte 64, rewritten in place with one ``pwrite`` after every write.

*A deleted or replaced folder.* While this provider holds an execution's lock, every checkpoint file
written first checks that the lock file at its path is still the one it locked, and every journal
fsync first checks that the journal at its path is still the file it appends to (one ``stat`` per fsync,
not per append: appends between two fsyncs are not promised to anyone, and the fsync comes before the
next durable call starts); if the folder was deleted, moved or replaced (and another process may have
taken a new lock in the new one), that raises :class:`~playbooks.errors.StoreReplacedError` instead of
going on writing to a file nobody will read.

This module is POSIX-only (it needs ``fcntl``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import struct
import warnings
import zlib
from collections.abc import Callable, Collection
from dataclasses import dataclass

import anyio.to_thread

from playbooks.checkpoints.provider import (
    CheckpointProvider,
    ExecutionLock,
    checkpoint_id,
    parse_checkpoint_id,
    split_checkpoint_id,
    validate_execution_id,
)
from playbooks.checkpoints.providers._sync import DIR_FLAGS as _DIR_FLAGS
from playbooks.checkpoints.providers._sync import READ_FLAGS as _READ_FLAGS
from playbooks.checkpoints.providers._sync import fsync_path as _fsync_path
from playbooks.errors import (
    CheckpointWarning,
    CheckpointWriteError,
    ExecutionLockedError,
    StoragePathError,
    StoreReplacedError,
)

__all__ = ("FilesystemCheckpointProvider",)

_RECORD_SUFFIX = ".pkl"
_TMP_SUFFIX = ".tmp"
_LOCK_NAME = ".lock"
_LOCKS_FOLDER = ".locks"  # {base}/.locks/{execution_id}: the lock that outlives a deleted run folder
_FOLDER_MODE = 0o700
_FILE_MODE = 0o600
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_APPEND_FLAGS = os.O_RDWR | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_HEAD_OFFSET = 64  # in the lock file; the pid comes first
_JOURNAL_SUFFIX = ".journal"
_ENTRY_MAGIC = b"PBJE"
_ENTRY = struct.Struct(">4sQII")  # marker, counter, length of the data that follows, CRC-32
_CRC_COVERS = struct.Struct(">QI")  # the CRC covers the counter and length, then the data

_ERRNO_WORDS = {
    errno.ENOSPC: "disk full",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "I/O error from the storage device",
    errno.ENAMETOOLONG: "file name too long (shorten the execution id)",
    errno.EMFILE: "too many open files in this process",
    errno.ENFILE: "too many open files on this system",
    errno.ENOENT: "the folder disappeared during the write",
    errno.ENOTDIR: "a path component is not a folder",
    errno.EEXIST: "a file of that name already exists",
}


def _describe(exc: OSError) -> str:
    """Say what went wrong in plain words, with the errno name for searching: 'disk full (ENOSPC)'."""
    code = exc.errno
    if code is None:
        return str(exc)
    name = errno.errorcode.get(code, f"errno {code}")
    return f"{_ERRNO_WORDS.get(code) or os.strerror(code).lower()} ({name})"


def _validate_execution_id(execution_id: str) -> None:
    """Reject ids that are not a single, visible folder name (path traversal, hidden, empty)."""
    validate_execution_id(execution_id)


def _crc(counter: int, length: int, data: bytes | memoryview) -> int:
    return zlib.crc32(data, zlib.crc32(_CRC_COVERS.pack(counter, length)))


def _frame(counter: int, data: bytes) -> bytes:
    return _ENTRY.pack(_ENTRY_MAGIC, counter, len(data), _crc(counter, len(data), data)) + data


def _scan_journal(data: bytes) -> tuple[list[tuple[int, bytes]], list[tuple[int, int]], int]:
    """Parse a journal: its entries, the damaged byte ranges, and the end of its last whole entry.

    A damaged entry (torn by a short write, or overwritten) never hides the ones after it: the scan
    resumes at the next marker whose entry checks out. An entry whose frame is whole but whose CRC
    fails (a flipped bit) is returned as well as listed among the damaged ranges, so the reader's
    integrity check names the record it was.
    """
    entries: list[tuple[int, bytes]] = []
    damage: list[tuple[int, int]] = []
    view = memoryview(data)
    size = len(data)
    offset = end = 0
    while offset < size:
        if offset + _ENTRY.size <= size:
            magic, counter, length, crc = _ENTRY.unpack_from(data, offset)
            start = offset + _ENTRY.size
            if magic == _ENTRY_MAGIC and start + length <= size:
                if _crc(counter, length, view[start : start + length]) == crc:
                    entries.append((counter, data[start : start + length]))
                    offset = end = start + length
                    continue
                if data.find(_ENTRY_MAGIC, offset + 1, start + length) < 0:
                    # Damaged inside (a flipped bit), framing intact: hand it over, so the reader's
                    # integrity check names the record it was.
                    entries.append((counter, data[start : start + length]))
                    damage.append((offset, start + length))
                    offset = end = start + length
                    continue
        following = data.find(_ENTRY_MAGIC, offset + 1)
        if following < 0:
            damage.append((offset, size))
            break
        damage.append((offset, following))
        offset = following
    return entries, damage, end


@dataclass(slots=True)
class _Journal:
    """An execution's journal open for appending."""

    fd: int
    unsynced: bool  # appends since the last fdatasync
    created: bool  # the file is new since the last sync: its name needs a folder fsync
    ident: tuple[int, int]  # (st_dev, st_ino) of the file we append to
    size: int  # its length after our last complete append
    path: str


def _split(cid: str) -> tuple[str, int]:
    """Parse and validate ``cid``; reject non-canonical spellings (``x_ckpt_01``) that alias another."""
    execution_id, counter = split_checkpoint_id(cid)
    _validate_execution_id(execution_id)
    return execution_id, counter


def _remove_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _record_counter(name: str, execution_id: str) -> int | None:
    """Return the counter if ``name`` is a canonical record file of ``execution_id``, else ``None``."""
    if not name.endswith(_RECORD_SUFFIX) or name.startswith("."):
        return None
    cid = name[: -len(_RECORD_SUFFIX)]
    try:
        owner, counter = parse_checkpoint_id(cid)
    except ValueError:
        return None
    if owner != execution_id or checkpoint_id(owner, counter) != cid:
        return None
    return counter


class _FlockLock(ExecutionLock):
    """An open ``.lock`` file descriptor holding ``flock(LOCK_EX)``."""

    def __init__(
        self, execution_id: str, fd: int, outer: int, on_release: Callable[[_FlockLock], None]
    ) -> None:
        self.execution_id = execution_id
        self._fd: int | None = fd
        self._outer = outer  # the second lock, in {base}/.locks, which outlives a deleted run folder
        self._on_release = on_release
        self.fd_for_head = fd
        self.head_size = -1

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self.fd_for_head = -1
        self._on_release(self)
        for held in (fd, self._outer):
            try:
                # Explicit unlock: a forked child sharing the descriptor would otherwise keep the lock.
                fcntl.flock(held, fcntl.LOCK_UN)
            finally:
                os.close(held)


class FilesystemCheckpointProvider(CheckpointProvider):
    """Records as files under ``base_path``; see the module docstring for layout and guarantees.

    ``inline_write_limit`` is the payload size (bytes) above which a write runs in a worker thread.
    """

    completes_without_suspending = True

    journal_drop_batch = 256  # dropping entries rewrites the journal file (two fsyncs): not often

    def __init__(
        self,
        base_path: str | os.PathLike[str] = ".checkpoints",
        *,
        inline_write_limit: int = 1 << 20,
    ) -> None:
        raw = os.fspath(base_path)
        if "\0" in raw:
            raise StoragePathError(f"storage path {raw!r} contains a NUL byte, which no path can hold")
        # Absolute, so a later chdir of the host program does not move the store.
        self._base = os.path.abspath(raw)
        self._inline_write_limit = inline_write_limit
        # execution id -> names of records saved with sync=False and not fsynced since.
        self._pending: dict[str, set[str]] = {}
        self._locks: set[_FlockLock] = set()
        self._lock_of: dict[str, _FlockLock] = {}  # execution id -> the lock held through this provider
        self._journals: dict[str, _Journal] = {}
        # execution id -> (lock path, (st_dev, st_ino)) of the lock this provider holds
        self._held: dict[str, tuple[str, tuple[int, int]]] = {}

    @property
    def base_path(self) -> str:
        """The absolute folder that holds one sub-folder per execution."""
        return self._base

    def _folder(self, execution_id: str) -> str:
        return os.path.join(self._base, execution_id)

    def _make_base(self) -> None:
        """Create the base folder (mode 0700 whatever the umask) if it does not exist."""
        if os.path.isdir(self._base):
            return
        os.makedirs(self._base, mode=_FOLDER_MODE, exist_ok=True)
        os.chmod(self._base, _FOLDER_MODE)

    def _check_store(self, execution_id: str) -> None:
        """Raise :class:`StoreReplacedError` if the lock this provider holds is no longer at its path."""
        held = self._held.get(execution_id)
        if held is None:
            return
        path, ident = held
        try:
            st = os.stat(path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if current != ident:
            raise StoreReplacedError(
                f"the checkpoint folder of execution {execution_id!r} ({os.path.dirname(path)}) was "
                f"{'deleted or moved' if current is None else 'replaced'} while this process was running "
                "it; stopping, since its records would be written where no resume reads them (another "
                "process may own the run now)"
            )

    def _make_folder(self, folder: str) -> None:
        """Create ``folder`` (mode 0700) and the base if needed; fsync the base so the folder persists."""
        self._make_base()
        try:
            os.mkdir(folder, _FOLDER_MODE)
        except FileExistsError:
            return
        # mkdir's mode is filtered by the umask; make sure the folder is private whatever it is.
        os.chmod(folder, _FOLDER_MODE)
        _fsync_path(self._base, _DIR_FLAGS)

    def _write_file(self, folder: str, name: str, data: bytes, fsync: bool) -> None:
        """Write ``data`` to a temporary file in ``folder`` and rename it to ``name`` (atomically).

        On failure the temporary file is removed and the exception propagates; the previous file of
        that name, if any, is untouched because nothing but ``os.replace`` ever changes it.
        """
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}")
        try:
            fd = os.open(tmp, _WRITE_FLAGS, _FILE_MODE)
        except FileNotFoundError:
            # First record of this execution (or its folder was removed): create it and retry once.
            self._make_folder(folder)
            fd = os.open(tmp, _WRITE_FLAGS, _FILE_MODE)
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view) :]
                if fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, os.path.join(folder, name))
        except BaseException:
            _remove_quietly(tmp)
            raise

    def _flush(self, execution_id: str, folder: str) -> None:
        """Fsync the records of ``execution_id`` saved with ``sync=False``, then the folder."""
        pending = self._pending.pop(execution_id, set())
        for name in sorted(pending):
            try:
                _fsync_path(os.path.join(folder, name), _READ_FLAGS)
            except FileNotFoundError:
                continue  # deleted since; nothing left to make durable
        _fsync_path(folder, _DIR_FLAGS)

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        execution_id, _ = _split(checkpoint_id)
        folder = self._folder(execution_id)
        name = checkpoint_id + _RECORD_SUFFIX
        path = os.path.join(folder, name)
        self._check_store(execution_id)
        if not sync:
            # Noted before the write, so a cancellation while a worker thread writes cannot lose it;
            # a name whose write failed costs the next flush one ENOENT, which it skips.
            self._pending.setdefault(execution_id, set()).add(name)
        try:
            if len(data) > self._inline_write_limit:
                await anyio.to_thread.run_sync(self._write_file, folder, name, data, sync)
            else:
                self._write_file(folder, name, data, sync)
            if sync:  # this record only: the unsynced ones wait for sync()
                self._pending.get(execution_id, set()).discard(name)
                _fsync_path(folder, _DIR_FLAGS)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot write checkpoint {path}: {_describe(exc)}; earlier checkpoints are intact"
            ) from exc

    async def _sync_records(self, execution_id: str) -> None:
        _validate_execution_id(execution_id)
        if execution_id not in self._pending:
            return
        folder = self._folder(execution_id)
        try:
            self._flush(execution_id, folder)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot flush checkpoints in {folder} to disk: {_describe(exc)}"
            ) from exc

    async def load_checkpoint(self, checkpoint_id: str) -> bytes | None:
        execution_id, _ = _split(checkpoint_id)
        path = os.path.join(self._folder(execution_id), checkpoint_id + _RECORD_SUFFIX)
        try:
            with open(path, "rb") as f:
                return f.read()
        except FileNotFoundError:
            return None

    async def list_checkpoints(self, execution_id: str) -> list[str]:
        _validate_execution_id(execution_id)
        try:
            with os.scandir(self._folder(execution_id)) as entries:
                counters = [
                    n for n in (_record_counter(e.name, execution_id) for e in entries) if n is not None
                ]
        except (FileNotFoundError, NotADirectoryError):
            return []
        return [checkpoint_id(execution_id, n) for n in sorted(counters)]

    async def delete_checkpoint(self, checkpoint_id: str) -> bool:
        execution_id, _ = _split(checkpoint_id)
        name = checkpoint_id + _RECORD_SUFFIX
        pending = self._pending.get(execution_id)
        if pending is not None:
            pending.discard(name)
        try:
            os.unlink(os.path.join(self._folder(execution_id), name))
        except FileNotFoundError:
            return False
        return True

    async def list_executions(self) -> list[str]:
        try:
            with os.scandir(self._base) as entries:
                candidates = [e.name for e in entries if not e.name.startswith(".") and e.is_dir()]
        except FileNotFoundError:
            return []
        found = []
        for execution_id in candidates:
            try:
                _validate_execution_id(execution_id)
                with os.scandir(self._folder(execution_id)) as entries:
                    if any(
                        _record_counter(e.name, execution_id) is not None
                        or e.name == execution_id + _JOURNAL_SUFFIX
                        for e in entries
                    ):
                        found.append(execution_id)
            except (ValueError, OSError):
                continue  # not one of ours, or vanished while we looked
        return sorted(found)

    @staticmethod
    def _flock(execution_id: str, folder: str, path: str) -> int:
        """Open ``path`` and take ``flock(LOCK_EX | LOCK_NB)`` on it; write this pid at its start."""
        try:
            fd = os.open(path, _LOCK_FLAGS, _FILE_MODE)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot open lock file {path}: {_describe(exc)}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            try:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            except OSError:
                holder = ""
            finally:
                os.close(fd)
            if holder == str(os.getpid()):
                who = f"this process (pid {holder}) already holds it; release that lock first"
            else:
                who = (
                    f"another process (pid {holder or 'unknown'}) is running it; wait for that process "
                    "to finish or stop it (the lock is freed as soon as it exits)"
                )
            raise ExecutionLockedError(
                f"execution {execution_id!r} is locked: {who}. Lock file: {path}"
            ) from None
        except OSError as exc:
            os.close(fd)
            raise CheckpointWriteError(f"cannot lock {path}: {_describe(exc)}") from exc
        try:
            # The pid, padded so the head after it (see write_head) stays where it is.
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii").ljust(32), 0)
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise CheckpointWriteError(f"cannot write lock file {path}: {_describe(exc)}") from exc
        return fd

    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        """Take ``flock`` on ``{base}/.locks/{execution_id}`` (which survives a deleted run folder),
        then on ``{base}/{execution_id}/.lock``; remove temp files left by dead writers."""
        _validate_execution_id(execution_id)
        folder = self._folder(execution_id)
        path = os.path.join(folder, _LOCK_NAME)
        locks = os.path.join(self._base, _LOCKS_FOLDER)
        try:
            self._make_base()
            if not os.path.isdir(locks):
                os.makedirs(locks, mode=_FOLDER_MODE, exist_ok=True)
                os.chmod(locks, _FOLDER_MODE)
        except OSError as exc:
            raise StoragePathError(
                f"cannot create the checkpoint folder {self._base}: {_describe(exc)}; choose another "
                "durability.storage_path or fix its permissions"
            ) from exc
        outer = self._flock(execution_id, locks, os.path.join(locks, execution_id))
        try:
            try:
                self._make_folder(folder)
            except OSError as exc:
                raise CheckpointWriteError(f"cannot create folder {folder}: {_describe(exc)}") from exc
            fd = self._flock(execution_id, folder, path)
        except BaseException:
            fcntl.flock(outer, fcntl.LOCK_UN)
            os.close(outer)
            raise
        try:
            self._remove_stale_temp_files(folder)
        except OSError:
            pass  # leftovers cost disk space, nothing else
        st = os.fstat(fd)
        self._held[execution_id] = (path, (st.st_dev, st.st_ino))
        lock = _FlockLock(execution_id, fd, outer, self._released)
        self._locks.add(lock)
        self._lock_of[execution_id] = lock
        return lock

    def _released(self, lock: _FlockLock) -> None:
        self._locks.discard(lock)
        self._lock_of.pop(lock.execution_id, None)
        self._held.pop(lock.execution_id, None)
        self._close_journal(lock.execution_id)

    @staticmethod
    def _remove_stale_temp_files(folder: str) -> None:
        """Delete temporary files of writes that never finished; safe only while holding the lock."""
        with os.scandir(folder) as entries:
            stale = [e.path for e in entries if e.name.startswith(".") and e.name.endswith(_TMP_SUFFIX)]
        for path in stale:
            _remove_quietly(path)

    async def close(self) -> None:
        """Release every lock still held through this provider and close the journals.

        Records saved with ``sync=False`` are not flushed: call :meth:`sync` first if they must
        survive a power failure.
        """
        for execution_id in list(self._journals):
            self._close_journal(execution_id)
        for lock in list(self._locks):
            await lock.release()

    # ----------------------------------------------------------------- journal

    def _journal_path(self, execution_id: str) -> str:
        return os.path.join(self._folder(execution_id), execution_id + _JOURNAL_SUFFIX)

    def _close_journal(self, execution_id: str) -> None:
        journal = self._journals.pop(execution_id, None)
        if journal is not None:
            os.close(journal.fd)

    def _open_journal(self, execution_id: str, path: str) -> _Journal:
        """Open the journal for appending; first cut off a torn tail another process left."""
        created = not os.path.exists(path)
        if created:
            self._make_folder(self._folder(execution_id))
        fd = os.open(path, _APPEND_FLAGS, _FILE_MODE)
        try:
            st = os.fstat(fd)
            size = st.st_size
            if size:
                _, _, end = _scan_journal(os.pread(fd, size, 0))
                if end < size:
                    # A short write (disk full, a size limit) or a kill mid-write left a torn last
                    # entry; appending after it would leave it in the middle. Cut it off first.
                    os.ftruncate(fd, end)
                    warnings.warn(
                        f"journal {path} ended with {size - end} bytes of a torn entry (a write that "
                        f"did not complete); they were cut off before appending",
                        CheckpointWarning,
                        stacklevel=4,
                    )
                    size = end
        except BaseException:
            os.close(fd)
            raise
        return _Journal(fd, False, created, (st.st_dev, st.st_ino), size, path)

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        self._prepare_append(execution_id, counter, data)()

    def prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        cls = type(self)
        if (
            cls.append_journal is not FilesystemCheckpointProvider.append_journal
            and cls.prepare_append is FilesystemCheckpointProvider.prepare_append
        ):
            # A subclass that wraps append_journal (metrics, fault injection) sees every entry.
            return super().prepare_append(execution_id, counter, data)
        return self._prepare_append(execution_id, counter, data)

    def _prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        journal = self._journal_for_append(execution_id)
        frame = _frame(counter, data)

        def append() -> None:
            journal.unsynced = True
            try:
                view = memoryview(frame)
                while view:
                    view = view[os.write(journal.fd, view) :]
            except OSError as exc:
                # Cut a partial entry off at once, so the next append does not land after it.
                try:
                    os.ftruncate(journal.fd, journal.size)
                except OSError:
                    self._close_journal(execution_id)  # the next append reopens and repairs
                raise CheckpointWriteError(
                    f"cannot append to journal {journal.path}: {_describe(exc)}; earlier checkpoints are intact"
                ) from exc
            journal.size += len(frame)

        return append

    def _journal_for_append(self, execution_id: str) -> _Journal:
        """The execution's open journal, opened (and its torn tail repaired) if needed."""
        journal = self._journals.get(execution_id)
        if journal is not None:
            return journal
        path = self._journal_path(execution_id)
        try:
            _validate_execution_id(execution_id)
            self._check_store(execution_id)
            journal = self._journals[execution_id] = self._open_journal(execution_id, path)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot open journal {path}: {_describe(exc)}; earlier checkpoints are intact"
            ) from exc
        return journal

    def _check_journal(self, execution_id: str, journal: _Journal) -> None:
        """Raise :class:`StoreReplacedError` if the journal at its path is no longer the file this
        process appends to: its folder, or the file itself, was deleted, moved or replaced."""
        try:
            st = os.stat(journal.path)
            current: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            current = None
        if current != journal.ident:
            self._close_journal(execution_id)
            raise StoreReplacedError(
                f"journal {journal.path} was {'deleted or moved' if current is None else 'replaced'} while "
                "this process was appending to it; stopping before the next durable call, since its "
                "records would be written where no resume reads them (another process may own the run now)"
            )

    async def sync_journal(self, execution_id: str) -> None:
        journal = self._journals.get(execution_id)
        if journal is None or not journal.unsynced:
            return
        self._check_journal(execution_id, journal)  # before the next durable call can start
        try:
            os.fdatasync(journal.fd)
            if journal.created:
                _fsync_path(self._folder(execution_id), _DIR_FLAGS)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot flush journal {self._journal_path(execution_id)} to disk: {_describe(exc)}"
            ) from exc
        journal.unsynced = journal.created = False

    async def sync(self, execution_id: str) -> None:
        await self.sync_journal(execution_id)
        await self._sync_records(execution_id)

    async def read_journal(self, execution_id: str) -> list[tuple[int, bytes]]:
        _validate_execution_id(execution_id)
        path = self._journal_path(execution_id)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        entries, damage, _ = _scan_journal(data)
        for begin, stop in damage:
            where = "at its end" if stop == len(data) else "in its middle; the entries after it are read"
            warnings.warn(
                f"journal {path}: bytes {begin}..{stop} are a damaged or torn entry {where}",
                CheckpointWarning,
                stacklevel=2,
            )
        return entries

    # ----------------------------------------------------------------- head

    async def write_head(self, execution_id: str, data: bytes) -> None:
        lock = self._lock_of.get(execution_id)
        if lock is not None and lock.fd_for_head >= 0:  # the common case: one pwrite
            try:
                os.pwrite(lock.fd_for_head, data, _HEAD_OFFSET)
                if lock.head_size != len(data):
                    os.ftruncate(lock.fd_for_head, _HEAD_OFFSET + len(data))
                    lock.head_size = len(data)
                return
            except OSError as exc:
                raise CheckpointWriteError(
                    f"cannot write the head in {os.path.join(self._folder(execution_id), _LOCK_NAME)}: "
                    f"{_describe(exc)}"
                ) from exc
        path = os.path.join(self._folder(execution_id), _LOCK_NAME)
        try:
            _validate_execution_id(execution_id)
            self._make_folder(self._folder(execution_id))
            fd = os.open(path, _LOCK_FLAGS, _FILE_MODE)
            try:
                os.pwrite(fd, data, _HEAD_OFFSET)
                os.ftruncate(fd, _HEAD_OFFSET + len(data))
            finally:
                os.close(fd)
        except OSError as exc:
            raise CheckpointWriteError(f"cannot write the head in {path}: {_describe(exc)}") from exc

    async def read_head(self, execution_id: str) -> bytes | None:
        _validate_execution_id(execution_id)
        path = os.path.join(self._folder(execution_id), _LOCK_NAME)
        try:
            with open(path, "rb") as f:
                f.seek(_HEAD_OFFSET)
                data = f.read()
        except FileNotFoundError:
            return None
        return data or None

    async def check_writable(self) -> None:
        """Create the base folder if needed and check that this process can write in it."""
        try:
            self._make_base()
            if not os.path.isdir(self._base):
                raise NotADirectoryError(errno.ENOTDIR, "not a folder")
            probe = os.path.join(self._base, f".probe.{secrets.token_hex(6)}{_TMP_SUFFIX}")
            os.close(os.open(probe, _WRITE_FLAGS, _FILE_MODE))
            os.unlink(probe)
        except OSError as exc:
            raise StoragePathError(
                f"cannot store checkpoints in {self._base}: {_describe(exc)}; choose another "
                "durability.storage_path or fix its permissions"
            ) from exc

    async def drop_journal(self, execution_id: str, counters: Collection[int]) -> None:
        doomed = set(counters)
        if not doomed:
            return
        kept = [(c, d) for c, d in await self.read_journal(execution_id) if c not in doomed]
        folder = self._folder(execution_id)
        name = execution_id + _JOURNAL_SUFFIX
        self._close_journal(execution_id)
        try:
            if not kept:
                _remove_quietly(os.path.join(folder, name))
                return
            payload = b"".join(_frame(c, d) for c, d in kept)
            self._write_file(folder, name, payload, True)
            _fsync_path(folder, _DIR_FLAGS)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot rewrite journal {os.path.join(folder, name)}: {_describe(exc)}; it is unchanged"
            ) from exc
