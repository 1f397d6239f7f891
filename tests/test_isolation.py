"""Careless and hostile LLM code in an isolated worker: each snippet is contained, reported with a
clear, typed error, and the host (this test process) goes on; the run goes on too.

The table in docs/isolation.md is this file: each row names its test.
"""

from __future__ import annotations

import builtins
import os
import threading
import socket

import anyio
import pytest

from playbooks.agent import Agent
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider
from playbooks.errors import (
    CodeExecutionError,
    CPULimitError,
    ImportBlockedError,
    IsolatedRunError,
    LLMCodeError,
    MemoryLimitError,
    OutputLimitError,
    TimeLimitError,
    WorkerDiedError,
)
from playbooks.execution.isolated_executor import IsolatedPythonExecutor, OpaqueValue
from playbooks.execution.landlock import abi_version
from playbooks.execution.sandbox import SandboxLimits
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

pytestmark = [pytest.mark.anyio, pytest.mark.integration]

CANARY = "sk-canary-7f3a9c1e5b"
FAST = SandboxLimits(statement_timeout=1.0, kill_grace=1.0)
landlock = pytest.mark.skipif(abi_version() < 1, reason="this kernel has no Landlock")


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


async def _work(i: int) -> int:
    return i * 10


class Outcome:
    def __init__(self, executor: IsolatedPythonExecutor, error: LLMCodeError | None, printed: list[str]):
        self.executor = executor
        self.error = error
        self.printed = "".join(printed)
        self.namespace = executor.namespace


async def _run(code: str, *, limits: SandboxLimits = FAST, then: str = "after = 1\n", tools=None, **kwargs) -> Outcome:
    """Run ``code`` then ``then`` in one response (chunk by chunk as an LLM would send them), and the
    namespace afterwards; ``then`` must not run after a failure."""
    printed: list[str] = []
    executor = IsolatedPythonExecutor(
        Agent("hostile", tools={"Work": _work, **(tools or {})}), limits=limits,
        output=lambda stream, text: printed.append(text), **kwargs,
    )
    async with executor:
        error = None
        for chunk in (code, then):
            try:
                await executor.add_chunk(chunk)
            except LLMCodeError as exc:
                error = error or exc
        result = await executor.finalize()
        if error is None:
            error = result.error
        assert (error is None) == result.success
        # The worker holds its namespace after a failure: it can still answer.
        return Outcome(executor, error, printed)


def _assert_contained(outcome: Outcome, kind: type[LLMCodeError], line: int, *words: str) -> None:
    assert isinstance(outcome.error, kind), outcome.error
    assert outcome.error.lineno == line, outcome.error
    for word in words:
        assert word in str(outcome.error), str(outcome.error)
    assert "after" not in outcome.namespace  # nothing ran after the failing statement


# ----------------------------------------------------------------- ending the process


async def test_sys_exit_is_an_error_of_its_statement():
    out = await _run("x = 1\nimport sys\nsys.exit()\n")
    _assert_contained(out, WorkerDiedError, 3, "SystemExit", "may not end its process")
    assert out.namespace["x"] == 1


async def test_raise_system_exit():
    _assert_contained(await _run("raise SystemExit(3)\n"), WorkerDiedError, 1, "SystemExit: 3")


async def test_raise_keyboard_interrupt():
    _assert_contained(await _run("raise KeyboardInterrupt\n"), WorkerDiedError, 1, "KeyboardInterrupt")


async def test_os_exit_ends_only_the_worker_and_the_run_goes_on():
    out = await _run("total = await Work(2)\nimport os\nos._exit(1)\n")
    _assert_contained(out, WorkerDiedError, 3, "exit code 1")
    # A fresh worker resumed the frame up to the statement that killed the old one.
    assert out.namespace["total"] == 20
    assert isinstance(out.namespace["os"], OpaqueValue)


async def test_exit_from_a_thread():
    code = "import os, threading, time\nthreading.Thread(target=lambda: os._exit(4)).start(); time.sleep(5)\n"
    _assert_contained(await _run(code), WorkerDiedError, 2, "exit code 4")


