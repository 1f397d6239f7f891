"""``playbooks run`` killed exactly before and exactly after its N-th durable record, then ``--resume``.

The test hook ``PLAYBOOKS_TEST_KILL_AT_RECORD=after:N`` (``before:N``) makes the process SIGKILL itself
just after (before) its N-th record write (a journal append or a checkpoint file). For every example
program, including ``reporter.pb`` whose python playbooks say several lines and call a markdown
playbook, and for N = 1, 2, ... until the run completes without being killed, a fresh run is killed at
record N and ``--resume`` finishes it. Then:

* the resumed run succeeds and returns what the uninterrupted run returned (no variable of a finished
  statement is lost: a lost one fails the next response's code or changes its requests);
* the two runs' standard output together is the uninterrupted run's output: no line lost, none twice,
  except the line of a ``Say`` that the resume reports as in flight at the kill (it may have been shown;
  it runs again with its idempotency key, as docs/durability.md says);
* no python playbook runs more often than in the reference, except a call reported in flight.

CI runs every ``STRIDE``-th record (set ``PLAYBOOKS_KILL_INJECTION_STRIDE=1`` for every record).
"""

from __future__ import annotations

import ast
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from playbooks.program import load_program

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
NAMES = ("orders", "nested", "two_agents", "reporter")
STRIDE = int(os.environ.get("PLAYBOOKS_KILL_INJECTION_STRIDE", "17"))
KILL_ENV = "PLAYBOOKS_TEST_KILL_AT_RECORD"


HASH_SEED = str(random.randrange(1, 2**32 - 1))


