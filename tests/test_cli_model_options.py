"""The ``[model]`` options reach the endpoint, and the tokens it reports are shown and recorded.

``playbooks run`` against a real local server speaking the OpenAI streaming protocol: ``max_tokens``
is in every request, ``headers`` are sent, ``stream_options.include_usage`` is asked for (unless
``usage = false``), and the usage the server reports is shown per call (``--verbose``), in the final
line and in the run record, added up over the run's calls. A run recorded into a cassette keeps that
usage, and replaying the cassette reports it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llm_server import FakeOpenAIServer, stream

pytestmark = pytest.mark.integration

PROGRAM = """\
# Adder
## Main
### Steps
1. Add two numbers
2. Return the sum
"""

FIRST = '```python\nawait Step("01")\ntotal = 2 + 3\n```\n'
SECOND = '```python\nawait Step("02")\nawait Return(total)\n```\n'


def _run(folder: Path, server: FakeOpenAIServer, extra: str = "") -> subprocess.CompletedProcess[str]:
    (folder / "adder.pb").write_text(PROGRAM)
    (folder / "playbooks.toml").write_text(
        f'[model]\nprovider = "openai"\nname = "m"\nbase_url = "{server.base_url}"\napi_key_env = "KEY"\n'
        'max_tokens = 321\ntimeout = 5\nheaders = "X-Org: acme; X-Team: data"\n' + extra
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env["KEY"] = "secret"
    return subprocess.run([sys.executable, "-m", "playbooks.cli", "run", "adder.pb", "--verbose"], cwd=folder,
                          env=env, text=True, capture_output=True, timeout=60)


def test_options_are_sent_and_usage_is_reported(tmp_path: Path) -> None:
    with FakeOpenAIServer() as server:
        server.script(stream([FIRST], usage=(100, 20)), stream([SECOND], usage=(150, 10)))
        proc = _run(tmp_path, server)
    assert proc.returncode == 0, proc.stderr
    for request in server.requests:
        assert request.body["max_tokens"] == 321
        assert request.body["stream_options"] == {"include_usage": True}
        assert request.headers["x-org"] == "acme" and request.headers["x-team"] == "data"
    assert "~ LLM call 1: 100 tokens in, 20 out" in proc.stderr
    assert "done: Adder.Main finished after 2 LLM calls (250 tokens in, 30 out)" in proc.stderr
    record = json.loads(next((tmp_path / ".checkpoints" / ".runs").glob("*.json")).read_text())
    assert (record["llm_calls"], record["prompt_tokens"], record["completion_tokens"]) == (2, 250, 30)
    listed = subprocess.run([sys.executable, "-m", "playbooks.cli", "runs"], cwd=tmp_path, text=True,
                            capture_output=True, timeout=60)
    assert "250/30" in listed.stdout, listed.stdout


def test_usage_can_be_turned_off(tmp_path: Path) -> None:
    with FakeOpenAIServer() as server:
        server.script(stream([FIRST]), stream([SECOND]))
        proc = _run(tmp_path, server, "usage = false\n")
    assert proc.returncode == 0, proc.stderr
    assert all("stream_options" not in request.body for request in server.requests)
    assert "done: Adder.Main finished after 2 LLM calls\n" in proc.stderr


def test_bad_headers_are_a_usage_error(tmp_path: Path) -> None:
    (tmp_path / "adder.pb").write_text(PROGRAM)
    (tmp_path / "playbooks.toml").write_text('[model]\nprovider = "openai"\nheaders = "no colon here"\n')
    bad = subprocess.run([sys.executable, "-m", "playbooks.cli", "run", "adder.pb"], cwd=tmp_path, text=True,
                         capture_output=True, timeout=60)
    assert bad.returncode == 2 and "model.headers" in bad.stderr and "Traceback" not in bad.stderr


def test_a_recorded_cassette_keeps_the_usage_and_replay_reports_it(tmp_path: Path) -> None:
    recording, replaying = tmp_path / "record", tmp_path / "replay"
    recording.mkdir()
    replaying.mkdir()
    (recording / "adder.pb").write_text(PROGRAM)
    with FakeOpenAIServer() as server:
        server.script(stream([FIRST], usage=(100, 20)), stream([SECOND], usage=(150, 10)))
        (recording / "playbooks.toml").write_text(
            f'[model]\nprovider = "record"\nname = "m"\nbase_url = "{server.base_url}"\napi_key_env = "KEY"\n'
            'cassette = "adder.cassette.json"\n'
        )
        recorded = _run_again(recording)
    assert recorded.returncode == 0, recorded.stderr
    interactions = json.loads((recording / "adder.cassette.json").read_text())["interactions"]
    assert [i["usage"] for i in interactions] == [
        {"prompt_tokens": 100, "completion_tokens": 20},
        {"prompt_tokens": 150, "completion_tokens": 10},
    ]
    (replaying / "adder.pb").write_text(PROGRAM)
    (replaying / "adder.cassette.json").write_text((recording / "adder.cassette.json").read_text())
    (replaying / "playbooks.toml").write_text('[model]\nprovider = "replay"\ncassette = "adder.cassette.json"\n')
    replayed = _run_again(replaying)
    assert replayed.returncode == 0, replayed.stderr
    assert "~ LLM call 1: 100 tokens in, 20 out" in replayed.stderr
    assert "done: Adder.Main finished after 2 LLM calls (250 tokens in, 30 out)" in replayed.stderr
    # A cassette recorded before usage was kept still replays, with no tokens to report.
    old = json.loads((replaying / "adder.cassette.json").read_text())
    for interaction in old["interactions"]:
        del interaction["usage"]
    (replaying / "adder.cassette.json").write_text(json.dumps(old))
    replayed_old = _run_again(replaying)
    assert replayed_old.returncode == 0, replayed_old.stderr
    assert "done: Adder.Main finished after 2 LLM calls\n" in replayed_old.stderr


def _run_again(folder: Path) -> subprocess.CompletedProcess[str]:
    """``playbooks run adder.pb --verbose`` in ``folder`` with the configuration already there (a fresh run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env["KEY"] = "secret"
    return subprocess.run([sys.executable, "-m", "playbooks.cli", "run", "adder.pb", "--verbose"], cwd=folder,
                          env=env, text=True, capture_output=True, timeout=60)


def test_a_cassette_recorded_from_a_live_model_holds_no_key(tmp_path: Path) -> None:
    """Issue 11: a run recorded against a live endpoint with a canary key, whose code looks for the key
    in its environment: the endpoint got the key, no stored byte (cassette, checkpoints, run record)
    holds it."""
    canary = "sk-canary-live-5c91e0"
    (tmp_path / "adder.pb").write_text(PROGRAM)
    probe = '```python\nimport os\nawait Step("01")\ntotal = 2 + 3\nprint(os.environ.get("KEY"))\n```\n'
    with FakeOpenAIServer() as server:
        server.script(stream([probe]), stream([SECOND]))
        (tmp_path / "playbooks.toml").write_text(
            f'[model]\nprovider = "record"\nname = "m"\nbase_url = "{server.base_url}"\napi_key_env = "KEY"\n'
            'cassette = "adder.cassette.json"\n'
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
        env["KEY"] = canary
        done = subprocess.run([sys.executable, "-m", "playbooks.cli", "run", "adder.pb"], cwd=tmp_path, env=env,
                              text=True, capture_output=True, timeout=60)
        sent = [request.headers.get("Authorization", request.headers.get("authorization", "")) for request in server.requests]
    assert done.returncode == 0, done.stderr
    assert sent and all(canary in header for header in sent)
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and p.name != "playbooks.toml"]
    assert any(p.name == "adder.cassette.json" for p in stored) and any(".checkpoints" in p.parts for p in stored)
    for path in stored:
        assert canary.encode() not in path.read_bytes(), path
    assert canary not in done.stdout + done.stderr
