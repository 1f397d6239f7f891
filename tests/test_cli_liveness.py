"""Whether a run is alive is decided by its checkpoint lock, never by a PID.

* A run killed while it was PID 1 of its PID namespace (a container restart, here ``unshare --pid``)
  is crashed, not "running (pid 1)", and resumes.
* A killed process that nobody reaped (a zombie) holds no lock: its run is crashed and resumes.
* Two ``--resume`` at once: exactly one resumes, the other says why it did not, and no line is shown
  twice.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


STORES = {
    "filesystem": {},
    "sqlite": {
        "PLAYBOOKS_DURABILITY_PROVIDER": "sqlite",
        "PLAYBOOKS_DURABILITY_STORAGE_PATH": ".checkpoints/checkpoints.sqlite3",
    },
}
"""Environment that selects each checkpoint provider (the run records stay in .checkpoints/.runs)."""


def _env(store: str = "filesystem", **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    env.update(STORES[store])
    env.update(extra)
    return env


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "playbooks.cli", *args]


def _setup(folder: Path) -> subprocess.CompletedProcess[str]:
    """Copy orders.pb and return its uninterrupted run (in a folder of its own)."""
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(EXAMPLES / f"orders{suffix}", folder)
    reference_dir = folder / "reference"
    reference_dir.mkdir()
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(EXAMPLES / f"orders{suffix}", reference_dir)
    reference = subprocess.run(_cli("run", "orders.pb"), cwd=reference_dir, env=_env(), text=True,
                               capture_output=True, timeout=60)
    assert reference.returncode == 0, reference.stderr
    return reference


def _runs(folder: Path, store: str = "filesystem") -> str:
    listed = subprocess.run(_cli("runs"), cwd=folder, env=_env(store), text=True, capture_output=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


def _kill_when_said(
    command: list[str], folder: Path, line: str, store: str = "filesystem"
) -> tuple[subprocess.Popen[str], str]:
    """Start ``command``; SIGKILL it once standard output shows ``line``. Return it unreaped."""
    proc = subprocess.Popen(command, cwd=folder, env=_env(store), text=True, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    seen = ""
    for got in proc.stdout:
        seen += got
        if got.strip() == line:
            proc.send_signal(signal.SIGKILL)
            break
    return proc, seen


def _resume(folder: Path, store: str = "filesystem") -> subprocess.CompletedProcess[str]:
    return subprocess.run(_cli("run", "orders.pb", "--resume"), cwd=folder, env=_env(store), text=True,
                          capture_output=True, timeout=60)


def _assert_store(folder: Path, store: str) -> None:
    """The run really used ``store``: its checkpoints are in that provider's files."""
    database = folder / ".checkpoints" / "checkpoints.sqlite3"
    assert database.exists() == (store == "sqlite")
    if store == "sqlite":
        # (the run's, and with the LLM's code isolated, one per execution its workers wrote)
        assert len(list((folder / ".checkpoints" / "checkpoints.sqlite3.locks").glob("*.lock"))) >= 1


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--pid", "--fork", "--kill-child", "true"], capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _unshare_works(), reason="unshare --pid needs root (or user namespaces)")
@pytest.mark.parametrize("store", STORES)
def test_a_run_killed_as_pid_1_of_a_container_resumes(tmp_path: Path, store: str) -> None:
    reference = _setup(tmp_path)
    command = ["unshare", "--pid", "--fork", "--kill-child", *_cli("run", "orders.pb")]
    proc, seen = _kill_when_said(command, tmp_path, "Order A101 is processing, total 18.00", store)
    proc.communicate(timeout=60)
    _assert_store(tmp_path, store)
    record = json.loads(next((tmp_path / ".checkpoints" / ".runs").glob("*.json")).read_text())
    assert record["pid"] == 1  # what the old PID check mistook for a live process
    deadline = time.monotonic() + 10  # --kill-child: PID 1 dies just after unshare itself
    while "crashed" not in (listed := _runs(tmp_path, store)):
        assert time.monotonic() < deadline, listed
        time.sleep(0.05)
    resumed = _resume(tmp_path, store)
    assert resumed.returncode == 0, resumed.stderr
    lines = (seen + resumed.stdout).splitlines()
    assert sorted(set(lines)) == sorted(reference.stdout.splitlines()), resumed.stderr


@pytest.mark.parametrize("store", STORES)
def test_an_unreaped_killed_run_is_crashed_and_resumes(tmp_path: Path, store: str) -> None:
    reference = _setup(tmp_path)
    proc, seen = _kill_when_said(_cli("run", "orders.pb"), tmp_path, "Hello! Let me look at your orders.",
                                 store)
    deadline = time.monotonic() + 10
    while not Path(f"/proc/{proc.pid}/stat").read_text().split(") ")[1].startswith("Z"):
        assert time.monotonic() < deadline
        time.sleep(0.01)
    _assert_store(tmp_path, store)
    assert "crashed" in _runs(tmp_path, store)  # a zombie: its PID exists, its lock does not
    resumed = _resume(tmp_path, store)
    proc.communicate(timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert set((seen + resumed.stdout).splitlines()) == set(reference.stdout.splitlines())


def test_two_resumes_at_once_one_resumes_the_other_says_why(tmp_path: Path) -> None:
    reference = _setup(tmp_path)
    killed = subprocess.run(_cli("run", "orders.pb"), cwd=tmp_path, env=_env(PLAYBOOKS_TEST_KILL_AT_RECORD="after:20"),
                            text=True, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    seen = killed.stdout
    both = [
        subprocess.Popen(_cli("run", "orders.pb", "--resume"), cwd=tmp_path, env=_env(), text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    results = [(p.communicate(timeout=60), p.returncode) for p in both]
    codes = sorted(code for _, code in results)
    assert codes == [0, 2], results
    (out_ok, _), _ = next(r for r in results if r[1] == 0)
    (out_no, err_no), _ = next(r for r in results if r[1] == 2)
    assert out_no == ""
    reasons = ("is running", "taken by another process", "(running)", "(completed)")  # (the other was quick)
    assert any(reason in err_no for reason in reasons), err_no
    assert seen + out_ok == reference.stdout


def test_a_run_records_its_hash_seed_and_resumes_under_it(tmp_path: Path) -> None:
    _setup(tmp_path)
    env = {k: v for k, v in _env().items() if k != "PYTHONHASHSEED"}
    killed = subprocess.run(_cli("run", "orders.pb"), cwd=tmp_path, env={**env, "PLAYBOOKS_TEST_KILL_AT_RECORD": "after:20"},
                            text=True, capture_output=True, timeout=60)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    record_file = next((tmp_path / ".checkpoints" / ".runs").glob("*.json"))
    seed = json.loads(record_file.read_text())["hash_seed"]
    assert seed.isdigit()  # pinned: playbooks run re-executed itself with a PYTHONHASHSEED
    other = str((int(seed) + 1) % 2**32)
    resumed = subprocess.run(_cli("run", "orders.pb", "--resume"), cwd=tmp_path,
                             env={**env, "PYTHONHASHSEED": other}, text=True, capture_output=True, timeout=60)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(record_file.read_text())["hash_seed"] == seed  # it re-executed under the recorded one