async def test_segfault_through_ctypes():
    out = await _run("y = 2\nimport ctypes\nctypes.string_at(0)\n")
    _assert_contained(out, WorkerDiedError, 3, "SIGSEGV")
    assert out.namespace["y"] == 2


async def test_deep_recursion_with_a_raised_limit():
    code = "import sys\nsys.setrecursionlimit(10**8)\ndef f(n):\n    return f(n + 1)\n\nf(0)\n"
    out = await _run(code)
    assert isinstance(out.error, (WorkerDiedError, CodeExecutionError)), out.error
    assert out.error.lineno in (4, 6)


async def test_kill_the_host_is_refused():
    out = await _run("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n")
    assert isinstance(out.error, CodeExecutionError) and "PermissionError" in str(out.error)


# ----------------------------------------------------------------- the host's objects and builtins


async def test_builtins_changed_in_the_worker_only():
    out = await _run("import builtins\nbuiltins.len = lambda x: 42\nn = len([1])\n", then="")
    assert out.error is None
    assert out.namespace["n"] == 42
    assert builtins.len([1]) == 1  # the host's builtins are untouched


async def test_gc_and_frames_find_no_host_objects(tmp_path):
    code = (
        "import gc, sys\n"
        "kinds = sorted({type(o).__name__ for o in gc.get_objects() if type(o).__name__ in "
        "('FilesystemCheckpointProvider', 'RecordKey', 'SQLiteCheckpointProvider', 'IsolatedPythonExecutor')})\n"
        "depth = 0\nf = sys._getframe()\nwhile f is not None:\n    depth += 1\n    f = f.f_back\n\n"
    )
    manager = CheckpointManager("gc-run", FilesystemCheckpointProvider(tmp_path / "store"))
    out = await _run(code, then="", checkpoint_manager=manager)
    assert out.error is None
    # The worker's own record key (the run key) is there; the host's provider and key are not.
    assert out.namespace["kinds"] == ["RecordKey"]
    assert manager.run_key.secret != manager._key.secret


async def test_forged_record_never_runs_in_the_host(tmp_path):
    """The attack that worked in-process: find the checkpoint manager, write a signed record whose
    pickle runs code in the next process that loads the run. The worker can sign only with its run
    key, and the host refuses to unpickle anything so signed."""
    marker = tmp_path / "pwned"
    code = (
        "import gc, pickle, os\n"
        "from playbooks.checkpoints.manager import CheckpointManager\n"
        "m = [o for o in gc.get_objects() if isinstance(o, CheckpointManager)][0]\n"
        "class Evil:\n"
        f"    def __reduce__(self):\n        return (os.system, ('touch {marker}',))\n\n"
        "from playbooks.checkpoints.model import Record, StoredVar\n"
        "import hashlib, time\n"
        "data = pickle.dumps(Evil())\n"
        "r = Record('snapshot', m.execution_id, m.allocate_counter(), time.time(), 'x', 'hostile', (), 0, '', "
        "variables={'evil': StoredVar(hashlib.sha256(data).hexdigest(), len(data), data, None)})\n"
        "await m.write(r, sync=True)\n"
    )
    manager = CheckpointManager("forged", FilesystemCheckpointProvider(tmp_path / "store"))
    await _run(code, then="", checkpoint_manager=manager)
    await manager.close()
    host = CheckpointManager("forged", FilesystemCheckpointProvider(tmp_path / "store"))
    checkpoint = await host.get_latest_checkpoint()
    assert checkpoint is not None and checkpoint.state.isolated
    with pytest.raises(IsolatedRunError, match="isolated worker"):
        checkpoint["namespace"]
    with pytest.raises(IsolatedRunError):
        await StreamingPythonExecutor.resume_from_checkpoint(
            Agent(checkpoint.state.agent_id), checkpoint, checkpoint_manager=host
        )
    await host.close()
    assert not marker.exists()


