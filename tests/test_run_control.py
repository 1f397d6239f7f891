"""Run control with real ``playbooks run`` processes: a run that failed resumes once the cause is
fixed, calling the failing call again and nothing before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SHOP = """\
# Shop
```python
import os

def _log(line):
    with open("ledger.txt", "a") as f:
        f.write(line + "\\n")

@playbook
async def Reserve(amount: int) -> str:
    \"\"\"Hold the stock.\"\"\"
    _log(f"reserved {amount}")
    return f"hold {amount}"

@playbook
async def Charge(amount: int) -> str:
    \"\"\"Reserve, then charge the customer.\"\"\"
    hold = await Reserve(amount)
    if os.environ.get("GATEWAY_DOWN") == str(amount):
        raise ConnectionError("the payment gateway is down")
    _log(f"charged {amount}")
    return f"receipt for {amount} ({hold})"
```

## Main
```python
@playbook
async def Main() -> str:
    first = await Charge(10)
    second = await Charge(20)
    third = await Charge(30)
    return "; ".join([first, second, third])
```
"""


def _playbooks(*args: str, cwd: Path, down: str = "") -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PLAYBOOKS_")}
    env["GATEWAY_DOWN"] = down
    return subprocess.run(
        [sys.executable, "-m", "playbooks.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
        env=env, input="",
    )


@pytest.mark.parametrize("down", ["10", "20", "30"])
def test_a_failed_run_resumes_calling_the_failed_call_again(tmp_path: Path, down: str) -> None:
    (tmp_path / "shop.pb").write_text(SHOP)
    (tmp_path / "shop.cassette.json").write_text(json.dumps({"version": 1, "interactions": []}))
    failed = _playbooks("run", "shop.pb", cwd=tmp_path, down=down)
    assert failed.returncode != 0
    assert f"calls Charge({down}) again; nothing before it runs twice" in failed.stderr, failed.stderr
    runs = _playbooks("runs", "--json", cwd=tmp_path)
    (record,) = json.loads(runs.stdout)
    assert record["status"] == "failed" and record["failed_call"] == f"Charge({down})"
    assert "ConnectionError: the payment gateway is down" in record["error"]
    table = _playbooks("runs", cwd=tmp_path).stdout
    assert f"failed in Charge({down}): " in table
    history = json.loads(_playbooks("checkpoints", "history", record["run_id"], "--json", cwd=tmp_path).stdout)
    assert [row["calls"] for row in history if row["event"] == "raised"] == [[f"Charge({down})"]]

    again = _playbooks("run", "shop.pb", "--resume", cwd=tmp_path, down=down)  # not fixed yet
    assert again.returncode != 0 and f"failed in Charge({down}); resuming calls it again" in again.stderr
    fixed = _playbooks("run", "shop.pb", "--resume", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "Shop.Main returned 'receipt for 10 (hold 10); receipt for 20 (hold 20); receipt for 30 (hold 30)'" in (
        fixed.stderr + fixed.stdout
    )
    ledger = (tmp_path / "ledger.txt").read_text().splitlines()
    # Before the failing call: each once. The failing call's own completed durable call (Reserve) is
    # replayed, not repeated, on every resume; only the part that failed runs again.
    expected = [f"{what} {a * 10}" for a in range(1, 4) for what in ("reserved", "charged")]
    assert ledger == expected, ledger
    (done,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    assert done["status"] == "completed"


def test_resume_of_a_crashed_run_is_unchanged_by_the_failure_rewind(tmp_path: Path) -> None:
    """A run that did not fail (killed, or one that completed) has nothing rewound: --resume of a
    completed run is refused as before."""
    (tmp_path / "shop.pb").write_text(SHOP)
    (tmp_path / "shop.cassette.json").write_text(json.dumps({"version": 1, "interactions": []}))
    ok = _playbooks("run", "shop.pb", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    (record,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    again = _playbooks("run", "shop.pb", "--resume", record["run_id"], cwd=tmp_path)
    assert again.returncode != 0 and "completed; there is nothing to resume" in again.stderr


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("example", ["orders", "nested", "reporter", "two_agents"])
def test_fork_at_every_snapshot_continues_and_leaves_the_original_unchanged(tmp_path: Path, example: str) -> None:
    """Each example, forked at about six checkpoints, resumes to the original's result; the
    original's files do not change. (An override changes the prompts that follow, which the
    examples' cassettes would not match: overrides are tested on orders, where their effect shows.)"""
    import shutil

    examples = Path(__file__).resolve().parent.parent / "examples"
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(examples / f"{example}{suffix}", tmp_path)
    (tmp_path / "playbooks.toml").write_text("[durability]\nkeep_history = true\n")  # every point forkable
    first = _playbooks("run", f"{example}.pb", "--in-process", cwd=tmp_path)  # (fork copies in-process runs)
    assert first.returncode == 0, first.stderr
    returned = next(line for line in first.stderr.splitlines() if line.startswith("done: "))
    (original,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    listing = json.loads(_playbooks("checkpoints", "list", original["run_id"], "--json", cwd=tmp_path).stdout)
    snapshots = [row["counter"] for row in listing if row["kind"] == "snapshot"]
    folder = tmp_path / ".checkpoints" / original["run_id"]
    before = _tree(folder)
    points = snapshots[:: max(1, len(snapshots) // 6)]  # about six points across the run
    for at in points:
        forked = _playbooks("fork", original["run_id"], "--at", str(at), cwd=tmp_path)
        assert forked.returncode == 0, forked.stderr
        fork_id = forked.stdout.split(" into ")[1].split(";")[0]
        resumed = _playbooks("run", f"{example}.pb", "--resume", fork_id, cwd=tmp_path)
        assert resumed.returncode == 0, (at, resumed.stderr)
        result = returned.split(" finished after ")[0]  # (a fork makes fewer LLM calls)
        assert result in resumed.stderr, (at, resumed.stderr)
        assert [ln for ln in first.stderr.splitlines() if " returned " in ln][-1] in resumed.stderr
        runs = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
        record = next(r for r in runs if r["run_id"] == fork_id)
        assert record["status"] == "completed" and record["forked_from"] == f"{original['run_id']} at checkpoint {at}"
    assert _tree(folder) == before  # the original run's files, byte for byte
    bad = _playbooks("fork", original["run_id"], "--at", "999999", cwd=tmp_path)
    assert bad.returncode == 1 and "has no readable checkpoint 999999" in bad.stderr
    missing = _playbooks("fork", "no-such-run", cwd=tmp_path)
    assert missing.returncode == 2 and "no run 'no-such-run'" in missing.stderr


def test_forking_where_pruning_removed_what_the_point_needs_is_refused(tmp_path: Path) -> None:
    import shutil

    examples = Path(__file__).resolve().parent.parent / "examples"
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(examples / f"two_agents{suffix}", tmp_path)
    assert _playbooks("run", "two_agents.pb", "--in-process", cwd=tmp_path).returncode == 0  # pruned as it ran
    (original,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    listing = json.loads(_playbooks("checkpoints", "list", original["run_id"], "--json", cwd=tmp_path).stdout)
    snapshots = [row["counter"] for row in listing if row["kind"] == "snapshot"]
    refused = _playbooks("fork", original["run_id"], "--at", str(snapshots[1]), cwd=tmp_path)
    assert refused.returncode == 1, refused.stdout
    assert "is older than what the execution keeps" in refused.stderr and "keep_history" in refused.stderr
    latest = _playbooks("fork", original["run_id"], cwd=tmp_path)  # the latest point is always whole
    assert latest.returncode == 0, latest.stderr


def test_fork_with_set_and_resume_with_arg_change_what_follows(tmp_path: Path) -> None:
    import shutil

    examples = Path(__file__).resolve().parent.parent / "examples"
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(examples / f"orders{suffix}", tmp_path)
    assert _playbooks("run", "orders.pb", "--in-process", cwd=tmp_path).returncode == 0
    (original,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    listing = json.loads(_playbooks("checkpoints", "list", original["run_id"], "--json", cwd=tmp_path).stdout)
    # The start of the third response's code, which loops over order_ids (set by the second).
    at = next(row["counter"] for row in listing if row["kind"] == "snapshot" and row["frame_id"] == "OrderAssistant/2")

    forked = _playbooks("fork", original["run_id"], "--at", str(at), "--set", 'order_ids=["A102"]', cwd=tmp_path)
    assert forked.returncode == 0, forked.stderr
    fork_id = forked.stdout.split(" into ")[1].split(";")[0]
    resumed = _playbooks("run", "orders.pb", "--resume", fork_id, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "Order A102 is delivered" in resumed.stdout and "Order A100" not in resumed.stdout
    assert "together come to 99.90" in resumed.stdout and "OrderAssistant.Main returned 1" in resumed.stderr

    plain = _playbooks("fork", original["run_id"], "--at", str(at), cwd=tmp_path)
    plain_id = plain.stdout.split(" into ")[1].split(";")[0]
    with_arg = _playbooks("run", "orders.pb", "--resume", plain_id, "--arg", 'order_ids=["A100", "A101"]', cwd=tmp_path)
    assert with_arg.returncode == 0, with_arg.stderr
    assert "resuming with order_ids=['A100', 'A101']" in with_arg.stderr
    assert "together come to 60.50" in with_arg.stdout and "Main returned 2" in with_arg.stderr
    listed = json.loads(_playbooks("checkpoints", "list", plain_id, "--json", cwd=tmp_path).stdout)
    assert any(row["kind"] == "state" and row["frame_id"].startswith("@override:") for row in listed)
    history = json.loads(_playbooks("checkpoints", "history", plain_id, "--json", cwd=tmp_path).stdout)
    assert [row["statement"] for row in history if row["event"] == "set"] == ["order_ids=['A100', 'A101']"]
    assert history[-1]["event"] == "finished" and history[-1]["step"] == "05 of 05"
    assert any("LookupOrder('A101')" in row["calls"] for row in history)
    assert not any(row["event"] == "raised" for row in history)
    table = _playbooks("checkpoints", "history", plain_id, cwd=tmp_path).stdout
    assert "step 05 of 05" in table and "order_ids=['A100', 'A101']" in table
    bad = _playbooks("fork", original["run_id"], "--set", "not an assignment", cwd=tmp_path)
    assert bad.returncode == 2 and "--set expects NAME=VALUE" in bad.stderr


ASK = """\
# Greeter
```python
def _log(line):
    with open("ledger.txt", "a") as f:
        f.write(line + "\\n")

@playbook
async def Book(name: str) -> str:
    \"\"\"Book a table (a side effect).\"\"\"
    _log(f"booked for {name}")
    return f"table for {name}"
```

## Main
```python
@playbook
async def Main() -> str:
    name = await AskUser("What is your name?")
    table = await Book(name)
    await Say("user", f"Hello, {name}: {table}")
    color = await AskUser("Favourite colour?")
    return f"{name} likes {color}"
```
"""


def test_suspend_exit_and_answer_from_other_processes(tmp_path: Path) -> None:
    (tmp_path / "ask.pb").write_text(ASK)
    (tmp_path / "ask.cassette.json").write_text(json.dumps({"version": 1, "interactions": []}))
    first = _playbooks("run", "ask.pb", "--suspend", cwd=tmp_path)
    assert first.returncode == 3, first.stderr
    (record,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    assert record["status"] == "waiting" and record["question"] == "What is your name?"
    assert "waiting for an answer to: What is your name?" in _playbooks("runs", cwd=tmp_path).stdout

    second = _playbooks("answer", record["run_id"], "Ada", cwd=tmp_path)
    assert second.returncode == 3, second.stderr
    assert "Hello, Ada: table for Ada" in second.stdout
    (record,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    assert record["question"] == "Favourite colour?"

    third = _playbooks("answer", record["run_id"], "green", cwd=tmp_path)
    assert third.returncode == 0, third.stderr
    assert "Greeter.Main returned 'Ada likes green'" in third.stderr
    assert "What is your name?" not in third.stdout  # answered once, journaled: never asked again
    assert (tmp_path / "ledger.txt").read_text().splitlines() == ["booked for Ada"]
    again = _playbooks("answer", record["run_id"], "blue", cwd=tmp_path)
    assert again.returncode == 2 and "is not waiting for an answer (it is completed)" in again.stderr


def test_without_suspend_ask_user_still_reads_standard_input(tmp_path: Path) -> None:
    (tmp_path / "ask.pb").write_text(ASK)
    (tmp_path / "ask.cassette.json").write_text(json.dumps({"version": 1, "interactions": []}))
    env = {key: value for key, value in os.environ.items() if not key.startswith("PLAYBOOKS_")}
    done = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "run", "ask.pb"], capture_output=True, text=True, timeout=60,
        cwd=tmp_path, env=env, input="Grace\nred\n",
    )
    assert done.returncode == 0 and "Greeter.Main returned 'Grace likes red'" in done.stderr
