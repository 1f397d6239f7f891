"""Durable cells in a real Jupyter kernel, killed with SIGKILL: the notebook's variables come back,
completed durable calls are not called again, printed lines are not printed again.

Each trial starts an ipykernel process (jupyter_client), runs a setup cell and a ``%%durable`` cell
whose loop calls a side-effecting function, kills the kernel (at a random instant, or from inside
the n-th call), starts a new kernel, runs the same two cells again and compares with an uninterrupted
run. The side effect is a line in a ledger file written with the call's idempotency key, as a
payment API would dedupe: the one call in flight at a kill may run twice with the same key; no
completed call may run again.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest

from notebook_kernel import CellRun, Kernel, kernel_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kernel_available() is not None, reason=str(kernel_available())),
]

N = 30
TRIALS = int(os.environ.get("PLAYBOOKS_NOTEBOOK_TRIALS", "10"))  # random instants; every fourth is killed twice

SETUP = """\
%load_ext playbooks
import os
import anyio
from playbooks import current_tool_call, durable_call

@durable_call
async def charge(i):
    key = current_tool_call().idempotency_key
    if os.path.exists(f"die-before-{i}"):
        os.remove(f"die-before-{i}"); os.kill(os.getpid(), 9)
    with open("ledger.txt", "a") as f:
        f.write(f"{key} {i}\\n"); f.flush(); os.fsync(f.fileno())
    if os.path.exists(f"die-after-{i}"):
        os.remove(f"die-after-{i}"); os.kill(os.getpid(), 9)
    await anyio.sleep(0.02)
    return i * 10
"""

CELL = f"""\
%%durable --id loop
results = []
total = 0
for i in range({N}):
    r = await charge(i)
    results.append(r)
    total += r
    print("step", i, total)
summary = {{"n": len(results), "total": total}}
"""

EXPECTED = {
    "results": [i * 10 for i in range(N)],
    "total": sum(i * 10 for i in range(N)),
    "i": N - 1,
    "r": (N - 1) * 10,
    "summary": {"n": N, "total": sum(i * 10 for i in range(N))},
}


def _variables(kernel: Kernel) -> dict[str, object]:
    return {name: kernel.value(name) for name in EXPECTED}


def _check(folder: Path, outputs: list[str]) -> None:
    """Side effects once (by key), completed calls never again, no printed line twice."""
    ledger = [line.split() for line in (folder / "ledger.txt").read_text().splitlines()]
    by_key: dict[str, set[str]] = {}
    for key, i in ledger:
        by_key.setdefault(key, set()).add(i)
    assert sorted(int(next(iter(v))) for v in by_key.values()) == list(range(N)), "each call's effect once"
    assert all(len(v) == 1 for v in by_key.values())
    repeats = [key for key, n in Counter(key for key, _ in ledger).items() if n > 1]
    kills = len(outputs) - 1
    assert len(repeats) <= kills, f"only the call in flight at a kill may run again: {repeats}"
    lines = [line for out in outputs for line in out.splitlines() if line.startswith("step")]
    assert [line for line, n in Counter(lines).items() if n > 1] == [], "a printed line was printed again"
    assert {line.split()[1] for line in lines} <= {str(i) for i in range(N)}


def _resume(folder: Path, outputs: list[str]) -> Kernel:
    kernel = Kernel(folder)
    assert kernel.run(SETUP).status == "ok"
    run = kernel.run(CELL)
    assert run.status == "ok", run
    outputs.append(run.stdout)
    return kernel


def _start_and_kill(folder: Path, delay: float, outputs: list[str]) -> CellRun:
    kernel = Kernel(folder)
    assert kernel.run(SETUP).status == "ok"
    run = CellRun()
    finished = kernel.collect(kernel.submit(CELL), run, until=time.monotonic() + delay)
    kernel.kill()
    outputs.append(run.stdout)
    run.status = "ok" if finished else "killed"
    return run


def test_uninterrupted_run_is_the_reference(tmp_path: Path) -> None:
    kernel = Kernel(tmp_path)
    try:
        assert kernel.run(SETUP).status == "ok"
        run = kernel.run(CELL)
        assert run.status == "ok", run
        assert "durable cell 'loop' ran" in run.summary
        assert _variables(kernel) == EXPECTED
        again = kernel.run(CELL)  # finished in this kernel: not run again
        assert "not run again" in again.summary and again.stdout == ""
    finally:
        kernel.close()
    _check(tmp_path, [run.stdout])


@pytest.mark.parametrize("trial", range(TRIALS))
def test_kill_at_a_random_instant_resumes_exactly(tmp_path: Path, trial: int) -> None:
    rng = random.Random(7100 + trial)
    outputs: list[str] = []
    first = _start_and_kill(tmp_path, rng.uniform(0.05, 1.2), outputs)
    if trial % 4 == 3:  # killed again while it resumes
        _start_and_kill(tmp_path, rng.uniform(0.2, 1.0), outputs)
    kernel = _resume(tmp_path, outputs)
    try:
        assert _variables(kernel) == EXPECTED
        summary = kernel.run(CELL).summary  # a third run in the same kernel changes nothing
        assert "not run again" in summary
    finally:
        kernel.close()
    _check(tmp_path, outputs)
    assert first.status in ("killed", "ok")


EVERY_AWAIT = os.environ.get("PLAYBOOKS_NOTEBOOK_EVERY_AWAIT") == "1"
KILL_POINTS = (
    [(where, call) for call in range(N) for where in ("before", "after")]
    if EVERY_AWAIT
    else [("before", 0), ("after", 0), ("before", 17), ("after", 29)]
)


@pytest.mark.parametrize(("where", "call"), KILL_POINTS)
def test_kill_inside_a_durable_call(tmp_path: Path, where: str, call: int) -> None:
    """The kernel dies inside the n-th call, before its side effect or after it: the call had
    started, so it is reported as in flight and runs again with the same key (an idempotent tool
    dedupes the second run; here the ledger shows it)."""
    (tmp_path / f"die-{where}-{call}").touch()
    outputs: list[str] = []
    run = _start_and_kill(tmp_path, 60, outputs)
    assert run.status == "killed" and not (tmp_path / f"die-{where}-{call}").exists()
    kernel = Kernel(tmp_path)
    try:
        assert kernel.run(SETUP).status == "ok"
        resumed = kernel.run(CELL)
        assert resumed.status == "ok", resumed
        outputs.append(resumed.stdout)
        assert "durable cell 'loop' resumed from checkpoint" in resumed.summary
        in_flight = f"may have run before the crash, ran again with the same idempotency key: charge({call})"
        assert in_flight in resumed.summary, resumed.summary
        assert _variables(kernel) == EXPECTED
    finally:
        kernel.close()
    _check(tmp_path, outputs)
    keys = Counter(line.split()[0] for line in (tmp_path / "ledger.txt").read_text().splitlines())
    assert sorted(keys.values()) == [1] * (N - 1) + [2 if where == "after" else 1]
