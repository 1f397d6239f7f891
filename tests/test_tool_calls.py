"""Tests of the tool-call interception layer (sequence numbers and idempotency keys)."""

from __future__ import annotations

import asyncio

import anyio
import pytest

from playbooks.agent import Agent
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import (
    ToolCall,
    ToolCallInterceptor,
    bind_tools,
    current_tool_call,
)

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def test_seq_and_keys_visible_inside_tools():
    seen: list[ToolCall] = []

    def Sync(x):
        seen.append(current_tool_call())
        return x

    async def Async(x):
        await anyio.sleep(0)
        seen.append(current_tool_call())
        return x

    ex = StreamingPythonExecutor(
        Agent("run1", {"Sync": Sync, "Async": Async}),
        interceptor=ToolCallInterceptor(run_id="run1", frame_id="f7"),
    )
    await ex.add_chunk("a = Sync(1)\nb = await Async(2)\nc = Sync(x=3)\n")
    assert (await ex.finalize()).success
    assert [c.seq for c in seen] == [0, 1, 2]
    assert [c.idempotency_key for c in seen] == ["run1:f7:0", "run1:f7:1", "run1:f7:2"]
    assert [c.name for c in seen] == ["Sync", "Async", "Sync"]
    assert seen[0].args == (1,) and seen[2].kwargs == {"x": 3}
    assert current_tool_call() is None  # reset after the call


async def test_default_keys_are_unique_per_executor():
    keys: list[str] = []
    agent = Agent("agentX", {"T": lambda: keys.append(current_tool_call().idempotency_key)})
    first, second = StreamingPythonExecutor(agent), StreamingPythonExecutor(agent)
    await first.add_chunk("T()\nT()\n")
    await second.add_chunk("T()\n")
    assert keys[:2] == [f"agentX:{first.frame_id}:0", f"agentX:{first.frame_id}:1"]
    assert keys[2] == f"agentX:{second.frame_id}:0" and first.frame_id != second.frame_id


async def test_next_seq_resumes_numbering():
    got: list[int] = []
    icpt = ToolCallInterceptor(run_id="r", frame_id="1", next_seq=5)
    tools = bind_tools({"T": lambda: got.append(current_tool_call().seq)}, icpt)
    tools["T"]()
    tools["T"]()
    assert got == [5, 6] and icpt.next_seq == 7


async def test_gather_calls_are_named_by_their_task_not_by_timing(anyio_backend):
    """Each coroutine gather wraps is a task of the frame's code; its calls are named after the task
    (created in program order, labelled by coroutine and arguments), whatever order they finish in."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio.gather is asyncio-only")
    finished: list[str] = []
    started: dict[str, str] = {}
    delays: dict[str, float] = {}

    async def Work(tag):
        call = current_tool_call()
        started[tag] = call.call_id
        await asyncio.sleep(delays.get(tag, 0))
        finished.append(tag)
        return call.idempotency_key

    async def run(times):
        started.clear()
        delays.update(zip("abc", times))
        ex = StreamingPythonExecutor(Agent("g", {"Work": Work}), namespace={"asyncio": asyncio})
        await ex.add_chunk("keys = await asyncio.gather(Work('a'), Work('b'), Work('c'))\nafter = await Work('d')\n")
        res = await ex.finalize()
        assert res.success, res.error
        return dict(started), ex

    first, ex = await run((0.03, 0.0, 0.01))
    assert finished[:3] == ["b", "c", "a"]  # finished out of order
    finished.clear()
    second, _ = await run((0.0, 0.02, 0.01))
    assert finished[:3] == ["a", "c", "b"]
    assert first == second  # the same ids, however the calls interleaved
    assert len({first[t] for t in "abc"}) == 3 and all(first[t].startswith("0-") for t in "abc")
    assert first["d"] == "0"  # the frame's own code: its first call (gather's tasks branch off)
    assert ex.namespace["keys"][0] == f"g:{ex.frame_id}:{first['a']}"


async def test_concurrent_calls_keep_their_own_current_call(anyio_backend):
    seen: dict[str, str] = {}

    async def Work(tag):
        await anyio.sleep(0)
        await anyio.sleep(0)
        seen[tag] = current_tool_call().idempotency_key

    icpt = ToolCallInterceptor(run_id="r", frame_id="f")
    tools = bind_tools({"Work": Work}, icpt)
    async with anyio.create_task_group() as tg:
        tg.start_soon(tools["Work"], "x")
        tg.start_soon(tools["Work"], "y")
    assert sorted(seen.values()) == ["r:f:0", "r:f:1"]


def test_non_callable_tool_raises_type_error():
    with pytest.raises(TypeError, match="NotAFunction"):
        bind_tools({"NotAFunction": 42}, ToolCallInterceptor(run_id="r"))
    with pytest.raises(TypeError):
        StreamingPythonExecutor(Agent("a", {"X": "string"}))


async def test_async_callable_object_stays_awaitable():
    class Tool:
        async def __call__(self, v):
            return (v, current_tool_call().name)

    ex = StreamingPythonExecutor(Agent("o", {"Obj": Tool()}))
    await ex.add_chunk("r = await Obj(9)\n")
    assert ex.namespace["r"] == (9, "Obj")


async def test_subclass_interceptor_sees_every_call():
    journal: list[tuple[str, int]] = []

    class Journaling(ToolCallInterceptor):
        def call_sync(self, call, fn):
            journal.append((call.name, call.seq))
            return super().call_sync(call, fn)

        async def call_async(self, call, fn):
            journal.append((call.name, call.seq))
            return await super().call_async(call, fn)

    async def A():
        return 1

    ex = StreamingPythonExecutor(
        Agent("j", {"S": lambda: 2, "A": A}), interceptor=Journaling(run_id="j")
    )
    await ex.add_chunk("v = S() + await A()\n")
    assert ex.namespace["v"] == 3
    assert journal == [("S", 0), ("A", 1)]
