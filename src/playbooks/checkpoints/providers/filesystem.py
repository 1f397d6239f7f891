"""A checkpoint provider that stores one file per record, in the seed-compatible layout.

Layout::

    {base}/{execution_id}/{execution_id}_ckpt_{n}.pkl    one record (an encoded checkpoint)
    {base}/{execution_id}/{execution_id}.journal         the journal: entries appended one after another
    {base}/{execution_id}/.lock                          the execution's lock; holds the holder's pid
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

*Locking.* :meth:`~FilesystemCheckpointProvider.acquire_lock` takes ``flock(LOCK_EX | LOCK_NB)`` on the
execution's ``.lock`` file and keeps the descriptor open. The kernel drops the lock when the process dies,
however it dies (``kill -9`` included), so there is never a stale lock to clean up. The lock file is never
deleted: unlinking a lock file races with a process that has just opened it. ``flock`` is local to one
machine; on network file systems use a provider built for many machines.

*Journal.* Journal entries (two per durable call) are appended to one file per execution, each framed
by its counter and length, through a descriptor kept open; :meth:`sync_journal` is one ``fdatasync``
(plus a folder fsync the first time, for the file's name). An append is one ``write``, so a killed
process leaves at most a short last entry, which :meth:`read_journal` drops. Dropping entries rewrites
the file (temporary file, fsync, rename), which the manager does in batches.

This module is POSIX-only (it needs ``fcntl``).
"""

from __future__ import annotations

import errno
import fcntl
import os
import secrets
import struct
from collections.abc import Callable, Collection

import anyio.to_thread

from playbooks.checkpoints.provider import (
    CheckpointProvider,
    ExecutionLock,
    checkpoint_id,
    parse_checkpoint_id,
)
from playbooks.errors import CheckpointWriteError, ExecutionLockedError

__all__ = ("FilesystemCheckpointProvider",)

_RECORD_SUFFIX = ".pkl"
_TMP_SUFFIX = ".tmp"
_LOCK_NAME = ".lock"
_FOLDER_MODE = 0o700
_FILE_MODE = 0o600
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)
_DIR_FLAGS = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0)
_LOCK_FLAGS = os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_APPEND_FLAGS = os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_CLOEXEC", 0)
_JOURNAL_SUFFIX = ".journal"
_ENTRY = struct.Struct(">QI")  # counter, length of the data that follows

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
    if not isinstance(execution_id, str) or not execution_id:
        raise ValueError("execution id must be a non-empty string")
    if execution_id.startswith("."):
        raise ValueError(f"execution id must not start with '.': {execution_id!r}")
    for bad in ("/", "\\", "\0"):
        if bad in execution_id:
            raise ValueError(f"execution id must not contain {bad!r}: {execution_id!r}")


def _split(cid: str) -> tuple[str, int]:
    """Parse and validate ``cid``; reject non-canonical spellings (``x_ckpt_01``) that alias another."""
    execution_id, counter = parse_checkpoint_id(cid)
    if checkpoint_id(execution_id, counter) != cid:
        raise ValueError(f"not a canonical checkpoint id: {cid!r}")
    _validate_execution_id(execution_id)
    return execution_id, counter


