"""One conformance suite for every checkpoint provider, then provider-specific and registry tests.

Every provider registered in the ``playbooks.checkpoint_providers`` entry-point group runs the
conformance suite; third-party ones are created with no arguments in a temporary working folder.
"""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import sqlite3
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from playbooks.checkpoints import providers
from playbooks.checkpoints.provider import CheckpointProvider, checkpoint_id, parse_checkpoint_id
from playbooks.checkpoints.providers import available_providers, create_provider, get_provider_class
from playbooks.checkpoints.providers.filesystem import FilesystemCheckpointProvider
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.checkpoints.providers.sqlite import SQLiteCheckpointProvider
from playbooks.errors import CheckpointError, CheckpointWriteError, ExecutionLockedError
from pg_server import postgres_or_skip

pytestmark = pytest.mark.anyio

BUILTINS = ("memory", "filesystem", "sqlite", "postgres")
DURABLE = ("filesystem", "sqlite")
"""Durable providers whose locks die with their process (postgres leases expire instead)."""
ALL_PROVIDERS = (*BUILTINS, *(n for n in available_providers() if n not in BUILTINS))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def storage_kwargs(name: str, tmp_path: Path) -> dict[str, Any]:
    """Constructor arguments that put ``name``'s storage under ``tmp_path``."""
    if name == "filesystem":
        return {"base_path": str(tmp_path / "ckpts")}
    if name == "sqlite":
        return {"path": str(tmp_path / "db" / "checkpoints.sqlite3")}
    if name == "postgres":  # a new database of a real server the tests start (see pg_server.py)
        return {"dsn": postgres_or_skip().new_database(), "lease_seconds": 5.0}
    return {}


