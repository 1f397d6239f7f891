"""Errors in a continued message are shown to the LLM with lines of the whole message.

With ``model.continuation = "vllm"`` (or ``"prefix"``) a response cut off by a crash is continued as the
rest of the model's own partial assistant message. The conversation keeps that message whole (what had
run, then the rest), so when the rest fails, "line N of your response" must count from the start of the
whole message and quote the failing line, not count from where the continuation began.

``playbooks run`` against a real local server speaking the OpenAI streaming protocol, SIGKILLed while
the first response is still streaming, then ``--resume``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llm_server import FakeOpenAIServer, RecordedRequest, Reply, stream

pytestmark = pytest.mark.integration

PROGRAM = """\
# Counter
## Main
### Steps
1. Say one and two
2. Return the count
"""

FIRST = '```python\nawait Step("01")\nawait Say("user", "one")\nx = 1\nawait Say("user", "two")\n'
"""The first response's part that runs before the kill; the rest of it never arrives."""
FAILING = "z = undefined_name + 1"
REST = f'\ny = 2\n{FAILING}\nawait Return(x + y)\n```\n'
"""The continuation: the model goes on with its own message; its second line fails."""
FIX = '```python\nawait Step("02")\nawait Return(x + 1)\n```\n'


def answer(request: RecordedRequest) -> Reply:
    """The first request gets FIRST, then pieces slow enough to be killed before they arrive; the
    continuation request (the partial message continued) gets REST; the error message gets FIX."""
    messages = request.body["messages"]
    if _continues(request):
        assert messages[-1]["role"] == "assistant"
        return stream([REST[i : i + 7] for i in range(0, len(REST), 7)])
    if messages[-1]["role"] == "user" and "failed" in messages[-1]["content"]:
        return stream([FIX])
    return stream([FIRST, "y", " = 2\n"], delay=1.5)


def _continues(request: RecordedRequest) -> bool:
    """Whether ``request`` asks to continue its last (assistant) message, as vLLM or Mistral say it."""
    body = request.body
    if body.get("continue_final_message") is True:
        assert body["add_generation_prompt"] is False
        return True
    return body["messages"][-1].get("prefix") is True


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env["FAKE_KEY"] = "x"
    return env


def _run(folder: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "playbooks.cli", "run", "counter.pb", "--verbose", *extra],
                            cwd=folder, env=_env(), text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.parametrize("continuation", ["vllm", "prefix"])
def test_an_error_in_a_continued_message_counts_lines_from_its_start(tmp_path: Path, continuation: str) -> None:
    (tmp_path / "counter.pb").write_text(PROGRAM)
    with FakeOpenAIServer() as server:
        server.responder = answer
        (tmp_path / "playbooks.toml").write_text(
            f'[model]\nprovider = "openai"\nname = "fake"\nbase_url = "{server.base_url}"\n'
            f'api_key_env = "FAKE_KEY"\ncontinuation = "{continuation}"\n'
        )
        first = _run(tmp_path)
        assert first.stdout is not None
        shown = [first.stdout.readline(), first.stdout.readline()]
        assert shown == ["one\n", "two\n"], (shown, first.stderr.read() if first.stderr else "")
        time.sleep(0.3)  # its records are written; the rest of the response is seconds away
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=60)
        resumed = _run(tmp_path, "--resume")
        out, err = resumed.communicate(timeout=60)
    assert resumed.returncode == 0, err
    assert out == "", out  # nothing said again
    assert "< Counter.Main returned 2" in err, err

    continued = [r for r in server.requests if _continues(r)]
    assert len(continued) == 1, [r.body for r in server.requests]
    prefill = continued[0].body["messages"][-1]["content"]
    assert prefill.startswith(FIRST.rstrip("\n")), prefill  # what had run, continued in place
    fixing = server.requests[-1].body["messages"]
    whole, told = fixing[-2], fixing[-1]
    kept = REST[: REST.index(FAILING) + len(FAILING) + 1]  # up to the failing line (see _response_seen)
    assert whole["role"] == "assistant" and whole["content"] == prefill + kept  # the message, whole
    line = whole["content"].splitlines().index(FAILING) + 1
    assert line > REST.count("\n")  # the continuation's own count would be smaller: this tells them apart
    assert told["content"].startswith(f"Your code failed at line {line} of your response:\n    {FAILING}\n"), told
    assert f"line {line}: " in err and "NameError" in err  # the progress line counts the same way
