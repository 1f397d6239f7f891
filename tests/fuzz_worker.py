"""The crash-trial fuzzer's subprocess runner and trial controller (issue 8).

Two halves in one file:

* ``run`` (what a subprocess executes): one program, read from a file, through the documented durable
  API (``CheckpointManager`` + ``FilesystemCheckpointProvider``, ``RecoveryCoordinator``,
  ``StreamingPythonExecutor.resume_from_checkpoint``), fed in random-size chunks, under asyncio or
  trio. Every live tool call appends fsynced lines to a ledger (its start: idempotency key, tool,
  arguments; its end: ok / raised / cancelled). At the end it writes JSON: the final namespace
  canonicalized *with sharing*, and whether it resumed. The calls recovery reported in flight are
  appended (fsynced) to a side file as soon as they are known, so a resume that is killed again
  still tells them.
* the controller (imported by ``test_crash_fuzz.py`` and ``benchmarks/soak_crash_fuzz.py``): runs a
  program uninterrupted (the reference), then from scratch in subprocesses killed with SIGKILL from
  outside at random instants and resumed, sometimes killed again during the resume, every process
  with its own random ``PYTHONHASHSEED``; compares and classifies (:data:`OUTCOMES`); shrinks a
  failing program.

Reproduce a trial::

    .venv/bin/python tests/fuzz_worker.py trial --backend asyncio --program-seed 7 --trial-seed 123
    .venv/bin/python tests/fuzz_worker.py trial --backend trio --program prog.py --trial-seed 5 --trials 20
    .venv/bin/python tests/fuzz_worker.py shrink --backend asyncio --program-seed 7 --trial-seed 123
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import types
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fuzz_programs import Program, ToolError, generate, parse_program  # noqa: E402

EXECUTION_ID = "fuzz"
CHILD_AGENT_ID = "fuzz_child"
MAX_CHUNK = 48
PROCESS_TIMEOUT = 45.0
ISOLATED_ENV = "PLAYBOOKS_FUZZ_ISOLATED"
"""Set (to anything) to run the programs in ``IsolatedPythonExecutor``: the controller's processes
inherit it, and a trial then also kills the isolated worker alone (see ``run_trial``)."""
"""Seconds a single worker process may run before the controller kills it as stuck."""

OUTCOMES = (
    "exact",
    "killed-before-start",
    "finished-before-kill",
    "diverged-namespace",
    "diverged-output",
    "diverged-unpicklable",
    "diverged-ledger",
    "repeated-call",
    "resume-error",
    "stuck",
    "reference-error",
)
"""``exact``: same namespace, output and calls as the reference. ``killed-before-start``: the kill
landed before anything was stored, and the fresh restart matched. ``finished-before-kill``: the run
ended before its kill instant (it ran faster than the reference) and matched. ``diverged-*``: the final namespace
(values or sharing), the concatenated output, or the multiset of live calls differ;
``diverged-unpicklable``: the only namespace difference is values the checkpoint could not store,
restored as ``UnrestoredValue`` placeholders (the documented ``skip`` policy). ``repeated-call``:
a call that had completed ran again (or a call ran twice under different keys). ``resume-error``: a
process ended with an error (a ``NonDeterminismError``, a failed statement, an interpreter error).
``stuck``: a process outlived PROCESS_TIMEOUT. ``reference-error``: the uninterrupted run failed (a bug of
the generator, or of the live path)."""

FAILING = frozenset(OUTCOMES) - {"exact", "killed-before-start", "finished-before-kill"}

COMPLETED_MARGIN = 0.5
"""A call whose end line is older than this at the kill had completed (its result was stored): it
must not run again even if recovery reports it in flight. Between a tool's end line and its result
record there is no await, only microseconds of work, but a loaded machine (the soak runs several
trials per core) can deschedule a process for a tenth of a second: 50 ms gave false alarms."""


# ============================================================================ canonical form


def canonicalize(namespace: dict[str, Any], skip: Iterable[str] = ()) -> dict[str, Any]:
    """The namespace as JSON, sharing made visible.

    Variables are walked in sorted order; every mutable object (list, dict, set, bytearray, instance,
    cell, function, class, exception, task) gets an id ``"#"`` at its first visit and is a ``{"ref":
    id}`` afterwards, so ``alias is shared`` and two closures over one cell show.
    """
    import asyncio

    skipped = set(skip)
    ids: dict[int, int] = {}
    alive: list[Any] = []

    def new_id(v: Any) -> int | None:
        key = id(v)
        if key in ids:
            return ids[key]
        ids[key] = len(ids)
        alive.append(v)
        return None

    def is_llm(obj: Any) -> bool:
        return getattr(obj, "__module__", None) == namespace.get("__name__", "__llm__")

    def attrs(d: dict[str, Any], depth: int) -> list[Any]:
        return [[k, canon(d[k], depth + 1)] for k in sorted(d)]

    def canon(v: Any, depth: int = 0) -> Any:
        if depth > 60:
            return {"deep": type(v).__qualname__}
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return {"float": repr(v)}
        if isinstance(v, bytes):
            return {"bytes": v.hex()}
        if isinstance(v, tuple):
            return {"tuple": [canon(x, depth + 1) for x in v]}
        if isinstance(v, frozenset):
            return {"frozenset": sorted((canon(x, depth + 1) for x in v), key=json.dumps)}
        if isinstance(v, types.ModuleType):
            return {"module": v.__name__}
        if isinstance(v, type) and not is_llm(v):
            return {"type": f"{v.__module__}.{v.__qualname__}"}
        if isinstance(v, (types.BuiltinFunctionType, types.BuiltinMethodType)):
            return {"builtin": getattr(v, "__qualname__", repr(v))}
        ref = new_id(v)
        if ref is not None:
            return {"ref": ref}
        n = ids[id(v)]
        if isinstance(v, list):
            return {"#": n, "list": [canon(x, depth + 1) for x in v]}
        if isinstance(v, dict):
            return {"#": n, "dict": [[canon(k, depth + 1), canon(x, depth + 1)] for k, x in v.items()]}
        if isinstance(v, (set,)):
            return {"#": n, "set": sorted((canon(x, depth + 1) for x in v), key=json.dumps)}
        if isinstance(v, bytearray):
            return {"#": n, "bytearray": bytes(v).hex()}
        if isinstance(v, types.CellType):
            try:
                contents = canon(v.cell_contents, depth + 1)
            except ValueError:
                contents = {"empty": True}
            return {"#": n, "cell": contents}
        if isinstance(v, types.FunctionType):
            return {
                "#": n,
                "function": v.__qualname__,
                "module": v.__module__,
                "globals_is_namespace": v.__globals__ is namespace,
                "cells": [canon(c, depth + 1) for c in (v.__closure__ or ())],
                "defaults": canon(v.__defaults__, depth + 1),
                "kwdefaults": canon(v.__kwdefaults__, depth + 1),
                "attrs": attrs(v.__dict__, depth),
            }
        if isinstance(v, types.MethodType):
            return {"#": n, "method": v.__func__.__qualname__, "self": canon(v.__self__, depth + 1)}
        if isinstance(v, type):
            own = {k: x for k, x in vars(v).items() if not (k.startswith("__") and k.endswith("__"))}
            return {
                "#": n,
                "class": v.__qualname__,
                "bases": [canon(b, depth + 1) for b in v.__bases__],
                "attrs": attrs(own, depth),
            }
        if isinstance(v, BaseException):
            return {
                "#": n,
                "exception": canon(type(v), depth + 1),
                "args": canon(v.args, depth + 1),
                "attrs": attrs(getattr(v, "__dict__", {}), depth),
                "cause": canon(v.__cause__, depth + 1),
                "context": canon(v.__context__, depth + 1),
                "suppress_context": v.__suppress_context__,
            }
        if type(v).__name__ == "UnrestoredValue":  # the skip policy's placeholder for an unpicklable value
            try:
                stands_for = object.__getattribute__(v, "_type_name")
            except AttributeError:
                stands_for = "?"
            return {"#": n, "unrestored": str(stands_for)}
        if isinstance(v, asyncio.Future) or all(
            callable(getattr(type(v), m, None)) for m in ("done", "cancelled", "result", "exception")
        ):
            # A task, or what stands for a finished one after a resume: compared by what it answers.
            if not v.done():
                state: Any = "pending"
            elif v.cancelled():
                state = "cancelled"
            elif v.exception() is not None:
                state = {"exception": canon(v.exception(), depth + 1)}
            else:
                state = {"result": canon(v.result(), depth + 1)}
            return {"#": n, "task": state}
        if isinstance(v, (types.CoroutineType, types.GeneratorType, types.AsyncGeneratorType)):
            return {"#": n, "opaque": type(v).__qualname__}
        if type(v).__qualname__ == "ExitedTaskGroup" and isinstance(getattr(v, "type_name", None), str):
            return {"#": n, "opaque": v.type_name}  # an exited task group, as a resume restores it
        d = getattr(v, "__dict__", None)
        if isinstance(d, dict) and is_llm(type(v)):
            return {"#": n, "instance": canon(type(v), depth + 1), "attrs": attrs(d, depth)}
        return {"#": n, "opaque": f"{type(v).__module__}.{type(v).__qualname__}"}

    out: dict[str, Any] = {}
    for name in sorted(namespace):
        if name.startswith("__") or name in skipped:
            continue
        value = namespace[name]
        if isinstance(value, types.ModuleType):
            continue
        out[name] = canon(value)
    return out


# ============================================================================ the worker (subprocess)


class _Ledger:
    """Append-only, fsynced record of live tool side effects."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def write(self, *fields: str) -> None:
        line = "\t".join([*fields, repr(time.time()), str(os.getpid())]) + "\n"
        os.write(self.fd, line.encode())
        os.fsync(self.fd)