@pytest.fixture
def make_provider(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Callable[[], CheckpointProvider]:
    """A factory of providers of the parametrized kind, all on the same storage."""
    name = str(request.param)
    if name not in BUILTINS:
        monkeypatch.chdir(tmp_path)  # third parties get their default location, inside tmp_path
    kwargs = storage_kwargs(name, tmp_path)
    return lambda: create_provider(name, **kwargs)


@pytest.fixture
async def provider(
    make_provider: Callable[[], CheckpointProvider], anyio_backend: str
) -> AsyncIterator[CheckpointProvider]:
    p = make_provider()
    yield p
    await p.close()


def parametrize_providers(names: tuple[str, ...]) -> pytest.MarkDecorator:
    return pytest.mark.parametrize("make_provider", names, indirect=True)


# --------------------------------------------------------------------------------------------------
# Conformance suite
# --------------------------------------------------------------------------------------------------

conformance = parametrize_providers(ALL_PROVIDERS)


@conformance
@given(data=st.binary(max_size=4096), counter=st.integers(min_value=0, max_value=10**12))
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_roundtrip_arbitrary_bytes(
    provider: CheckpointProvider, data: bytes, counter: int
) -> None:
    cid = checkpoint_id("run", counter)
    await provider.save_checkpoint(cid, data)
    assert await provider.load_checkpoint(cid) == data


@conformance
async def test_roundtrip_large_record(provider: CheckpointProvider) -> None:
    data = os.urandom(3 << 20)
    await provider.save_checkpoint("big_ckpt_1", data)
    assert await provider.load_checkpoint("big_ckpt_1") == data


@conformance
async def test_save_replaces_same_id(provider: CheckpointProvider) -> None:
    await provider.save_checkpoint("run_ckpt_1", b"old")
    await provider.save_checkpoint("run_ckpt_1", b"new")
    assert await provider.load_checkpoint("run_ckpt_1") == b"new"
    assert await provider.list_checkpoints("run") == ["run_ckpt_1"]


@conformance
async def test_load_missing_returns_none(provider: CheckpointProvider) -> None:
    assert await provider.load_checkpoint("nobody_ckpt_1") is None
    await provider.save_checkpoint("run_ckpt_1", b"x")
    assert await provider.load_checkpoint("run_ckpt_2") is None
    assert await provider.list_checkpoints("nobody") == []


@conformance
async def test_list_is_numeric_order(provider: CheckpointProvider) -> None:
    for n in (10, 2, 1, 9, 100, 0):
        await provider.save_checkpoint(checkpoint_id("run", n), b"%d" % n)
    ids = await provider.list_checkpoints("run")
    assert ids == [checkpoint_id("run", n) for n in (0, 1, 2, 9, 10, 100)]
    assert [parse_checkpoint_id(cid) for cid in ids][3] == ("run", 9)


@conformance
async def test_executions_are_isolated_even_with_prefix_ids(provider: CheckpointProvider) -> None:
    ids = ("a", "a_ckpt_1", "ab", "a_b", "a_ckpt_1_ckpt_2")
    for i, execution_id in enumerate(ids):
        for n in (1, 2):
            await provider.save_checkpoint(checkpoint_id(execution_id, n), f"{i}:{n}".encode())
    for i, execution_id in enumerate(ids):
        listed = await provider.list_checkpoints(execution_id)
        assert listed == [checkpoint_id(execution_id, 1), checkpoint_id(execution_id, 2)]
        assert all(parse_checkpoint_id(cid)[0] == execution_id for cid in listed)
        assert await provider.load_checkpoint(listed[1]) == f"{i}:2".encode()
    assert await provider.list_executions() == sorted(ids)


@conformance
async def test_delete(provider: CheckpointProvider) -> None:
    await provider.save_checkpoint("run_ckpt_1", b"1")
    await provider.save_checkpoint("run_ckpt_2", b"2")
    assert await provider.delete_checkpoint("run_ckpt_1") is True
    assert await provider.delete_checkpoint("run_ckpt_1") is False
    assert await provider.delete_checkpoint("other_ckpt_1") is False
    assert await provider.load_checkpoint("run_ckpt_1") is None
    assert await provider.list_checkpoints("run") == ["run_ckpt_2"]


@conformance
async def test_delete_execution_starts_the_id_clean(provider: CheckpointProvider) -> None:
    """A deleted execution's records, journal and head go (a new run under the id loads nothing and
    warns of no loss), its neighbours stay, and it is refused while someone holds the execution."""
    import warnings

    from playbooks import Agent, StreamingPythonExecutor
    from playbooks.checkpoints import CheckpointManager

    async def work(i: int) -> int:
        return i

    async def run(execution_id: str) -> None:
        manager = CheckpointManager(execution_id, provider, keep_last_n=None)
        executor = StreamingPythonExecutor(Agent("a", tools={"Work": work}), checkpoint_manager=manager)
        await executor.add_chunk("x = await Work(1)\nfor i in range(3):\n    await Work(i)\n")
        await executor.finalize()
        await manager.close()

    await run("run")
    await run("other")
    kept = await provider.list_checkpoints("other")
    held = await provider.acquire_lock("run")
    with pytest.raises(ExecutionLockedError):
        await provider.delete_execution("run")
    await held.release()
    assert await provider.delete_execution("run") > 0
    assert await provider.list_checkpoints("run") == []
    assert await provider.read_journal("run") == []
    assert await provider.list_checkpoints("other") == kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        manager = CheckpointManager("run", provider)
        assert await manager.get_latest_checkpoint() is None
        await run("run")
    assert await CheckpointManager("run", provider).get_latest_checkpoint() is not None


@conformance
async def test_list_executions(provider: CheckpointProvider) -> None:
    assert await provider.list_executions() == []
    await provider.save_checkpoint("zeta_ckpt_1", b"z")
    await provider.save_checkpoint("alpha_ckpt_3", b"a")
    lock = await provider.acquire_lock("locked-only")  # a lock alone is not an execution
    assert await provider.list_executions() == ["alpha", "zeta"]
    await lock.release()
    await provider.delete_checkpoint("zeta_ckpt_1")
    assert await provider.list_executions() == ["alpha"]


@conformance
async def test_cleanup_old_checkpoints(provider: CheckpointProvider) -> None:
    for n in range(1, 6):
        await provider.save_checkpoint(checkpoint_id("run", n), b"x")
    await provider.save_checkpoint("other_ckpt_1", b"y")
    assert await provider.cleanup_old_checkpoints("run", keep_last_n=2) == 3
    assert await provider.list_checkpoints("run") == ["run_ckpt_4", "run_ckpt_5"]
    assert await provider.cleanup_old_checkpoints("run", keep_last_n=5) == 0
    assert await provider.cleanup_old_checkpoints("run", keep_last_n=0) == 2
    assert await provider.list_checkpoints("run") == []
    assert await provider.list_checkpoints("other") == ["other_ckpt_1"]
    with pytest.raises(ValueError):
        await provider.cleanup_old_checkpoints("run", keep_last_n=-1)


@conformance
async def test_unsynced_saves_then_sync(provider: CheckpointProvider) -> None:
    await provider.sync("never-saved")
    for n in range(1, 4):
        await provider.save_checkpoint(checkpoint_id("run", n), b"%d" % n, sync=False)
    await provider.sync("run")
    await provider.sync("run")
    await provider.save_checkpoint("run_ckpt_4", b"4", sync=False)
    await provider.save_checkpoint("run_ckpt_5", b"5", sync=True)
    assert await provider.list_checkpoints("run") == [checkpoint_id("run", n) for n in range(1, 6)]
    assert await provider.load_checkpoint("run_ckpt_4") == b"4"


@conformance
async def test_concurrent_saves(provider: CheckpointProvider) -> None:
    async with anyio.create_task_group() as tg:
        for n in range(20):
            tg.start_soon(provider.save_checkpoint, checkpoint_id("run", n), b"r%d" % n)
    assert await provider.list_checkpoints("run") == [checkpoint_id("run", n) for n in range(20)]


@conformance
async def test_malformed_ids_are_rejected(provider: CheckpointProvider) -> None:
    for bad in ("run", "run_ckpt_", "_ckpt_1", "run_ckpt_x", "run_ckpt_01", "run_ckpt_1\n"):
        with pytest.raises(ValueError):
            await provider.save_checkpoint(bad, b"x")
        with pytest.raises(ValueError):
            await provider.load_checkpoint(bad)
        with pytest.raises(ValueError):
            await provider.delete_checkpoint(bad)


@conformance
async def test_lock_is_exclusive(
    provider: CheckpointProvider, make_provider: Callable[[], CheckpointProvider]
) -> None:
    other = make_provider()
    try:
        lock = await provider.acquire_lock("run")
        assert lock.execution_id == "run"
        with pytest.raises(ExecutionLockedError, match="run"):
            await provider.acquire_lock("run")
        with pytest.raises(ExecutionLockedError):
            await other.acquire_lock("run")
        second = await other.acquire_lock("another-run")  # locks are per execution
        await second.release()
        await lock.release()
        await lock.release()  # idempotent
        async with await other.acquire_lock("run"):
            with pytest.raises(ExecutionLockedError):
                await provider.acquire_lock("run")
        relocked = await provider.acquire_lock("run")
        await relocked.release()
    finally:
        await other.close()


@conformance
async def test_a_held_lock_renews_and_is_not_lost(provider: CheckpointProvider) -> None:
    """Every lock can be renewed while held; a lease's generation grows with each take, a lock that
    dies with its process has none (0)."""
    first = await provider.acquire_lock("run")
    await first.renew()
    assert not first.lost
    await first.release()
    second = await provider.acquire_lock("run")
    assert (first.generation, second.generation) == (0, 0) or second.generation > first.generation > 0
    await second.release()


@conformance
async def test_close_releases_locks(make_provider: Callable[[], CheckpointProvider]) -> None:
    first, second = make_provider(), make_provider()
    try:
        await first.acquire_lock("run")
        await first.close()
        lock = await second.acquire_lock("run")
        await lock.release()
    finally:
        await first.close()
        await second.close()


@parametrize_providers((*DURABLE, "postgres"))
async def test_records_outlive_the_provider_object(
    provider: CheckpointProvider, make_provider: Callable[[], CheckpointProvider]
) -> None:
    await provider.save_checkpoint("run_ckpt_1", b"synced")
    await provider.save_checkpoint("run_ckpt_2", b"unsynced", sync=False)
    reader = make_provider()
    try:
        assert await reader.list_checkpoints("run") == ["run_ckpt_1", "run_ckpt_2"]
        assert await reader.load_checkpoint("run_ckpt_2") == b"unsynced"
    finally:
        await reader.close()


_LOCK_HOLDER = """
import asyncio, json, sys, time
from playbooks.checkpoints.providers import create_provider

async def main():
    provider = create_provider(sys.argv[1], **json.loads(sys.argv[2]))
    await provider.acquire_lock("shared")
    print("locked", flush=True)
    time.sleep(120)

asyncio.run(main())
"""


@pytest.mark.integration
@pytest.mark.parametrize("name", DURABLE)
async def test_lock_of_killed_process_is_freed(name: str, tmp_path: Path) -> None:
    kwargs = storage_kwargs(name, tmp_path)
    provider = create_provider(name, **kwargs)
    child = subprocess.Popen(
        [sys.executable, "-c", _LOCK_HOLDER, name, json.dumps(kwargs)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        ready, _, _ = select.select([child.stdout], [], [], 30)
        line = child.stdout.readline() if ready else ""
        if line.strip() != "locked":
            child.kill()
            _, err = child.communicate()
            pytest.fail(f"lock holder did not start: {err}")
        with pytest.raises(ExecutionLockedError, match=rf"\b{child.pid}\b"):
            await provider.acquire_lock("shared")
        child.send_signal(signal.SIGKILL)
        child.wait()
        lock = await provider.acquire_lock("shared")
        await lock.release()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
        if child.stderr is not None:
            child.stderr.close()
        await provider.close()


# --------------------------------------------------------------------------------------------------
# Filesystem provider
# --------------------------------------------------------------------------------------------------


def _names(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()}


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
async def fs(tmp_path: Path, anyio_backend: str) -> AsyncIterator[FilesystemCheckpointProvider]:
    p = FilesystemCheckpointProvider(tmp_path / "ckpts")
    yield p
    await p.close()


async def test_fs_layout_and_permissions(fs: FilesystemCheckpointProvider, tmp_path: Path) -> None:
    lock = await fs.acquire_lock("agent")
    await fs.save_checkpoint("agent_ckpt_1", b"x")
    folder = tmp_path / "ckpts" / "agent"
    assert _names(folder) == {"agent_ckpt_1.pkl", ".lock"}
    assert _mode(tmp_path / "ckpts") == 0o700
    assert _mode(folder) == 0o700
    assert _mode(folder / "agent_ckpt_1.pkl") == 0o600
    assert _mode(folder / ".lock") == 0o600
    assert (folder / ".lock").read_text().strip() == str(os.getpid())
    await lock.release()


async def test_fs_leaves_no_temp_files(tmp_path: Path, anyio_backend: str) -> None:
    fs = FilesystemCheckpointProvider(tmp_path, inline_write_limit=16)  # big ones go to a thread
    await fs.save_checkpoint("run_ckpt_1", b"small")
    await fs.save_checkpoint("run_ckpt_2", b"x" * 1000)
    await fs.save_checkpoint("run_ckpt_2", b"y" * 1000, sync=False)
    await fs.sync("run")
    assert _names(tmp_path / "run") == {"run_ckpt_1.pkl", "run_ckpt_2.pkl"}
    assert await fs.load_checkpoint("run_ckpt_2") == b"y" * 1000


async def test_fs_ignores_foreign_and_temp_files(fs: FilesystemCheckpointProvider, tmp_path: Path) -> None:
    await fs.save_checkpoint("run_ckpt_2", b"x")
    folder = tmp_path / "ckpts" / "run"
    for name in (
        "notes.txt",
        "run_ckpt_01.pkl",
        "run_ckpt_3.pkl.bak",
        ".run_ckpt_4.pkl.abc.tmp",
        "other_ckpt_1.pkl",
        "run_ckpt_.pkl",
    ):
        (folder / name).write_bytes(b"junk")
    (tmp_path / "ckpts" / "empty").mkdir()
    (tmp_path / "ckpts" / ".hidden").mkdir()
    (tmp_path / "ckpts" / "stray-file").write_bytes(b"")
    assert await fs.list_checkpoints("run") == ["run_ckpt_2"]
    assert await fs.list_executions() == ["run"]


async def test_fs_acquire_lock_removes_stale_temp_files(
    fs: FilesystemCheckpointProvider, tmp_path: Path
) -> None:
    await fs.save_checkpoint("run_ckpt_1", b"x")
    stale = tmp_path / "ckpts" / "run" / ".run_ckpt_2.pkl.0123456789ab.tmp"
    stale.write_bytes(b"half a rec")
    async with await fs.acquire_lock("run"):
        assert not stale.exists()
        assert await fs.load_checkpoint("run_ckpt_1") == b"x"


@pytest.mark.parametrize(
    "bad", ["", ".", "..", "../escape", "a/b", "/abs", "a\\b", "a\0b", ".hidden"]
)
async def test_fs_rejects_path_traversal(
    fs: FilesystemCheckpointProvider, tmp_path: Path, bad: str
) -> None:
    with pytest.raises(ValueError):
        await fs.save_checkpoint(checkpoint_id(bad, 1), b"x")
    with pytest.raises(ValueError):
        await fs.load_checkpoint(checkpoint_id(bad, 1))
    with pytest.raises(ValueError):
        await fs.list_checkpoints(bad)
    with pytest.raises(ValueError):
        await fs.acquire_lock(bad)
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("target", "code", "words"),
    [
        ("replace", errno.ENOSPC, r"disk full \(ENOSPC\)"),
        ("write", errno.ENOSPC, r"disk full \(ENOSPC\)"),
        ("fsync", errno.EIO, r"I/O error .*\(EIO\)"),
        ("open", errno.EACCES, r"permission denied \(EACCES\)"),
    ],
)
async def test_fs_write_error_keeps_previous_record(
    fs: FilesystemCheckpointProvider,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    target: str,
    code: int,
    words: str,
) -> None:
    await fs.save_checkpoint("run_ckpt_1", b"good")

    def failing(*args: Any, **kwargs: Any) -> Any:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(os, target, failing)
    try:
        with pytest.raises(CheckpointWriteError, match=words) as info:
            await fs.save_checkpoint("run_ckpt_1", b"replacement")
        with pytest.raises(CheckpointWriteError):
            await fs.save_checkpoint("run_ckpt_2", b"next")
    finally:
        monkeypatch.undo()
    assert "run_ckpt_1.pkl" in str(info.value)
    assert isinstance(info.value.__cause__, OSError)
    assert await fs.load_checkpoint("run_ckpt_1") == b"good"
    assert await fs.list_checkpoints("run") == ["run_ckpt_1"]
    assert _names(tmp_path / "ckpts" / "run") == {"run_ckpt_1.pkl"}


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file modes")
async def test_fs_read_only_folder(fs: FilesystemCheckpointProvider, tmp_path: Path) -> None:
    await fs.save_checkpoint("run_ckpt_1", b"good")
    folder = tmp_path / "ckpts" / "run"
    folder.chmod(0o500)
    try:
        with pytest.raises(CheckpointWriteError, match="permission denied"):
            await fs.save_checkpoint("run_ckpt_2", b"next")
    finally:
        folder.chmod(0o700)
    assert await fs.load_checkpoint("run_ckpt_1") == b"good"
    assert _names(folder) == {"run_ckpt_1.pkl"}


async def test_fs_base_path_is_a_file(tmp_path: Path, anyio_backend: str) -> None:
    (tmp_path / "file").write_bytes(b"")
    fs = FilesystemCheckpointProvider(tmp_path / "file")
    with pytest.raises(CheckpointWriteError, match="ENOTDIR|EEXIST"):
        await fs.save_checkpoint("run_ckpt_1", b"x")


async def test_fs_fsync_only_when_asked(
    fs: FilesystemCheckpointProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fs.save_checkpoint("run_ckpt_0", b"creates the folder")
    calls: list[int] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        calls.append(fd)
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", counting_fsync)
    await fs.save_checkpoint("run_ckpt_1", b"a", sync=False)
    await fs.save_checkpoint("run_ckpt_2", b"b", sync=False)
    assert calls == []
    await fs.sync("run")
    assert len(calls) == 3  # two pending files, then the folder
    calls.clear()
    await fs.sync("run")
    assert calls == []
    await fs.save_checkpoint("run_ckpt_3", b"c", sync=False)
    await fs.save_checkpoint("run_ckpt_4", b"d")
    assert len(calls) == 2  # the new file and the folder; the pending one waits for sync()
    calls.clear()
    await fs.sync("run")
    assert len(calls) == 2  # the pending file, the folder
    calls.clear()
    await fs.save_checkpoint("run_ckpt_5", b"e", sync=False)
    await fs.delete_checkpoint("run_ckpt_5")
    await fs.sync("run")
    assert len(calls) == 1  # only the folder: the pending record is gone


async def test_fs_lock_error_names_holder(fs: FilesystemCheckpointProvider) -> None:
    async with await fs.acquire_lock("run"):
        with pytest.raises(ExecutionLockedError, match=rf"this process \(pid {os.getpid()}\)"):
            await fs.acquire_lock("run")


# --------------------------------------------------------------------------------------------------
# SQLite provider
# --------------------------------------------------------------------------------------------------


@pytest.fixture
async def db(tmp_path: Path, anyio_backend: str) -> AsyncIterator[SQLiteCheckpointProvider]:
    p = SQLiteCheckpointProvider(tmp_path / "sub" / "c.sqlite3")
    yield p
    await p.close()


def _insert_lock_row(path: Path, pid: int, hostname: str, token: str | None) -> None:
    with sqlite3.connect(path) as conn:
        conn.execute(
            "INSERT OR REPLACE INTO locks VALUES ('run', ?, ?, 0, ?)", (pid, hostname, token)
        )
    conn.close()


async def test_sqlite_file_permissions(db: SQLiteCheckpointProvider, tmp_path: Path) -> None:
    await db.save_checkpoint("run_ckpt_1", b"x")
    assert _mode(tmp_path / "sub") == 0o700
    assert _mode(tmp_path / "sub" / "c.sqlite3") == 0o600
    wal = tmp_path / "sub" / "c.sqlite3-wal"
    if wal.exists():
        assert _mode(wal) == 0o600


async def test_sqlite_uses_wal(db: SQLiteCheckpointProvider, tmp_path: Path) -> None:
    await db.save_checkpoint("run_ckpt_1", b"x")
    with sqlite3.connect(tmp_path / "sub" / "c.sqlite3") as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


@pytest.mark.parametrize(
    "pid, host", [(2**30, None), (1, None), ("parent", None), (2**30, "elsewhere.example")]
)
async def test_sqlite_lock_row_never_decides_liveness(
    db: SQLiteCheckpointProvider,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    pid: int | str,
    host: str | None,
) -> None:
    """A row left behind names a dead pid, pid 1, a live process (our parent) or another host: with
    its flock free, the lock is taken over, with a warning naming the old holder."""
    await db.list_executions()  # creates the schema
    import socket

    holder = os.getppid() if pid == "parent" else int(pid)
    _insert_lock_row(tmp_path / "sub" / "c.sqlite3", holder, host or socket.gethostname(), "old:1")
    lock = await db.acquire_lock("run")
    assert f"from process {holder} on" in caplog.text and "no longer running" in caplog.text
    with sqlite3.connect(tmp_path / "sub" / "c.sqlite3") as conn:
        row = conn.execute("SELECT pid, process_token FROM locks WHERE execution_id = 'run'").fetchone()
    conn.close()
    assert row == (os.getpid(), None)
    await lock.release()


async def test_sqlite_lock_is_a_flock_on_a_side_file(
    db: SQLiteCheckpointProvider, tmp_path: Path
) -> None:
    import fcntl
    import hashlib

    folder = tmp_path / "sub" / "c.sqlite3.locks"
    assert db.locks_path == str(folder)
    lock = await db.acquire_lock("run/with odd\nname")
    path = folder / (hashlib.sha256("run/with odd\nname".encode()).hexdigest()[:32] + ".lock")
    assert sorted(p.name for p in folder.iterdir()) == [path.name]
    assert _mode(folder) == 0o700 and _mode(path) == 0o600
    fd = os.open(path, os.O_RDWR)
    try:
        with pytest.raises(BlockingIOError):  # held, by the kernel's count
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        await lock.release()
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free again
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)
    assert path.exists()  # never deleted: unlinking races with a process that just opened it
    with sqlite3.connect(tmp_path / "sub" / "c.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM locks").fetchone()[0] == 0
    conn.close()


async def test_sqlite_lock_held_by_another_open_file_is_refused_without_a_row(
    db: SQLiteCheckpointProvider, tmp_path: Path
) -> None:
    """The flock decides even when no row names the holder (a holder killed between its flock and
    its row, or a row deleted by hand)."""
    import fcntl

    await db.list_executions()
    folder = tmp_path / "sub" / "c.sqlite3.locks"
    folder.mkdir(mode=0o700)
    from playbooks.checkpoints.providers.sqlite import lock_file_name

    fd = os.open(folder / lock_file_name("run"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(ExecutionLockedError, match="another process \\(not yet recorded\\)"):
            await db.acquire_lock("run")
    finally:
        os.close(fd)
    lock = await db.acquire_lock("run")
    await lock.release()


async def test_sqlite_in_memory_lock_is_exclusive(anyio_backend: str) -> None:
    db = SQLiteCheckpointProvider(":memory:")
    try:
        assert db.locks_path is None
        lock = await db.acquire_lock("run")
        with pytest.raises(ExecutionLockedError, match="this process already holds it"):
            await db.acquire_lock("run")
        await lock.release()
        relocked = await db.acquire_lock("run")
        await relocked.release()
    finally:
        await db.close()


def _start_sqlite_holder(db_path: Path, prefix: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    """Start a process (under ``prefix``, e.g. ``unshare``) that takes the lock of ``shared`` and
    prints ``locked pid <its pid>``; fail the test if it does not."""
    child = subprocess.Popen(
        [*prefix, sys.executable, "-c", _LOCK_HOLDER_PID, str(db_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], 30)
    line = child.stdout.readline() if ready else ""
    if not line.startswith("locked pid "):
        child.kill()
        _, err = child.communicate()
        pytest.fail(f"lock holder did not start: {line!r} {err}")
    child.holder_pid = int(line.split()[-1])  # type: ignore[attr-defined]
    return child


_LOCK_HOLDER_PID = """
import asyncio, os, sys, time
from playbooks.checkpoints.providers.sqlite import SQLiteCheckpointProvider

async def main():
    await SQLiteCheckpointProvider(sys.argv[1]).acquire_lock("shared")
    print("locked pid", os.getpid(), flush=True)
    time.sleep(120)

asyncio.run(main())
"""


def _stop(child: subprocess.Popen[str]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()
    for stream in (child.stdout, child.stderr):
        if stream is not None:
            stream.close()


async def _acquire_within(db: SQLiteCheckpointProvider, seconds: float) -> None:
    """Take and give back the lock of ``shared``, retrying while it is held, for up to ``seconds``."""
    deadline = anyio.current_time() + seconds
    while True:
        try:
            lock = await db.acquire_lock("shared")
        except ExecutionLockedError:
            if anyio.current_time() > deadline:
                raise
            await anyio.sleep(0.02)
            continue
        await lock.release()
        return


@pytest.mark.integration
async def test_sqlite_live_holder_is_refused_and_its_sigkill_frees_the_lock(
    db: SQLiteCheckpointProvider, tmp_path: Path
) -> None:
    child = _start_sqlite_holder(tmp_path / "sub" / "c.sqlite3")
    try:
        with pytest.raises(ExecutionLockedError) as refused:
            await db.acquire_lock("shared")
        message = str(refused.value)
        assert f"process {child.pid} on this host (since " in message
        assert "is running it; wait for that process to finish or stop it" in message
        assert "c.sqlite3.locks/" in message
        child.send_signal(signal.SIGKILL)
        child.wait()
        lock = await db.acquire_lock("shared")  # at once: the kernel dropped the flock
        await lock.release()
    finally:
        _stop(child)


@pytest.mark.integration
async def test_sqlite_lock_of_an_unreaped_killed_process_is_free(
    db: SQLiteCheckpointProvider, tmp_path: Path
) -> None:
    child = _start_sqlite_holder(tmp_path / "sub" / "c.sqlite3")
    try:
        child.send_signal(signal.SIGKILL)
        deadline = anyio.current_time() + 10
        while not Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"):
            assert anyio.current_time() < deadline, "the killed holder did not become a zombie"
            await anyio.sleep(0.01)
        os.kill(child.pid, 0)  # its PID still exists: a PID check would call it alive
        lock = await db.acquire_lock("shared")
        await lock.release()
        assert child.poll() == -signal.SIGKILL
    finally:
        _stop(child)


def _unshare_works() -> bool:
    import shutil

    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.integration
@pytest.mark.skipif(not _unshare_works(), reason="unshare --pid needs root (or user namespaces)")
async def test_sqlite_lock_of_a_killed_container_pid_1_is_free(
    db: SQLiteCheckpointProvider, tmp_path: Path
) -> None:
    """A holder that is PID 1 of its PID namespace (a container): refused while it lives, free once
    the container is killed, although PID 1 exists on every machine."""
    child = _start_sqlite_holder(tmp_path / "sub" / "c.sqlite3", ("unshare", "--pid", "--fork", "--kill-child"))
    try:
        assert child.holder_pid == 1  # type: ignore[attr-defined]
        with pytest.raises(ExecutionLockedError, match=r"process 1 on this host \(since "):
            await db.acquire_lock("shared")
        child.send_signal(signal.SIGKILL)  # unshare dies; --kill-child kills the namespace's PID 1
        child.wait()
        await _acquire_within(db, 10)
    finally:
        _stop(child)


async def test_sqlite_refuses_newer_schema(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "c.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA user_version=99")
    conn.close()
    db = SQLiteCheckpointProvider(path)
    with pytest.raises(CheckpointError, match="upgrade playbooks"):
        await db.list_executions()
    await db.close()


async def test_sqlite_not_a_database(tmp_path: Path, anyio_backend: str) -> None:
    path = tmp_path / "c.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    db = SQLiteCheckpointProvider(path)
    with pytest.raises(CheckpointWriteError, match="SQLITE_NOTADB"):
        await db.save_checkpoint("run_ckpt_1", b"x")
    with pytest.raises(CheckpointError, match="not a SQLite database"):
        await db.load_checkpoint("run_ckpt_1")
    await db.close()


async def test_sqlite_sync_fsyncs_the_wal_without_a_commit(
    db: SQLiteCheckpointProvider, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """sync() makes the unsynced commits durable with one fdatasync of the WAL (and of the folder
    once, for the WAL's name); it commits nothing of its own, and does nothing when nothing is new."""
    import os

    synced: list[str] = []
    real = os.fdatasync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    await db.save_checkpoint("run_ckpt_1", b"x", sync=False)
    await db.sync("run")
    assert synced == [str(tmp_path / "sub" / "c.sqlite3-wal"), str(tmp_path / "sub")]
    await db.save_checkpoint("run_ckpt_2", b"y", sync=False)
    await db.sync("run")
    await db.sync("run")
    assert synced[2:] == [str(tmp_path / "sub" / "c.sqlite3-wal")]
    with sqlite3.connect(tmp_path / "sub" / "c.sqlite3") as conn:
        assert conn.execute("SELECT count(*) FROM meta WHERE key = 'last_sync'").fetchone()[0] == 0
    conn.close()


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_builtins_are_available() -> None:
    assert set(BUILTINS) <= set(available_providers())
    assert available_providers() == sorted(available_providers())
    assert get_provider_class("memory") is MemoryCheckpointProvider
    assert get_provider_class("filesystem") is FilesystemCheckpointProvider
    assert get_provider_class("sqlite") is SQLiteCheckpointProvider


def test_unknown_provider_lists_available_names() -> None:
    with pytest.raises(LookupError, match="unknown checkpoint provider 'nope'.*filesystem.*sqlite"):
        get_provider_class("nope")


def test_create_provider_passes_arguments(tmp_path: Path) -> None:
    provider = create_provider("filesystem", base_path=tmp_path / "x")
    assert isinstance(provider, FilesystemCheckpointProvider)
    assert provider.base_path == str(tmp_path / "x")


def test_lazy_attributes() -> None:
    assert providers.SQLiteCheckpointProvider is SQLiteCheckpointProvider
    assert "MemoryCheckpointProvider" in dir(providers)
    with pytest.raises(AttributeError):
        getattr(providers, "NoSuchProvider")


def test_builtin_fallback_without_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "_entry_points", lambda: {})
    assert get_provider_class("memory") is MemoryCheckpointProvider
    assert available_providers() == sorted(BUILTINS)


class _FakeEntryPoint:
    def __init__(self, value: str, obj: object) -> None:
        self.value = value
        self._obj = obj

    def load(self) -> object:
        return self._obj


def test_entry_point_must_be_a_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(providers, "_entry_points", lambda: {"bad": (_FakeEntryPoint("m:X", object),)})
    with pytest.raises(TypeError, match="not a CheckpointProvider"):
        get_provider_class("bad")


def test_entry_point_registered_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    eps = (_FakeEntryPoint("a:X", object), _FakeEntryPoint("b:Y", object))
    monkeypatch.setattr(providers, "_entry_points", lambda: {"dup": eps})
    with pytest.raises(LookupError, match="more than once"):
        get_provider_class("dup")


@pytest.mark.integration
def test_importing_registry_is_lazy() -> None:
    code = (
        "import sys, playbooks.checkpoints.providers as p; "
        "print(sorted(m for m in ('sqlite3', 'playbooks.checkpoints.providers.sqlite', "
        "'playbooks.checkpoints.providers.filesystem', 'importlib.metadata') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# --------------------------------------------------------------------------------------------------
# Journal: native (filesystem) or stored as records (the default)
# --------------------------------------------------------------------------------------------------


async def _journal_view(provider: CheckpointProvider, execution_id: str, counters: list[int]) -> dict[int, bytes]:
    """What a manager reads back: journal entries kept apart, else records of those counters."""
    apart = dict(await provider.read_journal(execution_id))
    view = {}
    for counter in counters:
        data = apart.get(counter)
        if data is None:
            data = await provider.load_checkpoint(checkpoint_id(execution_id, counter))
        if data is not None:
            view[counter] = data
    return view


@conformance
async def test_journal_append_read_drop(provider: CheckpointProvider) -> None:
    for counter, data in ((1, b"one"), (2, b""), (3, b"three" * 100)):
        await provider.append_journal("run", counter, data)
    await provider.sync_journal("run")
    assert await _journal_view(provider, "run", [1, 2, 3]) == {1: b"one", 2: b"", 3: b"three" * 100}
    await provider.drop_journal("run", [1, 3])
    assert await _journal_view(provider, "run", [1, 2, 3]) == {2: b""}
    await provider.append_journal("run", 4, b"four")  # appending goes on after a drop
    assert await _journal_view(provider, "run", [2, 4]) == {2: b"", 4: b"four"}
    assert await _journal_view(provider, "other", [2, 4]) == {}


@conformance
async def test_prepared_append_lands_when_called(provider: CheckpointProvider) -> None:
    if not provider.completes_without_suspending:
        pytest.skip("prepare_append is for providers that write without suspending")
    await provider.append_journal("run", 1, b"one")
    land = provider.prepare_append("run", 2, b"two")
    assert await _journal_view(provider, "run", [1, 2]) == {1: b"one"}  # nothing written yet
    land()
    await provider.append_journal("run", 3, b"three")
    await provider.sync_journal("run")
    assert await _journal_view(provider, "run", [1, 2, 3]) == {1: b"one", 2: b"two", 3: b"three"}


async def test_fs_journal_is_one_file_and_drops_a_torn_tail(fs: FilesystemCheckpointProvider) -> None:
    await fs.append_journal("run", 1, b"first")
    await fs.append_journal("run", 2, b"second")
    await fs.sync_journal("run")
    path = Path(fs.base_path) / "run" / "run.journal"
    assert path.exists() and not await fs.list_checkpoints("run")
    assert await fs.list_executions() == ["run"]
    with open(path, "ab") as f:  # a process killed in the middle of an append
        f.write(b"\x00\x00\x00\x00\x00\x00\x00\x03\x00\x00\x00\x10par")
    assert await fs.read_journal("run") == [(1, b"first"), (2, b"second")]
    await fs.drop_journal("run", [1, 2])
    assert not path.exists()


async def test_fs_journal_sync_is_one_fdatasync(
    fs: FilesystemCheckpointProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fs.append_journal("run", 1, b"a")
    await fs.sync_journal("run")  # the first sync also fsyncs the folder (the new file's name)
    calls: list[str] = []
    monkeypatch.setattr(os, "fdatasync", lambda fd: calls.append("fdatasync"))
    monkeypatch.setattr(os, "fsync", lambda fd: calls.append("fsync"))
    await fs.append_journal("run", 2, b"b")
    await fs.append_journal("run", 3, b"c")
    await fs.sync_journal("run")
    assert calls == ["fdatasync"]
    await fs.sync_journal("run")  # nothing new: nothing to do
    assert calls == ["fdatasync"]


@conformance
async def test_head_is_one_small_record_replaced_in_place(provider: CheckpointProvider) -> None:
    assert await provider.read_head("run") is None
    await provider.write_head("run", b"h" * 61)
    await provider.write_head("run", b"H" * 61)
    assert await provider.read_head("run") == b"H" * 61
    assert await provider.read_head("other") is None


async def test_fs_a_damaged_entry_in_the_middle_hides_nothing_after_it(fs: FilesystemCheckpointProvider) -> None:
    for counter in (1, 2, 3):
        await fs.append_journal("run", counter, f"entry {counter}".encode() * 10)
    path = Path(fs.base_path) / "run" / "run.journal"
    data = bytearray(path.read_bytes())
    second = data.index(b"PBJE", 1)
    data[second + 12] ^= 0x7F  # the second entry's length is damaged: its frame no longer fits
    path.write_bytes(bytes(data))
    with pytest.warns(Warning, match="damaged or torn entry in its middle"):
        entries = await fs.read_journal("run")
    assert [c for c, _ in entries] == [1, 3]


async def test_fs_a_flipped_bit_inside_an_entry_is_handed_to_the_integrity_check(
    fs: FilesystemCheckpointProvider,
) -> None:
    for counter in (1, 2, 3):
        await fs.append_journal("run", counter, f"entry {counter}".encode() * 10)
    path = Path(fs.base_path) / "run" / "run.journal"
    data = bytearray(path.read_bytes())
    data[data.index(b"entry 2") + 3] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.warns(Warning, match="damaged or torn entry in its middle"):
        entries = await fs.read_journal("run")
    assert [c for c, _ in entries] == [1, 2, 3]  # the record's own check refuses entry 2
    assert dict(entries)[2] != b"entry 2" * 10


async def test_fs_a_torn_tail_is_cut_off_before_the_next_append(tmp_path: Path, anyio_backend: str) -> None:
    first = FilesystemCheckpointProvider(tmp_path)
    await first.append_journal("run", 1, b"one")
    path = tmp_path / "run" / "run.journal"
    with open(path, "ab") as f:  # a write cut short by a full disk, in another process
        f.write(b"PBJE\x00\x00\x00\x00\x00\x00\x00\x02\x00\x00\x01\x00par")
    second = FilesystemCheckpointProvider(tmp_path)
    with pytest.warns(Warning, match="torn entry"):
        await second.append_journal("run", 3, b"three")
    assert await second.read_journal("run") == [(1, b"one"), (3, b"three")]
    await first.close()
    await second.close()


async def test_fs_a_short_write_is_cut_off_at_once(
    fs: FilesystemCheckpointProvider, monkeypatch: pytest.MonkeyPatch
) -> None:
    await fs.append_journal("run", 1, b"one")
    real_write = os.write

    def short_then_full(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[:7])  # part of the entry lands, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", short_then_full)
    with pytest.raises(CheckpointWriteError, match="disk full"):
        await fs.append_journal("run", 2, b"two")
    monkeypatch.setattr(os, "write", real_write)
    await fs.append_journal("run", 3, b"three")
    assert await fs.read_journal("run") == [(1, b"one"), (3, b"three")]
    path = Path(fs.base_path) / "run" / "run.journal"
    assert path.read_bytes().count(b"PBJE") == 2  # nothing torn left in the file
