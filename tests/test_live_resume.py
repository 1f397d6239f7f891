"""Resume with a live model: ``playbooks run`` against a real local server speaking the OpenAI streaming
protocol, killed with SIGKILL at random instants, also while it continues a cut-off response.

The server streams slowly (so a kill lands mid-response) and answers differently every time: another
wording, and a continuation request gets only the code for the parcels its assistant messages do not
ship yet: as a new message (``continuation = "message"``, any endpoint) or as the rest of its own
partial message (``"vllm"``: ``continue_final_message``). Each parcel's shipment is appended to a fsynced ledger with its idempotency key. Whatever
the model answers after a crash, the run must complete with every parcel shipped exactly once (a call
reported in flight may run again, with the same key), no line shown twice (except a ``Say`` reported
in flight), and never a ``NonDeterminismError``.
"""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from llm_server import FakeOpenAIServer, RecordedRequest, Reply, stream

pytestmark = pytest.mark.integration

ITEMS = "abcdefgh"
TRIALS = int(os.environ.get("PLAYBOOKS_LIVE_RESUME_TRIALS", "3"))

PROGRAM = '''\
# Shipper
Ships the customer's parcels one by one.

```python
import os

from playbooks.execution.tool_calls import current_tool_call


@playbook
async def Ship(item: str) -> str:
    """Ships one parcel; returns its tracking code."""
    call = current_tool_call()
    key = call.idempotency_key if call is not None else "-"
    with open(os.environ["SHIP_LEDGER"], "a") as ledger:
        ledger.write(f"{item} {key}\\n")
        ledger.flush()
        os.fsync(ledger.fileno())
    return f"T-{item}"
```

## Main
### Triggers
- At the beginning

### Steps
1. Ship every parcel (a to h) and tell the user each tracking code
2. Return how many were shipped
'''

VERBS = ("shipped", "sent", "posted", "dispatched", "handed over")


def answer(request: RecordedRequest, number: int) -> Reply:
    """A model that words every answer differently and, asked to continue, writes only the rest (in a
    new message, or, asked to continue its own message, as the rest of that message)."""
    messages = request.body["messages"]
    written = "".join(m["content"] for m in messages if m["role"] == "assistant")
    continuing = request.body.get("continue_final_message") is True
    assert not continuing or (messages[-1]["role"] == "assistant" and request.body["add_generation_prompt"] is False)
    shipped = set(re.findall(r'Ship\("(\w)"\)', written))
    verb = VERBS[number % len(VERBS)]
    lines = [] if written else ['await Step("01")', f'await Say("user", "{verb}: starting ({number})")']
    if "done = []" not in written:
        lines.append("done = []")
    for item in ITEMS:
        if item not in shipped:
            lines.append(f'done.append(await Ship("{item}"))')
            lines.append(f'await Say("user", f"{verb} {item} ({number}): {{done[-1]}}")')
    lines += ['await Step("02")', "await Return(len(done))"]
    text = ("\n" if continuing else "```python\n") + "\n".join(lines) + "\n```\n"
    return stream([text[i : i + 9] for i in range(0, len(text), 9)], delay=0.015)


def _start(folder: Path, env: dict[str, str], *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "playbooks.cli", "run", "ship.pb", *extra], cwd=folder, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )


def _finish(proc: subprocess.Popen[str], kill_after: float | None) -> tuple[str, str, int]:
    """Wait for the process; with ``kill_after``, SIGKILL it that long after its first line of output
    (the model's answer is streaming then, whatever the machine's load made its start-up cost)."""
    seen = ""
    if kill_after is not None:
        assert proc.stdout is not None
        seen = proc.stdout.readline()
        if seen:
            time.sleep(kill_after)
            proc.send_signal(signal.SIGKILL)
    out, err = proc.communicate(timeout=60)
    return seen + out, err, proc.returncode


def _completed(folder: Path) -> bool:
    records = list((folder / ".checkpoints" / ".runs").glob("*.json"))
    return any(json.loads(record.read_text())["status"] == "completed" for record in records)


def _trial(folder: Path, server: FakeOpenAIServer, rng: random.Random, continuation: str) -> None:
    folder.mkdir()
    (folder / "ship.pb").write_text(PROGRAM)
    (folder / "playbooks.toml").write_text(
        f'[model]\nprovider = "openai"\nname = "fake"\nbase_url = "{server.base_url}"\napi_key_env = "FAKE_KEY"\n'
        f'continuation = "{continuation}"\n'
    )
    ledger = folder / "ledger.txt"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env.update(FAKE_KEY="x", SHIP_LEDGER=str(ledger))
    outputs: list[str] = []
    errors: list[str] = []
    kills = 0
    code = _finish(_start(folder, env), rng.uniform(0.0, 0.8))
    outputs.append(code[0])
    errors.append(code[1])
    while code[2] != 0 and not _completed(folder):  # (a kill can land after the run completed)
        assert code[2] == -signal.SIGKILL, code[1]
        kills += 1
        assert kills < 6, "\n".join(errors)
        again = rng.random() < 0.5 and kills < 3  # killed again while it continues the cut-off response
        # --resume-or-start: a kill before the run was recorded (nothing ran yet) leaves nothing to resume
        code = _finish(_start(folder, env, "--resume-or-start"), rng.uniform(0.0, 0.5) if again else None)
        outputs.append(code[0])
        errors.append(code[1])
    everything = "\n".join(errors)
    assert "NonDeterminismError" not in everything, everything
    assert "< Shipper.Main returned 8" in errors[-1], everything
    in_flight = [line for line in everything.splitlines() if "was running when the process stopped" in line]
    entries = [line.split() for line in ledger.read_text().splitlines()]
    shipments = Counter(item for item, _ in entries)
    assert set(shipments) == set(ITEMS), (shipments, everything)
    for item, count in shipments.items():
        if count > 1:  # only a call in flight at a kill may run again, and with the same key
            assert count - 1 <= sum(f"Ship('{item}')" in line for line in in_flight), (item, everything)
            assert len({key for it, key in entries if it == item}) == 1, entries
    said = Counter(line for out in outputs for line in out.splitlines())
    for line, count in said.items():
        if count > 1:
            assert count - 1 <= sum(repr(line) in report for report in in_flight), (line, outputs, everything)


@pytest.mark.parametrize("continuation", ["message", "vllm"])
def test_live_model_resume_after_random_kills(continuation: str, tmp_path: Path) -> None:
    rng = random.Random(int(os.environ.get("PLAYBOOKS_LIVE_RESUME_SEED", "7")))
    with FakeOpenAIServer() as server:
        counter = iter(range(10**6))
        server.responder = lambda request: answer(request, next(counter))
        for trial in range(TRIALS):
            _trial(tmp_path / f"trial-{trial}", server, rng, continuation)
        if continuation == "message":
            continued = [r for r in server.requests if "was cut off" in str(r.body["messages"][-1]["content"])]
        else:
            continued = [r for r in server.requests if r.body.get("continue_final_message")]
        assert continued, "no trial was cut off mid-response: the kills came too late"