# ----------------------------------------------------------------- time, memory, CPU, output


async def test_busy_loop_times_out_and_the_namespace_survives():
    out = await _run("a = 5\nwhile True:\n    pass\n")
    _assert_contained(out, TimeLimitError, 2, "ran longer than 1 s", "statement_timeout")
    assert out.namespace["a"] == 5


async def test_busy_loop_that_catches_the_timeout_is_killed():
    code = "while True:\n    try:\n        while True:\n            pass\n    except BaseException:\n        pass\n"
    out = await _run(code)
    _assert_contained(out, TimeLimitError, 1, "killed")


async def test_long_c_call_is_killed():
    out = await _run("import time\nx = 1\nsum(range(10**12))\n")
    _assert_contained(out, TimeLimitError, 3)
    assert out.namespace["x"] == 1


async def test_long_await_is_cancelled():
    out = await _run("import anyio\nawait anyio.sleep(100)\n")
    _assert_contained(out, TimeLimitError, 2, "ran longer than 1 s")


async def test_time_waiting_for_tools_does_not_count():
    async def slow(x):
        await anyio.sleep(1.5)
        return x

    out = await _run("v = await Slow(7)\n", tools={"Slow": slow})
    assert out.error is None
    assert out.namespace["v"] == 7


async def test_response_timeout():
    limits = SandboxLimits(statement_timeout=5, response_timeout=1.0, kill_grace=1.0)
    out = await _run("import time\nfor i in range(3):\n    time.sleep(0.45)\n\nn = 1\n", limits=limits)
    _assert_contained(out, TimeLimitError, 3, "response_timeout")


async def test_huge_allocation():
    out = await _run("b = 1\nx = bytearray(20 * 10**9)\n", limits=FAST.replace(memory_mb=1024))
    _assert_contained(out, MemoryLimitError, 2, "1024 MB")
    assert out.namespace["b"] == 1


async def test_cpu_limit():
    limits = SandboxLimits(statement_timeout=30, cpu_seconds=1)
    out = await _run("while True:\n    pass\n", limits=limits)
    _assert_contained(out, CPULimitError, 1, "CPU")


async def test_output_limit():
    out = await _run("print('x' * 100)\nprint('y' * 5000)\n", limits=FAST.replace(max_output_bytes=1000))
    _assert_contained(out, OutputLimitError, 2, "1000 bytes")
    assert out.printed == "x" * 100 + "\n"


async def test_import_policy():
    out = await _run("import math\nimport socket\n", limits=FAST.replace(import_deny=("socket",)))
    _assert_contained(out, ImportBlockedError, 2, "'socket'")
    out = await _run("import json\nimport os\n", limits=FAST.replace(import_allow=("json",)))
    _assert_contained(out, ImportBlockedError, 2, "'os'")


# ----------------------------------------------------------------- secrets, files, network