def _delay(*args: Any) -> float:
    """A tool's sleep, from its arguments only: 2 to 14 ms."""
    return 0.002 + (sum(len(repr(a)) * 7 for a in args) % 5) * 0.003


def _make_tools(ledger: _Ledger, chunk_seed: int) -> tuple[dict[str, Any], dict[str, Any]]:
    import anyio

    from playbooks import Agent
    from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
    from playbooks.execution.tool_calls import current_tool_call

    def tool(fn: Callable[..., Any]) -> Callable[..., Any]:
        name = fn.__name__

        async def wrapper(*args: Any) -> Any:
            call = current_tool_call()
            key = call.idempotency_key if call is not None else "?"
            ledger.write("start", key, name, repr(args))
            status = "cancelled"
            try:
                value = await fn(*args)
                status = "ok"
                return value
            except anyio.get_cancelled_exc_class():
                raise
            except Exception:
                status = "raised"
                raise
            finally:
                ledger.write("end", key, name, status)

        wrapper.__name__ = name
        wrapper.__qualname__ = name
        return wrapper

    @tool
    async def Work(x: int) -> int:
        await anyio.sleep(_delay(x))
        return (x * 7 + 3) % 1000

    @tool
    async def Greet(name: str) -> str:
        await anyio.sleep(_delay(name))
        return f"hello {name}"

    @tool
    async def Flaky(kind: str, x: int) -> int:
        await anyio.sleep(_delay(kind, x))
        if kind == "value":
            raise ValueError(f"bad value {x}")
        if kind == "custom":
            raise ToolError("E42", x)
        if kind == "chained":
            try:
                {}[x]
            except KeyError as exc:
                raise ToolError("chain", x) from exc
        return x

    @tool
    async def Slow(x: int, seconds: float) -> int:
        await anyio.sleep(seconds)
        return x + 1

    @tool
    async def Tag(items: list[Any], label: str) -> int:
        await anyio.sleep(_delay(label))
        items.append(label)
        return len(items)

    @tool
    async def Annotate(d: dict[str, Any], key: str) -> int:
        await anyio.sleep(_delay(key))
        d[key] = len(d)
        return len(d)

    child_agent = Agent(CHILD_AGENT_ID, tools={"Work": Work, "Greet": Greet})

    @tool
    async def RunChild(code: str) -> Any:
        child = StreamingPythonExecutor(child_agent)  # a child frame of this durable call
        rng = random.Random(f"{chunk_seed}:{code}")
        i = 0
        while i < len(code):
            n = rng.randint(1, MAX_CHUNK)
            await child.add_chunk(code[i : i + n])
            i += n
        result = await child.finalize()
        if not result.success:
            raise RuntimeError(f"child failed: {result.error}")
        return result.namespace["out"]

    tools = {
        "Work": Work,
        "Greet": Greet,
        "Flaky": Flaky,
        "Slow": Slow,
        "Tag": Tag,
        "Annotate": Annotate,
        "RunChild": RunChild,
    }
    return tools, {"Work": Work, "Greet": Greet}


