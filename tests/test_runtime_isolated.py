"""``.pb`` runs with the LLM's code isolated in worker processes (``ProgramRuntime(isolation=...)``,
the default of ``playbooks run``): hostile responses are contained and reported to the LLM, the run
goes on, nothing the host holds leaks into the worker or the store, and a worker killed from outside
is replaced without repeating a finished call.

(Every test of test_runtime.py, test_runtime_durable.py and test_runtime_cassettes.py also runs
isolated: see runtime_modes.py. This file holds what only an isolated run can show.)
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import anyio
import pytest

from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider
from playbooks.execution.sandbox import SandboxLimits
from playbooks.llm import Cassette, RecordingProvider, ReplayProvider
from playbooks.program import ProgramIO, ProgramRuntime, load_program, parse_program
from playbooks.program.runtime import CodeFailed

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
FAST = SandboxLimits(statement_timeout=1.0, kill_grace=1.0)
CANARY = "sk-canary-a61c0e"


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def code(text: str) -> str:
    return "```python\n" + textwrap.dedent(text).strip("\n") + "\n```\n"


COUNTER = """\
# Counter
```python
calls = []
kills = []

@playbook
async def Count():
    \"\"\"Count a call.\"\"\"
    calls.append(1)
    return len(calls)

@playbook
async def Kill():
    \"\"\"SIGKILL this host's workers, once (as an operator or the OOM killer would).\"\"\"
    import os, signal
    if not kills:
        kills.append(1)
        for pid in os.listdir("/proc"):
            try:
                with open(f"/proc/{pid}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    worker = b"isolated_worker" in f.read()
            except (OSError, ValueError):
                continue
            if parent == os.getpid() and worker:
                os.kill(int(pid), signal.SIGKILL)
    return "ok"
```

## Main
### Steps
- Do it
"""


def runtime(responses: list[str], *, limits: SandboxLimits = FAST, **options: Any) -> tuple[ProgramRuntime, list[Any]]:
    events: list[Any] = []
    llm = ReplayProvider(Cassette.from_responses(responses), match="none", chunk_size=(1, 7))
    program = parse_program(COUNTER, path="counter.pb")
    run = ProgramRuntime(
        program, llm=llm, io=ProgramIO(output=lambda text: None), on_event=events.append, isolation=limits,
        max_retries=3, **options,
    )
    return run, events


@pytest.mark.parametrize(
    "ending",
    ["import os\nos._exit(3)", "import sys\nsys.exit(0)", "raise KeyboardInterrupt", "import ctypes\nctypes.string_at(0)"],
)
async def test_code_that_ends_its_worker_is_reported_to_the_llm_and_the_run_goes_on(ending: str) -> None:
    run, events = runtime([code(f"n = await Count()\nkept = [n]\n{ending}\nnever = 1"), code("await Return(kept + [await Count()])")])
    result = await run.run()
    assert result.value == [1, 2]  # the variables before the statement are kept; Count ran once each
    failed = [e for e in events if isinstance(e, CodeFailed)]
    assert len(failed) == 1 and failed[0].lineno == 4 + ending.count("\n")  # (line 1 is the fence)
    assert "its worker process" in failed[0].message or "may not end its process" in failed[0].message


async def test_a_runaway_statement_is_stopped_and_the_run_goes_on() -> None:
    run, events = runtime([code("x = 5\nwhile True:\n    pass"), code("await Return(x)")])
    assert (await run.run()).value == 5
    failed = [e for e in events if isinstance(e, CodeFailed)]
    assert "ran longer than 1 s" in failed[0].message


async def test_a_worker_killed_from_outside_resumes_without_repeating_a_finished_call() -> None:
    run, _ = runtime([code("first = await Count()\nawait Kill()\nsecond = await Count()\nawait Return([first, second])")])
    assert (await run.run()).value == [1, 2]
    module = run.agents["Counter"].globals
    assert len(module["calls"]) == 2 and module["kills"] == [1]  # the Count before the kill did not run again


async def test_a_runtime_without_checkpoints_runs_afresh_each_time() -> None:
    """Without a checkpoint manager the workers' frames are kept in memory, a new store per run: a
    second run does not re-attach to the first one's finished frames."""
    run, _ = runtime([code("await Return(await Count())"), code("await Return(await Count())")])
    assert (await run.run()).value == 1
    assert (await run.run()).value == 2