async def test_environment_is_scrubbed(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.setenv("PLAYBOOKS_CHECKPOINT_KEY", CANARY + "-key")
    out = await _run("import os\nenv = dict(os.environ)\n", then="")
    assert CANARY not in repr(out.namespace["env"])
    assert set(out.namespace["env"]) <= {"PATH", "LANG", "HOME", "TMPDIR", "PYTHONHASHSEED", "PYTHONDONTWRITEBYTECODE"}
    monkeypatch.setenv("PASSED_IN", "yes")
    out = await _run("import os\nv = os.environ.get('PASSED_IN')\n", then="", limits=FAST.replace(env=("PASSED_IN",)))
    assert out.namespace["v"] == "yes"


async def test_secrets_never_reach_a_checkpoint(tmp_path, monkeypatch):
    """The key variables hold never reach a stored byte: grep every file of the store for the canary."""
    monkeypatch.setenv("OPENAI_API_KEY", CANARY)
    monkeypatch.setenv("PLAYBOOKS_CHECKPOINT_KEY", CANARY + "-hmac")

    async def fetch(name):
        return f"value of {name}"

    manager = CheckpointManager("secrets", FilesystemCheckpointProvider(tmp_path / "store"))
    code = "import os\nk = os.environ.get('OPENAI_API_KEY')\nv = await Fetch('x')\nprint(k, v)\n"
    out = await _run(code, then="", tools={"Fetch": fetch}, checkpoint_manager=manager)
    assert out.error is None and out.namespace["k"] is None
    await manager.close()
    stored = b"".join(p.read_bytes() for p in (tmp_path / "store").rglob("*") if p.is_file())
    assert stored and CANARY.encode() not in stored


@landlock
async def test_checkpoint_folder_cannot_be_read_deleted_or_overwritten(tmp_path):
    store = tmp_path / "store"
    manager = CheckpointManager("victim", FilesystemCheckpointProvider(store))
    await _run("a = await Work(1)\n", then="", checkpoint_manager=manager)
    before = {p: p.read_bytes() for p in store.rglob("*") if p.is_file()}
    for code in (
        f"import shutil\nshutil.rmtree({str(store)!r})\n",
        f"import os\nnames = os.listdir({str(store)!r})\n",
        f"open({str(store / 'victim' / 'x.pkl')!r}, 'wb').write(b'x')\n",
    ):
        out = await _run(code, then="")
        assert isinstance(out.error, CodeExecutionError) and "PermissionError" in str(out.error), out.error
    assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    await manager.close()


@landlock
async def test_key_file_cannot_be_read(tmp_path, monkeypatch):
    key_file = tmp_path / "config" / "checkpoint.key"
    key_file.parent.mkdir()
    key_file.write_text(CANARY)
    monkeypatch.setenv("PLAYBOOKS_CHECKPOINT_KEY_FILE", str(key_file))
    out = await _run(f"data = open({str(key_file)!r}).read()\n")
    assert isinstance(out.error, CodeExecutionError) and "PermissionError" in str(out.error)


@landlock
async def test_files_outside_the_scratch_folder_cannot_be_written(tmp_path):
    out = await _run(f"open({str(tmp_path / 'x')!r}, 'w').write('x')\n")
    assert isinstance(out.error, CodeExecutionError) and "PermissionError" in str(out.error)
    assert not (tmp_path / "x").exists()
    out = await _run("open('scratch.txt', 'w').write('ok')\nt = open('scratch.txt').read()\n", then="")
    assert out.namespace["t"] == "ok"


@pytest.mark.skipif(abi_version() < 4, reason="this kernel's Landlock cannot confine TCP")
async def test_no_network():
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    try:
        out = await _run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2)\n")
        assert isinstance(out.error, CodeExecutionError) and "PermissionError" in str(out.error), out.error
        out = await _run(
            f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=2)\nok = 1\n", then="",
            limits=FAST.replace(network=True),
        )
        assert out.error is None
    finally:
        server.close()


async def test_subprocesses_inherit_the_confinement(tmp_path):
    target = tmp_path / "from_child"
    out = await _run(f"import os\nstatus = os.system('touch {target}')\n", then="")
    assert out.error is None
    if abi_version() >= 1:
        assert not target.exists() and out.namespace["status"] != 0


# ----------------------------------------------------------------- the channel


async def test_garbage_on_the_channel_kills_only_the_worker():
    code = (
        "import gc\n"
        "s = [o for o in gc.get_objects() if type(o).__name__ == '_Channel'][0].sock\n"
        "s.sendall(b'\\xff' * 64)\nimport time\ntime.sleep(3)\n"
    )
    _assert_contained(await _run(code), WorkerDiedError, 3, "protocol")


async def test_storage_of_another_execution_is_refused(tmp_path):
    code = (
        "import gc\nfrom playbooks.execution.isolated_worker import _Channel\n"
        "c = [o for o in gc.get_objects() if isinstance(o, _Channel)][0]\n"
        "c.send({'op': 'store', 'method': 'write_head', 'eid': 'someone-else'}, (b'x',))\nimport time\ntime.sleep(3)\n"
    )
    manager = CheckpointManager("mine", FilesystemCheckpointProvider(tmp_path / "store"))
    out = await _run(code, checkpoint_manager=manager)
    _assert_contained(out, WorkerDiedError, 4, "protocol")
    assert not (tmp_path / "store" / "someone-else").exists()
    await manager.close()