def _error_text(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    tb = "\n".join(str(getattr(exc, "traceback_text", "")).splitlines()[-12:])
    cause = exc.__cause__ or exc.__context__
    if cause is not None and not tb:
        text += f"\n  caused by {type(cause).__name__}: {cause}"
    if tb:
        text += "\n" + tb
    return text


def _hash_seed_api() -> Any:
    """``playbooks.execution.hash_seed`` if this version of playbooks has it (issue 8, item 6)."""
    try:
        from playbooks.execution import hash_seed
    except ImportError:
        return None
    return hash_seed if hasattr(hash_seed, "resume_hash_seed") else None


async def _run_worker(options: argparse.Namespace) -> int:
    from playbooks import Agent
    from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
    from playbooks.errors import LLMCodeError
    from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

    if options.backend == "asyncio":
        import asyncio

        _RUNNING.append(asyncio.get_running_loop())
    isolated = bool(os.environ.get(ISOLATED_ENV))
    executor_class: Any = StreamingPythonExecutor
    if isolated:  # the LLM code runs in an isolated worker process (issue 11)
        from playbooks.execution.isolated_executor import IsolatedPythonExecutor

        executor_class = IsolatedPythonExecutor
    program = Path(options.program).read_text()
    isolation: dict[str, Any] = {}
    if isolated:

        def in_flight(restart: Any) -> None:  # a worker killed alone: the host resumed it at once
            with open(options.inflight, "a") as f:
                f.write("".join(key + "\n" for key in restart.in_flight))
                f.flush()
                os.fsync(f.fileno())

        isolation["on_restart"] = in_flight
    ledger = _Ledger(options.ledger)
    tools, _ = _make_tools(ledger, options.chunk_seed)
    agent = Agent(EXECUTION_ID, tools=tools)
    report: dict[str, Any] = {"recovered": False, "finished_before": False, "error": None, "namespace": None}
    try:
        manager = CheckpointManager(execution_id=agent.id, provider=FilesystemCheckpointProvider(options.store))
        seed_api = None if options.no_hash_seed_api else _hash_seed_api()
        if seed_api is not None and options.resume:
            # The documented resume: under the execution's recorded hash seed (this may re-execute
            # the process with PYTHONHASHSEED set; the ready mark is written after it).
            await seed_api.resume_hash_seed(manager)
        ready = {"time": time.time(), "hash_seed": os.environ.get("PYTHONHASHSEED", "random")}
        Path(options.ready).write_text(json.dumps(ready))
        executor = None
        if options.resume:
            coordinator = RecoveryCoordinator(manager)
            checkpoint = await manager.get_latest_checkpoint()
            if checkpoint is not None:
                if await coordinator.can_recover():
                    recovery = await coordinator.recover_execution_state(agent)
                    print(recovery, file=sys.stderr)
                    with open(options.inflight, "a") as f:
                        for call in recovery.in_flight:
                            f.write(call.idempotency_key + "\n")
                        f.flush()
                        os.fsync(f.fileno())
                else:
                    report["finished_before"] = True
                report["recovered"] = True
                executor = await executor_class.resume_from_checkpoint(
                    agent, checkpoint, checkpoint_manager=manager, **isolation
                )
        if executor is None:
            executor = executor_class(agent, checkpoint_manager=manager, **isolation)
        mode = "fresh" if not report["recovered"] else "finished" if report["finished_before"] else "resumed"
        Path(options.ready + ".mode").write_text(mode)
        rng = random.Random(options.chunk_seed)
        rest = program[len(executor.response) :]
        i = 0
        while i < len(rest) and not executor.finished:
            n = rng.randint(1, MAX_CHUNK)
            try:
                await executor.add_chunk(rest[i : i + n])
            except LLMCodeError:
                pass  # reported by finalize
            i += n
        result = await executor.finalize()
        if not result.success:
            assert result.error is not None
            report["error"] = _error_text(result.error)
        skip = sorted(set(tools) | {"print"})
        if isolated:  # canonicalized where the namespace lives, read back as plain data
            report["namespace"] = await executor.evaluate(
                f"__import__('fuzz_worker').canonicalize(globals(), skip={skip!r})"
            )
            await executor.aclose()
        else:
            report["namespace"] = canonicalize(result.namespace, skip=skip)
    except BaseException as exc:  # noqa: BLE001 - every failure is a result to report
        report["error"] = _error_text(exc) + "\n" + "\n".join(traceback.format_exc().splitlines()[-16:])
    report["ended"] = time.time()
    Path(options.out).write_text(json.dumps(report))
    return 0 if report["error"] is None else 3


_RUNNING: list[Any] = []  # the asyncio loop of this process, for _dump_when_stuck


def _dump_when_stuck(after: float) -> None:
    """Shortly before the controller kills a stuck process, print where it is (threads, and the
    stacks of its asyncio tasks) to stderr, which a ``stuck`` outcome shows."""
    import faulthandler
    import threading

    faulthandler.dump_traceback_later(after, exit=False)

    def tasks() -> None:
        import asyncio

        try:
            for task in asyncio.all_tasks(_RUNNING[0]) if _RUNNING else ():
                task.print_stack(limit=12, file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - a diagnostic only
            print(f"(no asyncio tasks: {exc!r})", file=sys.stderr)

    timer = threading.Timer(after + 0.5, tasks)
    timer.daemon = True
    timer.start()


def worker_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fuzz_worker.py run")
    parser.add_argument("program")
    parser.add_argument("store")
    parser.add_argument("ledger")
    parser.add_argument("out")
    parser.add_argument("--ready", required=True)
    parser.add_argument("--inflight", required=True)
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--chunk-seed", type=int, default=0)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument(
        "--no-hash-seed-api",
        action="store_true",
        help="resume under this process's own hash seed, without playbooks.execution.hash_seed",
    )
    options = parser.parse_args(argv)
    import warnings

    warnings.simplefilter("ignore")
    _dump_when_stuck(PROCESS_TIMEOUT - 5)
    if options.backend == "trio":
        import trio

        return trio.run(_run_worker, options)
    import asyncio

    return asyncio.run(_run_worker(options))


# ============================================================================ the controller


@dataclass
class Proc:
    """One worker process as the controller saw it."""

    returncode: int | None
    stdout: str
    stderr: str
    report: dict[str, Any] | None
    killed_at: float | None  # time.time() of our SIGKILL, if we sent it
    ran_for: float  # seconds from its ready mark to its end
    hash_seed: str
    resume: bool
    pid: int
    mode: str  # "fresh", "resumed" or "finished" (resumed a run that had finished), "" if unknown
    stuck: bool = False
    worker_killed_at: float | None = None  # time.time() of our SIGKILL of its isolated worker only

    @property
    def error(self) -> str | None:
        if self.stuck:
            return f"stuck: killed after {PROCESS_TIMEOUT}s\n{self.stderr[-3000:]}"
        if self.killed_at is not None:
            return None
        if self.report is None:
            return f"exit {self.returncode} without a report\n{self.stderr[-3000:]}"
        error = self.report.get("error")
        return str(error) if error else None


@dataclass
class Reference:
    program: Program
    stdout: str
    namespace: dict[str, Any]
    calls: Counter[tuple[str, str]]
    duration: float
    error: str | None = None


@dataclass
class TrialResult:
    backend: str
    program_seed: int | None
    trial_seed: int
    outcome: str
    detail: str
    features: list[str]
    kills: list[float] = field(default_factory=list)
    hash_seeds: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    error_kind: str = ""
    recipe: str = ""
    reference_duration: float = 0.0
    targets: list[str] = field(default_factory=list)
    """What each kill hit, with an isolated executor: the ``host``, its ``worker`` alone, or ``both``."""
    flags: list[str] = field(default_factory=list)
    """The trial options that changed from the defaults (``--pin-hash-seed``, ``--no-hash-seed-api``)."""

    @property
    def signature(self) -> str:
        return f"{self.outcome}:{self.error_kind}" if self.error_kind else self.outcome

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def _read_ledger(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    return [line.split("\t") for line in path.read_text().splitlines() if line]


def _spawn(
    tmp: Path,
    program_path: Path,
    backend: str,
    *,
    resume: bool,
    chunk_seed: int,
    hash_seed: str,
    kill_after: float | None,
    index: int,
    hash_seed_api: bool = True,
    target: str = "host",
) -> Proc:
    """Run one worker; SIGKILL it ``kill_after`` seconds after its ready mark (if still running).

    With an isolated executor, ``target`` says what is killed: ``"host"`` (this process; its
    isolated worker dies with it), ``"worker"`` (the isolated worker alone: the host resumes the frame
    in a new one and runs on) or ``"both"`` (the worker, then the host a moment later)."""
    ready = tmp / f"ready.{index}"
    mode_path = tmp / f"ready.{index}.mode"
    out = tmp / f"out.{index}.json"
    stdout_path, stderr_path = tmp / f"stdout.{index}", tmp / f"stderr.{index}"
    env = dict(os.environ, PYTHONHASHSEED=hash_seed, PYTHONUNBUFFERED="1")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "run",
        str(program_path),
        str(tmp / "store"),
        str(tmp / "ledger"),
        str(out),
        "--ready",
        str(ready),
        "--inflight",
        str(tmp / "inflight"),
        "--backend",
        backend,
        "--chunk-seed",
        str(chunk_seed),
    ] + (["--resume"] if resume else []) + ([] if hash_seed_api else ["--no-hash-seed-api"])
    with open(stdout_path, "wb") as so, open(stderr_path, "wb") as se:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=so, stderr=se, env=env, cwd=str(tmp))
        killed_at: float | None = None
        worker_killed_at: float | None = None
        stuck = False
        ready_at: float | None = None
        deadline = started + PROCESS_TIMEOUT
        try:
            while ready_at is None and proc.poll() is None and time.monotonic() < deadline:
                if ready.exists():
                    ready_at = time.monotonic()
                    break
                time.sleep(0.001)
            if ready_at is None:
                ready_at = time.monotonic()
            if kill_after is not None and proc.poll() is None:
                try:
                    proc.wait(timeout=max(0.0, ready_at + kill_after - time.monotonic()))
                except subprocess.TimeoutExpired:
                    if target in ("worker", "both"):
                        for child in _children(proc.pid):
                            worker_killed_at = time.time()
                            with contextlib.suppress(ProcessLookupError):
                                os.kill(child, signal.SIGKILL)
                        if target == "both":
                            time.sleep(random.Random(kill_after).uniform(0.0, 0.02))
                    if target != "worker":
                        killed_at = time.time()
                        proc.send_signal(signal.SIGKILL)
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                stuck = True
                proc.send_signal(signal.SIGKILL)
                proc.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ended = time.monotonic()
    if ready.exists():
        try:
            hash_seed = json.loads(ready.read_text())["hash_seed"]
        except ValueError:
            pass  # killed while writing it
    report = None
    if out.exists() and killed_at is None:
        try:
            report = json.loads(out.read_text())
        except ValueError:
            report = None
    return Proc(
        proc.returncode,
        stdout_path.read_text(errors="replace"),
        stderr_path.read_text(errors="replace"),
        report,
        killed_at,
        ended - ready_at,
        hash_seed,
        resume,
        proc.pid,
        mode_path.read_text() if mode_path.exists() else "",
        stuck,
        worker_killed_at,
    )


