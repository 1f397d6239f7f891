"""``@durable_call`` functions (durable however the LLM's code reaches them) and a shared namespace
with host-owned names (``unsaved=``) and live values that could not be saved."""

from __future__ import annotations

import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from playbooks import Agent, StreamingPythonExecutor
from playbooks.checkpoints import CheckpointManager, RecoveryCoordinator
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.execution import durable
from playbooks.execution.tool_calls import current_tool_call, durable_call
from playbooks.llm import LLMProvider, LLMRequest, Message

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture(autouse=True)
def _snapshot_after_every_await(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(durable, "_SNAPSHOT_EVERY", 1)


class _Died(BaseException):
    """Stands for the process dying inside a call."""


async def _crash(manager: CheckpointManager) -> None:
    if manager._lock is not None:
        await manager._lock.release()
        manager._lock = None


LEDGER: list[Any] = []
DIE_AT: list[int] = []


@durable_call
async def charge(amount: int) -> str:
    call = current_tool_call()
    assert call is not None  # reached through the interceptor: it has an identity
    if amount in DIE_AT:
        DIE_AT.remove(amount)
        raise _Died
    LEDGER.append((call.idempotency_key, amount))
    return f"charged {amount}"


@durable_call(name="fee")
def compute_fee(amount: int) -> int:
    LEDGER.append(("fee", amount))
    return amount // 10


class Billing:
    def __init__(self) -> None:
        self.charge = charge


def _namespace() -> dict[str, Any]:
    return {"billing": Billing(), "ops": {"fee": compute_fee}}


CODE = (
    "receipts = []\n"
    "for i in range(1, 6):\n"
    "    receipts.append(await billing.charge(i * 10))\n"
    "    fees = ops['fee'](i * 10)\n"
)


async def test_marked_functions_are_durable_however_the_code_reaches_them() -> None:
    LEDGER.clear()
    DIE_AT[:] = [30]
    ledger = LEDGER
    provider = MemoryCheckpointProvider()
    agent = Agent("cell")
    namespace = _namespace()
    manager = CheckpointManager("cell", provider)
    executor = StreamingPythonExecutor(agent, namespace=namespace, checkpoint_manager=manager)
    with pytest.raises(_Died):
        await executor.add_chunk(CODE)
        await executor.finalize()
    await _crash(manager)
    assert [amount for _, amount in ledger if _ != "fee"] == [10, 20]

    namespace = {}
    manager = CheckpointManager("cell", provider)
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    report = await RecoveryCoordinator(manager).recover_execution_state(agent)
    assert [call.call for call in report.in_flight] == ["charge(30)"]
    assert not checkpoint.state.skipped  # a variable holding a marked function can be saved
    resumed = await StreamingPythonExecutor.resume_from_checkpoint(
        agent, checkpoint, checkpoint_manager=manager, namespace=namespace
    )
    result = await resumed.finalize()
    assert result.success, result.error
    assert namespace["receipts"] == [f"charged {i * 10}" for i in range(1, 6)]
    charges = [amount for key, amount in ledger if key != "fee"]
    assert charges == [10, 20, 30, 40, 50]  # each once: 30 was in flight, not finished
    assert [amount for key, amount in ledger if key == "fee"] == [10, 20, 30, 40, 50]
    keys = [key for key, _ in ledger if key != "fee"]
    assert len(set(keys)) == 5 and all(key.startswith("cell:") for key in keys)
    await manager.close()


async def test_a_marked_function_outside_llm_code_or_inside_a_tool_is_a_plain_call() -> None:
    seen: list[Any] = []

    @durable_call
    async def inner(x: int) -> int:
        seen.append(current_tool_call())
        return x + 1

    async def Outer(x: int) -> int:
        return await inner(x) * 2  # inside a tool: part of that tool's call, not a call of its own

    assert await inner(1) == 2 and seen == [None]
    calls: list[str] = []
    executor = StreamingPythonExecutor(
        Agent("a", tools={"Outer": Outer}),
        namespace={"inner": inner},
        on_call=lambda call, value, error: calls.append(call.name),
    )
    await executor.add_chunk("a = await Outer(1)\nb = await inner(5)\n")
    result = await executor.finalize()
    assert result.success and result.namespace["a"] == 4 and result.namespace["b"] == 6
    assert calls == ["Outer", "inner"]


async def test_unsaved_names_are_neither_stored_nor_restored_and_live_values_are_kept() -> None:
    provider = MemoryCheckpointProvider()

    async def Work(x: int) -> int:
        return x

    def host_names(name: str) -> bool:
        return name in ("In", "Out") or name.startswith("_i")

    first = socket.socket()
    try:
        namespace: dict[str, Any] = {"In": ["cell 1"], "Out": {1: "x"}, "_i1": "src", "conn": first, "n": 0}
        manager = CheckpointManager("nb", provider)
        executor = StreamingPythonExecutor(
            Agent("nb", tools={"Work": Work}), namespace=namespace, checkpoint_manager=manager, unsaved=host_names
        )
        with pytest.warns(UserWarning, match="conn"):
            await executor.add_chunk("n = await Work(1)\nm = await Work(2)\n")
        await _crash(manager)

        with socket.socket() as second:  # the notebook's setup cell ran again: a new connection
            fresh: dict[str, Any] = {"In": ["new"], "Out": {}, "_i1": "new", "conn": second}
            manager = CheckpointManager("nb", provider)
            checkpoint = await manager.get_latest_checkpoint()
            assert checkpoint is not None
            assert not {"In", "Out", "_i1"} & set(checkpoint.state.variables)
            assert "conn" in {name for name, _, _ in checkpoint.state.skipped}
            resumed = await StreamingPythonExecutor.resume_from_checkpoint(
                Agent("nb", tools={"Work": Work}),
                checkpoint,
                checkpoint_manager=manager,
                namespace=fresh,
                unsaved=host_names,
            )
            await resumed.finalize()
            assert fresh["conn"] is second  # not a placeholder over the live value
            assert fresh["In"] == ["new"] and fresh["_i1"] == "new" and fresh["Out"] == {}
            assert (fresh["n"], fresh["m"]) == (1, 2)
            await manager.close()
    finally:
        first.close()


class _CountingModel(LLMProvider):
    """A model that answers with the number of times it was asked."""

    asked = 0

    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        type(self).asked += 1
        yield f"answer {type(self).asked} to "
        yield request.messages[-1].content


async def test_llm_complete_from_llm_code_is_a_durable_call() -> None:
    """The project's LLM clients are durable calls in code an executor runs: after a crash the
    answer comes from the journal, not from the model (which would answer differently)."""
    _CountingModel.asked = 0
    DIE_AT[:] = [20]
    provider = MemoryCheckpointProvider()
    code = (
        "reply = await model.complete(LLMRequest([Message('user', 'hi')]))\n"
        "paid = await charge(20)\n"
    )
    namespace: dict[str, Any] = {"model": _CountingModel(), "LLMRequest": LLMRequest, "Message": Message,
                                 "charge": charge}
    manager = CheckpointManager("llm", provider)
    executor = StreamingPythonExecutor(Agent("llm"), namespace=namespace, checkpoint_manager=manager)
    with pytest.raises(_Died):
        await executor.add_chunk(code)
    await _crash(manager)
    assert namespace["reply"] == "answer 1 to hi" and _CountingModel.asked == 1
    manager = CheckpointManager("llm", provider)
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    fresh: dict[str, Any] = {}
    resumed = await StreamingPythonExecutor.resume_from_checkpoint(
        Agent("llm"), checkpoint, checkpoint_manager=manager, namespace=fresh
    )
    await resumed.finalize()
    assert fresh["reply"] == "answer 1 to hi" and fresh["paid"] == "charged 20"
    assert _CountingModel.asked == 1  # not asked again
    assert await _CountingModel().complete(LLMRequest([Message("user", "x")])) == "answer 2 to x"  # host code
    await manager.close()