async def test_arguments_must_be_plain_data():
    out = await _run("class Thing:\n    pass\n\nv = await Work(Thing())\n")
    assert isinstance(out.error, CodeExecutionError) and "cannot cross to the host" in str(out.error)


async def test_tool_exceptions_reach_the_code():
    def fail(x):
        raise ValueError(f"bad {x}")

    out = await _run("try:\n    Fail(1)\nexcept ValueError as e:\n    msg = str(e)\n\n", then="", tools={"Fail": fail})
    assert out.error is None and out.namespace["msg"] == "bad 1"


async def test_restarts_are_bounded():
    limits = FAST.replace(max_restarts=1)
    printed: list[str] = []
    from playbooks.errors import SandboxError

    async with IsolatedPythonExecutor(Agent("r"), limits=limits, output=lambda s, t: printed.append(t)) as ex:
        with pytest.raises(WorkerDiedError):
            await ex.add_chunk("import os\nos._exit(1)\n")
    async with IsolatedPythonExecutor(Agent("r"), limits=limits.replace(max_restarts=0)) as ex:
        with pytest.raises(SandboxError, match="max_restarts"):
            await ex.add_chunk("import os\nos._exit(1)\n")



# ----------------------------------------------------------------- the contract


async def test_evaluate_reads_the_workers_state():
    async with IsolatedPythonExecutor(Agent("e", tools={"Work": _work})) as ex:
        await ex.add_chunk("report = {'total': await Work(3), 'items': (1, 2)}\nobj = object()\n")
        await ex.finalize()
        assert await ex.evaluate("report") == {"total": 30, "items": (1, 2)}
        assert isinstance(ex.namespace["obj"], OpaqueValue)
        with pytest.raises(KeyError):
            await ex.evaluate("report['missing']")
        from playbooks.execution.plain_data import PlainDataError

        with pytest.raises(PlainDataError, match="cannot cross"):
            await ex.evaluate("obj")


async def test_tools_that_change_their_arguments():
    def tag(items, label):
        items.append(label)
        return len(items)

    def note(d, key):
        d[key] = len(d)

    out = await _run("xs = [1]\nd = {}\nn = Tag(xs, 'a')\nNote(d, 'k')\nNote(d=d, key='j')\n", then="",
                     tools={"Tag": tag, "Note": note})
    assert out.error is None
    assert out.namespace["xs"] == [1, "a"] and out.namespace["n"] == 2
    assert out.namespace["d"] == {"k": 0, "j": 1}


async def test_a_worker_killed_from_outside_is_resumed_transparently(tmp_path):
    """SIGKILL from outside (an operator, the OOM killer) is a crash, not the code's doing: the frame
    resumes in a fresh worker, replaying finished calls, and the statement goes on."""
    import signal as signals

    calls: list[int] = []

    async def step(i):
        calls.append(i)
        if calls == [0, 1, 2]:
            os.killpg(executor._worker.process.pid, signals.SIGKILL)
            await anyio.sleep(0.2)
        return i

    seen: list[tuple[int, object]] = []
    manager = CheckpointManager("outside", FilesystemCheckpointProvider(tmp_path / "store"))
    executor = IsolatedPythonExecutor(
        Agent("o", tools={"Step": step}), checkpoint_manager=manager,
        on_call=lambda call, value, error: seen.append((call.attempt, value)),
    )
    async with executor:
        await executor.add_chunk("total = 0\nfor i in range(4):\n    total += await Step(i)\n\ndone = True\n")
        result = await executor.finalize()
    await manager.close()
    assert result.success, result.error
    assert executor.namespace["total"] == 6
    # Calls 0 and 1 had finished: replayed. Call 2 was in flight at the kill: it ran again.
    assert calls == [0, 1, 2, 2, 3]
    # The hook saw each live call, then the two finished ones again as the new worker replayed them
    # (their values as plain data), then the rest.
    assert [v for _, v in seen] == [0, 1, 0, 1, 2, 3]
    (restart,) = executor.restarts
    assert restart.resumed and restart.lineno == 2 and restart.in_flight == (f"outside:{executor.frame_id}:2",)


