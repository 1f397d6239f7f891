"""Bad inputs to the command line get one clear line on standard error and the usage exit code (2),
never a Python traceback (issue 9 item 7)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    return subprocess.run(
        [sys.executable, "-m", "playbooks.cli", *args], cwd=cwd, env={**base, **(env or {})}, text=True,
        capture_output=True, timeout=60,
    )


def _refused(proc: subprocess.CompletedProcess[str], *words: str, code: int = 2) -> None:
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[0].startswith("playbooks "), proc.stderr
    for word in words:
        assert word in proc.stderr, proc.stderr


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for suffix in (".pb", ".cassette.json"):
        shutil.copy(EXAMPLES / f"orders{suffix}", tmp_path)
    return tmp_path


def test_bad_storage_settings(folder: Path) -> None:
    _refused(_cli("run", "orders.pb", cwd=folder, env={"PLAYBOOKS_DURABILITY_PROVIDER": "nope"}), "nope")
    (folder / "playbooks.toml").write_text('[durability]\nprovider = "nope"\n')
    _refused(_cli("run", "orders.pb", cwd=folder), "nope")
    _refused(_cli("checkpoints", "list", cwd=folder), "nope")
    (folder / "playbooks.toml").write_text('[durability]\nstorage_path = "a\\u0000b"\n')
    _refused(_cli("run", "orders.pb", cwd=folder), "NUL")
    (folder / "afile").write_text("")
    (folder / "playbooks.toml").write_text('[durability]\nstorage_path = "afile"\n')
    _refused(_cli("run", "orders.pb", cwd=folder), "afile")
    _refused(_cli("checkpoints", "list", cwd=folder), "afile")


@pytest.mark.parametrize("run_id", ["../x", ".hidden", ""])
def test_bad_run_ids(folder: Path, run_id: str) -> None:
    for action in ("list", "show", "clear", "prune"):
        _refused(_cli("checkpoints", action, run_id, cwd=folder))
    _refused(_cli("run", "orders.pb", "--resume", run_id, cwd=folder) if run_id else
             _cli("run", "orders.pb", "--resume=", cwd=folder))


def test_deeply_nested_json_inputs(folder: Path) -> None:
    deep = "[" * 20000 + "]" * 20000
    _refused(_cli("run", "orders.pb", "--arg", f"x={deep}", cwd=folder), "nested too deeply")
    cassette = json.loads((folder / "orders.cassette.json").read_text())
    text = json.dumps(cassette).replace('"interactions": [', f'"deep": {deep}, "interactions": [', 1)
    (folder / "deep.json").write_text(text)
    _refused(_cli("run", "orders.pb", "--cassette", "deep.json", cwd=folder), "nested too deeply")


def test_exec_on_a_binary_or_missing_file(folder: Path) -> None:
    (folder / "binary.dat").write_bytes(bytes(range(256)) * 4)
    _refused(_cli("exec", "binary.dat", cwd=folder), "not UTF-8")
    _refused(_cli("exec", "missing.txt", cwd=folder), "missing.txt")
    (folder / "tools.py").write_text("x = 1 / 0\n")
    _refused(_cli("exec", "orders.pb", "--tools", "tools.py", cwd=folder), "ZeroDivisionError")
    _refused(_cli("exec", "orders.pb", "--tools", "nothing.py", cwd=folder), "nothing.py")


def test_output_closed_under_a_command(folder: Path) -> None:
    assert _cli("run", "orders.pb", cwd=folder).returncode == 0
    run_id = next((folder / ".checkpoints" / ".runs").glob("*.json")).stem
    base = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    show = subprocess.Popen([sys.executable, "-m", "playbooks.cli", "checkpoints", "show", run_id], cwd=folder,
                            env=base, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert show.stdout is not None and show.stderr is not None
    show.stdout.readline()
    show.stdout.close()  # `| head -1`
    err = show.stderr.read().decode()
    show.wait(60)
    assert "Traceback" not in err and "Exception ignored" not in err, err
    run = subprocess.Popen([sys.executable, "-m", "playbooks.cli", "run", "orders.pb"], cwd=folder, env=base,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert run.stdout is not None and run.stderr is not None
    run.stdout.close()  # `| head -0`: the first Say finds its output closed
    err = run.stderr.read()
    assert run.wait(60) == 1
    assert "Traceback" not in err and "cannot write to standard output" in err, err
    assert "BrokenPipe" not in err and "sent back to the LLM" not in err, err  # not the LLM's error
    resumed = _cli("run", "orders.pb", "--resume", cwd=folder)
    assert resumed.returncode == 0, resumed.stderr
    assert resumed.stdout.startswith("Hello! Let me look at your orders.\n")  # the Say runs again
    assert "All your orders together come to 160.40." in resumed.stdout


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_during_ask_user_ends_at_once(tmp_path: Path) -> None:
    from llm_server import FakeOpenAIServer, stream

    (tmp_path / "ask.pb").write_text("# Asker\n## Main\n### Steps\n1. Ask the user's name\n")
    code = '```python\nname = await AskUser("Your name?")\nawait Return(name)\n```\n'
    with FakeOpenAIServer() as server:
        server.script(stream([code]))
        (tmp_path / "playbooks.toml").write_text(
            f'[model]\nprovider = "openai"\nname = "m"\nbase_url = "{server.base_url}"\n'
        )
        base = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
        base["PYTHONFAULTHANDLER"] = "1"  # a hang is shown with every thread's stack (SIGABRT below)
        # As from a terminal: Ctrl-C is not ignored. (A test run started in the background of a shell
        # without job control ignores SIGINT, and a child inherits that: Python then installs no
        # handler, and the run rightly goes on.)
        proc = subprocess.Popen([sys.executable, "-m", "playbooks.cli", "run", "ask.pb"], cwd=tmp_path, env=base,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                preexec_fn=_default_sigint)
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        assert proc.stdout.readline() == "Your name?\n"
        proc.send_signal(signal.SIGINT)  # Ctrl-C while it waits for the answer; stdin stays open
        try:
            proc.wait(timeout=10)  # no Enter needed (communicate() would close stdin: an end of input)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            proc.wait()
            pytest.fail(f"still waiting 10 s after Ctrl-C:\n{proc.stderr.read()}")
        finally:
            proc.stdin.close()
        assert proc.stderr is not None
        err = proc.stderr.read()
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