def _children(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (an isolated executor's worker)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _write_program(tmp: Path, program: Program) -> Path:
    path = tmp / "program.py"
    path.write_text(program.text)
    return path


def run_reference(program: Program, *, seed: int = 0, workdir: Path | None = None) -> Reference:
    """Run ``program`` once, never killed, with a random hash seed."""
    rng = random.Random(f"reference:{seed}")
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-ref-", dir=workdir))
    try:
        path = _write_program(tmp, program)
        proc = _spawn(
            tmp,
            path,
            program.backend,
            resume=False,
            chunk_seed=rng.randrange(2**31),
            hash_seed=str(rng.randint(1, 2**32 - 1)),
            kill_after=None,
            index=0,
        )
        ledger = _read_ledger(tmp / "ledger")
        calls = Counter((f[2], f[3]) for f in ledger if f[0] == "start")
        ns = (proc.report or {}).get("namespace") or {}
        duration = proc.ran_for
        if proc.report is not None and (tmp / "ready.0").exists():
            # The worker's own clock: Popen.wait() polls, and would round the duration up.
            duration = float(proc.report["ended"]) - json.loads((tmp / "ready.0").read_text())["time"]
        return Reference(program, proc.stdout, ns, calls, duration, proc.error)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _error_kind(text: str) -> str:
    """The exception class name a failure is about: the innermost one named in the error text."""
    names = re.findall(r"\b([A-Z][A-Za-z]*(?:Error|Exception|Warning|Interrupt))\b", text)
    preferred = [n for n in names if n not in ("CodeExecutionError", "LLMCodeError")]
    if "stuck" in text[:6]:
        return "stuck"
    return (preferred or names or ["?"])[0]


def relabel(namespace: dict[str, Any]) -> dict[str, Any]:
    """The canonical namespace with ids replaced by where each object was first seen, so one
    variable's value reads (and compares) the same whatever the numbering of the others."""
    where: dict[int, str] = {}

    def label(node: Any, path: str) -> None:
        if isinstance(node, dict):
            if "#" in node:
                where[node["#"]] = path
            for k, v in node.items():
                label(v, f"{path}.{k}")
        elif isinstance(node, list):
            for i, v in enumerate(node):
                label(v, f"{path}[{i}]")

    def rewrite(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"ref"}:
                return {"same object as": where.get(node["ref"], "?")}
            return {k: rewrite(v) for k, v in node.items() if k != "#"}
        if isinstance(node, list):
            return [rewrite(v) for v in node]
        return node

    for name, value in namespace.items():
        label(value, name)
    return {name: rewrite(value) for name, value in namespace.items()}


def _diff_namespace(ref: dict[str, Any], got: dict[str, Any] | None) -> list[str]:
    if got is None:
        return ["  no namespace"]
    a_all, b_all = relabel(ref), relabel(got)
    lines = []
    for name in sorted(set(ref) | set(got)):
        a, b = a_all.get(name, "<missing>"), b_all.get(name, "<missing>")
        if a != b:
            lines.append(f"  {name}: expected {json.dumps(a)[:500]}\n  {' ' * len(name)}  got      {json.dumps(b)[:500]}")
    return lines or ["  (every variable reads the same, but the sharing between them differs)"]


def _diff_output(ref: str, got: str) -> list[str]:
    import difflib

    return [
        "  " + line
        for line in difflib.unified_diff(ref.splitlines(), got.splitlines(), "reference", "killed+resumed", lineterm="")
    ][:40]


def compare(reference: Reference, procs: list[Proc], ledger: list[list[str]], in_flight: set[str]) -> tuple[str, list[str], str]:
    """(outcome, problems, error text) of a trial's processes against the reference."""
    problems: list[tuple[str, str]] = []
    error_text = ""
    for i, p in enumerate(procs):
        if p.error is not None:
            kind = "stuck" if p.stuck else "resume-error"
            error_text = p.error
            problems.append((kind, f"process {i} ({'resume' if p.resume else 'fresh'}): {p.error}"))
            break
    final = procs[-1]
    # The ledger: each completed call once; a repeat only for a call reported in flight at a kill.
    starts: dict[str, list[list[str]]] = {}
    ends: dict[str, list[list[str]]] = {}
    for f in ledger:
        (starts if f[0] == "start" else ends).setdefault(f[1], []).append(f)
    killed_at = {str(p.pid): p.killed_at or p.worker_killed_at for p in procs if (p.killed_at or p.worker_killed_at)}
    for key, lines in starts.items():
        if len({(f[2], f[3]) for f in lines}) > 1:
            problems.append(("diverged-ledger", f"key {key} ran with different calls: {[(f[2], f[3]) for f in lines]}"))
        if len(lines) < 2:
            continue
        call = f"{lines[0][2]}{lines[0][3]} (key {key})"
        # An end line older than the kill of its own process by COMPLETED_MARGIN: that call had completed.
        completed = [
            e for e in ends.get(key, [])
            if e[-1] in killed_at and float(e[-2]) < killed_at[e[-1]] - COMPLETED_MARGIN  # type: ignore[operator]
            and any(float(f[-2]) > float(e[-2]) for f in lines)
        ]
        if completed:
            e = completed[0]
            problems.append(("repeated-call", f"{call} ran again though it had ended ({e[3]}) "
                             f"{killed_at[e[-1]] - float(e[-2]):.3f} s before its process was killed"
                             + ("; recovery reported it in flight" if key in in_flight else "")))
        elif key not in in_flight:
            problems.append(("repeated-call", f"{call} ran {len(lines)} times; recovery did not report it in flight"))
    got = Counter((lines[0][2], lines[0][3]) for lines in starts.values())
    extra, missing = got - reference.calls, reference.calls - got
    if problems and problems[0][0] in ("resume-error", "stuck"):
        extra, missing = Counter(), Counter()  # the run did not get to the end
    again = Counter({c: n for c, n in extra.items() if c in reference.calls})
    new_calls = extra - again
    if again:
        problems.append(("repeated-call", f"calls that ran more often than in the reference (under new keys): {sorted(again.elements())[:10]}"))
    if new_calls:
        problems.append(("diverged-ledger", f"calls the reference never made: {sorted(new_calls.elements())[:10]}"))
    if missing:
        problems.append(("diverged-ledger", f"reference calls that never ran live: {sorted(missing.elements())[:10]}"))
    if not any(k in ("resume-error", "stuck") for k, _ in problems):
        ns = (final.report or {}).get("namespace")
        if ns != reference.namespace:
            kind = "diverged-namespace"
            if ns is not None:
                a_all, b_all = relabel(reference.namespace), relabel(ns)
                pairs = [(a_all.get(k), b_all.get(k)) for k in set(a_all) | set(b_all) if a_all.get(k) != b_all.get(k)]
                if pairs and all(
                    isinstance(a, dict) and "opaque" in a and isinstance(b, dict) and "unrestored" in b for a, b in pairs
                ):
                    kind = "diverged-unpicklable"
            problems.append((kind, "namespace differs:\n" + "\n".join(_diff_namespace(reference.namespace, ns))))
        output = "".join(p.stdout for p in procs)
        if output != reference.stdout:
            problems.append(("diverged-output", "output differs:\n" + "\n".join(_diff_output(reference.stdout, output))))
    order = [
        "resume-error", "stuck", "repeated-call", "diverged-ledger", "diverged-namespace", "diverged-output",
        "diverged-unpicklable",
    ]
    if problems:
        outcome = min((k for k, _ in problems), key=order.index)
        return outcome, [f"{k}: {t}" for k, t in problems], error_text
    return "exact", [], ""


def run_trial(
    reference: Reference,
    trial_seed: int,
    *,
    double_kill: float = 0.3,
    pin_hash_seed: bool = False,
    hash_seed_api: bool = True,
    workdir: Path | None = None,
    keep: bool = False,
    kill_fractions: list[float] | None = None,
) -> TrialResult:
    """Run the reference's program killed at a random instant (maybe twice), resumed to the end.

    The kill instants are uniform over the reference's duration (from each process's ready mark);
    ``kill_fractions`` gives them instead, as fractions of that duration (one per kill).
    """
    program = reference.program
    features = sorted(program.features)
    if reference.error is not None:
        return TrialResult(program.backend, program.seed, trial_seed, "reference-error", reference.error,
                           features, error_kind=_error_kind(reference.error), recipe=program.recipe)
    rng = random.Random(f"trial:{trial_seed}")
    tmp = Path(tempfile.mkdtemp(prefix="fuzz-trial-", dir=workdir))
    try:
        path = _write_program(tmp, program)
        pinned = str(rng.randint(1, 2**32 - 1))
        kills = [rng.uniform(0.0, reference.duration)]
        if rng.random() < double_kill:
            kills.append(rng.uniform(0.0, max(0.05, reference.duration - kills[0]) + 0.05))
        if kill_fractions is not None:
            kills = [max(0.0, f) * reference.duration for f in kill_fractions]
        targets = [rng.choice(("host", "worker", "both")) if os.environ.get(ISOLATED_ENV) else "host" for _ in kills]
        procs: list[Proc] = []
        for index in range(len(kills) + 1):
            kill_after = kills[index] if index < len(kills) else None
            proc = _spawn(
                tmp,
                path,
                program.backend,
                resume=index > 0,
                chunk_seed=rng.randrange(2**31),
                hash_seed=pinned if pin_hash_seed else str(rng.randint(1, 2**32 - 1)),
                kill_after=kill_after,
                index=index,
                hash_seed_api=hash_seed_api,
                target=targets[index] if index < len(targets) else "host",
            )
            procs.append(proc)
            if proc.killed_at is None:
                break  # it ended on its own (finished, failed or stuck)
        ledger = _read_ledger(tmp / "ledger")
        in_flight = set((tmp / "inflight").read_text().split()) if (tmp / "inflight").exists() else set()
        outcome, problems, error_text = compare(reference, procs, ledger, in_flight)
        first = procs[0]
        if (
            outcome == "exact"
            and first.killed_at is not None
            and procs[1].mode == "fresh"
            and first.stdout == ""
            and not any(f[-1] == str(first.pid) for f in ledger)
        ):
            outcome = "killed-before-start"
        if outcome == "exact" and first.killed_at is None and first.worker_killed_at is None:
            outcome = "finished-before-kill"
        kinds = {p.split(":", 1)[0] for p in problems}
        detail = "\n".join(problems)
        if keep:
            detail += f"\n(kept in {tmp})"
        return TrialResult(
            program.backend,
            program.seed,
            trial_seed,
            outcome,
            detail,
            features,
            kills=[round(k, 4) for k, p in zip(kills, procs) if p.killed_at is not None or p.worker_killed_at is not None],
            targets=[t for t, p in zip(targets, procs) if p.killed_at is not None or p.worker_killed_at is not None],
            hash_seeds=[p.hash_seed for p in procs],
            problems=sorted(kinds),
            error_kind=_error_kind(error_text) if outcome in ("resume-error", "stuck") else "",
            recipe=program.recipe,
            reference_duration=reference.duration,
            flags=(["--pin-hash-seed"] if pin_hash_seed else []) + ([] if hash_seed_api else ["--no-hash-seed-api"]),
        )
    finally:
        if not keep:
            shutil.rmtree(tmp, ignore_errors=True)


# ============================================================================ reports, shrinking, CLI


def repro_command(result: TrialResult, program_file: str | None = None) -> str:
    """The one command that runs this trial again (``program_file``: a saved program instead)."""
    source = f"--program {program_file or 'PROGRAM.py'}" if program_file or not result.recipe else result.recipe
    flags = "".join(f" {f}" for f in result.flags)
    return (
        f"{sys.executable} {Path(__file__).resolve()} trial --backend {result.backend} {source} "
        f"--trial-seed {result.trial_seed}{flags}"
    )


def describe(result: TrialResult, program: Program, reference: Reference | None = None) -> str:
    """A failing trial as text: the seeds, the command that repeats it, the program and the diff."""
    lines = [
        f"outcome {result.signature} ({result.backend}, program seed {result.program_seed}, "
        f"trial seed {result.trial_seed}, kills after {result.kills} s, hash seeds {result.hash_seeds})",
        f"repeat: {repro_command(result, None if program.origin == 'generated' else 'PROGRAM.py')}"
        + ("" if program.origin == "generated" else "   (PROGRAM.py: the program below)"),
        "--- program ---",
        program.text.rstrip("\n"),
        "--- what differed ---",
        result.detail,
    ]
    if reference is not None:
        lines.insert(1, f"reference ran {reference.duration:.3f} s")
    return "\n".join(lines)


def shrink(
    program: Program,
    signature: str,
    trial_seeds: list[int],
    *,
    budget: float = 300.0,
    pin_hash_seed: bool = False,
    hash_seed_api: bool = True,
    kill_fractions: list[float] | None = None,
    log: Callable[[str], None] | None = None,
) -> tuple[Program, TrialResult | None]:
    """Remove items from ``program`` while a trial still fails with ``signature``.

    Kills land at random instants, so a candidate counts as failing if any of ``trial_seeds`` (tried
    in order) reproduces the signature; with ``kill_fractions`` (the failing trial's kill instants as
    fractions of its reference's duration) every other attempt kills near those instants. Items are
    removed one at a time, last first, in passes until a pass removes nothing or ``budget`` seconds
    have gone.
    """
    deadline = time.monotonic() + budget
    last: TrialResult | None = None
    jitter = random.Random(f"shrink:{trial_seeds}")

    def fails(candidate: Program) -> TrialResult | None:
        reference = run_reference(candidate)
        if reference.error is not None or not reference.calls:
            return None
        for i, seed in enumerate(trial_seeds):
            fractions = None
            if kill_fractions and i % 2 == 0:
                # Every other attempt kills near where the original failing trial did.
                fractions = [min(1.0, max(0.0, f + jitter.uniform(-0.05, 0.05))) for f in kill_fractions]
            result = run_trial(
                reference, seed, pin_hash_seed=pin_hash_seed, hash_seed_api=hash_seed_api, kill_fractions=fractions
            )
            if result.signature == signature:
                return result
            if time.monotonic() > deadline:
                break
        return None

    current = program
    changed = True
    while changed and time.monotonic() < deadline:
        changed = False
        for index in range(len(current.items) - 1, -1, -1):
            if time.monotonic() > deadline or index >= len(current.items):
                break
            candidate = current.without(index)
            result = fails(candidate)
            if result is not None:
                current, last, changed = candidate, result, True
                if log:
                    log(f"shrink: {len(current.items)} items left")
    current.origin = "shrunk"
    return current, last


def _load_program(options: argparse.Namespace) -> Program:
    if options.program:
        program = parse_program(Path(options.program).read_text(), options.backend)
        program.origin = "file"
        return program
    features = tuple(options.features.split(",")) if options.features else None
    return generate(
        options.program_seed,
        options.backend,
        features=features,
        min_features=options.min_features,
        max_features=options.max_features,
    )


def cli_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fuzz_worker.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=("trial", "shrink", "show"))
    parser.add_argument("--backend", choices=("asyncio", "trio"), default="asyncio")
    parser.add_argument("--program-seed", type=int, default=0)
    parser.add_argument("--program", help="a program file (as printed by a failing trial)")
    parser.add_argument("--features", help="generate from these features only (comma-separated)")
    parser.add_argument("--min-features", type=int, default=2)
    parser.add_argument("--max-features", type=int, default=5)
    parser.add_argument("--trial-seed", type=int, default=0)
    parser.add_argument("--trials", type=int, default=1, help="trial seeds TRIAL_SEED.. TRIAL_SEED+N-1")
    parser.add_argument("--pin-hash-seed", action="store_true", help="one PYTHONHASHSEED for all processes")
    parser.add_argument("--keep", action="store_true", help="keep the trial folders")
    parser.add_argument("--no-hash-seed-api", action="store_true",
                        help="resume without playbooks.execution.hash_seed.resume_hash_seed")
    parser.add_argument("--budget", type=float, default=300.0, help="shrink: seconds")
    parser.add_argument("--attempts", type=int, default=6, help="shrink: trial seeds per candidate")
    options = parser.parse_args(argv)
    program = _load_program(options)
    if options.command == "show":
        print(program.text, end="")
        return 0
    reference = run_reference(program, seed=options.trial_seed)
    print(f"reference: {reference.duration:.3f} s, {sum(reference.calls.values())} calls, error={reference.error}")
    failures = 0
    first_failure: TrialResult | None = None
    for seed in range(options.trial_seed, options.trial_seed + options.trials):
        result = run_trial(reference, seed, pin_hash_seed=options.pin_hash_seed,
                           hash_seed_api=not options.no_hash_seed_api, keep=options.keep)
        print(f"trial {seed}: {result.signature} kills={result.kills} {result.targets or ''}")
        if result.outcome in FAILING:
            failures += 1
            first_failure = first_failure or result
            print(describe(result, program, reference))
    if options.command == "shrink" and first_failure is not None:
        seeds = [first_failure.trial_seed] + [first_failure.trial_seed * 1000 + i for i in range(options.attempts - 1)]
        small, result = shrink(
            program, first_failure.signature, seeds, budget=options.budget,
            pin_hash_seed=options.pin_hash_seed, hash_seed_api=not options.no_hash_seed_api,
            kill_fractions=[k / first_failure.reference_duration for k in first_failure.kills],
            log=lambda m: print(m, flush=True),
        )
        print("--- shrunk program ---")
        print(small.text, end="")
        if result is not None:
            print(describe(result, small))
    return 1 if failures else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "run":
        raise SystemExit(worker_main(sys.argv[2:]))
    raise SystemExit(cli_main(sys.argv[1:]))
