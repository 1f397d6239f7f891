"""Variables set at a resume (``CheckpointManager.save_overrides``): applied by the restore, kept
across a crash before the next snapshot, and not applied again once a snapshot holds them."""

from __future__ import annotations

from typing import Any

import pytest

from playbooks import Agent, StreamingPythonExecutor
from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.execution import durable

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _snapshot_after_every_await(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_SNAPSHOT_EVERY", 1)


class _Died(BaseException):
    pass


CODE = "x = 1\ny = await Work(x)\nz = await Work(x + 10)\nx = await Work(7) // 10\nw = await Work(x + 100)\n"


async def _crash(manager: CheckpointManager) -> None:
    if manager._lock is not None:
        await manager._lock.release()
        manager._lock = None


async def _resume(manager: CheckpointManager, agent: Agent, namespace: dict[str, Any]) -> None:
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    executor = await StreamingPythonExecutor.resume_from_checkpoint(
        agent, checkpoint, checkpoint_manager=manager, namespace=namespace
    )
    await executor.finalize()


async def test_an_override_holds_until_a_snapshot_takes_it_in() -> None:
    calls: list[int] = []
    die = {15}

    async def Work(v: int) -> int:
        if v in die:
            die.discard(v)
            raise _Died
        calls.append(v)
        return v * 10

    agent = Agent("o", tools={"Work": Work})
    provider = MemoryCheckpointProvider()
    manager = CheckpointManager("o", provider)
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    die = {11}
    with pytest.raises(_Died):
        await executor.add_chunk(CODE)
    await _crash(manager)

    manager = CheckpointManager("o", provider)  # set x at the resume point, then die before a snapshot
    await manager.get_latest_checkpoint()
    await manager.save_overrides({"x": 5})
    await _crash(manager)

    die = {107}
    namespace: dict[str, Any] = {}
    manager = CheckpointManager("o", provider)
    with pytest.warns(UserWarning, match=r"now calls Work\(15\) instead"), pytest.raises(_Died):
        await _resume(manager, agent, namespace)  # x = 5 applied: Work(15) runs; x = 7; Work(107) dies
    await _crash(manager)
    assert namespace["x"] == 7 and namespace["z"] == 150  # x was 5 for z, then the code set it to 7
    namespace = {}
    manager = CheckpointManager("o", provider)
    await _resume(manager, agent, namespace)  # a snapshot after the override: it is not set again
    assert (namespace["x"], namespace["y"], namespace["z"], namespace["w"]) == (7, 10, 150, 1070)
    assert calls == [1, 15, 7, 107]
    await manager.close()
