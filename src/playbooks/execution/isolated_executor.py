"""Run LLM code in a limited worker process: the host keeps the tools, the storage and the keys.

:class:`IsolatedPythonExecutor` has the contract of
:class:`~playbooks.execution.streaming_python_executor.StreamingPythonExecutor` (``add_chunk``,
``finalize``, ``resume_from_checkpoint``, errors with the response's line numbers) but the statements
run in a worker process (:mod:`playbooks.execution.isolated_worker`) that holds the namespace:

* **Tools stay in the host.** The worker's namespace has stubs; a call travels over the channel with
  its arguments as plain data (:mod:`playbooks.execution.plain_data`), the host runs the tool with the
  call's idempotency key in :func:`~playbooks.execution.tool_calls.current_tool_call`, and sends back
  the result (a pickle made by the host, unpickled by the worker).
* **The host owns storage and keys.** The worker's checkpoint manager journals and snapshots as usual,
  but its records go over the channel to the host's provider, signed with a run key the host derived
  for this execution (:func:`~playbooks.checkpoints.codec.derive_run_key`). The host verifies and
  stores them and reads their metadata, but never unpickles them: only a worker does. The worker gets
  a scrubbed environment, a scratch folder and, on Linux, a Landlock sandbox that hides the storage and
  the key file from it.
* **Limits** (:class:`~playbooks.execution.sandbox.SandboxLimits`) raise typed
  :class:`~playbooks.errors.SandboxLimitError` subclasses into the response like any failing
  statement.
* **Death is survivable.** When the LLM's code ends its worker (``sys.exit`` in a thread,
  ``os._exit``, a segfault, an OOM kill, a hang the host kills), the host starts a fresh worker that
  resumes the frame from its checkpoints up to the statement that killed the old one, and reports
  :class:`~playbooks.errors.WorkerDiedError` (or the limit's error) for that statement: the namespace
  is what it was before it, and no finished call runs again. An executor without a checkpoint manager
  journals into memory for this.

What is blocked, limited and allowed, with the tests behind each line: docs/isolation.md.
"""

from __future__ import annotations

import ast
import atexit
import builtins
import contextlib
import contextvars
import dataclasses
import mmap
import os
import pickle
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio
import cloudpickle

import playbooks
from playbooks import errors
from playbooks.agent import AgentLike
from playbooks.errors import (
    CPULimitError,
    ExecutorStateError,
    InterpreterError,
    LLMCodeError,
    SandboxError,
    SecretStoredError,
    TimeLimitError,
    WorkerDiedError,
)
from playbooks.checkpoints.outcome import dump_outcome
from playbooks.checkpoints.secrets import check_secrets
from playbooks.execution.durable import outside_durable_calls
from playbooks.execution.channel import ChannelClosed, HostChannel, ProtocolError
from playbooks.execution.isolated_worker import STATUS
from playbooks.execution.plain_data import PlainDataError, decode_plain
from playbooks.execution.retry import RetryPolicy, policy_of
from playbooks.execution.sandbox import SandboxLimits
from playbooks.execution.statement_splitter import Statement
from playbooks.execution.streaming_python_executor import ExecutionResult
from playbooks.execution.tool_calls import ToolCall, ToolCallInterceptor, is_async_tool, is_cheap

if TYPE_CHECKING:
    from playbooks.checkpoints.manager import CheckpointManager
    from playbooks.checkpoints.model import Checkpoint

__all__ = ("IsolatedPythonExecutor", "OpaqueValue", "RecordedError", "WorkerRestart")

_POLL = 0.25  # s between two looks of the watchdog at a busy worker
_SCRUBBED_PATH = "/usr/local/bin:/usr/bin:/bin"
_SYSTEM_READ = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/etc", "/dev", "/proc", "/sys")


@dataclass(frozen=True, slots=True, repr=False)
class OpaqueValue:
    """A variable of the worker that is not plain data: the host sees its type and a short repr only
    (unpickling it in the host would run code the LLM chose). ``repr()`` and ``str()`` of it are
    the worker's repr of the value, so a host describing variables (to the LLM, in a log) shows what
    it would show in-process."""

    type: str
    repr: str

    def __str__(self) -> str:
        return self.repr

    def __repr__(self) -> str:
        return self.repr


def _shown_value(data: Any) -> Any:
    if isinstance(data, dict) and "plain" in data:
        try:
            return decode_plain(data["plain"])
        except PlainDataError:
            pass
    if isinstance(data, dict):
        return OpaqueValue(str(data.get("type", "?")), str(data.get("repr", "?")))
    return OpaqueValue("?", "?")


