"""Kill -9 a real durable run at every await, resume it in a new process, compare with a run that never died.

Each scenario of ``durable_worker.py`` runs once uninterrupted (the reference), then, for every live
call K, twice more from scratch: killed with SIGKILL as call K starts (``before``) and after its side
effect but before it returns (``in``), then resumed. The resumed run must end with the reference's
namespace and output (the killed process's output plus the resumed one's, with no line twice), and the
side-effect ledger must show every call once, except the one in flight at the kill, which recovery
reports and which runs again with the same idempotency key. A randomized test kills at random instants
from outside.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

WORKER = str(Path(__file__).with_name("durable_worker.py"))
sys.path.insert(0, str(Path(__file__).parent))
from durable_worker import SCENARIOS  # noqa: E402

pytestmark = pytest.mark.integration


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    namespace: dict[str, str] | None
    in_flight: list[str]
    recovered: bool = False


def _run(tmp: Path, scenario: str, *extra: str) -> Run:
    out = tmp / "out.json"
    out.unlink(missing_ok=True)
    proc = subprocess.run(
        [sys.executable, WORKER, scenario, str(tmp / "store"), str(tmp / "ledger"), str(out), *extra],
        capture_output=True,
        text=True,
        timeout=60,
    )
    data = json.loads(out.read_text()) if out.exists() else {"namespace": None, "in_flight": []}
    return Run(
        proc.returncode, proc.stdout, proc.stderr, data["namespace"], data["in_flight"], data.get("recovered", False)
    )


def _ledger(tmp: Path) -> list[tuple[str, str]]:
    path = tmp / "ledger"
    if not path.exists():
        return []
    return [tuple(line.split("\t")) for line in path.read_text().splitlines()]  # type: ignore[misc]


_REFERENCE: dict[str, tuple[Run, list[str]]] = {}


def _reference(tmp_path_factory: pytest.TempPathFactory, scenario: str) -> tuple[Run, list[str]]:
    if scenario not in _REFERENCE:
        tmp = tmp_path_factory.mktemp(f"ref-{scenario}")
        run = _run(tmp, scenario)
        assert run.returncode == 0, run.stderr
        _REFERENCE[scenario] = (run, [arg for _, arg in _ledger(tmp)])
    return _REFERENCE[scenario]


def _check_resumed(tmp: Path, reference: Run, reference_args: list[str], killed: Run, resumed: Run) -> None:
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.namespace == reference.namespace
    # Output: what the killed process printed, then the resumed one; nothing twice, nothing lost.
    assert killed.stdout + resumed.stdout == reference.stdout, resumed.stderr
    ledger = _ledger(tmp)
    counts = Counter(key for key, _ in ledger)
    repeated = {key for key, n in counts.items() if n > 1}
    assert repeated <= set(resumed.in_flight), f"completed calls ran twice: {repeated - set(resumed.in_flight)}"
    assert all(n <= 2 for n in counts.values())
    first_of_each = list({key: arg for key, arg in ledger}.values())
    assert sorted(first_of_each) == sorted(reference_args)


def _kill_points(reference_args: list[str]) -> list[str]:
    return [f"{phase}:{k}" for k in range(1, len(reference_args) + 1) for phase in ("before", "in")]


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_kill_at_every_await_then_resume(scenario: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    reference, reference_args = _reference(tmp_path_factory, scenario)
    assert reference_args, "the scenario makes live calls"
    for point in _kill_points(reference_args):
        tmp = tmp_path_factory.mktemp(f"{scenario}-{point.replace(':', '-')}")
        killed = _run(tmp, scenario, "--kill", point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed = _run(tmp, scenario, "--resume")
        assert resumed.recovered, resumed.stderr
        try:
            _check_resumed(tmp, reference, reference_args, killed, resumed)
        except AssertionError as exc:
            raise AssertionError(f"{scenario} killed at {point}: {exc}\n{resumed.stderr}") from exc
        if point.startswith("in:"):
            assert resumed.in_flight, f"{scenario} {point}: the call in flight was not reported"


@pytest.mark.parametrize("scenario", ["loop", "cheap", "nested"])
def test_kill_at_every_await_with_a_journal_sync_cadence(
    scenario: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """With the journal fsynced every third durable call (and cheap calls not journaled at all), a
    killed process still resumes exactly: its records were in the page cache when written."""
    reference, reference_args = _reference(tmp_path_factory, scenario)
    for point in _kill_points(reference_args):
        tmp = tmp_path_factory.mktemp(f"cadence-{scenario}-{point.replace(':', '-')}")
        killed = _run(tmp, scenario, "--kill", point, "--sync-every", "3")
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed = _run(tmp, scenario, "--resume", "--sync-every", "3")
        try:
            _check_resumed(tmp, reference, reference_args, killed, resumed)
        except AssertionError as exc:
            raise AssertionError(f"{scenario} killed at {point} (sync every 3): {exc}\n{resumed.stderr}") from exc


def test_resume_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    first = _run(tmp_path, "flat")
    assert first.returncode == 0
    again = _run(tmp_path, "flat", "--resume")  # nothing to recover: a fresh run with new keys
    assert again.returncode == 0 and again.namespace == first.namespace


def test_kill_at_random_instants(tmp_path_factory: pytest.TempPathFactory) -> None:
    rng = random.Random(int(os.environ.get("PLAYBOOKS_CRASH_SEED", "20261123")))
    trials = int(os.environ.get("PLAYBOOKS_CRASH_TRIALS", "12"))
    for trial in range(trials):
        scenario = rng.choice(sorted(SCENARIOS))
        reference, reference_args = _reference(tmp_path_factory, scenario)
        tmp = tmp_path_factory.mktemp(f"random-{trial}")
        out = tmp / "out.json"
        proc = subprocess.Popen(
            [sys.executable, WORKER, scenario, str(tmp / "store"), str(tmp / "ledger"), str(out),
             "--delay", "0.01"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        time.sleep(rng.uniform(0.05, 0.5))
        proc.send_signal(signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
        killed = Run(proc.returncode, stdout, stderr, None, [])
        resumed = _run(tmp, scenario, "--resume")
        if not resumed.recovered:
            # Nothing to resume: the run had finished before the kill landed, or had not written its
            # first checkpoint (then it had shown nothing, and the new run is the whole run).
            assert killed.stdout == reference.stdout or (
                killed.stdout == "" and resumed.stdout == reference.stdout
            ), (killed.stdout, resumed.stdout)
            continue
        try:
            _check_resumed(tmp, reference, reference_args, killed, resumed)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial} ({scenario}): {exc}\n{resumed.stderr}") from exc