async def test_the_worker_never_sees_the_hosts_environment_or_objects(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The code looks for the model key in its environment and for the host's manager and key
    through gc: it finds neither, and no stored byte of the durable run holds the key."""
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    probe = code(
        """
        import os, gc
        env_key = os.environ.get("OPENAI_API_KEY")
        managers = [type(o).__name__ for o in gc.get_objects() if type(o).__name__ == "CheckpointManager"]
        await Return([env_key, managers == [] or "only its own"])
        """
    )
    manager = CheckpointManager("iso-secrets", FilesystemCheckpointProvider(tmp_path), key=b"k" * 32)
    run, _ = runtime([probe], checkpoint_manager=manager)
    value = (await run.run()).value
    await manager.close()
    assert value[0] is None
    stored = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any("~" in str(p) for p in stored)  # the code's own execution was written
    for path in stored:
        assert CANARY.encode() not in path.read_bytes(), path


async def test_variables_of_any_type_carry_over_between_responses() -> None:
    first = code(
        """
        class Box:
            def __init__(self, v):
                self.v = v
            def __repr__(self):
                return f"Box({self.v})"
        box = Box(await Count())
        """
    )
    run, _ = runtime([first, code("box.v += 10\nawait Return(repr(box))")])
    assert (await run.run()).value == "Box(11)"


def test_playbooks_run_is_isolated_by_default_and_in_process_on_request(tmp_path: Path) -> None:
    """``playbooks run`` runs the LLM's code in a worker (``os.getpid()`` there is not the host's);
    ``--in-process`` runs it in the host; a resume runs it the way the run started."""
    pb = tmp_path / "pid.pb"
    pb.write_text(textwrap.dedent(
        """\
        # Pid
        ## Main
        ### Steps
        - Say where the code runs
        """
    ))
    scripted = ReplayProvider(Cassette.from_responses([code('import os\nawait Say("user", str(os.getpid()))\nawait Return(1)')]), match="none")
    recorder = RecordingProvider(scripted, tmp_path / "pid.cassette.json")
    anyio.run(ProgramRuntime(load_program(pb), llm=recorder, io=ProgramIO(output=lambda text: None)).run)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}

    def run(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", "import os, sys; print(os.getpid(), flush=True); "
             "from playbooks.cli import main; sys.exit(main(sys.argv[1:]))", "run", "pid.pb", *extra],
            cwd=tmp_path, env=env, text=True, capture_output=True, timeout=60,
        )

    isolated = run()
    assert isolated.returncode == 0, isolated.stderr
    host, said = isolated.stdout.split()
    assert host != said
    in_process = run("--in-process")
    assert in_process.returncode == 0, in_process.stderr
    host, said = in_process.stdout.split()
    assert host == said
    runs = subprocess.run(
        [sys.executable, "-m", "playbooks.cli", "checkpoints", "list"], cwd=tmp_path, env=env, text=True,
        capture_output=True, timeout=60,
    )
    assert runs.returncode == 0 and "~" not in runs.stdout  # the code's executions count with their run
    assert len(runs.stdout.splitlines()) == 2


def test_fork_explains_that_it_copies_in_process_runs_only(tmp_path: Path) -> None:
    for name in ("orders.pb", "orders.cassette.json"):
        (tmp_path / name).write_bytes((ROOT / "examples" / name).read_bytes())
    env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
    cli = [sys.executable, "-m", "playbooks.cli"]
    done = subprocess.run([*cli, "run", "orders.pb"], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=60)
    assert done.returncode == 0, done.stderr
    run_id = next(p.stem for p in (tmp_path / ".checkpoints" / ".runs").glob("*.json"))
    fork = subprocess.run([*cli, "fork", run_id], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=60)
    assert fork.returncode == 2
    assert "ran its LLM code isolated" in fork.stderr and "--in-process" in fork.stderr
    assert "Traceback" not in fork.stderr
    clear = subprocess.run(
        [*cli, "checkpoints", "clear", run_id], cwd=tmp_path, env=env, text=True, capture_output=True, timeout=60
    )
    assert clear.returncode == 0, clear.stderr
    left = [p for p in (tmp_path / ".checkpoints").rglob("*") if p.is_file() and p.name != ".lock" and not {".runs", ".locks"} & set(p.parts)]
    assert left == []  # the run's code executions went with it