def _fsync_path(path: str, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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

    def __init__(self, execution_id: str, fd: int, on_release: Callable[[_FlockLock], None]) -> None:
        self.execution_id = execution_id
        self._fd: int | None = fd
        self._on_release = on_release

    async def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._on_release(self)
        try:
            # Explicit unlock: a forked child sharing the descriptor would otherwise keep the lock.
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


class FilesystemCheckpointProvider(CheckpointProvider):
    """Records as files under ``base_path``; see the module docstring for layout and guarantees.

    ``inline_write_limit`` is the payload size (bytes) above which a write runs in a worker thread.
    """

    journal_drop_batch = 64  # dropping entries rewrites the journal file

    def __init__(
        self,
        base_path: str | os.PathLike[str] = ".checkpoints",
        *,
        inline_write_limit: int = 1 << 20,
    ) -> None:
        # Absolute, so a later chdir of the host program does not move the store.
        self._base = os.path.abspath(os.fspath(base_path))
        self._inline_write_limit = inline_write_limit
        # execution id -> names of records saved with sync=False and not fsynced since.
        self._pending: dict[str, set[str]] = {}
        self._locks: set[_FlockLock] = set()
        # execution id -> (open journal descriptor, unsynced appends?, file new since the last sync?)
        self._journals: dict[str, tuple[int, bool, bool]] = {}

    @property
    def base_path(self) -> str:
        """The absolute folder that holds one sub-folder per execution."""
        return self._base

    def _folder(self, execution_id: str) -> str:
        return os.path.join(self._base, execution_id)

    def _make_folder(self, folder: str) -> None:
        """Create ``folder`` (mode 0700) and the base if needed; fsync the base so the folder persists."""
        os.makedirs(self._base, mode=_FOLDER_MODE, exist_ok=True)
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

    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        """Take ``flock`` on ``{base}/{execution_id}/.lock``; remove temp files left by dead writers."""
        _validate_execution_id(execution_id)
        folder = self._folder(execution_id)
        path = os.path.join(folder, _LOCK_NAME)
        try:
            self._make_folder(folder)
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
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
            self._remove_stale_temp_files(folder)
        except OSError as exc:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise CheckpointWriteError(f"cannot write lock file {path}: {_describe(exc)}") from exc
        lock = _FlockLock(execution_id, fd, self._locks.discard)
        self._locks.add(lock)
        return lock

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
        entry = self._journals.pop(execution_id, None)
        if entry is not None:
            os.close(entry[0])

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        _validate_execution_id(execution_id)
        path = self._journal_path(execution_id)
        try:
            entry = self._journals.get(execution_id)
            if entry is None:
                created = not os.path.exists(path)
                if created:
                    self._make_folder(self._folder(execution_id))
                fd = os.open(path, _APPEND_FLAGS, _FILE_MODE)
                entry = (fd, False, created)
            fd, _, created = entry
            self._journals[execution_id] = (fd, True, created)
            frame = _ENTRY.pack(counter, len(data)) + data
            view = memoryview(frame)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot append to journal {path}: {_describe(exc)}; earlier checkpoints are intact"
            ) from exc

    async def sync_journal(self, execution_id: str) -> None:
        entry = self._journals.get(execution_id)
        if entry is None or not entry[1]:
            return
        fd, _, created = entry
        try:
            os.fdatasync(fd)
            if created:
                _fsync_path(self._folder(execution_id), _DIR_FLAGS)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot flush journal {self._journal_path(execution_id)} to disk: {_describe(exc)}"
            ) from exc
        self._journals[execution_id] = (fd, False, False)

    async def sync(self, execution_id: str) -> None:
        await self.sync_journal(execution_id)
        await self._sync_records(execution_id)

    async def read_journal(self, execution_id: str) -> list[tuple[int, bytes]]:
        _validate_execution_id(execution_id)
        try:
            with open(self._journal_path(execution_id), "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return []
        entries = []
        offset = 0
        while offset + _ENTRY.size <= len(data):
            counter, length = _ENTRY.unpack_from(data, offset)
            start = offset + _ENTRY.size
            if start + length > len(data):
                break  # a torn last entry: the process died while appending it
            entries.append((counter, data[start : start + length]))
            offset = start + length
        return entries

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
            payload = b"".join(_ENTRY.pack(c, len(d)) + d for c, d in kept)
            self._write_file(folder, name, payload, True)
            _fsync_path(folder, _DIR_FLAGS)
        except OSError as exc:
            raise CheckpointWriteError(
                f"cannot rewrite journal {os.path.join(folder, name)}: {_describe(exc)}; it is unchanged"
            ) from exc