def _beneath(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


@dataclass(frozen=True, slots=True)
class WorkerRestart:
    """A worker that died and was replaced: why, in which statement, and the calls that were in flight
    (they may have run, and run again with the same idempotency key when ``resumed``; a statement
    the LLM's code ended does not run again, nor do its calls)."""

    reason: str
    lineno: int | None
    resumed: bool
    """True: killed from outside, the frame resumed with the statement (as after a crash); False: the
    statement failed with :attr:`reason`."""
    in_flight: tuple[str, ...]
    """Idempotency keys of the calls that had started but not finished."""


class _Worker:
    """One worker process, its channel, status page and scratch folder."""

    def __init__(self, process: subprocess.Popen[bytes], channel: HostChannel, status: mmap.mmap, scratch: str) -> None:
        self.process = process
        self.channel = channel
        self.status = status
        self.scratch = scratch
        self.killed_for: str | None = None
        self.cpu_time = 0.0
        self.reply: dict[str, Any] | None = None
        self.answered = anyio.Event()
        self.ended = anyio.Event()
        self.busy = False
        self.dead = False
        self.broken: BaseException | None = None
        self.scope: anyio.CancelScope | None = None
        self._finalizer = weakref.finalize(self, _reap, process, scratch)

    def statement(self) -> tuple[int, int, int, int]:
        number, lineno, start, end = STATUS.unpack_from(self.status, 0)
        return int(number), int(lineno), int(start), int(end)

    def kill(self, reason: str) -> None:
        if self.killed_for is None:
            self.killed_for = reason
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signal.SIGKILL)

    def _wait(self) -> None:
        """Reap the process, keeping the CPU time it used (tells a CPU limit from other kills)."""
        if self.process.returncode is not None:
            return
        try:
            _, status, usage = os.wait4(self.process.pid, 0)
        except ChildProcessError:
            self.process.wait()
            return
        self.cpu_time = usage.ru_utime + usage.ru_stime
        self.process.returncode = os.waitstatus_to_exitcode(status)

    async def wait(self) -> None:
        await anyio.to_thread.run_sync(self._wait)

    async def close(self) -> None:
        if self.scope is not None:
            self.scope.cancel()
        if self.process.returncode is None:
            with contextlib.suppress(Exception):
                await self.channel.send({"op": "close"})
        self.kill("closed")
        self.channel.close()
        await self.wait()
        self._finalizer()


@dataclass
class _Launched:
    """A worker process just started: it boots and waits for its ``init`` message."""

    process: subprocess.Popen[bytes]
    host_end: socket.socket
    status: mmap.mmap
    scratch: str
    root: str


_SPARES: list[_Launched] = []
"""Workers started ahead (one per host by default), so an executor's worker is already booted."""