def _env(kill: str | None = None) -> dict[str, str]:
    """No PLAYBOOKS_ settings, and one hash seed for the whole test, so `playbooks run` need not
    re-execute itself to pin one (hundreds of runs are started here; test_cli_liveness covers that)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env["PYTHONHASHSEED"] = HASH_SEED
    if kill is not None:
        env[KILL_ENV] = kill
    return env


def _run(folder: Path, name: str, *extra: str, kill: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "run", f"{name}.pb", "--verbose", *extra],
        cwd=folder, env=_env(kill), text=True, capture_output=True, timeout=60,
    )


def _copy(name: str, folder: Path) -> None:
    folder.mkdir(parents=True)
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(EXAMPLES / f"{name}{suffix}", folder)


def _in_flight(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "was running when the process stopped" in line]


def same_output(got: str, want: str, resumed_stderr: str) -> bool:
    """``got`` is ``want``, except that a line whose ``Say`` was reported in flight may appear twice."""
    if got == want:
        return True
    lines = got.splitlines()
    for report in _in_flight(resumed_stderr):
        match = re.search(r"warning: Say\('user', (.*)\) was running when the process stopped", report)
        if match is None:
            continue
        said = ast.literal_eval(match.group(1))
        seen = [i for i, line in enumerate(lines) if line == said]
        if len(seen) >= 2:
            del lines[seen[1]]
    return lines == want.splitlines()


def python_calls(stderr: str, tools: set[str]) -> Counter[str]:
    calls: Counter[str] = Counter()
    for line in stderr.splitlines():
        match = re.search(r"> (\w+)\.(\w+)\((.*)\)$", line)
        if match and match.group(2) in tools:
            calls[f"{match.group(2)}({match.group(3)})"] += 1
    return calls


def kill_trial(
    name: str, folder: Path, kill: str, reference: subprocess.CompletedProcess[str], *extra: str
) -> str | None:
    """Kill a run at ``kill`` and resume it; ``None`` if the run completed unkilled, else a verdict
    (``""`` when the trial matched the reference, otherwise what differed)."""
    program = load_program(EXAMPLES / f"{name}.pb")
    tools = {p.name for agent in program.agents for p in agent.playbooks.values() if p.kind == "python"}
    _copy(name, folder)
    killed = _run(folder, name, *extra, kill=kill)
    if killed.returncode == 0:
        return None
    assert killed.returncode == -9, killed.stderr
    resumed = _run(folder, name, "--resume")  # (a resume runs the LLM's code the way the run started)
    where = f"{name} killed {kill}" + (f" ({' '.join(extra)})" if extra else "")
    if resumed.returncode != 0:
        return f"{where}: the resume failed:\n{resumed.stderr[-2000:]}"
    if not same_output(killed.stdout + resumed.stdout, reference.stdout, resumed.stderr):
        return f"{where}: output\n{killed.stdout}---\n{resumed.stdout}"
    for line in reference.stderr.splitlines():
        if re.search(r"^(\[\w+\] )?< \w+\.Main returned", line) and line not in resumed.stderr.splitlines():
            return f"{where}: {line!r} missing"
    want = python_calls(reference.stderr, tools)
    got = python_calls(killed.stderr, tools) + python_calls(resumed.stderr, tools)
    reported = _in_flight(resumed.stderr)
    for call, count in got.items():
        extra = count - want[call]
        if extra > sum(call.split("(")[0] in line for line in reported):
            return f"{where}: {call} ran {count} times, {want[call]} in the reference"
    return ""


@pytest.mark.parametrize("way", ["isolated", "in-process"])
@pytest.mark.parametrize("name", NAMES)
def test_kill_before_and_after_every_record_then_resume(name: str, way: str, tmp_path: Path) -> None:
    """(``isolated``: the LLM's code in worker processes, the default; ``in-process``: ``--in-process``.
    The workers' records go through the host's provider, so the kills hit them too.)"""
    extra = ("--in-process",) if way == "in-process" else ()
    reference_dir = tmp_path / "reference"
    _copy(name, reference_dir)
    reference = _run(reference_dir, name, *extra)
    assert reference.returncode == 0, reference.stderr
    failures: list[str] = []
    trials = 0
    for mode in ("after", "before"):
        n = 1 if mode == "after" else 1 + STRIDE // 2
        while True:
            verdict = kill_trial(name, tmp_path / f"{mode}-{n}", f"{mode}:{n}", reference, *extra)
            if verdict is None:
                break
            trials += 1
            if verdict:
                failures.append(verdict)
            n += STRIDE
    assert trials > 0
    assert not failures, f"{len(failures)} of {trials} trials differ:\n" + "\n\n".join(failures[:3])


PROGRAMS = Path(__file__).resolve().parent / "programs"


def _copy_printer(folder: Path) -> None:
    folder.mkdir(parents=True)
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(PROGRAMS / f"printer{suffix}", folder)


def _printer_trial(folder: Path, kill: str, reference: str) -> tuple[list[str], str] | None:
    """Kill ``printer.pb`` at ``kill`` and resume it; ``None`` if it completed unkilled, else the lines
    shown twice and the last line the killed run showed, after checking that, once each, the lines are
    the reference's in its order."""
    _copy_printer(folder)
    killed = _run(folder, "printer", kill=kill)
    if killed.returncode == 0:
        return None
    assert killed.returncode == -9, killed.stderr
    resumed = _run(folder, "printer", "--resume")
    assert resumed.returncode == 0, f"printer killed {kill}: the resume failed:\n{resumed.stderr[-2000:]}"
    lines = (killed.stdout + resumed.stdout).splitlines()
    twice = [line for line, count in Counter(lines).items() if count > 1]
    assert list(dict.fromkeys(lines)) == reference.splitlines(), (
        f"printer killed {kill}: output\n{killed.stdout}---\n{resumed.stdout}"
    )
    last = killed.stdout.splitlines()[-1] if killed.stdout else ""
    return twice, last


def test_python_playbook_prints_and_says_are_not_repeated(tmp_path: Path) -> None:
    """A python playbook that prints before its first await, prints and says in a loop, and calls
    another one that prints around a ``Say``, killed exactly after and before its records.

    Killed after a record: no line is shown twice (before this, every ``print`` of a resumed python
    playbook was shown again). Killed before a record: at most the one line that record is about is
    shown again, the last line the killed run showed: a ``Say`` the resume reports in flight, or a
    ``print`` killed between its line and its record (at least once, like every durable call, see
    docs/durability.md); never an earlier line.
    """
    reference_dir = tmp_path / "reference"
    _copy_printer(reference_dir)
    reference = _run(reference_dir, "printer")
    assert reference.returncode == 0, reference.stderr
    assert "first print, before any await" in reference.stdout and "  part 2 say" in reference.stdout
    stride = max(1, STRIDE // 17)  # every record: the program writes few
    trials = {"after": 0, "before": 0}
    for mode in ("after", "before"):
        n = 1
        while True:
            verdict = _printer_trial(tmp_path / f"{mode}-{n}", f"{mode}:{n}", reference.stdout)
            if verdict is None:
                break
            twice, last = verdict
            trials[mode] += 1
            if mode == "after":
                assert twice == [], f"killed after record {n}, shown twice: {twice}"
            else:
                assert twice in ([], [last]), f"killed before record {n} (last line {last!r}), shown twice: {twice}"
            n += stride
    assert trials["after"] >= 6 and trials["before"] >= 6, trials  # at stride 1: every record, both ways
