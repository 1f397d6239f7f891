"""`playbooks run` and `playbooks init`, run as real subprocesses on the examples and on broken input."""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import anyio.lowlevel
import pytest

from playbooks.config import Config, load_config
from playbooks.llm import Cassette, LLMProvider, LLMRequest, RecordingProvider
from playbooks.program import PlaybookRunError, ProgramIO, ProgramRuntime, load_program

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
pytestmark = pytest.mark.integration


def _run(*args: str, cwd: Path, input: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PLAYBOOKS_")}
    return subprocess.run(
        [sys.executable, "-m", "playbooks.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env=env,
        input=input if input is not None else "",
    )


def test_orders_example(tmp_path: Path) -> None:
    proc = _run("run", str(EXAMPLES / "orders.pb"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "Hello! Let me look at your orders.",
        "Order A100 is shipped, total 42.50",
        "Order A101 is processing, total 18.00",
        "Order A102 is delivered, total 99.90",
        "All your orders together come to 160.40.",
    ]
    assert "> OrderAssistant.Main()" in proc.stderr
    assert "- step 03: For each order, look it up" in proc.stderr
    assert "! code failed (line 6: KeyError: 'amount'); sent back to the LLM" in proc.stderr
    assert "< OrderAssistant.Main returned 3" in proc.stderr
    assert "done: OrderAssistant.Main finished after 3 LLM calls" in proc.stderr


def test_nested_example(tmp_path: Path) -> None:
    proc = _run("run", str(EXAMPLES / "nested.pb"), "--no-stream", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["Lisbon: t-shirts, sunglasses", "Oslo: sweater, coat, umbrella"]
    assert "  > TripPlanner.PackingList(city='Oslo')" in proc.stderr
    assert "    - step 02.02: add an umbrella if it rains" in proc.stderr


def test_two_agents_example(tmp_path: Path) -> None:
    proc = _run("run", str(EXAMPLES / "two_agents.pb"), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "Bought 3 widgets for 14.40 (4.80 each). Seller says: Thank you! 3 widgets are on their way."
    ]
    assert "@ Buyer -> Seller: {'item': 'widget', 'quantity': 3}" in proc.stderr
    assert "[Seller] < Seller.Main returned 'sold'" in proc.stderr
    assert "[Buyer] < Buyer.Main returned 14.4" in proc.stderr


def test_verbose_shows_statements_as_they_run(tmp_path: Path) -> None:
    proc = _run("run", str(EXAMPLES / "orders.pb"), "--verbose", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert '|   2: await Step("01")' in proc.stderr
    assert "|   4: for order_id in order_ids: ..." in proc.stderr
    assert "~ LLM call 2 (OrderAssistant.Main)" in proc.stderr
    assert "> OrderAssistant.LookupOrder(order_id='A101')" in proc.stderr


def test_cassette_from_flag_and_from_config(tmp_path: Path) -> None:
    program = tmp_path / "shop.pb"
    shutil.copy(EXAMPLES / "orders.pb", program)
    (tmp_path / "recorded").mkdir()
    shutil.copy(EXAMPLES / "orders.cassette.json", tmp_path / "recorded" / "orders.json")
    missing = _run("run", str(program), cwd=tmp_path)
    assert missing.returncode == 2
    assert "shop.cassette.json' does not exist" in missing.stderr
    assert 'provider = "record"' in missing.stderr
    flag = _run("run", str(program), "--cassette", str(tmp_path / "recorded" / "orders.json"), cwd=tmp_path)
    assert flag.returncode == 0, flag.stderr
    config = tmp_path / "conf" / "pb.toml"
    config.parent.mkdir()
    config.write_text('[model]\ncassette = "../recorded/orders.json"\n', encoding="utf-8")
    from_config = _run("run", str(program), "--config", str(config), cwd=tmp_path)
    assert from_config.returncode == 0, from_config.stderr
    assert from_config.stdout == flag.stdout


def test_bad_program_reports_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pb"
    bad.write_text("# Agent\n## Main($x\nText.\n", encoding="utf-8")
    proc = _run("run", str(bad), cwd=tmp_path)
    assert proc.returncode == 1
    assert f"{bad}:2:4: invalid playbook signature" in proc.stderr
    assert proc.stdout == ""


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    missing = _run("run", str(tmp_path / "missing.pb"), cwd=tmp_path)
    assert missing.returncode == 2 and "no such file" in missing.stderr
    assert _run("run", cwd=tmp_path).returncode == 2
    bad_arg = _run("run", str(EXAMPLES / "orders.pb"), "--arg", "oops", cwd=tmp_path)
    assert bad_arg.returncode == 2 and "NAME=VALUE" in bad_arg.stderr


def test_resume_with_nothing_to_resume_says_why_and_stops(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "orders.pb", tmp_path)
    shutil.copy(EXAMPLES / "orders.cassette.json", tmp_path)
    proc = _run("run", "orders.pb", "--resume", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "no crashed or failed run of orders.pb to resume in .checkpoints/.runs (runs found: none)" in proc.stderr
    assert "--resume-or-start" in proc.stderr and proc.stdout == ""
    started = _run("run", "orders.pb", "--resume-or-start", cwd=tmp_path)
    assert started.returncode == 0, started.stderr
    assert "starting a fresh run (--resume-or-start)" in started.stderr
    assert "All your orders together come to 160.40." in started.stdout
    again = _run("run", "orders.pb", "--resume", cwd=tmp_path)  # the latest run completed
    assert again.returncode == 2
    assert "(completed)" in again.stderr and again.stdout == ""
    run_id = next((tmp_path / ".checkpoints" / ".runs").glob("*.json")).stem
    named = _run("run", "orders.pb", "--resume", run_id, cwd=tmp_path)
    assert named.returncode == 2 and f"run {run_id} completed; there is nothing to resume" in named.stderr


def test_resume_of_an_unknown_run_is_a_usage_error(tmp_path: Path) -> None:
    proc = _run("run", str(EXAMPLES / "orders.pb"), "--resume", "no-such-run", cwd=tmp_path)
    assert proc.returncode == 2
    assert "no run 'no-such-run'" in proc.stderr and "playbooks runs" in proc.stderr


def test_resume_with_durability_off_says_how_to_turn_it_on(tmp_path: Path) -> None:
    (tmp_path / "playbooks.toml").write_text("[durability]\nenabled = false\n", encoding="utf-8")
    proc = _run("run", str(EXAMPLES / "orders.pb"), "--resume", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert "set durability.enabled = true" in proc.stderr and proc.stdout == ""
    afresh = _run("run", str(EXAMPLES / "orders.pb"), "--resume-or-start", cwd=tmp_path)
    assert afresh.returncode == 0, afresh.stderr
    assert not (tmp_path / ".checkpoints").exists()


def test_resume_refuses_a_changed_program_unless_forced(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "orders.pb", tmp_path)
    shutil.copy(EXAMPLES / "orders.cassette.json", tmp_path)
    first = _run("run", "orders.pb", cwd=tmp_path)
    assert first.returncode == 0
    run_file = next((tmp_path / ".checkpoints" / ".runs").glob("*.json"))
    record = json.loads(run_file.read_text())
    record["status"] = "failed"  # as if it had stopped before the end
    run_file.write_text(json.dumps(record))
    program = tmp_path / "orders.pb"
    program.write_text(program.read_text() + "\n", encoding="utf-8")
    refused = _run("run", "orders.pb", "--resume", cwd=tmp_path)
    assert refused.returncode == 2
    assert "orders.pb changed since run" in refused.stderr and "--force" in refused.stderr
    forced = _run("run", "orders.pb", "--resume", record["run_id"], "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr
    assert f"resuming run {record['run_id']}" in forced.stderr


def test_bad_config_exits_2(tmp_path: Path) -> None:
    (tmp_path / "playbooks.toml").write_text('[model]\nprovder = "replay"\n', encoding="utf-8")
    proc = _run("run", str(EXAMPLES / "orders.pb"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "playbooks.toml:2:1: unknown key 'provder' in table [model] — did you mean 'provider'?" in proc.stderr
    (tmp_path / "playbooks.toml").write_text('[model]\nprovider = "nonsense"\n', encoding="utf-8")
    proc = _run("run", str(EXAMPLES / "orders.pb"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "unknown model provider 'nonsense'" in proc.stderr


PROGRAM = """\
# Greeter
## Main($name)
### Steps
- Ask the user where they are
- Greet them
"""

RESPONSES = [
    '```python\nplace = await AskUser(f"Where are you, {name}?")\n```',
    '```python\nawait Say("user", f"Hello {name} in {place}!")\nawait Return(place)\n```',
]


class _Scripted(LLMProvider):
    """Hand-written responses, streamed in small chunks."""

    def __init__(self, responses: list[str]) -> None:
        self.responses = list(responses)

    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        text = self.responses.pop(0)
        for start in range(0, len(text), 5):
            await anyio.lowlevel.checkpoint()
            yield text[start : start + 5]


def _greeter(tmp_path: Path, responses: list[str], *, keep: int | None = None) -> Path:
    """The greeter program and its cassette, recorded in-process from ``responses`` (so its requests
    are exactly what the runtime asks); ``keep`` cuts the cassette to its first interactions."""
    path = tmp_path / "greeter.pb"
    path.write_text(PROGRAM, encoding="utf-8")
    cassette = tmp_path / "greeter.cassette.json"
    recorder = RecordingProvider(_Scripted(responses), cassette)
    runtime = ProgramRuntime(
        load_program(path), llm=recorder, io=ProgramIO(input=["Paris"], output=lambda text: None), temperature=0.0
    )
    try:
        anyio.run(functools.partial(runtime.run, name="Ada"))
    except PlaybookRunError:
        pass
    if keep is not None:
        recorded = Cassette.load(cassette)
        Cassette(recorded.interactions[:keep]).save(cassette)
    return path


def test_main_arguments_and_stdin(tmp_path: Path) -> None:
    program = _greeter(tmp_path, RESPONSES)
    proc = _run("run", str(program), "--arg", "name=Ada", cwd=tmp_path, input="Paris\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["Where are you, Ada?", "Hello Ada in Paris!"]
    assert "< Greeter.Main returned 'Paris'" in proc.stderr


def test_end_of_input_and_exhausted_cassette_exit_1(tmp_path: Path) -> None:
    program = _greeter(tmp_path, RESPONSES)
    eof = _run("run", str(program), "--arg", "name=Ada", cwd=tmp_path, input="")
    assert eof.returncode == 1
    assert "AskUser: standard input ended" in eof.stderr
    short = _greeter(tmp_path, RESPONSES, keep=1)
    out = _run("run", str(short), "--arg", "name=Ada", cwd=tmp_path, input="Rome\n")
    assert out.returncode == 1
    assert "ran out" in out.stderr


def test_failing_playbook_exit_1(tmp_path: Path) -> None:
    program = _greeter(tmp_path, ['```python\nplace = undefined_name\n```'] * 3)
    proc = _run("run", str(program), "--arg", "name=Ada", cwd=tmp_path)
    assert proc.returncode == 1
    assert "greeter.pb:2: playbook Greeter.Main failed: the LLM's code failed 3 times in a row" in proc.stderr
    assert "NameError: name 'undefined_name' is not defined" in proc.stderr


def test_init_writes_a_default_config(tmp_path: Path) -> None:
    proc = _run("init", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    written = tmp_path / "playbooks.toml"
    assert "[model]" in written.read_text(encoding="utf-8")
    loaded = load_config(written, env={})
    assert (loaded.model, loaded.durability) == (Config().model, Config().durability)
    again = _run("init", cwd=tmp_path)
    assert again.returncode == 1 and "already exists; use --force" in again.stderr
    written.write_text("# mine\n", encoding="utf-8")
    forced = _run("init", "--force", cwd=tmp_path)
    assert forced.returncode == 0
    assert "[durability]" in written.read_text(encoding="utf-8")
    other = _run("init", "--path", str(tmp_path / "sub.toml"), cwd=tmp_path)
    assert other.returncode == 0 and (tmp_path / "sub.toml").is_file()


def test_examples_parse_without_warnings() -> None:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("orders", "nested", "two_agents"):
            program = load_program(EXAMPLES / f"{name}.pb")
            assert program.agents
            assert (EXAMPLES / f"{name}.cassette.json").is_file()


def test_cassette_that_does_not_match_exit_1(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "orders.pb", tmp_path)
    cassette = json.loads((EXAMPLES / "orders.cassette.json").read_text())
    for message in cassette["interactions"][0]["request"]["messages"]:
        message["content"] = message["content"].replace("orders", "invoices")
    (tmp_path / "orders.cassette.json").write_text(json.dumps(cassette))
    proc = _run("run", "orders.pb", cwd=tmp_path)
    assert proc.returncode == 1
    assert "no interaction of cassette" in proc.stderr and "was recorded for this request" in proc.stderr


def test_openai_endpoint_down_exit_1(tmp_path: Path) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    (tmp_path / "playbooks.toml").write_text(
        f'[model]\nprovider = "openai"\nbase_url = "http://127.0.0.1:{port}/v1"\n', encoding="utf-8"
    )
    env_key = {"OPENAI_API_KEY": "test"}
    proc = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "run", str(EXAMPLES / "orders.pb")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}, **env_key},
    )
    assert proc.returncode == 1, proc.stderr
    assert f"127.0.0.1:{port}" in proc.stderr


def test_checkpoints_show_prune_clear(tmp_path: Path) -> None:
    shutil.copy(EXAMPLES / "orders.pb", tmp_path)
    shutil.copy(EXAMPLES / "orders.cassette.json", tmp_path)
    assert _run("run", "orders.pb", cwd=tmp_path).returncode == 0
    run_id = next((tmp_path / ".checkpoints" / ".runs").glob("*.json")).stem
    shown = _run("checkpoints", "show", run_id, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    data = json.loads(shown.stdout)
    assert set(data) == {"metadata", "execution_state", "namespace"}
    assert data["metadata"]["execution_id"] == run_id and data["execution_state"]["done"]
    one = _run("checkpoints", "show", data["metadata"]["checkpoint_id"], cwd=tmp_path)
    assert json.loads(one.stdout)["metadata"]["counter"] == data["metadata"]["counter"]
    runs = json.loads(_run("runs", "--json", cwd=tmp_path).stdout)
    assert [(r["run_id"], r["status"], r["program"].endswith("orders.pb")) for r in runs] == [(run_id, "completed", True)]
    assert runs[0]["checkpoints"] > 0 and runs[0]["last_statement"]
    listed = json.loads(_run("checkpoints", "list", run_id, "--json", cwd=tmp_path).stdout)
    assert [row["checkpoint_id"] for row in listed] == [f"{run_id}_ckpt_{row['counter']}" for row in listed]
    assert {row["kind"] for row in listed} <= {"snapshot", "intent", "result", "state"} and listed[-1]["done"]
    (stored,) = json.loads(_run("checkpoints", "list", "--json", cwd=tmp_path).stdout)
    assert stored["run_id"] == run_id and stored["checkpoints"] >= len(listed)  # (and the manager's own entries)
    before = _run("checkpoints", "list", run_id, cwd=tmp_path).stdout.count("_ckpt_")
    pruned = _run("checkpoints", "prune", run_id, "--keep", "1", cwd=tmp_path)
    assert pruned.returncode == 0 and "deleted" in pruned.stdout
    after = _run("checkpoints", "list", run_id, cwd=tmp_path).stdout.count("_ckpt_")
    assert 0 < after < before
    assert _run("checkpoints", "show", run_id, cwd=tmp_path).returncode == 0  # still readable
    unasked = _run("checkpoints", "clear", "--all", cwd=tmp_path)  # no terminal to confirm on
    assert unasked.returncode == 2 and "--yes" in unasked.stderr
    cleared = _run("checkpoints", "clear", "--all", "--yes", cwd=tmp_path)
    assert cleared.returncode == 0, cleared.stderr
    assert "no runs" in _run("runs", cwd=tmp_path).stdout
    assert _run("checkpoints", "show", "nope", cwd=tmp_path).returncode == 2


def test_completed_runs_are_deleted_after_their_age_and_failed_ones_kept(tmp_path: Path) -> None:
    """Retention: ``checkpoints prune --older-than AGE`` deletes completed runs that finished longer
    ago (records and checkpoints); failed, crashed and recent ones stay. With
    ``durability.delete_completed_after_days`` a run that completes does the same for the others."""
    shutil.copy(EXAMPLES / "orders.pb", tmp_path)
    shutil.copy(EXAMPLES / "orders.cassette.json", tmp_path)
    runs = tmp_path / ".checkpoints" / ".runs"
    for _ in range(2):
        assert _run("run", "orders.pb", cwd=tmp_path).returncode == 0
    old, recent = sorted(runs.glob("*.json"))
    record = json.loads(old.read_text())
    record["updated"] -= 3 * 86400
    old.write_text(json.dumps(record))
    for status in ("failed", "crashed"):  # old too, but they may resume
        (runs / f"kept-{status}.json").write_text(json.dumps({**record, "run_id": f"kept-{status}", "status": status}))
    assert _run("checkpoints", "prune", "--older-than", "x", cwd=tmp_path).returncode == 2
    assert _run("checkpoints", "prune", recent.stem, "--older-than", "1d", cwd=tmp_path).returncode == 2
    pruned = _run("checkpoints", "prune", "--older-than", "2d", cwd=tmp_path)
    assert pruned.returncode == 0 and f"deleted 1 completed run: {old.stem}" in pruned.stdout, pruned.stdout
    assert sorted(p.stem for p in runs.glob("*.json")) == sorted([recent.stem, "kept-crashed", "kept-failed"])
    def stored(run_id: str) -> list[str]:  # (a run's folder keeps its lock file, as after clear)
        return [p.name for p in (tmp_path / ".checkpoints" / run_id).iterdir() if p.name != ".lock"]

    assert not stored(old.stem) and stored(recent.stem)

    record = json.loads(recent.read_text())
    record["updated"] -= 2 * 86400
    recent.write_text(json.dumps(record))
    (tmp_path / "playbooks.toml").write_text("[durability]\ndelete_completed_after_days = 1\n", encoding="utf-8")
    again = _run("run", "orders.pb", cwd=tmp_path)
    assert again.returncode == 0 and f"deleted the completed run {recent.stem}" in again.stderr, again.stderr
    left = sorted(p.stem for p in runs.glob("*.json"))
    assert len(left) == 3 and "kept-crashed" in left and "kept-failed" in left and recent.stem not in left
