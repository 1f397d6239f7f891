"""Recorded cassettes replay whatever the chunk boundaries, also when the LLM's code fails mid-response.

A run is recorded from an endpoint that streams in chunks of one size, then replayed (matching every
message of every request) with chunks of another size. The failing response's text after the failing
statement arrives in different amounts at different chunk sizes; the conversation keeps the response
up to the failing statement's line only, so the next request is the same at every size.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from playbooks.llm import Cassette, RecordingProvider, ReplayProvider
from playbooks.program import ProgramIO, ProgramRuntime, parse_program

from runtime_modes import runtime_mode  # noqa: E402,F401  (every test in-process and isolated)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


PROGRAM = """\
# Counter
## Main
### Steps
1. Count the letters of each word
2. Return the total
"""


def _code(text: str) -> str:
    return "```python\n" + textwrap.dedent(text).strip("\n") + "\n```\n"


RESPONSES = [
    _code('''
        await Step("01")
        words = ["alpha", "beta", "gamma"]
        sizes = {w: len(w) for w in words}
        total = sizes["delta"]
        await Say("user", f"{total} letters")
        await Return(total)
    '''),
    _code('''
        total = sum(sizes.values())
        await Say("user", f"{total} letters")
        await Step("02")
        await Return(total)
    '''),
]

SIZES = [(1, 1), (3, 3), (7, 7), (2, 40), (10_000, 10_000)]


async def _run(llm: ReplayProvider | RecordingProvider) -> tuple[object, list[str]]:
    said: list[str] = []
    runtime = ProgramRuntime(parse_program(PROGRAM, path="counter.pb"), llm=llm, io=ProgramIO(output=said.append))
    result = await runtime.run()
    return result.value, said


@pytest.mark.parametrize("recorded_at", SIZES)
async def test_a_cassette_replays_at_every_chunk_size(recorded_at: tuple[int, int], tmp_path: Path) -> None:
    path = tmp_path / "counter.cassette.json"
    source = ReplayProvider(Cassette.from_responses(RESPONSES), match="none", chunk_size=recorded_at)
    recorded = await _run(RecordingProvider(source, path))
    assert recorded == (14, ["14 letters"])
    for size in SIZES:
        replayed = await _run(ReplayProvider(path, match="request", chunk_size=size, seed=size[0]))
        assert replayed == recorded, (recorded_at, size)
