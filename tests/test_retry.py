"""Retry policies for durable calls: attempts, backoff, which errors retry, and the count journaled
across a kill (a real subprocess killing itself between attempts)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from playbooks import Agent, StreamingPythonExecutor
from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.execution.retry import RetryPolicy, retry
from playbooks.execution.tool_calls import ToolCall, current_tool_call, durable_call

pytestmark = pytest.mark.anyio

FAST = RetryPolicy(max_attempts=3, initial_delay=0.0)


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Flaky:
    """A tool that fails its first ``failures`` attempts with ``error``; records what it saw."""

    def __init__(self, failures: int, error: type[Exception] = ConnectionError) -> None:
        self.failures = failures
        self.error = error
        self.seen: list[ToolCall] = []

    async def __call__(self, x: int) -> int:
        call = current_tool_call()
        assert call is not None
        self.seen.append(call)
        if len(self.seen) <= self.failures:
            raise self.error(f"attempt {call.attempt} failed")
        return x * 10


@pytest.mark.parametrize("durable_run", [False, True], ids=["plain", "durable"])
async def test_a_tool_is_retried_under_one_key_until_it_succeeds(durable_run: bool) -> None:
    flaky = Flaky(2)
    observed: list[Any] = []
    manager = CheckpointManager("r", MemoryCheckpointProvider()) if durable_run else None
    executor = StreamingPythonExecutor(
        Agent("r", tools={"Fetch": flaky}), retry=FAST, checkpoint_manager=manager,
        on_call=lambda call, value, error: observed.append((call.attempt, value, error)),
    )
    await executor.add_chunk("v = await Fetch(4)\n")
    result = await executor.finalize()
    assert result.success and result.namespace["v"] == 40
    assert [c.attempt for c in flaky.seen] == [1, 2, 3]
    assert len({c.idempotency_key for c in flaky.seen}) == 1
    assert observed == [(3, 40, None)]  # the call's end, once
    if manager is not None:
        await manager.close()


async def test_which_errors_retry_and_the_last_error_is_the_calls() -> None:
    policy = RetryPolicy(max_attempts=5, initial_delay=0.0, give_up_on=(PermissionError,))
    gives_up = Flaky(9, PermissionError)
    exhausted = Flaky(9, TimeoutError)
    executor = StreamingPythonExecutor(Agent("e", tools={"Deny": gives_up, "Slow": exhausted}), retry=policy)
    await executor.add_chunk(
        "try:\n    await Deny(1)\nexcept PermissionError as e:\n    denied = str(e)\n"
        "try:\n    await Slow(1)\nexcept TimeoutError as e:\n    slow = str(e)\n"
    )
    result = await executor.finalize()
    assert result.namespace["denied"] == "attempt 1 failed" and len(gives_up.seen) == 1
    assert result.namespace["slow"] == "attempt 5 failed" and len(exhausted.seen) == 5


async def test_the_functions_own_policy_wins_and_none_means_one_attempt() -> None:
    own = Flaky(3)
    decorated = retry(max_attempts=4, initial_delay=0.0)(own)
    bare = Flaky(1)
    executor = StreamingPythonExecutor(Agent("o", tools={"Own": decorated, "Bare": bare}))
    await executor.add_chunk("a = await Own(1)\ntry:\n    await Bare(1)\nexcept ConnectionError:\n    b = 'failed'\n")
    result = await executor.finalize()
    assert result.namespace["a"] == 10 and len(own.seen) == 4
    assert result.namespace["b"] == "failed" and len(bare.seen) == 1


async def test_durable_call_takes_a_retry_policy() -> None:
    flaky = Flaky(1)
    marked = durable_call(flaky.__call__, name="flaky", retry=RetryPolicy(max_attempts=2, initial_delay=0.0))
    executor = StreamingPythonExecutor(Agent("d"), namespace={"flaky": marked})
    await executor.add_chunk("v = await flaky(2)\n")
    assert (await executor.finalize()).namespace["v"] == 20 and [c.attempt for c in flaky.seen] == [1, 2]


async def test_a_cancelled_backoff_is_not_retried() -> None:
    import anyio

    flaky = Flaky(9)
    slow = RetryPolicy(max_attempts=5, initial_delay=10.0, jitter=0.0)
    executor = StreamingPythonExecutor(Agent("c", tools={"Fetch": flaky}), retry=slow)
    with anyio.move_on_after(0.2):
        await executor.add_chunk("await Fetch(1)\n")
    assert len(flaky.seen) == 1


@given(
    attempt=st.integers(1, 40),
    initial=st.floats(0, 10),
    multiplier=st.floats(1, 4),
    cap=st.floats(0, 60),
    jitter=st.floats(0, 1),
    draw=st.floats(0, 1, exclude_max=True),
)
def test_backoff_grows_is_capped_and_jitter_only_shortens(
    attempt: int, initial: float, multiplier: float, cap: float, jitter: float, draw: float
) -> None:
    policy = RetryPolicy(initial_delay=initial, multiplier=multiplier, max_delay=cap, jitter=jitter)

    class Fixed:
        def random(self) -> float:
            return draw

    base = min(cap, initial * multiplier ** (attempt - 1))
    delay = policy.delay(attempt, Fixed())  # type: ignore[arg-type]
    assert base * (1 - jitter) - 1e-9 <= delay <= base + 1e-9
    assert policy.delay(attempt + 1, Fixed()) >= delay - 1e-9 or base >= cap  # type: ignore[arg-type]


def test_policies_refuse_nonsense() -> None:
    for bad in ({"max_attempts": 0}, {"initial_delay": -1}, {"multiplier": 0.5}, {"jitter": 2}):
        with pytest.raises(ValueError):
            RetryPolicy(**bad)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        retry(RetryPolicy(), max_attempts=2)


WORKER = textwrap.dedent(
    """
    import json, os, signal, sys
    import anyio
    from playbooks import Agent, StreamingPythonExecutor
    from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
    from playbooks.execution.retry import retry
    from playbooks.execution.tool_calls import current_tool_call

    store, ledger, out = sys.argv[1:4]

    @retry(max_attempts=4, initial_delay=0.05, jitter=0.0)
    async def Charge(amount):
        call = current_tool_call()
        with open(ledger, "a") as f:
            f.write(json.dumps([call.idempotency_key, call.attempt, call.resumed]) + "\\n")
        if call.attempt == 2 and not call.resumed:
            os.kill(os.getpid(), signal.SIGKILL)  # dies between attempt 1's failure and attempt 2's end
        if call.attempt < 4:
            raise ConnectionError(f"attempt {call.attempt}: the gateway timed out")
        return f"charged {amount} on attempt {call.attempt}"

    async def main():
        agent = Agent("pay", tools={"Charge": Charge})
        manager = CheckpointManager("pay", FilesystemCheckpointProvider(store))
        code = "receipt = await Charge(30)\\n"
        if await RecoveryCoordinator(manager).can_recover():
            checkpoint = await manager.get_latest_checkpoint()
            executor = await StreamingPythonExecutor.resume_from_checkpoint(agent, checkpoint, checkpoint_manager=manager)
        else:
            executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
            await executor.add_chunk(code)
        result = await executor.finalize()
        await manager.close()
        with open(out, "w") as f:
            json.dump({"receipt": result.namespace.get("receipt"), "error": str(result.error)}, f)

    anyio.run(main)
    """
)


@pytest.mark.integration
def test_the_attempt_count_survives_a_kill_between_attempts(tmp_path: Path) -> None:
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    args = [sys.executable, str(worker), str(tmp_path / "store"), str(tmp_path / "ledger"), str(tmp_path / "out")]
    first = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert first.returncode == -9, first.stderr
    second = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert second.returncode == 0, second.stderr
    assert json.loads((tmp_path / "out").read_text())["receipt"] == "charged 30 on attempt 4"
    attempts = [json.loads(line) for line in (tmp_path / "ledger").read_text().splitlines()]
    assert [(a, r) for _, a, r in attempts] == [(1, False), (2, False), (3, True), (4, True)]
    assert len({key for key, _, _ in attempts}) == 1  # one idempotency key across every attempt


async def test_a_programs_tool_calls_follow_its_retry_policy(tmp_path: Path) -> None:
    """``playbooks run`` gives the program's tool calls the ``[durability] retry_*`` policy: a python
    playbook that times out twice succeeds on the third attempt; a KeyError is not retried."""
    import textwrap

    from playbooks.cli.run_command import _retry_policy
    from playbooks.config import load_config
    from playbooks.llm import Cassette, ReplayProvider
    from playbooks.program import ProgramRuntime, parse_program

    pb = textwrap.dedent(
        """\
        # A
        ```python
        ATTEMPTS = []

        @playbook
        async def Fetch(key):
            ATTEMPTS.append(key)
            with open(LOG, "a") as log:
                log.write(key + "\\n")
            if key == "missing":
                raise KeyError(key)
            if len(ATTEMPTS) < 3:
                raise TimeoutError("the backend timed out")
            return f"value of {key}"
        ```
        ## Main
        Fetch something.
        """
    )
    response = (
        "```python\nv = await Fetch('k')\ntry:\n    await Fetch('missing')\nexcept KeyError:\n    pass\n"
        "await Return(v)\n```\n"
    )
    config = load_config(None, env={}, overrides={"durability.retry_max_attempts": 3,
                                                  "durability.retry_initial_delay": 0.0})
    policy = _retry_policy(config)
    assert policy is not None and policy.max_attempts == 3
    assert _retry_policy(load_config(None, env={})) is None  # the default: one attempt
    program = parse_program(pb.replace("LOG", repr(str(tmp_path / "log"))), path="test.pb")
    llm = ReplayProvider(Cassette.from_responses([response]), match="none")
    runtime = ProgramRuntime(program, llm=llm, tool_retry=policy)
    result = await runtime.run()
    assert result.value == "value of k"
    assert (tmp_path / "log").read_text().split() == ["k", "k", "k", "missing"]


async def test_resumed_is_readable_from_the_code_and_from_tools() -> None:
    from playbooks import resumed

    seen: list[tuple[str, bool]] = []

    async def Note(where: str) -> None:
        seen.append((where, resumed()))
        if where == "die" and not resumed():
            raise KeyboardInterrupt  # stands for the process dying (once)

    provider = MemoryCheckpointProvider()
    agent = Agent("flag", tools={"Note": Note})
    manager = CheckpointManager("flag", provider)
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager, namespace={"resumed": resumed})
    assert resumed() is False
    with pytest.raises(KeyboardInterrupt):
        await executor.add_chunk("first = resumed()\nawait Note('tool')\nawait Note('die')\nlast = resumed()\n")
    assert executor.namespace["first"] is False
    await manager._lock.release()  # what kill -9 leaves: the records, no lock
    manager._lock = None
    manager = CheckpointManager("flag", provider)
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    namespace: dict[str, Any] = {"resumed": resumed}
    again = await StreamingPythonExecutor.resume_from_checkpoint(
        agent, checkpoint, checkpoint_manager=manager, namespace=namespace
    )
    await again.finalize()
    assert seen == [("tool", False), ("die", False), ("die", True)]
    assert namespace["last"] is True  # (``first`` too, if its statement ran again after the resume)
    await manager.close()