@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_background_task_calls_on_between_chunks(anyio_backend):
    """A task the code leaves running makes its calls while the host waits for the next chunk, as
    in-process: its tool call does not hold up the chunk that started it (the crash trials found a
    cancel that came too late because it did)."""
    import time

    async def slow(x):
        await anyio.sleep(2.0)
        return x

    async with IsolatedPythonExecutor(Agent("bg", tools={"Slow": slow, "Work": _work})) as ex:
        began = time.monotonic()
        await ex.add_chunk("import asyncio\nt = asyncio.create_task(Slow(1))\nq = await Work(1)\n")
        assert time.monotonic() - began < 1.5
        await ex.add_chunk(
            "t.cancel()\ntry:\n    await t\n    cancelled = False\nexcept asyncio.CancelledError:\n    cancelled = True\n\n"
        )
        await ex.finalize()
        assert ex.namespace["cancelled"] is True


async def test_death_after_small_chunks_keeps_what_ran_before():
    """The stored response can stop short of the statement that ended the worker (nothing was
    snapshotted since): the new worker is fed the rest of the text before it."""
    code = "x = 1\ny = [x, 2]\nimport os\nos._exit(3)\nz = 3\n"
    async with IsolatedPythonExecutor(Agent("chunks")) as ex:
        with pytest.raises(WorkerDiedError):
            for char in code:
                await ex.add_chunk(char)
        result = await ex.finalize()
    assert result.statements_executed == 3 and result.executed_code == "x = 1\ny = [x, 2]\nimport os"
    assert ex.namespace["y"] == [1, 2] and "z" not in ex.namespace


async def test_slow_storage_is_never_cut_off():
    """A storage write slower than the host's watchdog poll used to be cancelled half-way, and the
    worker then waited for its answer for ever (the soak found it on a loaded machine)."""
    from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider

    class SlowStore(MemoryCheckpointProvider):
        completes_without_suspending = False

        async def append_journal(self, execution_id, counter, data):
            await anyio.sleep(0.3)
            await super().append_journal(execution_id, counter, data)

        async def sync_journal(self, execution_id):
            await anyio.sleep(0.4)
            await super().sync_journal(execution_id)

    manager = CheckpointManager("slow", SlowStore(), key=b"k")
    try:
        with anyio.fail_after(60):
            out = await _run("a = await Work(1)\nb = await Work(2)\n", then="", checkpoint_manager=manager)
    finally:
        await manager.close()
    assert out.error is None and out.namespace["b"] == 20


async def test_hooks_see_statements_and_calls_live_and_replayed(tmp_path):
    seen: list[tuple[str, object, object]] = []
    statements: list[int] = []

    def on_call(call, value, error):
        seen.append((call.name, value, None if error is None else str(error)))

    manager = CheckpointManager("hooks", FilesystemCheckpointProvider(tmp_path / "store"))
    executor = IsolatedPythonExecutor(
        Agent("h", tools={"Work": _work}), checkpoint_manager=manager, on_call=on_call,
        on_statement=lambda s: statements.append(s.lineno),
    )
    async with executor:
        await executor.add_chunk("a = await Work(1)\nb = await Work(2)\n")
    await manager.close()
    assert seen == [("Work", 10, None), ("Work", 20, None)] and statements == [1, 2]
    # A new host resumes the run: both calls replay from the journal (a fast run snapshots every few
    # awaits), and the hook sees them, their values as plain data.
    seen.clear()
    manager = CheckpointManager("hooks", FilesystemCheckpointProvider(tmp_path / "store"))
    checkpoint = await manager.get_latest_checkpoint()
    assert checkpoint is not None
    resumed = await IsolatedPythonExecutor.resume_from_checkpoint(
        Agent("h", tools={"Work": _work}), checkpoint, checkpoint_manager=manager, on_call=on_call
    )
    async with resumed:
        assert resumed.restored
        await resumed.add_chunk("c = a + b\n")
        await resumed.finalize()
    await manager.close()
    assert resumed.namespace["c"] == 30
    assert seen == [("Work", 10, None), ("Work", 20, None)]


