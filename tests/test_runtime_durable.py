"""Durable program runs in one process: a run dies in an LLM call and a new runtime resumes it.

The subprocess-and-SIGKILL version, over every progress line of the examples, is test_cli_resume.py.
"""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
import pytest

from playbooks.checkpoints import CheckpointManager, MemoryCheckpointProvider
from playbooks.llm import Cassette, LLMProvider, LLMRequest, ReplayProvider
from playbooks.program import ProgramIO, ProgramRuntime, parse_program

from runtime_modes import runtime_mode  # noqa: E402,F401  (every test in-process and isolated)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Died(BaseException):
    """Stands for the process dying (nothing catches a BaseException that is not an Exception)."""


class Dies(LLMProvider):
    """Serves scripted responses; the process "dies" at request ``die_at``."""

    def __init__(self, responses: list[str], die_at: int | None = None) -> None:
        self.inner = ReplayProvider(Cassette.from_responses(responses), match="none", chunk_size=(1, 5))
        self.die_at = die_at
        self.requests = 0

    def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        self.requests += 1
        if self.requests == self.die_at:
            raise Died
        return self.inner.stream(request)


def code(text: str) -> str:
    return "```python\n" + textwrap.dedent(text).strip("\n") + "\n```\n"


ASK = """\
# Asker
## Main
### Steps
- Ask the user for their name
- Greet them
"""

FIRST = code('await Step("01")\nname = await AskUser("Your name?")')
SECOND = code('await Step("02")\nawait Say("user", f"Hi {name}")\nawait Return(name)')


async def _crash(manager: CheckpointManager) -> None:
    if manager._lock is not None:  # what kill -9 leaves: the records, and no lock
        await manager._lock.release()
        manager._lock = None


async def test_an_answer_is_not_asked_again_after_a_crash() -> None:
    program = parse_program(ASK, path="ask.pb")
    storage = MemoryCheckpointProvider()
    said: list[str] = []
    manager = CheckpointManager("ask-run", storage)
    first = ProgramRuntime(
        program, llm=Dies([FIRST, SECOND], die_at=2), io=ProgramIO(output=said.append, input=["Ada"]),
        checkpoint_manager=manager,
    )
    with pytest.raises(BaseExceptionGroup) as died:  # the agents' task group wraps it
        await first.run()
    assert died.value.subgroup(Died) is not None
    assert said == ["Your name?"]
    await _crash(manager)

    resumed_manager = CheckpointManager("ask-run", storage)
    await resumed_manager.load_records()
    llm = Dies([SECOND])
    second = ProgramRuntime(
        program, llm=llm, io=ProgramIO(output=said.append, input=["Someone else"]),
        checkpoint_manager=resumed_manager,
    )
    result = await second.run()
    assert result.value == "Ada"  # the answer given before the crash
    assert said == ["Your name?", "Hi Ada"]  # the question was not asked again
    assert llm.requests == 1  # the finished response was not requested again
    await resumed_manager.close()  # (its lock: the test runs again, isolated, with the same id)


async def test_a_durable_run_without_a_crash_matches_a_plain_run() -> None:
    program = parse_program(ASK, path="ask.pb")
    plain_said: list[str] = []
    plain = await ProgramRuntime(
        program, llm=Dies([FIRST, SECOND]), io=ProgramIO(output=plain_said.append, input=["Ada"])
    ).run()
    durable_said: list[str] = []
    manager = CheckpointManager("ask-durable", MemoryCheckpointProvider())
    durable = await ProgramRuntime(
        program, llm=Dies([FIRST, SECOND]), io=ProgramIO(output=durable_said.append, input=["Ada"]),
        checkpoint_manager=manager,
    ).run()
    assert (plain.value, plain_said) == (durable.value, durable_said)
    assert await manager.list_checkpoints()
    latest = await manager.get_latest_checkpoint()
    await manager.close()
    assert latest is not None and latest["execution_state"]["done"]
