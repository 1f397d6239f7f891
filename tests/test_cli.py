"""The `playbooks exec` main job, run as a real subprocess like the README does."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.integration


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "playbooks.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_exec_streams_the_example_and_runs_every_statement() -> None:
    proc = _run("exec", "examples/order_totals.md", "--tools", "examples/order_tools.py", "--chunk-size", "3")
    assert proc.returncode == 0, proc.stderr
    assert "3 open orders, total after discounts: 413.00" in proc.stdout
    assert "[notify] Largest open order: #104 (300.00)" in proc.stdout
    assert "ran 6 statements" in proc.stdout
    # each statement is announced before its own output, in order
    assert proc.stdout.index("line  11: print(") < proc.stdout.index("3 open orders")


def test_exec_reports_an_error_in_the_llm_code_with_its_line(tmp_path: Path) -> None:
    response = tmp_path / "bad.md"
    response.write_text("```python\nx = 1\ny = x / 0\nz = 3\n```\n", encoding="utf-8")
    proc = _run("exec", str(response))
    assert proc.returncode == 1
    assert "ZeroDivisionError" in proc.stderr
    assert "line 3" in proc.stderr
    assert "y = x / 0" in proc.stderr  # the LLM's own line, through linecache
    assert "ran 1 statements" in proc.stdout


def test_exec_usage_errors_exit_2(tmp_path: Path) -> None:
    assert _run("exec", str(tmp_path / "missing.md")).returncode == 2
    assert _run("nonsense").returncode == 2


@pytest.mark.parametrize(
    "argv, loaded",
    [
        (["--help"], set()),
        (["init", "--help"], {"playbooks.cli.init_command"}),
        (["runs", "--help"], {"playbooks.cli.checkpoints_command"}),
        # (run uses a helper of checkpoints_command)
        (["--conf", "x.toml", "run", "--help"], {"playbooks.cli.run_command", "playbooks.cli.checkpoints_command"}),
    ],
)
def test_the_command_line_loads_only_the_invoked_command(argv: list[str], loaded: set[str]) -> None:
    """``playbooks --help`` starts without the runtime, the LLM client or the storage code; a
    sub-command loads its own module (``--config``'s value, even abbreviated, is not a command)."""
    code = (
        "import runpy, sys\n"
        f"sys.argv = ['playbooks', *{argv!r}]\n"
        "try:\n    runpy.run_module('playbooks.cli', run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print(' '.join(sorted(m for m in sys.modules if m.startswith('playbooks.'))), file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    modules = set(done.stderr.split())
    commands = {m for m in modules if m.endswith("_command")}
    assert commands == loaded, done.stderr
    if not loaded:
        assert not {m for m in modules if m.split(".")[1] in ("program", "llm", "checkpoints", "execution")}


@pytest.mark.integration
def test_exec_runs_the_code_isolated_by_default(tmp_path: Path) -> None:
    response = tmp_path / "hostile.md"
    response.write_text("```python\nx = 1\nimport os\nos._exit(3)\nz = 3\n```\n", encoding="utf-8")
    proc = _run("exec", str(response))
    assert proc.returncode == 1
    assert "WorkerDiedError" not in proc.stderr or "line 4" in proc.stderr
    assert "ended its worker process" in proc.stderr and "Traceback" not in proc.stderr
    assert "ran 2 statements" in proc.stdout
    (tmp_path / "playbooks.toml").write_text("[sandbox]\nstatement_timeout = 0.5\n", encoding="utf-8")
    response.write_text("```python\nwhile True:\n    pass\n```\n", encoding="utf-8")
    proc = _run("--config", str(tmp_path / "playbooks.toml"), "exec", str(response))
    assert proc.returncode == 1 and "ran longer than 0.5 s" in proc.stderr
    proc = _run("exec", "--in-process", "examples/order_totals.md", "--tools", "examples/order_tools.py")
    assert proc.returncode == 0 and "ran 6 statements" in proc.stdout


@pytest.mark.integration
def test_keys_in_the_environment_never_reach_a_stored_byte(tmp_path: Path) -> None:
    """A run with a canary model key and checkpoint key in its environment: no file it leaves (the
    checkpoints, the run registry, the output) holds either."""
    import os
    import shutil

    for name in ("orders.pb", "orders.cassette.json"):
        shutil.copy(ROOT / "examples" / name, tmp_path / name)
    env = dict(os.environ, OPENAI_API_KEY="sk-canary-4d1f", PLAYBOOKS_CHECKPOINT_KEY="ck-canary-9e2a")
    done = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "run", "orders.pb"], cwd=tmp_path, env=env,
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    stored = [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".pb"]
    assert any(".checkpoints" in str(p) for p in stored)
    for path in stored:
        data = path.read_bytes()
        assert b"canary-4d1f" not in data and b"canary-9e2a" not in data, path
    assert "canary" not in done.stdout + done.stderr
