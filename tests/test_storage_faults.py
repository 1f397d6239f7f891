"""Storage that never loses a finished call: a full disk, a file-size limit, kills in a row during a
replay, a deleted or replaced run folder.

Every test runs a durable executor, "kills" it (what kill -9 leaves: the stored records and no lock),
resumes it, and counts the live calls of its tool: a call that returned is never run again, except the
one whose result could not be written.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from playbooks import Agent
from playbooks.checkpoints import (
    CheckpointManager,
    CheckpointProvider,
    FilesystemCheckpointProvider,
    MemoryCheckpointProvider,
    RecoveryCoordinator,
    SQLiteCheckpointProvider,
)
from playbooks.checkpoints.model import Record
from playbooks.errors import CheckpointWriteError, ExecutionLockedError, StoreReplacedError
from playbooks.execution import durable
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

pytestmark = pytest.mark.anyio


class Killed(BaseException):
    """Raised by a tool to stop the process at a chosen live call (what SIGKILL does, in-process)."""


class Tools:
    """``Work(i)`` returns ``i * 10``; ``returned`` lists every live call that returned."""

    def __init__(self) -> None:
        self.returned: list[int] = []
        self.kill_at: int | None = None  # the live call (1-based) that "kills" before it runs
        self.live = 0

    def tools(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        async def Work(i: int) -> int:
            self.live += 1
            if self.kill_at is not None and self.live == self.kill_at:
                raise Killed
            self.returned.append(i)
            return i * 10

        return {"Work": Work}

    def repeated(self) -> list[int]:
        return sorted({i for i in self.returned if self.returned.count(i) > 1})


_CALLS = 36  # calls of Work that program() makes


def program(big: int) -> str:
    """LLM-style code: a namespace of ``big`` small dicts, top-level awaits and loops of awaits."""
    lines = [f"data = [{{'i': i, 's': 'x' * 40}} for i in range({big})]\n", "total = 0\n"]
    for block in range(6):
        lines.append(f"v{block} = await Work({block * 100})\n")
        lines.append(f"for i in range({block * 100 + 1}, {block * 100 + 6}):\n    total += await Work(i)\n")
        lines.append(f"data[{block}]['s'] = 'changed'\n")
    lines.append("result = (total, v0, v5, len(data))\n")
    return "".join(lines)


async def _crash(manager: CheckpointManager) -> None:
    if manager._lock is not None:
        await manager._lock.release()
        manager._lock = None


async def _run(
    agent: Agent, make: Callable[[], CheckpointProvider], code: str, *, resume: bool
) -> tuple[StreamingPythonExecutor, CheckpointManager]:
    """Start (or resume) the run and feed the rest of ``code`` in chunks; may raise Killed."""
    manager = CheckpointManager(execution_id=agent.id, provider=make())
    executor = None
    try:
        if resume:
            coordinator = RecoveryCoordinator(manager)
            if await coordinator.can_recover():
                checkpoint = await manager.get_latest_checkpoint()
                assert checkpoint is not None
                await coordinator.recover_execution_state(agent)
                executor = await StreamingPythonExecutor.resume_from_checkpoint(
                    agent, checkpoint, checkpoint_manager=manager
                )
        if executor is None:
            executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
        rest = code[len(executor.response) :]
        for i in range(0, len(rest), 23):
            await executor.add_chunk(rest[i : i + 23])
        result = await executor.finalize()
        assert result.success, result.error
    except BaseException:
        await _crash(manager)
        raise
    return executor, manager


async def _uninterrupted(code: str) -> Any:
    tools = Tools()
    agent = Agent(f"ref-{uuid.uuid4().hex[:8]}", tools=tools.tools())
    executor = StreamingPythonExecutor(agent)
    await executor.add_chunk(code)
    result = await executor.finalize()
    assert result.success, result.error
    return executor.namespace["result"]


# ----------------------------------------------------------------- replay order


async def test_a_snapshot_written_during_a_replay_never_hides_unreplayed_records() -> None:
    """Records 2..7 are calls 0..5 after the first snapshot; record 8 is a snapshot written by a
    resumed process after replaying calls 0..1 only (next call 2). It must not be the base: calls 2..5
    stay in the journal."""
    manager = CheckpointManager("replay", MemoryCheckpointProvider())
    await manager.open()

    def record(kind: str, **fields: Any) -> Record:
        return Record(
            kind=kind, execution_id="replay", counter=manager.allocate_counter(), timestamp=0.0,  # type: ignore[arg-type]
            frame_id="replay", agent_id="a", call_stack=(), response_start=0, response_text="", **fields,
        )

    await manager.write(record("snapshot", next_seq=0))
    for seq in range(6):
        await manager.write(record("result", seq=str(seq), name="Work", outcome="value", value=b"x"))
    await manager.write(record("snapshot", next_seq=2))  # written during the replay
    fresh = CheckpointManager("replay", manager.provider)
    await fresh.load_records()
    state = fresh.frame_state("replay")
    assert state is not None
    assert state.snapshot_counter == 1
    assert sorted(state.journal, key=int) == [str(s) for s in range(6)]
    await manager.prune(force=True)  # the pruning rule agrees: nothing the journal needs is deleted
    again = CheckpointManager("replay", manager.provider)
    await again.load_records()
    assert sorted(again.frame_state("replay").journal, key=int) == [str(s) for s in range(6)]  # type: ignore[union-attr]
    await manager.close()


@pytest.fixture
def snapshot_whenever_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    """A big namespace is snapshotted as soon as the throttle allows: make it allow every time, so a
    resumed process snapshots during its replay whenever the executor would let it."""
    monkeypatch.setattr(durable, "_SNAPSHOT_SPACING", 0)
    monkeypatch.setattr(durable, "_SNAPSHOT_EVERY", 1)


def _providers(tmp_path: Path) -> dict[str, Callable[[], CheckpointProvider]]:
    memory = MemoryCheckpointProvider()
    return {
        "memory": lambda: memory,
        "sqlite": lambda: SQLiteCheckpointProvider(tmp_path / "db.sqlite3"),
        "filesystem": lambda: FilesystemCheckpointProvider(tmp_path / "fs"),
    }


@pytest.mark.parametrize("provider", ["memory", "sqlite", "filesystem"])
@pytest.mark.parametrize("kills", [(9, 14), (3, 6, 9), (20, 4, 4)])
async def test_kills_in_a_row_with_a_big_namespace_repeat_no_finished_call(
    provider: str, kills: tuple[int, ...], tmp_path: Path, snapshot_whenever_allowed: None
) -> None:
    code = program(big=9000)  # ~0.5 MB pickled: above the small-namespace limit
    expected = await _uninterrupted(code)
    tools = Tools()
    agent = Agent("dk", tools=tools.tools())
    make = _providers(tmp_path)[provider]
    resume = False
    for kill_at in kills:
        tools.kill_at, tools.live = kill_at, 0
        with pytest.raises(Killed):
            await _run(agent, make, code, resume=resume)
        resume = True
    tools.kill_at = None
    executor, manager = await _run(agent, make, code, resume=True)
    assert executor.namespace["result"] == expected
    assert tools.repeated() == []
    await manager.close()


# ----------------------------------------------------------------- a full disk


@contextlib.contextmanager
def _small_disk(folder: Path) -> Iterator[Callable[[int], None]]:
    """A folder whose free space can be set: a tmpfs when root can mount one (as in CI), else a
    file-size limit (RLIMIT_FSIZE) on this process. Yields ``limit(n)``: n bytes more may be written
    (``limit(-1)``: no limit)."""
    folder.mkdir()
    mounted = os.geteuid() == 0 and subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(folder)], capture_output=True
    ).returncode == 0
    filler = folder / "filler"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a killed process

    def limit(free: int) -> None:
        if mounted:
            filler.unlink(missing_ok=True)
            if free >= 0:
                st = os.statvfs(folder)
                total = st.f_bavail * st.f_frsize
                with open(filler, "wb") as f:
                    f.write(b"\0" * max(0, total - free))
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (hard if free < 0 else free + 64 * 1024, hard))

    try:
        yield limit
    finally:
        limit(-1)
        signal.signal(signal.SIGXFSZ, old_handler)
        if mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.integration
async def test_a_full_disk_during_writes_then_resume_kill_resume_repeats_no_finished_call(tmp_path: Path) -> None:
    """For each amount of free space: the run hits ENOSPC (or EFBIG) in the middle of a journal append
    or a snapshot file; space comes back; the resumed run is killed; a last resume finishes. Records
    the second run appended after the torn entry must all be read by the third."""
    code = program(big=3000)
    expected = await _uninterrupted(code)
    hits: dict[str, int] = {}
    with _small_disk(tmp_path / "disk") as limit:
        for trial, free in enumerate(range(3_000, 120_000, 9_000)):
            store = tmp_path / "disk" / f"t{trial}"
            tools = Tools()
            agent = Agent("full", tools=tools.tools())
            make = lambda: FilesystemCheckpointProvider(store)  # noqa: E731
            limit(free)
            with pytest.raises(CheckpointWriteError) as info:
                await _run(agent, make, code, resume=False)
            limit(-1)
            hits["journal" if "journal" in str(info.value) else "snapshot"] = hits.get(
                "journal" if "journal" in str(info.value) else "snapshot", 0
            ) + 1
            at_risk = tools.returned[-1:]  # its result may be what could not be written
            left = _CALLS - len(set(tools.returned))  # calls the resume still makes live (at least)
            if left:  # else every call ran and the final snapshot failed: no live call to kill at
                tools.kill_at, tools.live = min(7, max(1, left // 2)), 0
                with pytest.raises(Killed):
                    await _run(agent, make, code, resume=True)
            tools.kill_at = None
            executor, manager = await _run(agent, make, code, resume=True)
            await manager.close()
            assert executor.namespace["result"] == expected, trial
            assert set(tools.repeated()) <= set(at_risk), (trial, free, tools.repeated())
            shutil.rmtree(store)
    print(f"\nwrite failures by kind: {hits}")
    assert hits.get("journal", 0) >= 1 and hits.get("snapshot", 0) >= 1, hits


# ----------------------------------------------------------------- a deleted or replaced folder


@pytest.mark.parametrize("how", ["deleted", "replaced", "journal replaced"])
async def test_a_deleted_or_replaced_run_folder_stops_the_writer(how: str, tmp_path: Path) -> None:
    tools = Tools()
    agent = Agent("gone", tools=tools.tools())
    manager = CheckpointManager(execution_id="gone", provider=FilesystemCheckpointProvider(tmp_path))
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await executor.add_chunk("a = await Work(1)\nfor i in range(2):\n    b = await Work(i)\n")
    folder = tmp_path / "gone"
    if how == "deleted":
        shutil.rmtree(folder)
    elif how == "replaced":
        shutil.move(folder, tmp_path / "elsewhere")
        shutil.copytree(tmp_path / "elsewhere", folder)
    else:
        journal = folder / "gone.journal"
        shutil.copy(journal, tmp_path / "copy")
        os.replace(tmp_path / "copy", journal)
    with pytest.raises(StoreReplacedError, match="deleted|replaced|moved"):
        await executor.add_chunk("c = await Work(2)\nfor i in range(2):\n    d = await Work(i)\n")
        await executor.finalize()
    with contextlib.suppress(StoreReplacedError):  # closing says so again, and releases the lock
        await manager.close()
    assert manager._lock is None


@pytest.mark.parametrize("folder", ["kept", "deleted", "replaced"])
async def test_a_second_process_cannot_take_the_lock_while_the_first_runs(folder: str, tmp_path: Path) -> None:
    first = CheckpointManager("both", FilesystemCheckpointProvider(tmp_path))
    await first.open()
    if folder == "deleted":
        shutil.rmtree(tmp_path / "both")
    elif folder == "replaced":
        shutil.move(tmp_path / "both", tmp_path / "moved")
        (tmp_path / "both").mkdir()
    second = CheckpointManager("both", FilesystemCheckpointProvider(tmp_path))
    with pytest.raises(ExecutionLockedError, match="another process|this process"):
        await second.open()
    with contextlib.suppress(StoreReplacedError):
        await first.close()
    await second.open()  # free again once the first one is gone
    await second.close()


def test_base_folder_is_private_whatever_the_umask(tmp_path: Path) -> None:
    import anyio

    old = os.umask(0)
    try:
        provider = FilesystemCheckpointProvider(tmp_path / "base" / "deeper")
        anyio.run(provider.check_writable)
        lock = anyio.run(provider.acquire_lock, "run")
        anyio.run(lock.release)
    finally:
        os.umask(old)
    assert (tmp_path / "base" / "deeper").stat().st_mode & 0o777 == 0o700
    assert (tmp_path / "base" / "deeper" / "run").stat().st_mode & 0o777 == 0o700
    time.sleep(0)


WORKER = Path(__file__).parent / "durable_worker.py"


def _finished_keys(store: Path) -> set[str]:
    """Idempotency keys of the calls whose result record is stored (and verifies)."""
    import warnings

    import anyio

    async def main() -> set[str]:
        manager = CheckpointManager("agent_1", FilesystemCheckpointProvider(store))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = await manager.load_records()
        return {r.key for r in records.values() if r.kind == "result"}

    return anyio.run(main) if store.exists() else set()


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ["loop", "gather", "nested"])
def test_a_full_disk_then_resume_sigkill_resume_in_real_processes(scenario: str, tmp_path: Path) -> None:
    """The same with real processes and a real SIGKILL: the first process stops on ENOSPC (or EFBIG),
    the second resumes and is killed at its second live call, the third finishes. No idempotency key
    appears twice in the ledger, except the last call of the first process (its result may be what
    did not fit)."""
    import json
    import sys

    reference = tmp_path / "ref.json"
    subprocess.run(
        [sys.executable, str(WORKER), scenario, str(tmp_path / "ref"), str(tmp_path / "ref.ledger"), str(reference)],
        check=True, capture_output=True, timeout=120,
    )
    expected = json.loads(reference.read_text())["namespace"]
    failures = 0
    with _small_disk(tmp_path / "disk") as limit:
        for trial, free in enumerate(range(0, 40_000, 4_096)):
            store, ledger, out = tmp_path / "disk" / f"s{trial}", tmp_path / f"l{trial}", tmp_path / f"o{trial}"
            args = [sys.executable, str(WORKER), scenario, str(store), str(ledger), str(out)]
            limit(free)
            first = subprocess.run(args, capture_output=True, text=True, timeout=120)
            limit(-1)
            if first.returncode == 0:
                break  # enough space for the whole run: later trials would be the same
            failures += 1
            assert "Checkpoint" in first.stderr or "Storage" in first.stderr, first.stderr[-2000:]
            lines = ledger.read_text().splitlines() if ledger.exists() else []
            # Calls that ran but whose result is not stored were in flight: they may run again.
            at_risk = {line.split("\t")[0] for line in lines} - _finished_keys(store)
            second = subprocess.run([*args, "--resume", "--kill", "before:2"], capture_output=True, timeout=120)
            assert second.returncode in (0, -signal.SIGKILL), second.stderr
            third = subprocess.run([*args, "--resume"], capture_output=True, text=True, timeout=120)
            assert third.returncode == 0, third.stderr[-2000:]
            assert json.loads(out.read_text())["namespace"] == expected, trial
            keys = [line.split("\t")[0] for line in ledger.read_text().splitlines()]
            repeated = {k for k in keys if keys.count(k) > 1}
            assert repeated <= at_risk, (trial, free, sorted(repeated))
            assert not repeated & _finished_keys(store) - at_risk
    assert failures >= 2, "the disk never filled up"


async def test_a_cut_journal_is_reported_then_numbering_skips_the_lost_records(tmp_path: Path) -> None:
    import warnings

    tools = Tools()
    agent = Agent("cut", tools=tools.tools())
    manager = CheckpointManager("cut", FilesystemCheckpointProvider(tmp_path))
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await executor.add_chunk("a = await Work(1)\nfor i in range(3):\n    b = await Work(i)\n")
    await _crash(manager)
    journal = tmp_path / "cut" / "cut.journal"
    raw = journal.read_bytes()
    journal.write_bytes(raw[: raw.rindex(b"PBJE")])  # the last entry is gone, at an entry boundary
    lost = max(manager._written)
    reader = CheckpointManager("cut", FilesystemCheckpointProvider(tmp_path))
    with pytest.warns(Warning, match=f"lost records {lost}"):
        await reader.open()
    assert reader.allocate_counter() > lost  # a copy of the lost record put back cannot collide
    await reader.save_state("after", 1)  # the resumed run writes on: the head moves past the loss
    await reader.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = CheckpointManager("cut", FilesystemCheckpointProvider(tmp_path))
        await again.load_records()
