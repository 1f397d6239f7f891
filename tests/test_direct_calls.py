"""A statement's direct call (``x = await Tool(...)``) is recorded by the snapshot after it, if one is
written there, not by a result record of its own. These tests pin down when that happens, and that the
result is written whenever no snapshot takes its place (between the snapshots of a fast run, which
snapshots after every ``_SNAPSHOT_EVERY``-th statement that awaited)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from playbooks import Agent
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
from playbooks.checkpoints.provider import CheckpointProvider
from playbooks.errors import CheckpointTooLargeError
from playbooks.execution import durable
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import current_tool_call

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def every_await(monkeypatch: pytest.MonkeyPatch) -> None:
    """Snapshot after every statement that awaited, as a slow run does."""
    monkeypatch.setattr(durable, "_SNAPSHOT_EVERY", 1)


class Tools:
    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    def agent(self, name: str) -> Agent:
        async def Work(x: Any) -> Any:
            call = current_tool_call()
            assert call is not None
            self.calls.append((call.idempotency_key, x))
            return x * 10 if isinstance(x, int) else x

        return Agent(name, tools={"Work": Work})


async def _kinds(manager: CheckpointManager) -> list[str]:
    """The kinds of the records of the root frame, in order."""
    records = await manager.load_records()
    return [r.kind for _, r in sorted(records.items()) if r.kind != "state"]


async def _stop(manager: CheckpointManager) -> None:
    """What kill -9 leaves: the records, and no lock."""
    if manager._lock is not None:
        await manager._lock.release()
        manager._lock = None


async def _resume(agent: Agent, provider: CheckpointProvider) -> tuple[StreamingPythonExecutor, Any]:
    manager = CheckpointManager(execution_id=agent.id, provider=provider)
    coordinator = RecoveryCoordinator(manager)
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    report = await coordinator.recover_execution_state(agent)
    return await StreamingPythonExecutor.resume_from_checkpoint(agent, checkpoint, checkpoint_manager=manager), report


@pytest.mark.parametrize(
    "code",
    ["x = await Work(1)\n", "await Work(1)\n", "x = await Work(*[1])\n", "x = await Work(x=1)\n"],
)
@pytest.mark.usefixtures("every_await")
async def test_a_direct_call_is_held_by_the_snapshot_after_it(tmp_path: Path, code: str, anyio_backend: str) -> None:
    tools = Tools()
    manager = CheckpointManager("d", FilesystemCheckpointProvider(tmp_path))
    ex = StreamingPythonExecutor(tools.agent("d"), checkpoint_manager=manager)
    await ex.add_chunk(code)
    assert await _kinds(manager) == ["snapshot", "intent", "snapshot"]
    await manager.close()


async def test_a_fast_run_snapshots_every_eighth_await_and_records_the_results_between(
    tmp_path: Path, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(durable, "_SNAPSHOT_INTERVAL", float("inf"))  # a loaded machine is still "fast"
    tools = Tools()
    manager = CheckpointManager("f", FilesystemCheckpointProvider(tmp_path))
    ex = StreamingPythonExecutor(tools.agent("f"), checkpoint_manager=manager)
    await ex.add_chunk("".join(f"x{i} = await Work({i})\n" for i in range(17)))
    every = durable._SNAPSHOT_EVERY
    one_round = ["intent", "result"] * (every - 1) + ["intent", "snapshot"]
    assert await _kinds(manager) == ["snapshot", *one_round, *one_round, "intent", "result"]
    await _stop(manager)
    ex2, report = await _resume(tools.agent("f"), FilesystemCheckpointProvider(tmp_path))
    assert report.in_flight == []
    assert (await ex2.finalize()).namespace["x16"] == 160
    assert len(tools.calls) == 17  # every call replayed, none ran again


@pytest.mark.parametrize(
    "code",
    [
        "x = str(await Work(1))\n",  # str runs after the call returns
        "x: int = await Work(1)\n",  # the annotation is evaluated after the assignment
        "x = [await Work(1)]\n",
        "x = await Work(await Work(1))\n",  # the inner call's caller goes on
        "x, y = await Work((1, 2))\n",  # unpacking runs the LLM's objects' code
        "x = 0\nx += await Work(1)\n",  # __iadd__ may be the LLM's code
        "async def W(v):\n    return await Work(v) + 1\nx = await W(1)\n",  # the helper goes on
        "T = Work\nasync def Work(v):\n    return await T(v) + 1\nx = await Work(1)\n",  # not the tool any more
    ],
)
async def test_a_call_followed_by_more_code_keeps_its_result_record(tmp_path: Path, code: str, anyio_backend: str) -> None:
    tools = Tools()
    manager = CheckpointManager("r", FilesystemCheckpointProvider(tmp_path))
    ex = StreamingPythonExecutor(tools.agent("r"), checkpoint_manager=manager)
    await ex.add_chunk(code)
    kinds = await _kinds(manager)
    assert kinds.count("result") == kinds.count("intent") >= 1
    await manager.close()


@pytest.mark.usefixtures("every_await")
async def test_a_snapshot_that_fails_leaves_the_result_recorded(tmp_path: Path, anyio_backend: str) -> None:
    tools = Tools()
    agent = tools.agent("big")
    manager = CheckpointManager("big", FilesystemCheckpointProvider(tmp_path), max_checkpoint_size_mb=0.05)
    ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    with pytest.raises(CheckpointTooLargeError):
        await ex.add_chunk("x = await Work('y' * 100_000)\n")
    assert (await _kinds(manager)).count("result") == 1
    await _stop(manager)
    # A new process replays the call from its result record: the tool does not run again.
    ex2, report = await _resume(agent, FilesystemCheckpointProvider(tmp_path))
    assert report.in_flight == []
    result = await ex2.finalize()  # (this manager has the default limit)
    assert result.namespace["x"] == "y" * 100_000
    assert len(tools.calls) == 1


@pytest.mark.parametrize("every", [1, 2])
async def test_a_direct_call_resumes_exactly_after_a_kill_at_every_record(
    tmp_path: Path, every: int, anyio_backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stop after each stored record in turn: every completed call is replayed or superseded by a
    snapshot, and only a call whose outcome no readable record holds runs again, reported. With a
    snapshot after every awaited statement, and after every second one."""
    monkeypatch.setattr(durable, "_SNAPSHOT_EVERY", every)
    code = "total = 0\nfor i in range(3):\n    total += await Work(i)\nx = await Work(7)\ny = await Work(x)\nz = x + y\n"
    reference = Tools()
    plain = StreamingPythonExecutor(reference.agent("ref"))
    await plain.add_chunk(code)
    expected = {k: plain.namespace[k] for k in ("total", "x", "y", "z")}
    probe = CheckpointManager("p", FilesystemCheckpointProvider(tmp_path / "probe"))
    await StreamingPythonExecutor(Tools().agent("p"), checkpoint_manager=probe).add_chunk(code)
    count = len(await probe.load_records())
    await probe.close()
    for stop_after in range(1, count + 1):
        folder = tmp_path / f"k{stop_after}"
        tools = Tools()
        agent = tools.agent("k")
        provider = _StopAfter(folder, stop_after)
        manager = CheckpointManager("k", provider)
        ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
        try:
            await ex.add_chunk(code)
        except _Stopped:
            pass
        await _stop(manager)
        finished = len(tools.calls)
        if not await RecoveryCoordinator(CheckpointManager("k", FilesystemCheckpointProvider(folder))).can_recover():
            assert finished == 0  # stopped before the frame's first snapshot: nothing ran yet
            continue
        ex2, report = await _resume(agent, FilesystemCheckpointProvider(folder))
        result = await ex2.finalize()
        assert result.success, result.error
        assert {k: result.namespace[k] for k in expected} == expected
        # A call that ran before the stop runs again only if it was reported in flight.
        before = {k for k, _ in tools.calls[:finished]}
        again = [k for k, _ in tools.calls[finished:] if k in before]
        assert again == [c.idempotency_key for c in report.in_flight if c.idempotency_key in before]
        assert len(again) <= 1


class _Stopped(BaseException):
    pass


class _StopAfter(FilesystemCheckpointProvider):
    """Stops the "process" right after its ``n``-th stored record (a kill there leaves the same)."""

    def __init__(self, base: Path, n: int) -> None:
        super().__init__(base)
        self._left = n

    def _tick(self) -> None:
        self._left -= 1
        if self._left == 0:
            raise _Stopped()
        if self._left < 0:
            raise _Stopped()

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        if self._left <= 0:
            raise _Stopped()
        await super().append_journal(execution_id, counter, data)
        self._tick()

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        if self._left <= 0:
            raise _Stopped()
        await super().save_checkpoint(checkpoint_id, data, sync=sync)
        self._tick()