async def test_a_namespace_that_cannot_reach_the_worker_is_a_host_error():
    from playbooks.errors import SandboxError

    async with IsolatedPythonExecutor(Agent("n"), namespace={"lock": threading.Lock()}) as ex:
        with pytest.raises(SandboxError, match="cannot be sent to its worker"):
            await ex.add_chunk("x = 1\n")


async def test_the_first_namespace_reaches_the_worker():
    async with IsolatedPythonExecutor(Agent("n"), namespace={"orders": [{"id": 1, "total": 9.5}]}) as ex:
        await ex.add_chunk("total = sum(o['total'] for o in orders)\n")
        await ex.finalize()
        assert ex.namespace["total"] == 9.5


def test_the_docs_example_runs_as_written(tmp_path):
    """docs/isolation.md's first example, run as a script in a fresh folder."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "isolation.md").read_text(encoding="utf-8")
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    (tmp_path / "example.py").write_text(code, encoding="utf-8")
    done = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["True charged A1", "CHARGED A1"]


async def test_reattached_frames_report_a_finished_response_and_pass_their_variables_on(tmp_path) -> None:
    """What a host that names its frames (a ``.pb`` run) relies on: in a new host process, an executor
    re-attached to a finished frame runs nothing and reports its response and variables; one that
    ``inherit``s it starts from its variables (of any type: only a worker unpickles them)."""
    calls: list[int] = []

    async def work(i: int) -> int:
        calls.append(i)
        return i * 10

    agent = Agent("a", tools={"Work": work})
    text = "class Box:\n    pass\nbox = Box()\nbox.a = await Work(1)\nb = await Work(2)\n"

    def manager() -> CheckpointManager:
        return CheckpointManager("attach", FilesystemCheckpointProvider(tmp_path), key=b"k" * 32)

    first = manager()
    async with IsolatedPythonExecutor(agent, checkpoint_manager=first, frame_id="t1", limits=FAST) as executor:
        await executor.add_chunk(text)
        await executor.finalize()
    await first.close()
    host = manager()  # a new host process
    await host.load_records()
    async with IsolatedPythonExecutor(agent, checkpoint_manager=host, frame_id="t1", limits=FAST) as again:
        assert again.restored and again.finished
        result = await again.finalize()
        assert result.response == text and result.success and again.namespace["b"] == 20
    async with IsolatedPythonExecutor(agent, checkpoint_manager=host, frame_id="t2", inherit="t1", limits=FAST) as nxt:
        await nxt.add_chunk("c = box.a + b\n")
        await nxt.finalize()
        assert nxt.namespace["c"] == 30
    await host.close()
    assert calls == [1, 2]


async def test_a_tools_exception_reaches_the_code_as_it_was_raised() -> None:
    """The host remembers which call raised what (to give the code's error its cause back) without
    marking the exception: the code's copy has the attributes the tool gave it and no more (a mark
    differed between runs and broke exact resume: 138 of 300 soak trials)."""

    async def boom() -> None:
        raise ValueError("no")

    executor = IsolatedPythonExecutor(Agent("a", tools={"Boom": boom}), limits=FAST)
    async with executor:
        await executor.add_chunk("try:\n    await Boom()\nexcept ValueError as e:\n    err = e\ndone = 1\n")
        assert await executor.evaluate("sorted(vars(err))") == []
        with pytest.raises(CodeExecutionError) as caught:
            await executor.add_chunk("await Boom()\n")
        assert isinstance(caught.value.__cause__, ValueError)