def _launch(root: str) -> _Launched:
    """Start a worker process (``root``: the folder holding this ``playbooks``) with a scrubbed
    environment in a fresh scratch folder; it confines itself when its ``init`` arrives."""
    host_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    for end in (host_end, worker_end):
        with contextlib.suppress(OSError):
            end.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            end.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    status_fd = os.memfd_create("playbooks-worker-status", 0)
    scratch = tempfile.mkdtemp(prefix="playbooks-worker-")
    try:
        os.ftruncate(status_fd, STATUS.size)
        status = mmap.mmap(status_fd, STATUS.size)
        # The hash seed is the same in every worker, so a resumed worker iterates sets alike.
        env = {
            "PATH": _SCRUBBED_PATH, "LANG": "C.UTF-8", "HOME": scratch, "TMPDIR": scratch, "PYTHONHASHSEED": "0",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        bootstrap = (
            f"import sys; sys.path.insert(0, {root!r}); "
            "from playbooks.execution.isolated_worker import main; main()"
        )
        with open(os.path.join(scratch, "worker.stderr"), "wb") as stderr:
            process = subprocess.Popen(
                [sys.executable, "-s", "-c", bootstrap, str(worker_end.fileno()), str(status_fd), str(os.getpid())],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                pass_fds=(worker_end.fileno(), status_fd), cwd=scratch, env=env, start_new_session=True,
            )
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        host_end.close()
        raise
    finally:
        worker_end.close()
        os.close(status_fd)
    return _Launched(process, host_end, status, scratch, root)


@atexit.register
def _reap_spares() -> None:
    """End the workers started ahead when the host exits (they would die with it anyway)."""
    while _SPARES:
        spare = _SPARES.pop()
        _reap(spare.process, spare.scratch)


def _take_spare(root: str) -> _Launched | None:
    """A worker started ahead that is still alive (and runs this ``playbooks``), if any."""
    while _SPARES:
        spare = _SPARES.pop()
        if spare.process.poll() is None and spare.root == root:
            return spare
        _reap(spare.process, spare.scratch)
        spare.host_end.close()
    return None


def _reap(process: subprocess.Popen[bytes], scratch: str) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(Exception):
        process.wait(5)
    shutil.rmtree(scratch, ignore_errors=True)


class IsolatedPythonExecutor:
    """Execute an LLM response statement by statement in a limited worker process.

    The arguments are those of :class:`StreamingPythonExecutor`, plus ``limits`` (default
    :class:`SandboxLimits()`) and ``output``, called with ``(stream, text)`` for what the code prints
    (default: the host's ``sys.stdout`` / ``sys.stderr``). ``namespace`` gives the worker its first
    variables (pickled to it); afterwards :attr:`namespace` is the host's *view* of the worker's
    variables, refreshed by :meth:`finalize`: plain data as values, anything else as an
    :class:`OpaqueValue`. Use it as an async context manager (or call :meth:`aclose`) to end the
    worker; it also ends with the executor or the host.

    For a host that runs several responses in one execution (the ``.pb`` runtime): ``frame_id`` naming
    a frame that has checkpoints re-attaches to it (feed it the response again; a finished one
    reports its result), ``inherit`` names a finished frame whose final variables the worker starts
    from, ``observer`` (``"module:function"``) is trusted host code the worker calls as
    ``function(namespace, call, value, error)`` after every call, and ``expose`` names dunder variables
    (an observer's notes) to show in :attr:`namespace`.
    """

    def __init__(
        self,
        agent: AgentLike,
        *,
        namespace: Mapping[str, Any] | None = None,
        on_statement: Callable[[Statement], None] | None = None,
        on_call: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
        checkpoint_manager: CheckpointManager | None = None,
        frame_id: str | None = None,
        retry: RetryPolicy | None = None,
        limits: SandboxLimits | None = None,
        output: Callable[[str, str], None] | None = None,
        on_restart: Callable[[WorkerRestart], None] | None = None,
        prestart: bool = True,
        inherit: str | None = None,
        observer: str | None = None,
        expose: tuple[str, ...] = (),
    ) -> None:
        self.agent = agent
        self._resume: dict[str, Any] | None = None
        self._chunks: list[str] = []
        self._response = ""
        self._restored = False
        self._inherit = inherit
        self._observer = observer
        self._expose = tuple(expose)
        self.prestart = prestart
        """Keep one worker process started ahead for the next executor (a warm start)."""
        self.restarts: list[WorkerRestart] = []
        """Every worker that died under this executor and was replaced, oldest first."""
        self._on_restart = on_restart
        self.limits = limits or SandboxLimits()
        self._initial = dict(namespace or {})
        self.namespace: dict[str, Any] = dict(self._initial)
        self._on_statement = on_statement
        self._on_call = on_call
        self._output = output or _print_to_host
        self._retry = retry
        if checkpoint_manager is None:
            from playbooks.checkpoints.manager import CheckpointManager
            from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider

            checkpoint_manager = CheckpointManager(
                f"isolated-{secrets.token_hex(6)}", MemoryCheckpointProvider(), key=secrets.token_bytes(32),
                keep_last_n=2,
            )
            self._own_manager = True
        else:
            self._own_manager = False
        self.manager = checkpoint_manager
        self._frame_id = frame_id or f"{agent.id}-{secrets.token_hex(4)}"
        self._done_before = False
        state = checkpoint_manager.frame_state(self._frame_id) if frame_id is not None else None
        if state is not None:
            # A frame of this execution that has checkpoints: re-attach to it, as an in-process
            # executor does (feed it the response again: what had run is skipped).
            self._resume = {"upto": None, "failure": None, "feed": False}
            self._restored = True
            self._done_before = state.done
            if state.done:  # it had finished: nothing is fed again, finalize reports its response
                self._response = state.response
        self._tools = dict(agent.tools)
        self._host_calls = ToolCallInterceptor(run_id=checkpoint_manager.execution_id, frame_id=self._frame_id)
        self._worker: _Worker | None = None
        self._error: LLMCodeError | None = None
        self._fatal: InterpreterError | None = None
        self._host_failure: BaseException | None = None
        self._raised: dict[str, BaseException] = {}  # what the host's tools raised into the worker, by call
        self._finalized = False
        self._killed_at: tuple[int, int] | None = None  # (statement number, start) of the last outside kill
        self._outstanding = 0
        self._printed = 0
        self._executed_offset = 0
        self._statements = 0
        self.sandbox_report = ""
        """What the worker enforces, in words (filesystem, TCP, signals, memory, CPU, user)."""

    # ----------------------------------------------------------------- lifecycle

    @classmethod
    async def resume_from_checkpoint(
        cls,
        agent: AgentLike,
        checkpoint: Checkpoint,
        *,
        checkpoint_manager: CheckpointManager,
        namespace: Mapping[str, Any] | None = None,
        on_statement: Callable[[Statement], None] | None = None,
        on_call: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
        limits: SandboxLimits | None = None,
        output: Callable[[str, str], None] | None = None,
        on_restart: Callable[[WorkerRestart], None] | None = None,
    ) -> IsolatedPythonExecutor:
        """Continue the execution ``checkpoint`` belongs to, in a fresh worker (see
        :meth:`StreamingPythonExecutor.resume_from_checkpoint`): its code after the executed offset
        runs, journaled calls return their recorded results, and the executor is returned as if it had
        been fed the stored response."""
        executor = cls(
            agent, namespace=namespace, on_statement=on_statement, on_call=on_call,
            checkpoint_manager=checkpoint_manager, frame_id=checkpoint.root_frame_id, limits=limits, output=output,
            on_restart=on_restart,
        )
        executor._resume = {"upto": None, "failure": None, "feed": True}
        executor._response = checkpoint.state.response
        executor._restored = True
        try:
            await executor._ensure_worker()
        except LLMCodeError:
            pass
        return executor

    async def __aenter__(self) -> IsolatedPythonExecutor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """End the worker and remove its scratch folder; idempotent."""
        worker, self._worker = self._worker, None
        if worker is not None:
            with anyio.CancelScope(shield=True):
                await worker.close()
        if self._own_manager:
            await self.manager.close()

    async def _ensure_worker(self) -> None:
        if self._fatal is not None:
            raise self._fatal
        if self._worker is None:
            await self._spawn(self._resume)
            self._resume = None

    def _settings(self, resume: dict[str, Any] | None) -> dict[str, Any]:
        manager = self.manager
        storage = [p for p in (getattr(manager.provider, "base_path", None), getattr(manager.provider, "path", None)) if p]
        from playbooks.checkpoints.codec import default_key_file

        hidden = [os.fspath(p) for p in storage] + [default_key_file()]
        path = [
            p for p in sys.path
            if p and os.path.exists(p) and os.path.realpath(p) != os.path.realpath(os.getcwd())
            and not any(_beneath(h, p) for h in hidden)
        ]
        root = os.path.dirname(os.path.dirname(os.path.abspath(playbooks.__file__)))
        read = [*path, root, sys.prefix, sys.base_prefix, sys.exec_prefix, *_SYSTEM_READ, *self.limits.read_paths]
        read = [p for p in dict.fromkeys(read) if not any(_beneath(h, p) for h in hidden)]
        tools = {}
        for name, fn in self._tools.items():
            if not callable(fn):
                raise TypeError(f"tool {name!r} is not callable: {fn!r}")
            tools[name] = {"async": is_async_tool(fn), "retry": policy_of(fn, None), "cheap": is_cheap(fn),
                           "doc": getattr(fn, "__doc__", None)}
        try:
            initial = cloudpickle.dumps(self._initial)
        except Exception as exc:
            raise SandboxError(f"the namespace given to the isolated executor cannot be sent to its worker: {exc}") from exc
        check_secrets(initial, self.manager.secrets, "the namespace given to the isolated worker")
        return {
            "agent_id": self.agent.id, "tools": tools, "namespace": initial, "frame_id": self._frame_id,
            "retry": self._retry, "limits": self.limits, "report_statements": self._on_statement is not None,
            "backend": _backend(), "sys_path": [root, *path], "read_paths": read,
            "inherit": self._inherit, "observer": self._observer, "expose": self._expose,
            "write_paths": list(self.limits.write_paths), "drop_root": True, "resume": resume,
            "store": {
                "execution_id": manager.execution_id, "run_key": manager.run_key.secret,
                "journal_drop_batch": manager.provider.journal_drop_batch, "keep_last_n": manager.keep_last_n,
                "max_checkpoint_size_mb": manager.max_checkpoint_size_mb, "unpicklable": manager.unpicklable,
                "snapshot_sync_every": manager.snapshot_sync_every, "compress_over": manager.compress_over,
                "journal_sync_every": manager.journal_sync_every,
                "journal_sync_interval": manager.journal_sync_interval,
            },
        }

    async def _spawn(self, resume: dict[str, Any] | None) -> None:
        await self.manager.lock()  # the host holds the execution's lock for its worker
        settings = self._settings(resume)
        root = settings["sys_path"][0]
        process = _take_spare(root) if self.prestart else None
        if process is None:
            process = _launch(root)
        if self.prestart:
            _SPARES.append(_launch(root))  # boots while this one works: the next executor starts warm
        settings["write_paths"] = [process.scratch, *settings["write_paths"]]
        settings["env"] = {name: os.environ[name] for name in self.limits.env if name in os.environ}
        max_frame = int(self.manager.max_checkpoint_size_mb * 1024 * 1024 * 2) + (16 << 20)
        worker = _Worker(process.process, HostChannel(process.host_end, max_frame=max_frame), process.status, process.scratch)
        self._worker = worker
        _start_detached(lambda: self._pump(worker))
        reply = await self._command({"op": "init"}, (pickle.dumps(settings),))
        if reply.get("op") == "done":
            self._restored = self._restored or bool(reply.get("restored"))
            self.sandbox_report = str(reply.get("report", ""))
            response = self._response
            if int(reply.get("response", 0)) < len(response):  # the rest of what the LLM sent
                await self._command({"op": "chunk", "text": response[int(reply["response"]):]})

    # ----------------------------------------------------------------- the pump

    async def _command(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> dict[str, Any]:
        """Send a command and wait for the worker's answer (its pump serves the worker meanwhile); a
        worker that dies meanwhile is replaced (see :meth:`_died`)."""
        worker = self._worker
        assert worker is not None
        if not worker.dead:
            worker.answered = anyio.Event()
            worker.busy = True
            try:
                await worker.channel.send(header, blobs)
                await worker.answered.wait()
            except ChannelClosed:
                await worker.ended.wait()  # its pump is about to see the end of the stream
            finally:
                worker.busy = False
        if worker.broken is not None:
            self._fatal = SandboxError(f"the isolated executor failed: {type(worker.broken).__name__}: {worker.broken}")
            raise self._fatal from worker.broken
        if worker.dead:
            return await self._died(worker, header)
        assert worker.reply is not None
        return self._answer(worker.reply)

    async def _pump(self, worker: _Worker) -> None:
        """Serve one worker for its whole life, between commands too: its tool calls (a task the
        LLM's code left running calls on while the host waits for the next chunk), its storage,
        its output, and the answers to commands; kill it when it overstays a limit."""
        clock = _Watchdog(self.limits, worker)
        try:
            with anyio.CancelScope() as scope:
                worker.scope = scope
                async with anyio.create_task_group() as group:
                    group.start_soon(self._watch, worker, clock)
                    while True:
                        try:
                            header, blobs = await worker.channel.receive()
                            if header["op"] in ("done", "error", "fatal"):
                                worker.reply = header
                                worker.answered.set()
                            else:
                                await self._handle(worker, group, header, blobs)
                        except ProtocolError as exc:
                            worker.kill(f"it broke the channel's protocol ({exc})")
                            break
                        except ChannelClosed:
                            break
                    group.cancel_scope.cancel()  # its calls cannot answer a dead worker
        except BaseException as exc:
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            worker.broken = exc  # a bug of the host side: the waiting command raises it
        finally:
            worker.dead = True
            worker.answered.set()
            worker.ended.set()

    async def _watch(self, worker: _Worker, clock: _Watchdog) -> None:
        """Every poll, account the worker's busy time; kill it when it overstays a limit."""
        while True:
            await anyio.sleep(_POLL)
            reason = clock.tick(self._outstanding if worker.busy else -1)
            if reason is not None:
                worker.kill(reason)

    async def _handle(self, worker: _Worker, group: Any, header: dict[str, Any], blobs: list[bytes]) -> None:
        op = header["op"]
        if op == "store":
            await self._store(worker, header, blobs)
        elif op == "call":
            self._outstanding += 1
            group.start_soon(self._call, worker, header)
        elif op == "out":
            self._out(worker, str(header.get("stream")), str(header.get("text", "")))
        elif op == "statement" and self._on_statement is not None:
            self._on_statement(_statement(header))
        elif op == "replayed" and self._on_call is not None:
            call = self._tool_call(header, (), {})
            error = header.get("error")
            self._on_call(
                call, _shown_value(header.get("value")),
                None if error is None else RecordedError(str(error), str(header.get("error_type", ""))),
            )
        elif op not in ("statement", "replayed"):
            raise ProtocolError(f"unknown message {op!r}")

    def _out(self, worker: _Worker, stream: str, text: str) -> None:
        limit = self.limits.max_output_bytes
        self._printed += len(text)
        if limit is not None and self._printed > 2 * limit + 65536:
            raise ProtocolError("it printed far beyond the output limit")
        self._output("stderr" if stream == "stderr" else "stdout", text)

    def _tool_call(self, header: Mapping[str, Any], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ToolCall:
        return ToolCall(
            str(header.get("name")), args, dict(kwargs), int(header.get("seq") or 0), str(header.get("key") or ""),
            str(header.get("call_id") or ""), attempt=int(header.get("attempt") or 1),
            resumed=bool(header.get("resumed")),
        )

    async def _call(self, worker: _Worker, header: dict[str, Any]) -> None:
        """Run a tool the worker's code called, and answer with its result or exception."""
        reply: dict[str, Any] = {"op": "reply", "id": header.get("id")}
        try:
            try:
                args = decode_plain(header.get("args"))
                kwargs = decode_plain(header.get("kwargs"))
                if not isinstance(args, list) or not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
                    raise PlainDataError("arguments must be a list and keyword arguments a dict of str")
            except PlainDataError as exc:
                raise ProtocolError(str(exc)) from None
            name = str(header.get("name"))
            fn = self._tools.get(name)
            call = self._tool_call(header, tuple(args), kwargs)
            if self._host_failure is not None:
                await self._reply_host_error(worker, reply, self._host_failure)
                return
            if fn is None:
                outcome: tuple[bool, Any] = (False, NameError(f"no tool {name!r} in the host"))
            else:
                try:
                    with outside_durable_calls():
                        if is_async_tool(fn):
                            value = await self._host_calls.attempt_async(call, fn)
                        else:
                            value = self._host_calls.call_sync(call, fn)
                    outcome = (True, value)
                except InterpreterError as exc:  # the host failed under the call (HostIOError, storage)
                    self._host_failure = exc
                    await self._reply_host_error(worker, reply, exc)
                    return
                except Exception as exc:
                    outcome = (False, exc)
                except BaseException as exc:
                    if isinstance(exc, anyio.get_cancelled_exc_class()):
                        raise
                    # (``KeyboardInterrupt``, a host's own signal such as a run suspending for an
                    # answer): it stops the host's command, not the LLM's code; the call stays
                    # unfinished in the journal.
                    self._host_failure = exc
                    await self._reply_host_error(worker, reply, exc)
                    return
                if self._on_call is not None:
                    self._on_call(call, outcome[1] if outcome[0] else None, None if outcome[0] else outcome[1])
            changed: tuple[bytes, ...] = ()
            after = [*args, *kwargs.values()]
            if any(type(a) in _MUTABLE for a in after) and after != [
                *decode_plain(header["args"]), *decode_plain(header["kwargs"]).values()
            ]:
                reply["args"] = True  # the tool changed an argument: the worker's copy follows
                changed = (pickle.dumps(after),)
            if not outcome[0]:  # an error of the LLM's code it causes comes back with it as its cause
                self._raised[call.idempotency_key] = outcome[1]
            # As a journal stores it: an exception keeps its class, attributes and chain even when its
            # __init__ takes other arguments than its args (a faithful stand-in at worst).
            data = dump_outcome(outcome[1], what=f"tool {name!r}")
            if data is None:
                failure = SandboxError(
                    f"tool {name!r} returned a {type(outcome[1]).__name__}, which cannot be sent to the "
                    "isolated worker (it cannot be pickled); return plain or picklable data"
                )
                self._host_failure = failure
                await self._reply_host_error(worker, reply, failure)
                return
            try:  # a key that a tool returned never reaches the worker, nor its records
                for blob in (data, *changed):
                    check_secrets(blob, self.manager.secrets, f"the result of tool {name!r} for the isolated worker")
            except SecretStoredError as exc:
                self._host_failure = exc
                await self._reply_host_error(worker, reply, exc)
                return
            with contextlib.suppress(ChannelClosed):
                await worker.channel.send({**reply, "ok": outcome[0]}, (data, *changed))
        except ProtocolError as exc:
            worker.kill(f"it broke the channel's protocol ({exc})")
        finally:
            self._outstanding -= 1

    async def _reply_host_error(self, worker: _Worker, reply: dict[str, Any], exc: BaseException) -> None:
        with contextlib.suppress(ChannelClosed):
            await worker.channel.send({**reply, "host_error": True, "type": type(exc).__name__, "message": str(exc)})

    async def _store(self, worker: _Worker, header: dict[str, Any], blobs: list[bytes]) -> None:
        """Serve a storage request of the worker's manager, confined to this execution."""
        from playbooks.checkpoints.provider import parse_checkpoint_id

        provider = self.manager.provider
        eid = self.manager.execution_id
        method = str(header.get("method"))
        answer: dict[str, Any] = {"op": "reply", "id": header.get("id"), "ok": True}
        data: tuple[bytes, ...] = ()
        try:
            if "cid" in header and parse_checkpoint_id(str(header["cid"]))[0] != eid:
                raise ProtocolError(f"a {method} of another execution's record")
            if "eid" in header and header["eid"] != eid:
                raise ProtocolError(f"a {method} of another execution")
            if self._host_failure is not None and "id" in header:
                raise self._host_failure
            if method == "append_journal":
                await provider.append_journal(eid, int(header["counter"]), blobs[0])
            elif method == "write_head":
                await provider.write_head(eid, blobs[0])
            elif method == "save_checkpoint":
                await provider.save_checkpoint(str(header["cid"]), blobs[0], sync=bool(header.get("sync")))
            elif method in ("sync", "sync_journal"):
                await getattr(provider, method)(eid)
            elif method == "load_checkpoint":
                found = await provider.load_checkpoint(str(header["cid"]))
                data = () if found is None else (found,)
            elif method == "list_checkpoints":
                answer["value"] = await provider.list_checkpoints(eid)
            elif method == "delete_checkpoint":
                answer["value"] = await provider.delete_checkpoint(str(header["cid"]))
            elif method == "list_executions":
                answer["value"] = [e for e in await provider.list_executions() if e == eid]
            elif method == "read_journal":
                journal = await provider.read_journal(eid)
                answer["value"] = [counter for counter, _ in journal]
                data = tuple(entry for _, entry in journal)
            elif method == "drop_journal":
                await provider.drop_journal(eid, [int(c) for c in header.get("counters", [])])
            elif method == "read_head":
                head = await provider.read_head(eid)
                data = () if head is None else (head,)
            else:
                raise ProtocolError(f"unknown storage method {method!r}")
        except ProtocolError:
            raise
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise ProtocolError(f"a malformed {method}: {exc}") from None
        except Exception as exc:
            if self._host_failure is None:
                self._host_failure = exc
            answer = {"op": "reply", "id": header.get("id"), "ok": False, "type": type(exc).__name__, "message": str(exc)}
        if "id" in header:
            await worker.channel.send(answer, data)

    def _answer(self, reply: dict[str, Any]) -> dict[str, Any]:
        """The worker's answer to a command: raise what it reports."""
        if self._host_failure is not None:
            failure = self._host_failure
            self._fatal = failure if isinstance(failure, InterpreterError) else SandboxError(str(failure))
            raise failure
        op = reply["op"]
        if op == "fatal":
            self._fatal = _host_error(reply)
            raise self._fatal
        if op == "error":
            error = _code_error(reply, self.response)
            raised = reply.get("raised")
            if isinstance(raised, list) and raised and isinstance(raised[0], dict):
                first = raised[0]
                known = self._raised.get(str(first.get("key")))
                error.__cause__ = known if known is not None else RecordedError(
                    str(first.get("message", "")), str(first.get("type", ""))
                )
            if self._error is None:
                self._error = error
            raise error
        return reply

    async def _died(self, worker: _Worker, header: dict[str, Any]) -> dict[str, Any]:
        """The worker died under a command ``header``. Killed from outside (a SIGKILL the host did
        not send: an operator, the OOM killer), it is replaced by one that resumes the frame as a new
        process would after a crash, and the command goes on. Ended by the LLM's code (an exit, a
        crash, a limit), or killed from outside twice in one statement, the new worker resumes up to
        that statement, which fails with the reason."""
        worker.channel.close()
        await worker.wait()
        number, lineno, start, end = worker.statement()
        reason = _death(worker, self.limits)
        outside = worker.process.returncode == -signal.SIGKILL and worker.killed_for is None
        tail = _stderr_tail(worker.scratch)
        await worker.close()
        self._worker = None
        if self._host_failure is not None:
            return self._answer({"op": "done"})
        response = self.response
        error = reason[0](reason[1].format(line=lineno), statement=response[start:end], lineno=lineno)
        error.executed_code = response[:start]
        place = (number, start)
        # (A worker killed before it ran any code is started again however often: nothing can repeat.)
        resumed = outside and (place != self._killed_at or not number)
        await self._restarted(WorkerRestart(str(error), lineno if number else None, resumed, ()))
        if len(self.restarts) > self.limits.max_restarts:
            self._fatal = SandboxError(
                f"the isolated worker died {len(self.restarts)} times (max_restarts = {self.limits.max_restarts}); "
                f"the last time: {error}" + (f"\n{tail}" if tail else "")
            )
            raise self._fatal
        if resumed:
            self._killed_at = place
            await self._spawn({"upto": None, "failure": None, "feed": True})
            if header["op"] not in ("chunk", "init"):
                return await self._command(header)
            return {"op": "spawned"}  # a chunk: the new worker was fed it; init: it is up
        if not number:
            self._fatal = SandboxError(
                f"the isolated worker died before running any code: {error.message}" + (f"\n{tail}" if tail else "")
            )
            raise self._fatal
        await self._spawn({"upto": start, "failure": pickle.dumps(error), "text": response[:start], "feed": True})
        self._error = self._error or error
        raise error

    async def _restarted(self, restart: WorkerRestart) -> None:
        """Record a restart, with the calls its frame had in flight (read from the records' metadata:
        nothing is unpickled), and tell ``on_restart``."""
        await self.manager.load_records()
        state = self.manager.frame_state(self._frame_id)
        in_flight = tuple(entry.key for entry in state.in_flight) if state is not None else ()
        restart = dataclasses.replace(restart, in_flight=in_flight)
        self.restarts.append(restart)
        if self._on_restart is not None:
            self._on_restart(restart)

    # ----------------------------------------------------------------- the contract

    @property
    def response(self) -> str:
        """The whole response received so far."""
        if self._chunks:
            self._response += "".join(self._chunks)
            self._chunks.clear()
        return self._response

    @property
    def error(self) -> LLMCodeError | None:
        """The first failure of this stream, if any."""
        return self._error

    @property
    def restored(self) -> bool:
        """Whether this executor continues a frame from its checkpoints."""
        return self._restored

    @property
    def finished(self) -> bool:
        """Whether :meth:`finalize` ran, here or before a crash (a re-attached frame that had
        finished: :meth:`finalize` returns what it had returned, nothing runs again)."""
        return self._finalized or self._done_before

    @property
    def frame_id(self) -> str:
        return self._frame_id

    @property
    def executed_offset(self) -> int:
        """Length of the executed prefix of the response (as of the last :meth:`finalize`)."""
        return self._executed_offset

    @property
    def statements_executed(self) -> int:
        return self._statements

    def get_executed_code(self) -> str:
        return self.response[: self._executed_offset]

    async def start(self) -> None:
        """Start the worker and its durable frame now instead of at the first chunk."""
        await self._ensure_worker()
        await self._command({"op": "start"})

    async def checkpoint(self) -> None:
        """Take a snapshot now."""
        await self._ensure_worker()
        await self._command({"op": "checkpoint"})

    async def evaluate(self, expression: str) -> Any:
        """The value of ``expression`` in the worker's namespace, as plain data (for a host that
        reads a result: ``await executor.evaluate("report['total']")``). Nothing is journaled or
        checkpointed; a value that is not plain data raises
        :class:`~playbooks.execution.plain_data.PlainDataError`, an exception of the expression is
        raised as its builtin type (``KeyError``, ``NameError``, ...) or ``RuntimeError``."""
        await self._ensure_worker()
        reply = await self._command({"op": "evaluate", "expression": expression})
        if "failed" in reply:
            kind = PlainDataError if reply["failed"] == "PlainDataError" else getattr(builtins, str(reply["failed"]), None)
            if not (isinstance(kind, type) and issubclass(kind, Exception)):
                kind = RuntimeError
            raise kind(str(reply.get("message", "")))
        return decode_plain(reply.get("value"))

    async def add_chunk(self, text: str) -> None:
        """Feed the next chunk; the statements it completes run in the worker (see
        :meth:`StreamingPythonExecutor.add_chunk`). Raises the first failing statement's
        :class:`~playbooks.errors.LLMCodeError` (limits and a worker's death included) and the host's
        :class:`~playbooks.errors.InterpreterError`."""
        if self._fatal is not None:
            raise self._fatal
        if self._finalized:
            raise ExecutorStateError("add_chunk() after finalize()")
        if not text:
            return
        await self._ensure_worker()
        self._chunks.append(text)
        await self._command({"op": "chunk", "text": text})

    async def finalize(self) -> ExecutionResult:
        """End the stream and report, as :meth:`StreamingPythonExecutor.finalize` does; refreshes
        :attr:`namespace`."""
        if self._fatal is not None:
            raise self._fatal
        if not self._finalized:
            await self._ensure_worker()
            try:
                reply = await self._command({"op": "finalize"})
            except LLMCodeError:  # the worker died in the trailing statement; the new one finalizes
                reply = await self._command({"op": "finalize"})
            self._finalized = True
            if isinstance(reply.get("error"), dict) and self._error is None:
                with contextlib.suppress(LLMCodeError):
                    self._answer(reply["error"])
            self._executed_offset = int(reply.get("executed_offset", 0))
            self._statements = int(reply.get("statements", 0))
            variables = reply.get("variables") or {}
            self.namespace = {str(name): _shown_value(value) for name, value in variables.items()}
        return ExecutionResult(
            success=self._error is None, error=self._error, executed_code=self.get_executed_code(),
            executed_offset=self._executed_offset, statements_executed=self._statements,
            response=self.response, namespace=self.namespace,
        )


class RecordedError(Exception):
    """An exception a tool of the host had raised into the worker, as the host sees it when it no
    longer holds the object (the call was replayed from the worker's journal): its type's name
    (``module.qualname``) and its message, never an unpickled worker value."""

    def __init__(self, message: str, type_name: str = "") -> None:
        super().__init__(message)
        self.type_name = type_name


class _Watchdog:
    """Kills a worker that runs a statement (or a response) past its limit plus ``kill_grace``: one the
    worker's own timer could not stop (a C loop, code that catches the exception)."""

    def __init__(self, limits: SandboxLimits, worker: _Worker) -> None:
        self.limits = limits
        self.worker = worker
        self.number = -1
        self.statement = 0.0
        self.response = 0.0
        self.last = anyio.current_time()

    def tick(self, outstanding: int) -> str | None:
        """Account the time since the last tick; ``outstanding``: the host's calls running for the
        worker (its time does not count), ``-1`` when no command runs (the worker is idle)."""
        now = anyio.current_time()
        elapsed, self.last = now - self.last, now
        number, lineno, _, _ = self.worker.statement()
        if number != self.number:
            self.number, self.statement = number, 0.0
        if outstanding or not number:
            return None
        self.statement += elapsed
        self.response += elapsed
        grace = self.limits.kill_grace
        if self.limits.statement_timeout is not None and self.statement > self.limits.statement_timeout + grace:
            return "statement"
        if self.limits.response_timeout is not None and self.response > self.limits.response_timeout + grace:
            return "response"
        return None


_MUTABLE = frozenset({list, dict, set, bytearray})
"""Argument types a tool can change in place (the worker's object then follows)."""

_DETACHED: set[Any] = set()  # asyncio tasks of the pumps (the loop keeps only weak references)


def _start_detached(run: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a worker's pump beside the caller's tasks, for as long as the worker lives: a task group
    would end with the call that starts it (anyio has no detached tasks; each backend has its own)."""
    if _backend() == "trio":
        import trio

        # (a system task starts in an empty context: it gets the caller's, as an asyncio task does)
        trio.lowlevel.spawn_system_task(run, context=contextvars.copy_context())
    else:
        import asyncio

        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(run())
        _DETACHED.add(task)
        task.add_done_callback(_DETACHED.discard)


def _host_error(reply: Mapping[str, Any]) -> InterpreterError:
    """The host-side error a worker's ``fatal`` reply names (a storage failure, a divergent replay)."""
    kind = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, InterpreterError)):
        kind = SandboxError
    error: InterpreterError = kind.__new__(kind)
    Exception.__init__(error, str(reply.get("message", "")))
    return error


def _code_error(reply: Mapping[str, Any], response: str) -> LLMCodeError:
    """The error of the LLM's code a worker's ``error`` reply describes (plain fields, no pickle)."""
    kind = getattr(errors, str(reply.get("type")), None)
    if not (isinstance(kind, type) and issubclass(kind, LLMCodeError)):
        kind = errors.CodeExecutionError
    lineno, col, executed = reply.get("lineno"), reply.get("col_offset"), reply.get("executed_code")
    error: LLMCodeError = kind(
        str(reply.get("message", "")), statement=str(reply.get("statement", "")),
        lineno=lineno if isinstance(lineno, int) else None, col_offset=col if isinstance(col, int) else None,
        traceback_text=str(reply.get("traceback", "")),
    )
    error.executed_code = response[:executed] if isinstance(executed, int) else ""
    return error


def _death(worker: _Worker, limits: SandboxLimits) -> tuple[type[LLMCodeError], str]:
    """Why the worker died: the error class for its statement, and a message with ``{line}``."""
    code = worker.process.returncode
    killed = worker.killed_for
    if killed == "statement":
        return TimeLimitError, f"statement at line {{line}} ran longer than {limits.statement_timeout:g} s (statement_timeout); its worker was killed"
    if killed == "response":
        return TimeLimitError, f"the response's code ran longer than {limits.response_timeout:g} s (response_timeout); its worker was killed"
    if killed is not None and killed != "closed":
        return WorkerDiedError, f"the worker of the statement at line {{line}} was killed: {killed}"
    if code is not None and code < 0:
        sig = -code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        cpu_out = limits.cpu_seconds is not None and worker.cpu_time >= limits.cpu_seconds
        if sig == signal.SIGXCPU or (sig == signal.SIGKILL and cpu_out):
            return CPULimitError, (
                f"the statement at line {{line}} used up the worker's {limits.cpu_seconds} s of CPU time "
                "(cpu_seconds)"
            )
        if sig == signal.SIGKILL:
            return WorkerDiedError, (
                "the worker of the statement at line {line} was killed (SIGKILL): the system ran out of "
                "memory, or something outside killed it"
            )
        return WorkerDiedError, f"the statement at line {{line}} crashed its worker process ({name})"
    return WorkerDiedError, (
        f"the statement at line {{line}} ended its worker process (exit code {code}: sys.exit in a thread, "
        "os._exit or similar); LLM code may not end its process"
    )


def _stderr_tail(scratch: str) -> str:
    try:
        with open(os.path.join(scratch, "worker.stderr"), "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4000))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


def _statement(header: Mapping[str, Any]) -> Statement:
    source = str(header.get("source", ""))
    lineno = int(header.get("lineno", 1))
    try:
        node = ast.parse(source).body[0]
        ast.increment_lineno(node, lineno - 1)
    except (SyntaxError, IndexError, ValueError):
        node = ast.Pass(lineno=lineno, col_offset=0)
    return Statement(
        source, node, int(header.get("start", 0)), int(header.get("end", 0)), lineno,
        int(header.get("col_offset", 0)), int(header.get("end_lineno", lineno)), int(header.get("end_col_offset", 0)),
    )


def _print_to_host(stream: str, text: str) -> None:
    target = sys.stderr if stream == "stderr" else sys.stdout
    target.write(text)
    target.flush()


def _backend() -> str:
    """The event loop the host runs on (the worker runs the same one, so code behaves alike)."""
    trio = sys.modules.get("trio")
    if trio is not None:
        try:
            trio.lowlevel.current_task()
        except RuntimeError:
            pass
        else:
            return "trio"
    return "asyncio"
