"""Durable execution in one process: the documented contract, the checkpoint mapping, replay, and faults.

A "crash" here abandons an executor mid-stream and drops its manager's lock, then a new manager and
coordinator (a new process, as far as the stored state is concerned) resume it. The real thing, with
subprocesses and SIGKILL at every await, is in test_crash_recovery.py.
"""

from __future__ import annotations

import os
import pickle
import stat
import warnings
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from playbooks import Agent
from playbooks.checkpoints import (
    CheckpointManager,
    FilesystemCheckpointProvider,
    MemoryCheckpointProvider,
    RecoveryCoordinator,
)
from playbooks.checkpoints.provider import CheckpointProvider
from playbooks.errors import (
    CheckpointKeyError,
    CheckpointTooLargeError,
    CheckpointWarning,
    CheckpointWriteError,
    CodeExecutionError,
    ExecutionLockedError,
    NonDeterminismError,
    UnpicklableValueError,
    UnrestoredValueError,
)
from playbooks.execution import durable
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import current_tool_call

pytestmark = pytest.mark.anyio


@pytest.fixture(autouse=True)
def _snapshot_after_every_await(monkeypatch: pytest.MonkeyPatch) -> None:
    """These tests read the snapshot after a given statement: snapshot after every statement that
    awaited, as a slow run does (a fast one snapshots after every eighth: test_direct_calls.py and the
    crash tests run that)."""
    monkeypatch.setattr(durable, "_SNAPSHOT_EVERY", 1)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Ledger:
    """Tools whose calls are counted: a completed call must never run twice."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def tools(self) -> dict[str, Callable[..., Awaitable[Any]]]:
        async def Work(x: Any) -> Any:
            call = current_tool_call()
            assert call is not None
            self.calls.append((call.idempotency_key, x))
            return x * 10 if isinstance(x, int) else x

        async def Fail(message: str) -> None:
            self.calls.append(("fail", message))
            raise ValueError(message)

        return {"Work": Work, "Fail": Fail}


async def _feed(executor: StreamingPythonExecutor, text: str, size: int = 7) -> None:
    for i in range(0, len(text), size):
        await executor.add_chunk(text[i : i + size])


async def _crash(manager: CheckpointManager) -> None:
    """What kill -9 leaves: the stored records, and no lock (the kernel drops it)."""
    if manager._lock is not None:
        await manager._lock.release()
        manager._lock = None


async def _resume(
    agent: Agent, provider: CheckpointProvider, **kw: Any
) -> tuple[StreamingPythonExecutor, Any, CheckpointManager]:
    manager = CheckpointManager(execution_id=agent.id, provider=provider, **kw)
    coordinator = RecoveryCoordinator(manager)
    assert await coordinator.can_recover()
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    report = await coordinator.recover_execution_state(agent)
    executor = await StreamingPythonExecutor.resume_from_checkpoint(agent, checkpoint, checkpoint_manager=manager)
    return executor, report, manager


CODE = (
    "total = 0\n"
    "for i in range(1, 4):\n"
    "    total += await Work(i)\n"
    "first, second = await Work(5), await Work(6)\n"
    "print('total', total)\n"
    "square = lambda v: v * v\n"
    "class Box:\n"
    "    def __init__(self, v):\n"
    "        self.v = v\n"
    "box = Box(await Work(7))\n"
    "final = square(box.v) + total\n"
)


async def test_contract_resume_after_a_crash_mid_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ledger = Ledger()
    agent = Agent("agent_1", tools=ledger.tools())
    manager = CheckpointManager(execution_id=agent.id, provider=FilesystemCheckpointProvider(tmp_path / ".checkpoints"))
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    cut = CODE.index("box = Box") + 5
    await _feed(executor, CODE[:cut])  # the stream stops mid-statement: the process dies here
    await _crash(manager)
    assert capsys.readouterr().out == "total 60\n"
    files = sorted(os.listdir(tmp_path / ".checkpoints" / "agent_1"))
    snapshots = [f for f in files if f.startswith("agent_1_ckpt_") and f.endswith(".pkl")]
    assert set(files) == {".lock", "agent_1.journal", *snapshots}  # small snapshots go to the journal

    agent2 = Agent("agent_1", tools=ledger.tools())
    executor2, report, manager2 = await _resume(agent2, FilesystemCheckpointProvider(tmp_path / ".checkpoints"))
    assert report.in_flight == []
    # stored as it streamed (with every record): no set_llm_response needed
    assert CODE[:cut].startswith(executor2.response)
    assert len(executor2.response) > CODE.index("print('total'")
    await _feed(executor2, CODE[len(executor2.response) :])
    result = await executor2.finalize()
    assert result.success, result.error
    assert result.namespace["final"] == 70 * 70 + 60
    assert result.namespace["square"](3) == 9
    assert capsys.readouterr().out == ""  # print ran before the crash: not shown again
    assert [x for _, x in ledger.calls] == [1, 2, 3, 5, 6, 7]  # every completed call once
    assert not await RecoveryCoordinator(manager2).can_recover()  # finished


async def test_checkpoint_reads_as_the_documented_mapping(tmp_path: Path) -> None:
    agent = Agent("agent_1", tools=Ledger().tools())
    manager = CheckpointManager(execution_id=agent.id, provider=FilesystemCheckpointProvider(tmp_path))
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await _feed(executor, "a = 1\nb = await Work(a)\nc = 'tail")
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    assert checkpoint["namespace"]["b"] == 10 and checkpoint["namespace"]["a"] == 1
    assert "Work" not in checkpoint["namespace"]
    meta = checkpoint["metadata"]
    assert meta["llm_response"].startswith("a = 1\nb = await Work(a)\n")
    assert meta["executed_code"] == "a = 1\nb = await Work(a)"
    assert meta["statement"] == "b = await Work(a)"
    assert isinstance(meta["counter"], int) and isinstance(meta["timestamp"], float)
    stack = checkpoint["execution_state"]["call_stack"]
    assert [f["agent_id"] for f in stack] == ["agent_1"]
    assert set(checkpoint) == {"namespace", "execution_state", "metadata"}
    assert checkpoint.checkpoint_id == f"agent_1_ckpt_{meta['counter']}"


async def test_counters_continue_across_executors_and_resumes() -> None:
    provider = MemoryCheckpointProvider()
    agent = Agent("a", tools=Ledger().tools())
    manager = CheckpointManager(execution_id="a", provider=provider, keep_last_n=None)
    namespace: dict[str, Any] = {}
    for n in range(3):  # one executor per LLM call, sharing the namespace
        ex = StreamingPythonExecutor(agent, checkpoint_manager=manager, namespace=namespace)
        await ex.add_chunk(f"v{n} = await Work({n})\n")
        assert (await ex.finalize()).success
    ids = await manager.list_checkpoints()
    counters = [int(i.rsplit("_", 1)[1]) for i in ids]
    assert counters == sorted(counters) and len(set(counters)) == len(counters)
    latest = await manager.get_latest_checkpoint()
    assert latest is not None and latest.counter == counters[-1]
    assert latest["namespace"]["v2"] == 20 and latest["namespace"]["v0"] == 0
    await manager.close()
    again = CheckpointManager(execution_id="a", provider=provider, keep_last_n=None)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=again, namespace=namespace)
    await ex.add_chunk("w = await Work(9)\n")
    await ex.finalize()
    newer = [int(i.rsplit("_", 1)[1]) for i in await again.list_checkpoints()]
    assert min(set(newer) - set(counters)) > max(counters)  # never restarted, never overwritten


async def test_call_in_flight_runs_again_with_the_same_key_and_is_reported() -> None:
    provider = MemoryCheckpointProvider()
    keys: list[str] = []
    crash = {"now": True}

    async def Charge(amount: int) -> str:
        call = current_tool_call()
        assert call is not None
        keys.append(call.idempotency_key)
        if crash["now"]:
            raise KeyboardInterrupt  # stands for the process dying inside the call
        return f"charged {amount}"

    agent = Agent("pay", tools={"Charge": Charge})
    manager = CheckpointManager(execution_id="pay", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    with pytest.raises(KeyboardInterrupt):
        await ex.add_chunk("receipt = await Charge(5)\n")
    await _crash(manager)
    crash["now"] = False
    with pytest.warns(CheckpointWarning, match="may have run"):
        ex2, report, _ = await _resume(agent, provider)
        result = await ex2.finalize()
    assert result.namespace["receipt"] == "charged 5"
    assert len(keys) == 2 and keys[0] == keys[1]
    assert [c.idempotency_key for c in report.in_flight] == [keys[0]]
    assert "Charge(5)" in str(report)


async def test_replayed_exception_and_try_blocks() -> None:
    provider = MemoryCheckpointProvider()
    ledger = Ledger()
    agent = Agent("e", tools=ledger.tools())
    manager = CheckpointManager(execution_id="e", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    code = "try:\n    await Fail('nope')\nexcept ValueError as e:\n    caught = str(e)\n    after = await Work(2)\n"
    await ex.add_chunk(code[: code.index("    after")])
    # the compound statement is incomplete: nothing ran yet
    await ex.add_chunk("    after = await Work(2)\n")
    await ex.add_chunk("x = 1")  # completes the try statement; it runs
    await _crash(manager)
    ex2, _, _ = await _resume(agent, provider)
    result = await ex2.finalize()
    assert result.namespace["caught"] == "nope" and result.namespace["after"] == 20
    assert ledger.calls.count(("fail", "nope")) == 1


async def test_nondeterministic_replay_is_refused_with_both_calls(tmp_path: Path) -> None:
    provider = MemoryCheckpointProvider()
    folder = tmp_path / "inbox"
    folder.mkdir()
    calls = {"n": 0}

    async def Work(x: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return x

    agent = Agent("nd", tools={"Work": Work})
    manager = CheckpointManager(execution_id="nd", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    code = f"import os\nfor n in range(2):\n    await Work(len(os.listdir({str(folder)!r})))\n"
    with pytest.raises(KeyboardInterrupt):
        await ex.add_chunk(code + "done = 1\n")
    await _crash(manager)
    (folder / "new-file").write_text("the world changed")
    with pytest.raises(NonDeterminismError, match=r"Work\(0\).*Work\(1\)"):
        await _resume(agent, provider)


async def test_two_agents_are_isolated_and_one_execution_is_locked() -> None:
    provider = MemoryCheckpointProvider()
    ledger = Ledger()
    a = StreamingPythonExecutor(Agent("iso-a", tools=ledger.tools()), checkpoint_manager=CheckpointManager("iso-a", provider))
    b = StreamingPythonExecutor(Agent("iso-b", tools=ledger.tools()), checkpoint_manager=CheckpointManager("iso-b", provider))
    await a.add_chunk("x = await Work(1)\n")
    await b.add_chunk("x = await Work(2)\n")
    assert a.namespace["x"] == 10 and b.namespace["x"] == 20
    keys = [k for k, _ in ledger.calls]
    assert len(set(keys)) == 2
    intruder = StreamingPythonExecutor(Agent("iso-a", tools=ledger.tools()), checkpoint_manager=CheckpointManager("iso-a", provider))
    with pytest.raises(ExecutionLockedError):
        await intruder.add_chunk("y = await Work(3)\n")


async def test_unpicklable_skip_warns_and_use_after_resume_explains(tmp_path: Path) -> None:
    provider = MemoryCheckpointProvider()
    agent = Agent("u", tools=Ledger().tools())
    manager = CheckpointManager(execution_id="u", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    path = tmp_path / "f.txt"
    path.write_text("hello")
    with pytest.warns(CheckpointWarning, match="'handle'"):
        await ex.add_chunk(f"import threading\nhandle = open({str(path)!r}, 'a')\nlock = threading.Lock()\ngen = (i for i in range(3))\nkept = await Work(4)\n")
    await _crash(manager)
    ex2, report, _ = await _resume(agent, provider)
    assert set(report.skipped_variables) == {"handle", "lock", "gen"}
    assert ex2.namespace["kept"] == 40
    with pytest.raises(CodeExecutionError):
        await ex2.add_chunk("data = handle.read()\n")
    result = await ex2.finalize()
    assert isinstance(result.error, CodeExecutionError)
    assert isinstance(result.error.__cause__, UnrestoredValueError)
    assert "handle" in str(result.error) and "TextIOWrapper" in str(result.error)
    ex.namespace["handle"].close()


async def test_unpicklable_strict_fails_and_keeps_the_previous_checkpoint() -> None:
    provider = MemoryCheckpointProvider()
    agent = Agent("s", tools=Ledger().tools())
    manager = CheckpointManager(execution_id="s", provider=provider, unpicklable="strict")
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\n")
    before = await manager.list_checkpoints()
    with pytest.raises(UnpicklableValueError, match="'gen'.*generator"):
        await ex.add_chunk("gen = (i for i in range(3))\nb = await Work(2)\n")
    latest = await manager.get_latest_checkpoint()
    assert latest is not None and latest["namespace"]["a"] == 10
    assert set(before) <= set(await manager.list_checkpoints())
    with pytest.raises(UnpicklableValueError):
        await ex.add_chunk("c = 3\n")  # the executor stopped


async def test_too_large_names_the_largest_variables() -> None:
    manager = CheckpointManager(execution_id="big", provider=MemoryCheckpointProvider(), max_checkpoint_size_mb=0.5)
    ex = StreamingPythonExecutor(Agent("big", tools=Ledger().tools()), checkpoint_manager=manager)
    with pytest.raises(CheckpointTooLargeError, match=r"Largest variables: huge \(0\.8"):
        await ex.add_chunk("small = 1\nhuge = 'x' * 900_000\nr = await Work(1)\n")


async def test_write_error_is_clear_and_earlier_checkpoints_stay(tmp_path: Path) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores folder permissions")
    base = tmp_path / "ckpt"
    manager = CheckpointManager(execution_id="w", provider=FilesystemCheckpointProvider(base))
    ex = StreamingPythonExecutor(Agent("w", tools=Ledger().tools()), checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\n")
    folder = base / "w"
    kept = sorted(folder.iterdir())
    folder.chmod(stat.S_IRUSR | stat.S_IXUSR)
    try:
        with pytest.raises(CheckpointWriteError, match="Permission denied|permission"):
            await ex.add_chunk("b = await Work(2)\n")
    finally:
        folder.chmod(0o700)
    assert all(p.exists() for p in kept)
    latest = await manager.get_latest_checkpoint()
    assert latest is not None and latest["namespace"]["a"] == 10


async def test_disk_full_is_clear_and_earlier_checkpoints_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from playbooks.checkpoints.providers import filesystem

    manager = CheckpointManager(execution_id="full", provider=FilesystemCheckpointProvider(tmp_path))
    ex = StreamingPythonExecutor(Agent("full", tools=Ledger().tools()), checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\n")
    kept = {p: p.read_bytes() for p in (tmp_path / "full").glob("*.pkl")}

    def no_space(fd: int, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(filesystem.os, "write", no_space)
    with pytest.raises(CheckpointWriteError, match=r"disk full \(ENOSPC\); earlier checkpoints are intact"):
        await ex.add_chunk("b = await Work(2)\n")
    monkeypatch.undo()
    assert all(p.read_bytes() == data for p, data in kept.items())
    assert not list((tmp_path / "full").glob(".*.tmp"))  # no temporary file left behind
    latest = await manager.get_latest_checkpoint()
    assert latest is not None and latest["namespace"]["a"] == 10


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "empty", "garbage"])
async def test_corrupt_latest_checkpoint_falls_back_and_says_so(tmp_path: Path, damage: str) -> None:
    ledger = Ledger()
    agent = Agent("c", tools=ledger.tools())
    # every snapshot fsynced: each is a checkpoint file (unsynced small ones go to the journal)
    manager = CheckpointManager(execution_id="c", provider=FilesystemCheckpointProvider(tmp_path), snapshot_sync_every=1)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\nb = await Work(2)\n")
    await _crash(manager)
    newest = max((tmp_path / "c").glob("c_ckpt_*.pkl"), key=lambda p: int(p.stem.rsplit("_", 1)[1]))
    data = newest.read_bytes()
    if damage == "truncate":
        newest.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        newest.write_bytes(data[:-5] + bytes([data[-5] ^ 0x40]) + data[-4:])
    elif damage == "empty":
        newest.write_bytes(b"")
    else:
        newest.write_bytes(b"not a checkpoint at all")
    with pytest.warns(CheckpointWarning, match=newest.stem):
        ex2, report, _ = await _resume(agent, FilesystemCheckpointProvider(tmp_path))
    assert any(newest.stem in m for m in report.fallbacks)
    result = await ex2.finalize()
    assert result.namespace["a"] == 10 and result.namespace["b"] == 20
    assert [x for _, x in ledger.calls].count(1) == 1  # the first call is older than the fallback


async def test_tampered_checkpoint_is_rejected_before_unpickling(tmp_path: Path) -> None:
    agent = Agent("t", tools=Ledger().tools())
    manager = CheckpointManager(execution_id="t", provider=FilesystemCheckpointProvider(tmp_path), key="secret")
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\n")
    await _crash(manager)
    reader = CheckpointManager(execution_id="t", provider=FilesystemCheckpointProvider(tmp_path), key="other key")
    with pytest.raises(CheckpointKeyError, match="another key"):  # never a silent fresh start
        await reader.get_latest_checkpoint()


async def test_keep_last_n_bounds_the_records_and_resume_still_works() -> None:
    provider = MemoryCheckpointProvider()
    ledger = Ledger()
    agent = Agent("k", tools=ledger.tools())
    manager = CheckpointManager(execution_id="k", provider=provider, keep_last_n=2, snapshot_sync_every=1)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("big = list(range(5_000))\n")  # referenced (over 4 KiB), cheap to snapshot
    for i in range(12):
        await ex.add_chunk(f"v{i} = await Work({i})\n")
    # pruning runs every few snapshots; forced, it leaves the last two snapshots, the journal
    # between them, the older snapshot that holds `big`, the execution's hash seed record, and the
    # tombstone that lists what was pruned
    await manager.prune(force=True)
    assert len(await manager.list_checkpoints()) <= 8
    await _crash(manager)
    ex2, _, _ = await _resume(agent, provider)
    assert ex2.namespace["v11"] == 110 and ex2.namespace["big"][-1] == 4_999


async def test_untouched_namespace_is_not_rewritten_per_await() -> None:
    sizes: list[int] = []

    class Measuring(MemoryCheckpointProvider):
        async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
            sizes.append(len(data))
            await super().save_checkpoint(checkpoint_id, data, sync=sync)

    manager = CheckpointManager(execution_id="m", provider=Measuring())
    ex = StreamingPythonExecutor(Agent("m", tools=Ledger().tools()), checkpoint_manager=manager)
    await ex.add_chunk("blob = 'y' * 1_000_000\nrows = [{'id': i} for i in range(20_000)]\n")
    await ex.add_chunk("a = await Work(1)\n")
    sizes.clear()
    await ex.add_chunk("b = await Work(2)\n")
    assert sum(sizes) < 20_000, sizes


async def test_llm_code_error_is_stored_and_reported_after_resume() -> None:
    provider = MemoryCheckpointProvider()
    agent = Agent("err", tools=Ledger().tools())
    manager = CheckpointManager(execution_id="err", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\n")
    with pytest.raises(CodeExecutionError):
        await ex.add_chunk("b = 1 / 0\n")
    result = await ex.finalize()
    assert not result.success
    latest = await manager.get_latest_checkpoint()
    assert latest is not None and latest["execution_state"]["done"]
    copy = pickle.loads(pickle.dumps(result.error))
    assert copy.lineno == result.error.lineno and str(copy) == str(result.error)


async def test_nested_executor_is_a_child_frame_in_the_call_stack() -> None:
    provider = MemoryCheckpointProvider()
    ledger = Ledger()
    seen: list[list[dict[str, Any]]] = []
    manager = CheckpointManager(execution_id="p", provider=provider)

    async def RunChild(code: str) -> Any:
        child = StreamingPythonExecutor(Agent("child", tools=ledger.tools()))
        await _feed(child, code)
        latest = await manager.get_latest_checkpoint()
        assert latest is not None
        seen.append(latest["execution_state"]["call_stack"])
        result = await child.finalize()
        return result.namespace["out"]

    agent = Agent("p", tools={"RunChild": RunChild, **ledger.tools()})
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("x = await Work(1)\ny = await RunChild('out = await Work(5)\\n')\n")
    result = await ex.finalize()
    assert result.namespace["y"] == 50
    stack = seen[0]
    assert [f["agent_id"] for f in stack] == ["p", "child"]
    assert stack[1]["frame_id"].startswith(stack[0]["frame_id"] + "/")
    assert stack[1]["parent_seq"] == "1"
    keys = [k for k, _ in ledger.calls]
    assert len(set(keys)) == len(keys)


async def test_no_checkpoint_means_nothing_to_recover() -> None:
    manager = CheckpointManager(execution_id="none", provider=MemoryCheckpointProvider())
    assert not await RecoveryCoordinator(manager).can_recover()
    assert await manager.get_latest_checkpoint() is None


def test_warning_filters_do_not_hide_checkpoint_warnings() -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        warnings.warn("x", CheckpointWarning)
    assert caught and issubclass(caught[0].category, UserWarning)


async def test_expensive_snapshots_are_spaced_and_the_journal_covers_the_gap() -> None:
    provider = MemoryCheckpointProvider()
    ledger = Ledger()
    agent = Agent("gap", tools=ledger.tools())
    manager = CheckpointManager(execution_id="gap", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("rows = [{'id': i} for i in range(200_000)]\ntotal = 0\n")  # pickling takes ms
    for i in range(6):
        await ex.add_chunk(f"total += await Work({i})\n")
    records = await manager.load_records()
    snapshots = [r for r in records.values() if r.kind == "snapshot" and r.frame_id == ex.frame_id]
    assert len(snapshots) < 7  # not one per await: the journal covers the statements in between
    await _crash(manager)
    ex2, _, _ = await _resume(agent, provider)
    await ex2.add_chunk("done = True\n")
    result = await ex2.finalize()
    assert result.namespace["total"] == sum(i * 10 for i in range(6))
    assert [x for _, x in ledger.calls] == list(range(6))  # replayed, not called again


async def test_a_tool_that_mutates_its_argument_has_the_change_replayed() -> None:
    """A replayed call does not run the tool, so the change it made to its (list) argument is
    recorded with its result and applied again: the resumed namespace is the live one."""
    provider = MemoryCheckpointProvider()
    crash = {"at": 2}
    calls: list[list[int]] = []

    async def Append(items: list[int], value: int) -> int:
        if len(calls) + 1 == crash["at"]:
            raise KeyboardInterrupt  # the process dies in the second call
        items.append(value)  # the argument changes while the call runs
        calls.append(list(items))
        return len(items)

    agent = Agent("mut", tools={"Append": Append})
    manager = CheckpointManager(execution_id="mut", provider=provider)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    with pytest.raises(KeyboardInterrupt):
        await ex.add_chunk("items = []\nfor v in (1, 2):\n    n = await Append(items, v)\ndone = 1\n")
    await _crash(manager)
    crash["at"] = 0
    ex2, _, _ = await _resume(agent, provider)
    assert ex2.namespace["items"] == [1, 2] and ex2.namespace["n"] == 2
    assert calls == [[1], [1, 2]]  # the first call was replayed (its change applied), not run again


async def test_corrupt_journal_entry_is_skipped_and_reported(tmp_path: Path) -> None:
    ledger = Ledger()
    agent = Agent("j", tools=ledger.tools())
    manager = CheckpointManager(execution_id="j", provider=FilesystemCheckpointProvider(tmp_path))
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("a = await Work(1)\nb = await Work(2)\n")
    await _crash(manager)
    journal = tmp_path / "j" / "j.journal"
    data = bytearray(journal.read_bytes())
    data[-3] ^= 0x40  # a bit flips in the last entry (the last snapshot)
    journal.write_bytes(bytes(data))
    with pytest.warns(CheckpointWarning) as caught:
        ex2, report, _ = await _resume(agent, FilesystemCheckpointProvider(tmp_path))
    said = " | ".join(str(w.message) for w in caught)
    assert "unreadable and was skipped" in said and "Work(2)" in said and "may have run" in said
    assert report.fallbacks
    # The skipped snapshot held the value of `b = await Work(2)` (a direct call's result is not also
    # journaled): the resume starts from the snapshot before it, and that call, left in flight by
    # what is readable, runs again with the same idempotency key and is reported.
    assert [c.call for c in report.in_flight] == ["Work(2)"]
    result = await ex2.finalize()
    assert result.namespace["a"] == 10 and result.namespace["b"] == 20
    assert [x for _, x in ledger.calls] == [1, 2, 2]
    assert ledger.calls[1][0] == ledger.calls[2][0]  # the same idempotency key


@pytest.mark.parametrize("kind", ["memory", "sqlite", "filesystem"])
async def test_resume_on_every_builtin_provider(tmp_path: Path, kind: str) -> None:
    from playbooks.checkpoints.providers import create_provider

    def provider() -> CheckpointProvider:
        if kind == "memory":
            return shared
        if kind == "sqlite":
            return create_provider("sqlite", path=str(tmp_path / "c.sqlite3"))
        return create_provider("filesystem", base_path=str(tmp_path / "fs"))

    shared = create_provider("memory")
    ledger = Ledger()
    agent = Agent(f"every-{kind}", tools=ledger.tools())
    manager = CheckpointManager(execution_id=agent.id, provider=provider())
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await _feed(ex, CODE[: CODE.index("box = Box") + 5])
    await _crash(manager)
    ex2, _, manager2 = await _resume(agent, provider())
    await _feed(ex2, CODE[len(ex2.response) :])
    result = await ex2.finalize()
    assert result.success and result.namespace["final"] == 70 * 70 + 60
    assert [x for _, x in ledger.calls] == [1, 2, 3, 5, 6, 7]
    await manager2.close()
    await manager2.provider.close()
    await manager.provider.close()


@pytest.mark.parametrize("compress", [True, False])
async def test_large_snapshots_are_stored_compressed_and_resume_exactly(tmp_path: Path, compress: bool) -> None:
    """A snapshot of 64 KiB or more is stored zlib-compressed (the file is smaller than what it holds),
    and a resume restores the same values; with compression off it is stored as is."""
    from playbooks.checkpoints.codec import read_place

    provider = FilesystemCheckpointProvider(tmp_path)
    ledger = Ledger()
    agent = Agent("zip", tools=ledger.tools())
    manager = CheckpointManager(execution_id="zip", provider=provider, keep_last_n=None)
    if not compress:
        manager.compress_over = None
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    code = "rows = [{'id': i, 'name': f'customer {i}', 'tags': ['a', 'b']} for i in range(20000)]\nn = await Work(1)\n"
    await ex.add_chunk(code)
    await ex.finalize()
    await manager.close()
    files = sorted((tmp_path / "zip").glob("*.pkl"))
    places = [read_place((f.read_bytes()))[0] for f in files]
    big = [(f.stat().st_size, p) for f, p in zip(files, places) if f.stat().st_size > 20000 or p.compressed]
    assert big and all(p.compressed is compress for _, p in big)
    if compress:
        assert all(size < 400_000 for size, _ in big)  # ~1 MB of pickled rows, compressed
    manager = CheckpointManager(execution_id="zip", provider=provider)
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    namespace = checkpoint["namespace"]
    assert namespace["rows"][19999] == {"id": 19999, "name": "customer 19999", "tags": ["a", "b"]}
    assert namespace["n"] == 10


async def test_a_resume_reads_no_pruned_record_left_in_the_journal(tmp_path: Path) -> None:
    """Pruned journal entries stay in the journal until a batch of them is dropped; loading meets
    the tombstone that lists them first (newest first) and neither reads nor verifies them, and the
    resume is the same as one that read them all."""

    async def work(x: int) -> int:
        return x

    agent = Agent("pruned", tools={"Work": work})
    manager = CheckpointManager("pruned", FilesystemCheckpointProvider(tmp_path), keep_last_n=2)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await ex.add_chunk("total = 0\n" + "".join(f"total += await Work({i})\n" for i in range(60)))
    await _crash(manager)

    journal = dict(await FilesystemCheckpointProvider(tmp_path).read_journal("pruned"))
    fresh = CheckpointManager("pruned", FilesystemCheckpointProvider(tmp_path), keep_last_n=2)
    decoded: list[int] = []
    real = fresh._decode
    fresh._decode = lambda data, counter: decoded.append(counter) or real(data, counter)  # type: ignore[method-assign]
    records = await fresh.load_records()
    assert fresh._pruned, "the run must have pruned records"
    dead_in_journal = [c for c in journal if c in fresh._pruned]
    assert dead_in_journal, "pruned entries must still be in the journal for this test to mean anything"
    assert not set(decoded) & set(dead_in_journal)
    assert set(decoded) == set(records) | fresh._tombstones
    assert await fresh.unread_counters() == []  # pruned is not unreadable

    resumed_agent = Agent("pruned", tools={"Work": work})
    coordinator = RecoveryCoordinator(fresh)
    checkpoint = await fresh.get_latest_checkpoint()
    assert checkpoint is not None
    await coordinator.recover_execution_state(resumed_agent)
    resumed = await StreamingPythonExecutor.resume_from_checkpoint(resumed_agent, checkpoint, checkpoint_manager=fresh)
    assert resumed.namespace["total"] == sum(range(60))
    assert not fresh.fallbacks
    await fresh.close()
