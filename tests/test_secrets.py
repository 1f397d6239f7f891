"""Secrets never reach a stored byte: a checkpoint record, a cassette or a value sent to an isolated
worker that would hold the value of the model's key, the checkpoint key or a ``durability.secret_env``
variable is refused with ``SecretStoredError`` naming the variable, and nothing of it is written."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import pytest

from playbooks.agent import Agent
from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.checkpoints.secrets import Secret, secrets_from_env
from playbooks.errors import SecretStoredError
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.llm import Cassette, LLMProvider, LLMRequest, RecordingProvider, ReplayProvider
from playbooks.llm.base import Message
from playbooks.program import ProgramIO, ProgramRuntime, load_program

CANARY = "sk-canary-0b7e55d2"


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_secrets_from_env_takes_set_values_of_a_useful_length() -> None:
    found = secrets_from_env(["KEY", "SHORT", "UNSET", "KEY"], {"KEY": CANARY, "SHORT": "abc"})
    assert found == (Secret("KEY", CANARY.encode()),)
    assert CANARY not in repr(found)  # never printed


@pytest.mark.anyio
async def test_a_record_holding_a_secret_is_refused_and_the_earlier_ones_stay() -> None:
    async def fetch() -> str:
        return f"token={CANARY}"

    manager = CheckpointManager("secret-run", MemoryCheckpointProvider(), key=b"k" * 32)
    manager.secrets = (Secret("OPENAI_API_KEY", CANARY.encode()),)
    executor = StreamingPythonExecutor(Agent("a", {"Fetch": fetch}), checkpoint_manager=manager)
    await executor.add_chunk("x = 1\n")
    await executor.checkpoint()
    with pytest.raises(SecretStoredError, match=r"\$OPENAI_API_KEY") as caught:
        await executor.add_chunk("t = await Fetch()\n")
    assert caught.value.name == "OPENAI_API_KEY"
    stored = await manager.provider.read_journal("secret-run")
    assert all(CANARY.encode() not in entry for _, entry in stored)
    for cid in await manager.list_checkpoints():  # what was stored before it still loads
        data = await manager.provider.load_checkpoint(cid)
        assert data is None or CANARY.encode() not in data
    assert await manager.get_latest_checkpoint() is not None
    assert manager.for_execution("secret-run~code").secrets == manager.secrets


class _Leaky(LLMProvider):
    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        yield f"```python\nprint('{CANARY}')\n```"


@pytest.mark.anyio
async def test_a_cassette_interaction_holding_a_secret_is_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    recorder = RecordingProvider(_Leaky(), path, secrets=[Secret("OPENAI_API_KEY", CANARY.encode())])
    with pytest.raises(SecretStoredError):
        async for _ in recorder.stream(LLMRequest([Message("user", "hi")])):
            pass
    assert CANARY not in path.read_text()
    assert Cassette.load(path).interactions == []


PROGRAM = """\
# Leaker
```python
import os

@playbook
async def GetKey():
    \"\"\"A careless tool that returns the model's key.\"\"\"
    return os.environ["OPENAI_API_KEY"]
```

## Main
### Steps
- Get the key
"""


@pytest.mark.integration
@pytest.mark.parametrize("way", ["isolated", "in-process"])
def test_a_tool_that_returns_the_key_stops_the_run_and_nothing_stores_it(
    tmp_path: Path, way: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "leak.pb").write_text(PROGRAM)
    monkeypatch.setenv("OPENAI_API_KEY", "a-key-while-recording")
    responses = ["```python\nkey = await GetKey()\nawait Return(len(key))\n```"]
    recorder = RecordingProvider(
        ReplayProvider(Cassette.from_responses(responses), match="none"), tmp_path / "leak.cassette.json"
    )
    anyio.run(ProgramRuntime(load_program(tmp_path / "leak.pb"), llm=recorder, io=ProgramIO(output=print)).run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env["OPENAI_API_KEY"] = CANARY
    extra = ["--in-process"] if way == "in-process" else []
    done = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "run", "leak.pb", *extra], cwd=tmp_path, env=env, text=True,
        capture_output=True, timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert "$OPENAI_API_KEY" in done.stderr and "Traceback" not in done.stderr
    assert CANARY not in done.stdout + done.stderr
    stored = [p for p in (tmp_path / ".checkpoints").rglob("*") if p.is_file()]
    assert stored
    for p in stored:
        assert CANARY.encode() not in p.read_bytes(), p
