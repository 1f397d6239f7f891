"""``playbooks run`` killed with SIGKILL after every progress line of each example, then ``--resume``.

For each example the uninterrupted run (``--verbose``, so every statement and tool call prints a line)
is the reference. Then, for every line K of its progress output, a fresh run is killed as soon as line
K appears and ``playbooks run --resume`` finishes it. The two runs' standard output together must be
the reference output (no line lost, none twice), the resumed run must return the same value, and no
tool call (a python playbook) may run more often than in the reference, except a call that recovery
reports as in flight when the process died.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from playbooks.program import load_program
from test_cli_kill_injection import python_calls

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("orders", "nested", "two_agents")


HASH_SEED = str(random.randrange(1, 2**32 - 1))


def _env() -> dict[str, str]:
    """The environment of every run: no PLAYBOOKS_ settings, and one hash seed for the whole test (so
    `playbooks run` need not re-execute itself to pin one: hundreds of runs are started here)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env["PYTHONHASHSEED"] = HASH_SEED
    return env


def _command(*extra: str) -> list[str]:
    return [sys.executable, "-m", "playbooks.cli", "run", *extra]


def _copy(name: str, folder: Path) -> None:
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(EXAMPLES / f"{name}{suffix}", folder)


def _killed_after_line(name: str, folder: Path, k: int) -> tuple[str, str, int]:
    proc = subprocess.Popen(
        _command(f"{name}.pb", "--verbose"), cwd=folder, env=_env(), text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    assert proc.stderr is not None
    seen = []
    for line in proc.stderr:
        seen.append(line)
        if len(seen) == k:
            proc.send_signal(signal.SIGKILL)
            break
    stdout, rest = proc.communicate(timeout=60)
    return stdout, "".join(seen) + rest, proc.returncode


@pytest.mark.parametrize("name", NAMES)
def test_sigkill_after_every_line_then_resume(name: str, tmp_path: Path) -> None:
    program = load_program(EXAMPLES / f"{name}.pb")
    tools = {p.name for agent in program.agents for p in agent.playbooks.values() if p.kind == "python"}
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    _copy(name, reference_dir)
    reference = subprocess.run(
        _command(f"{name}.pb", "--verbose"), cwd=reference_dir, env=_env(), text=True, capture_output=True,
        timeout=60,
    )
    assert reference.returncode == 0, reference.stderr
    lines = reference.stderr.splitlines()
    returned = [line for line in lines if re.search(r"^(\[\w+\] )?< \w+\.Main returned", line)]
    reference_calls = python_calls(reference.stderr, tools)
    done_at = next(i for i, line in enumerate(lines) if line.startswith("done:"))
    for k in range(1, done_at + 1):  # every line before "done:" (after it the run has completed)
        folder = tmp_path / f"kill-{k}"
        folder.mkdir()
        _copy(name, folder)
        killed_out, killed_err, code = _killed_after_line(name, folder, k)
        assert code == -signal.SIGKILL, (k, killed_err)
        resumed = subprocess.run(
            _command(f"{name}.pb", "--resume", "--verbose"), cwd=folder, env=_env(), text=True,
            capture_output=True, timeout=60,
        )
        where = f"{name}, killed after line {k} ({lines[k - 1].strip()!r})"
        if resumed.returncode == 2 and "(completed)" in resumed.stderr and k == done_at:
            # On a busy machine the kill after the last line can land after the run recorded itself
            # completed (it only had "done:" left to print): then there is nothing to resume, and the
            # killed process had shown everything.
            assert killed_out == reference.stdout, where
            continue
        assert resumed.returncode == 0, f"{where}:\n{resumed.stderr}"
        assert killed_out + resumed.stdout == reference.stdout, f"{where}:\n{resumed.stderr}"
        said = ("resuming run", "starting a fresh run", "starts from the beginning")
        assert any(text in resumed.stderr for text in said), where
        for line in returned:
            assert line in resumed.stderr.splitlines(), f"{where}: {line!r} missing"
        in_flight = [line for line in resumed.stderr.splitlines() if "was running when the process stopped" in line]
        calls = python_calls(killed_err, tools) + python_calls(resumed.stderr, tools)
        for call, count in calls.items():
            extra = count - reference_calls[call]
            if extra > 0:
                tool = call.split("(")[0]
                reported = sum(tool in line for line in in_flight)
                assert extra <= reported, f"{where}: {call} ran {count} times, reported in flight {reported}"


def test_runs_and_checkpoints_commands_show_a_crashed_run(tmp_path: Path) -> None:
    _copy("orders", tmp_path)
    _killed_after_line("orders", tmp_path, 12)
    runs = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "runs"], cwd=tmp_path, env=_env(), text=True,
        capture_output=True, timeout=60,
    )
    assert runs.returncode == 0, runs.stderr
    assert "crashed" in runs.stdout and "orders.pb" in runs.stdout
    run_id = runs.stdout.split("crashed")[0].split()[-1]
    listed = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "checkpoints", "list", run_id], cwd=tmp_path, env=_env(),
        text=True, capture_output=True, timeout=60,
    )
    assert listed.returncode == 0, listed.stderr
    assert f"{run_id}_ckpt_" in listed.stdout
