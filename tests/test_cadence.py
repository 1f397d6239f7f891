"""Checkpoint cadence: cheap tools are not journaled and run again after a resume; the journal's
fsync can come every n-th durable call or every t seconds instead of before every one."""

from __future__ import annotations

from typing import Any

import pytest

from playbooks import Agent, StreamingPythonExecutor, cheap
from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.config import load_config

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class _Died(BaseException):
    pass


class Counting(MemoryCheckpointProvider):
    def __init__(self) -> None:
        super().__init__()
        self.fsyncs = 0

    async def sync_journal(self, execution_id: str) -> None:
        self.fsyncs += 1
        await super().sync_journal(execution_id)


CODE = "total = 0\nfor i in range(12):\n    total += await Rate(i) * await Charge(i)\n"


async def test_cheap_calls_are_not_journaled_and_run_again_after_a_resume() -> None:
    charged: list[int] = []
    rated: list[int] = []
    die = {7}

    @cheap
    async def Rate(i: int) -> int:
        rated.append(i)
        return 2

    async def Charge(i: int) -> int:
        if i in die:
            die.discard(i)
            raise _Died
        charged.append(i)
        return i

    provider = MemoryCheckpointProvider()
    agent = Agent("cad", tools={"Rate": Rate, "Charge": Charge})
    manager = CheckpointManager("cad", provider, keep_last_n=None)
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    with pytest.raises(_Died):
        await executor.add_chunk(CODE)
        await executor.finalize()
    assert manager._lock is not None
    await manager._lock.release()
    manager._lock = None
    manager = CheckpointManager("cad", provider, keep_last_n=None)
    records = await manager.load_records()
    assert {r.name for r in records.values() if r.kind in ("intent", "result")} == {"Charge"}
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    namespace: dict[str, Any] = {}
    resumed = await StreamingPythonExecutor.resume_from_checkpoint(
        agent, checkpoint, checkpoint_manager=manager, namespace=namespace
    )
    await resumed.finalize()
    await manager.close()
    assert namespace["total"] == 2 * sum(range(12))
    assert charged == list(range(12))  # each once (7 was in flight, not finished)
    assert rated[:8] == list(range(8)) and rated[8:] == list(range(12))  # cheap: all again


@pytest.mark.parametrize(
    ("every", "interval", "fsyncs"), [(1, None, 24), (4, None, 6), (1000, 0.0, 24), (1000, None, 0)]
)
async def test_the_journal_is_fsynced_at_the_configured_cadence(
    every: int, interval: float | None, fsyncs: int
) -> None:
    """24 durable calls: an fsync before each (the default), before every 4th, or whenever the
    interval (0 s) has passed; with neither due, only closing the run fsyncs."""
    async def Rate(i: int) -> int:
        return 2

    async def Charge(i: int) -> int:
        return i

    provider = Counting()
    manager = CheckpointManager("sync", provider)
    manager.journal_sync_every, manager.journal_sync_interval = every, interval
    agent = Agent("sync", tools={"Rate": Rate, "Charge": Charge})
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    await executor.add_chunk(CODE)
    await executor.finalize()
    before_close = provider.fsyncs
    await manager.close()
    assert executor.namespace["total"] == 2 * sum(range(12))
    assert before_close == fsyncs


def test_cadence_settings_come_from_the_configuration(tmp_path: Any) -> None:
    config = load_config(None, env={}, overrides={
        "durability.journal_sync_every": 8, "durability.journal_sync_interval": 0.5,
        "durability.compress_snapshots": False, "durability.storage_path": str(tmp_path),
    })
    manager = CheckpointManager.from_config(config.durability, "cfg")
    assert (manager.journal_sync_every, manager.journal_sync_interval, manager.compress_over) == (8, 0.5, None)
