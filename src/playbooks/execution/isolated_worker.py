"""The worker process of an :class:`~playbooks.execution.isolated_executor.IsolatedPythonExecutor`.

Started by the host as ``python -m playbooks.execution.isolated_worker SOCKET_FD STATUS_FD`` with a
scrubbed environment, it reads one ``init`` message (a pickle: the host is trusted), confines itself
(dies with the host, drops root, ``RLIMIT_AS``/``RLIMIT_CPU``, Landlock, recursion limit) and only then
unpickles anything the host gave it and runs LLM code, in a :class:`StreamingPythonExecutor` of its
own whose tools are stubs: every call travels to the host, which runs the real tool and answers with
the result. The executor's checkpoint manager stores its records through the host
(:class:`_RelayProvider`) and signs them with the run key the host derived for this execution, never
with the host's key.

The worker writes the statement it is running into a shared status page (``STATUS_FD``) so a host
that kills it for a hang can name the statement, and enforces its limits first itself: a statement's
wall time by ``SIGALRM`` (an exception in the LLM's frame) and by a cancel scope (an ``await`` that
overstays), the output limit in its writer. A worker that dodges them is killed by the host.
"""

from __future__ import annotations

import builtins
import contextlib
import ctypes
import faulthandler
import functools
import importlib
import itertools
import math
import mmap
import os
import pickle
import resource
import signal
import socket
import struct
import sys
import time
import traceback
import types
from collections import deque
from collections.abc import Callable, Collection, Mapping
from types import FrameType
from typing import Any

import anyio

from playbooks.checkpoints.provider import CheckpointProvider, ExecutionLock
from playbooks.execution.channel import FrameReader, encode_frame
from playbooks.execution.plain_data import PlainDataError, encode_plain, is_plain

__all__ = ("STATUS", "main")

STATUS = struct.Struct("=QQQQ")
"""The status page: statement number (0: none running), its line, its start and end offsets."""

_SHORT_RETRY = 0.05  # s: a timer that fired inside the interpreter's machinery tries again this soon


class _LimitExceeded(Exception):
    """Raised into the LLM's code when it exceeds a limit; the executor reports it as the class named
    by ``__playbooks_error__`` with this message."""

    __playbooks_error__: type = Exception


@functools.cache
def _limit(error_class_name: str) -> type[_LimitExceeded]:
    """The exception raised into LLM code for the limit reported as ``error_class_name`` (one class
    per limit, made once)."""
    from playbooks import errors

    return type(
        f"{error_class_name}Exceeded", (_LimitExceeded,), {"__playbooks_error__": getattr(errors, error_class_name)}
    )


# ----------------------------------------------------------------- confinement


def _die_with_host(host: int) -> None:
    """Ask the kernel to kill this process when its parent (the host, process ``host``) dies; if it
    died before that took effect, go. (Not "the parent is process 1": in a container the host often
    is process 1.)"""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != host:
            os._exit(0)


def _confine(settings: Mapping[str, Any]) -> str:
    """Apply the limits of ``settings`` to this process; return what is enforced, in words."""
    from playbooks.execution import landlock

    limits = settings["limits"]
    report = []
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    if limits.memory_mb is not None:
        size = limits.memory_mb * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        report.append(f"memory: {limits.memory_mb} MB address space")
    if limits.cpu_seconds is not None:
        resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 5))
        report.append(f"cpu: {limits.cpu_seconds} s")
    if os.geteuid() == 0 and settings["drop_root"]:
        report.append(_drop_capabilities())
    report.append(landlock.restrict(settings["read_paths"], settings["write_paths"], network=limits.network))
    sys.setrecursionlimit(limits.recursion_limit)
    return "; ".join(report)


def _drop_capabilities() -> str:
    """A worker of a root host keeps uid 0 (the interpreter may live where only root reads) but gives
    up every capability: it cannot raise its limits, signal other users' processes or bypass file
    permissions; Landlock confines its files."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        for cap in range(64):
            libc.prctl(24, cap, 0, 0, 0)  # PR_CAPBSET_DROP (fails past the last capability: fine)
        header = struct.pack("=Ii", 0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this process
        data = ctypes.create_string_buffer(24)
        if libc.capset(ctypes.create_string_buffer(header, len(header)), data) != 0:
            return f"capabilities: kept (capset: {os.strerror(ctypes.get_errno())})"
    except (OSError, AttributeError) as exc:
        return f"capabilities: kept ({exc})"
    return "capabilities: none (the host runs as root)"


def _builtins_for_code(allow: Collection[str] | None, deny: Collection[str]) -> dict[str, Any]:
    """The builtins of the LLM's namespace: a module of its own (``import builtins; builtins.len =
    ...`` changes the LLM's ``len``, not the worker's) whose ``__import__`` applies the import policy
    to the LLM's own imports."""
    own = types.ModuleType("builtins", builtins.__doc__)
    own.__dict__.update(vars(builtins))
    real = builtins.__import__
    blocked = _limit("ImportBlockedError")

    def guarded(name: str, globals: Any = None, locals: Any = None, fromlist: Any = (), level: int = 0) -> Any:
        top = name.partition(".")[0]
        if level == 0 and (top in deny or (allow is not None and top not in allow)):
            raise blocked(f"import of {name!r} is not allowed in this sandbox (its import policy)")
        if level == 0 and name == "builtins":
            return own
        return real(name, globals, locals, fromlist, level)

    own.__import__ = guarded  # type: ignore[attr-defined]
    return own.__dict__


# ----------------------------------------------------------------- the channel, worker side


class _Channel:
    """The worker's end of the channel: blocking sends, an async reader, and sync round trips."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(True)
        self.sock = sock
        self.reader = FrameReader()
        self._ids = itertools.count(1)
        self.replies: dict[int, tuple[dict[str, Any], list[bytes]]] = {}
        self.waiting: dict[int, anyio.Event] = {}
        self.commands: deque[tuple[dict[str, Any], list[bytes]]] = deque()
        self.command_ready: anyio.Event | None = None
        self.on_request: Callable[[bool], None] | None = None  # pause (True) / resume the clock
        self.outbox: list[bytes] = []
        self.printed = False  # output waits in the outbox

    def send(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> None:
        """Send a message now, after the ones told before it."""
        self.tell(header, blobs)
        self.flush()

    def tell(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> None:
        """Queue a message that needs no answer (a write, output): it leaves with the next message
        sent, or at the next :meth:`flush`. Order is kept, so the host still serves a write before
        the call that follows it; one system call carries them all."""
        self.outbox.extend(encode_frame(header, blobs))
        if len(self.outbox) > 256:
            self.flush()

    def flush(self) -> None:
        parts, self.outbox = self.outbox, []
        try:
            while parts:  # (sendmsg takes at most IOV_MAX buffers at once)
                self.sock.sendall(b"".join(parts[:512]))
                del parts[:512]
        except OSError:
            os._exit(0)  # the host is gone

    def _dispatch(self, frames: list[tuple[dict[str, Any], list[bytes]]]) -> None:
        for header, blobs in frames:
            if header["op"] == "reply":
                key = int(header["id"])
                self.replies[key] = (header, blobs)
                event = self.waiting.pop(key, None)
                if event is not None:
                    event.set()
            else:
                self.commands.append((header, blobs))
                if self.command_ready is not None:
                    self.command_ready.set()

    def _received(self, data: bytes) -> None:
        if not data:
            os._exit(0)  # the host closed the channel (it died or closed the executor)
        self.reader.feed(data)
        self._dispatch(self.reader.frames())

    async def read_forever(self) -> None:
        """Read the host's messages as they come. Under asyncio a reader callback stays registered
        with the loop (an answer wakes its waiting call directly: no task switch, no re-registering
        per message); under trio a task waits for the socket."""
        if _on_asyncio():
            import asyncio

            loop = asyncio.get_running_loop()
            loop.add_reader(self.sock.fileno(), self._readable)
            try:
                await anyio.sleep_forever()
            finally:
                loop.remove_reader(self.sock.fileno())
        while True:
            await anyio.wait_readable(self.sock)
            self._readable()

    def _readable(self) -> None:
        try:
            data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return  # a sync round trip read it first
        except OSError:
            os._exit(0)
        self._received(data)

    def receive_blocking(self) -> tuple[dict[str, Any], list[bytes]]:
        """The next command, before the event loop runs (the ``init`` message)."""
        while not self.commands:
            self._received(self.sock.recv(1 << 20))
        return self.commands.popleft()

    async def request(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> tuple[dict[str, Any], list[bytes]]:
        key = next(self._ids)
        event = anyio.Event()
        self.waiting[key] = event
        self._pause(True)
        try:
            self.send({**header, "id": key}, blobs)
            await event.wait()
        finally:
            self.waiting.pop(key, None)
            self._pause(False)
        return self.replies.pop(key)

    def request_sync(self, header: dict[str, Any], blobs: tuple[bytes, ...] = ()) -> tuple[dict[str, Any], list[bytes]]:
        key = next(self._ids)
        self._pause(True)
        try:
            self.send({**header, "id": key}, blobs)
            while key not in self.replies:
                self._received(self.sock.recv(1 << 20))
        finally:
            self._pause(False)
        return self.replies.pop(key)

    def _pause(self, paused: bool) -> None:
        if self.on_request is not None:
            self.on_request(paused)


def _on_asyncio() -> bool:
    return "trio" not in sys.modules or not _in_trio()


def _in_trio() -> bool:
    import trio

    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        return False
    return True


def _host_error(header: Mapping[str, Any]) -> Exception:
    """The error a reply of the host carries (a failure of the host: storage, a value it cannot send)."""
    from playbooks import errors

    kind = getattr(errors, str(header.get("type", "")), None)
    if not (isinstance(kind, type) and issubclass(kind, errors.InterpreterError)):
        kind = errors.SandboxError
    error = kind.__new__(kind)
    Exception.__init__(error, str(header.get("message", "the host failed")))
    return error


class _RelayLock(ExecutionLock):
    def __init__(self, execution_id: str) -> None:
        self.execution_id = execution_id

    async def release(self) -> None:
        """The host holds the real lock."""


class _RelayProvider(CheckpointProvider):
    """A provider whose storage is the host's: records go over the channel, opaque to the host."""

    def __init__(self, channel: _Channel, journal_drop_batch: int) -> None:
        self.channel = channel
        self.journal_drop_batch = journal_drop_batch  # type: ignore[misc]

    async def _ask(self, method: str, blobs: tuple[bytes, ...] = (), **fields: Any) -> tuple[dict[str, Any], list[bytes]]:
        header, data = await self.channel.request({"op": "store", "method": method, **fields}, blobs)
        if not header.get("ok"):
            raise _host_error(header)
        return header, data

    def _tell(self, method: str, blobs: tuple[bytes, ...] = (), **fields: Any) -> None:
        self.channel.tell({"op": "store", "method": method, **fields}, blobs)

    # Writes (syncs included) are told, not asked: the host serves messages in order, so a write is
    # done (durable, for a sync) before the host runs the next call or shows the next output, and a
    # write that failed makes the host refuse them and answer the next request with the failure.

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        self._tell("save_checkpoint", (data,), cid=checkpoint_id, sync=sync)

    async def sync(self, execution_id: str) -> None:
        self._tell("sync", eid=execution_id)

    async def load_checkpoint(self, checkpoint_id: str) -> bytes | None:
        header, data = await self._ask("load_checkpoint", cid=checkpoint_id)
        return data[0] if data else None

    async def list_checkpoints(self, execution_id: str) -> list[str]:
        header, _ = await self._ask("list_checkpoints", eid=execution_id)
        return [str(cid) for cid in header["value"]]

    async def delete_checkpoint(self, checkpoint_id: str) -> bool:
        header, _ = await self._ask("delete_checkpoint", cid=checkpoint_id)
        return bool(header["value"])

    async def list_executions(self) -> list[str]:
        header, _ = await self._ask("list_executions")
        return [str(eid) for eid in header["value"]]

    async def acquire_lock(self, execution_id: str) -> ExecutionLock:
        return _RelayLock(execution_id)

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        self._tell("append_journal", (data,), eid=execution_id, counter=counter)

    async def sync_journal(self, execution_id: str) -> None:
        self._tell("sync_journal", eid=execution_id)

    async def read_journal(self, execution_id: str) -> list[tuple[int, bytes]]:
        header, data = await self._ask("read_journal", eid=execution_id)
        return list(zip((int(c) for c in header["value"]), data))

    async def drop_journal(self, execution_id: str, counters: Collection[int]) -> None:
        self._tell("drop_journal", eid=execution_id, counters=sorted(counters))

    async def write_head(self, execution_id: str, data: bytes) -> None:
        self._tell("write_head", (data,), eid=execution_id)

    async def read_head(self, execution_id: str) -> bytes | None:
        header, data = await self._ask("read_head", eid=execution_id)
        return data[0] if data else None


# ----------------------------------------------------------------- time limits


class _Clock:
    """A statement's (and the response's) wall time in the worker, paused while the host serves a
    call; when it runs out, the LLM's frame gets an exception (``SIGALRM``) or its ``await`` is
    cancelled (the cancel scope of the running command)."""

    def __init__(self, statement_timeout: float | None, response_timeout: float | None, status: mmap.mmap) -> None:
        self.statement_timeout = statement_timeout
        self.response_timeout = response_timeout
        self.status = status
        self.scope: anyio.CancelScope | None = None
        self.filename = ""
        self.number = 0
        self.lineno = 0
        self.running = False
        self.started = 0.0
        self.statement_spent = 0.0
        self.response_spent = 0.0
        self.paused = 0
        self.expired: str | None = None
        self._exceeded = _limit("TimeLimitError")
        signal.signal(signal.SIGALRM, self._alarm)

    def begin(self, lineno: int, start: int, end: int) -> None:
        """A statement starts."""
        self._settle()
        self.number += 1
        self.lineno = lineno
        self.statement_spent = 0.0
        self.expired = None
        STATUS.pack_into(self.status, 0, self.number, lineno, start, end)
        self.running = True
        self._arm()

    def command(self, scope: anyio.CancelScope | None) -> None:
        """A command (a chunk, finalize) starts (``scope``) or ends (``None``)."""
        self._settle()
        self.scope = scope
        if scope is None:
            self.running = False
            self._disarm()
        elif self.running:
            self._arm()

    def pause(self, paused: bool) -> None:
        if paused:
            self.paused += 1
            if self.paused == 1:
                self._settle()
                self._disarm()
        else:
            self.paused -= 1
            if self.paused == 0 and self.running and self.scope is not None:
                self._arm()

    def _settle(self) -> None:
        if self.started:
            spent = time.monotonic() - self.started
            self.statement_spent += spent
            self.response_spent += spent
            self.started = 0.0

    def _remaining(self) -> tuple[float, str]:
        left = [(math.inf, "")]
        if self.statement_timeout is not None:
            left.append((self.statement_timeout - self.statement_spent, "statement"))
        if self.response_timeout is not None:
            left.append((self.response_timeout - self.response_spent, "response"))
        return min(left)

    def _arm(self) -> None:
        remaining, _ = self._remaining()
        self.started = time.monotonic()
        if remaining == math.inf:
            return
        signal.setitimer(signal.ITIMER_REAL, max(remaining, 0.001))
        if self.scope is not None:
            self.scope.deadline = anyio.current_time() + max(remaining, 0.0) + _SHORT_RETRY

    def _disarm(self) -> None:
        signal.setitimer(signal.ITIMER_REAL, 0)
        if self.scope is not None:
            self.scope.deadline = math.inf

    def message(self) -> str:
        self._settle()
        self.started = time.monotonic()
        _, which = self._remaining()
        if which == "response":
            return f"the response's code ran longer than {self.response_timeout:g} s (response_timeout)"
        return f"statement at line {self.lineno} ran longer than {self.statement_timeout:g} s (statement_timeout)"

    def _alarm(self, signum: int, frame: FrameType | None) -> None:
        if not self.running or self.paused:
            return
        if _in_llm_code(frame, self.filename):
            self.expired = "time"
            raise self._exceeded(self.message())
        signal.setitimer(signal.ITIMER_REAL, _SHORT_RETRY)  # in the machinery: try again in a moment


def _in_llm_code(frame: FrameType | None, filename: str) -> bool:
    """Whether ``frame`` runs the LLM's code, or a library it called, and not the interpreter's own
    machinery (an exception raised there could tear a checkpoint)."""
    while frame is not None:
        code_file = frame.f_code.co_filename
        if code_file == filename:
            return True
        module = frame.f_globals.get("__name__", "")
        if isinstance(module, str) and module.startswith(("playbooks.", "anyio", "asyncio", "trio", "sniffio")):
            return False
        frame = frame.f_back
    return False


# ----------------------------------------------------------------- the worker


class _Output:
    """``sys.stdout``/``sys.stderr`` of the worker: text goes to the host, up to the output limit."""

    def __init__(self, channel: _Channel, stream: str, budget: list[int | None]) -> None:
        self.channel = channel
        self.stream = stream
        self.budget = budget
        self._exceeded = _limit("OutputLimitError")

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        left = self.budget[0]
        if left is not None:
            # A str has at most as many characters as its UTF-8 bytes: a huge one is refused unencoded.
            size = len(text) if len(text) > left else len(text.encode("utf-8", "replace"))
            if size > left:
                raise self._exceeded(
                    f"the code printed more than {self.budget[1]} bytes in one response (max_output_bytes)"
                )
            self.budget[0] = left - size
        if text:
            self.channel.tell({"op": "out", "stream": self.stream, "text": text})
            self.channel.printed = True
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


class _Worker:
    def __init__(self, channel: _Channel, settings: dict[str, Any], status: mmap.mmap) -> None:
        self.channel = channel
        self.settings = settings
        limits = settings["limits"]
        self.clock = _Clock(limits.statement_timeout, limits.response_timeout, status)
        channel.on_request = self.clock.pause
        self.budget: list[int | None] = [limits.max_output_bytes, limits.max_output_bytes]
        sys.stdout = _Output(channel, "stdout", self.budget)
        sys.stderr = _Output(channel, "stderr", self.budget)
        self.live: set[str] = set()
        # The exceptions the host's tools raised into the code (live or replayed), by call: an error
        # of the code whose chain holds one names that call to the host (see _raised_by_host).
        # (By id, holding the object: built-in exceptions take no weak references. A worker lives for
        # one response, so they are few.)
        self.raised: dict[int, tuple[BaseException, str]] = {}
        self.executor: Any = None
        self.memory_error = _limit("MemoryLimitError")

    # ----------------------------------------------------------------- tools

    def _stub(self, name: str, spec: Mapping[str, Any]) -> Callable[..., Any]:
        from playbooks.execution.retry import retry
        from playbooks.execution.tool_calls import cheap, current_tool_call

        channel = self.channel
        live = self.live

        def message(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
            call = current_tool_call()
            fields: dict[str, Any] = {"op": "call", "name": name}
            try:
                fields["args"] = encode_plain(list(args), f"the arguments of {name}()")
                fields["kwargs"] = encode_plain(kwargs, f"the keyword arguments of {name}()")
            except PlainDataError as exc:
                raise TypeError(str(exc)) from None
            if call is not None:
                fields.update(
                    key=call.idempotency_key, call_id=call.call_id, seq=call.seq, attempt=call.attempt,
                    resumed=call.resumed,
                )
                live.add(f"{call.idempotency_key}#{call.attempt}")
            return fields

        def answer(reply: tuple[dict[str, Any], list[bytes]], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            header, blobs = reply
            if header.get("host_error"):
                raise _host_error(header)
            if "args" in header:  # the tool changed its arguments (appended to a list): so do we
                _update_in_place([*args, *kwargs.values()], pickle.loads(blobs[1]))
            value = pickle.loads(blobs[0])
            if header.get("ok"):
                return value
            raise value

        if spec["async"]:

            async def async_stub(*args: Any, **kwargs: Any) -> Any:
                return answer(await channel.request(message(args, kwargs)), args, kwargs)

            stub: Callable[..., Any] = async_stub
        else:

            def sync_stub(*args: Any, **kwargs: Any) -> Any:
                return answer(channel.request_sync(message(args, kwargs)), args, kwargs)

            stub = sync_stub
        stub.__name__ = stub.__qualname__ = name
        stub.__doc__ = spec.get("doc")
        if spec.get("retry") is not None:
            stub = retry(spec["retry"])(stub)
        if spec.get("cheap"):
            stub = cheap(stub)
        return stub

    def _observe(self, call: Any, value: Any, error: BaseException | None) -> None:
        """Tell the host about a call the journal answered (it saw the live ones itself)."""
        if error is not None:
            self.raised[id(error)] = (error, call.idempotency_key)
        tag = f"{call.idempotency_key}#{call.attempt}"
        if tag in self.live:
            self.live.discard(tag)
            return
        self.channel.tell({
            "op": "replayed", "name": call.name, "key": call.idempotency_key, "call_id": call.call_id,
            "seq": call.seq, "attempt": call.attempt, "value": _shown(value) if error is None else None,
            "error": None if error is None else f"{type(error).__name__}: {error}",
            "error_type": None if error is None else f"{type(error).__module__}.{type(error).__qualname__}",
        })

    def _on_statement(self, statement: Any) -> None:
        self.clock.begin(statement.lineno, statement.start, statement.end)
        if self.channel.printed:  # what the last statement printed goes out before the next one runs
            self.channel.printed = False
            self.channel.flush()
        if self.settings["report_statements"]:
            self.channel.tell({
                "op": "statement", "source": statement.source, "start": statement.start, "end": statement.end,
                "lineno": statement.lineno, "col_offset": statement.col_offset,
                "end_lineno": statement.end_lineno, "end_col_offset": statement.end_col_offset,
            })

    # ----------------------------------------------------------------- commands

    async def _build(self) -> None:
        from playbooks.agent import Agent
        from playbooks.checkpoints.codec import RecordKey
        from playbooks.checkpoints.manager import CheckpointManager
        from playbooks.errors import LLMCodeError
        from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

        settings = self.settings
        limits = settings["limits"]
        tools = {name: self._stub(name, spec) for name, spec in settings["tools"].items()}
        agent = Agent(settings["agent_id"], tools=tools)
        namespace = pickle.loads(settings["namespace"])
        namespace["__builtins__"] = _builtins_for_code(
            None if limits.import_allow is None else set(limits.import_allow), set(limits.import_deny)
        )
        store = settings["store"]
        manager = CheckpointManager(
            store["execution_id"],
            _RelayProvider(self.channel, store["journal_drop_batch"]),
            key=RecordKey(store["run_key"], "the run key the host issued"),
            keep_last_n=store["keep_last_n"],
            max_checkpoint_size_mb=store["max_checkpoint_size_mb"],
            unpicklable=store["unpicklable"],
            snapshot_sync_every=store["snapshot_sync_every"],
        )
        manager.compress_over = store["compress_over"]
        manager.journal_sync_every = store["journal_sync_every"]
        manager.journal_sync_interval = store["journal_sync_interval"]
        resume = settings["resume"]
        hooks: dict[str, Any] = {"on_statement": self._on_statement, "on_call": self._observe}
        observer = _observer(settings.get("observer"), namespace)
        if observer is not None:
            observe = self._observe

            def on_call(call: Any, value: Any, error: BaseException | None) -> None:
                observer(call, value, error)
                observe(call, value, error)

            hooks["on_call"] = on_call
        frame_id = settings["frame_id"]
        if resume is not None or settings.get("inherit") is not None:
            await manager.load_records()
        if resume is not None and frame_id in manager.loaded_frame_ids() and not resume["feed"]:
            # Re-attached, not fed: the host feeds the response again (what had run is skipped).
            self.executor = StreamingPythonExecutor(
                agent, namespace=namespace, checkpoint_manager=manager, frame_id=frame_id,
                retry=settings["retry"], **hooks,
            )
        elif resume is not None and frame_id in manager.loaded_frame_ids():
            # (the replayed statements run under this command's clock, as live ones)
            self.executor = await StreamingPythonExecutor.resume_frame(
                agent, frame_id, checkpoint_manager=manager, namespace=namespace, upto=resume["upto"],
                retry=settings["retry"], **hooks,
            )
        else:
            inherit = settings.get("inherit")
            if inherit is not None:
                # The variables a finished frame of this execution ended with (the host's previous
                # response): restored into this namespace by re-attaching to it; nothing runs again.
                if inherit not in manager.loaded_frame_ids():
                    from playbooks.errors import CheckpointCorruptError

                    raise CheckpointCorruptError(
                        f"the checkpoints of frame {inherit!r} of execution {manager.execution_id!r} are "
                        "missing: the variables its code assigned cannot be restored"
                    )
                given = dict(namespace)
                StreamingPythonExecutor(agent, namespace=namespace, checkpoint_manager=manager, frame_id=inherit)
                namespace.update(given)
            self.executor = StreamingPythonExecutor(
                agent, namespace=namespace, checkpoint_manager=manager, frame_id=frame_id,
                retry=settings["retry"], **hooks,
            )
        self.clock.filename = self.executor.filename
        if resume is not None and resume["failure"] is not None:
            # Up to the statement that ended the old worker: the stored response may stop short of it.
            text = resume["text"]
            if len(self.executor.response) < len(text):
                with contextlib.suppress(LLMCodeError):
                    await self.executor.add_chunk(text[len(self.executor.response) :])
            self.executor.report_failure(pickle.loads(resume["failure"]))

    async def serve(self) -> None:
        self.channel.command_ready = anyio.Event()
        async with anyio.create_task_group() as group:
            group.start_soon(self.channel.read_forever)
            reply = await self._step(self._build())
            if reply["op"] == "done":
                executor = self.executor
                reply.update(response=len(executor.response), restored=executor.restored, report=self.settings["report"])
            self.channel.send(reply)
            while True:
                while not self.channel.commands:
                    await self.channel.command_ready.wait()
                    self.channel.command_ready = anyio.Event()
                header, _ = self.channel.commands.popleft()
                op = header["op"]
                if op == "close":
                    group.cancel_scope.cancel()
                    return
                if op == "chunk":
                    reply = await self._step(self.executor.add_chunk(header["text"]))
                elif op == "finalize":
                    reply = await self._step(self.executor.finalize())
                    if reply["op"] == "done":
                        reply.update(self._summary())
                elif op == "start":
                    reply = await self._step(self.executor.start())
                elif op == "checkpoint":
                    reply = await self._step(self.executor.checkpoint())
                elif op == "evaluate":
                    reply = self._evaluate(str(header.get("expression", "")))
                else:
                    reply = {"op": "fatal", "type": "SandboxError", "message": f"unknown command {op!r}"}
                self.channel.send(reply)

    async def _step(self, step: Any) -> dict[str, Any]:
        """Run one command; its reply (``done``, the LLM's ``error``, or a ``fatal`` host error)."""
        from playbooks.errors import InterpreterError, LLMCodeError

        scope = anyio.CancelScope()
        self.clock.command(scope)
        try:
            with scope:
                await step
        except LLMCodeError as exc:
            return self._error_reply(exc)
        except InterpreterError as exc:
            return {"op": "fatal", "type": type(exc).__name__, "message": str(exc)}
        except MemoryError:
            return self._stopped(self.memory_error("the code ran out of memory in the worker"))
        except Exception as exc:
            return {"op": "fatal", "type": "SandboxError",
                    "message": f"the worker failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}"}
        except BaseException as exc:  # SystemExit, KeyboardInterrupt, GeneratorExit from the LLM's code
            if isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            return self._stopped(exc, ended=True)
        finally:
            self.clock.command(None)
        if scope.cancelled_caught:
            return self._stopped(_limit("TimeLimitError")(self.clock.message()))
        return {"op": "done"}

    def _evaluate(self, expression: str) -> dict[str, Any]:
        """The value of a host's expression in the LLM's namespace, as plain data (nothing is
        journaled: a host reads the worker's state with it)."""
        try:
            value = eval(compile(expression, "<host expression>", "eval"), self.executor.namespace)
            return {"op": "done", "value": encode_plain(value, f"the value of {expression!r}")}
        except Exception as exc:
            return {"op": "done", "failed": type(exc).__name__, "message": str(exc)}

    def _stopped(self, exc: BaseException, *, ended: bool = False) -> dict[str, Any]:
        """A statement stopped by a limit outside its frame, or by a ``SystemExit`` it raised: the
        stream fails there, as if the statement had raised."""
        from playbooks.errors import CodeExecutionError, LLMCodeError, WorkerDiedError

        executor = self.executor
        source, lineno = _running_statement(executor, self.clock)
        if isinstance(exc, _LimitExceeded):
            error: LLMCodeError = exc.__playbooks_error__(str(exc), statement=source, lineno=lineno)
        elif ended:
            error = WorkerDiedError(
                f"{type(exc).__name__}: {exc} (LLM code may not end its process: return, or raise an "
                "exception)" if str(exc) else f"{type(exc).__name__} (LLM code may not end its process)",
                statement=source, lineno=lineno,
            )
        else:
            error = CodeExecutionError(f"{type(exc).__name__}: {exc}", statement=source, lineno=lineno)
        if executor is None:
            return {"op": "fatal", "type": "SandboxError", "message": str(error)}
        executor.report_failure(error)
        return self._error_reply(executor.error or error)

    def _error_reply(self, exc: Any) -> dict[str, Any]:
        from playbooks.errors import CodeExecutionError

        kind, message = type(exc).__name__, exc.message
        if type(exc) is CodeExecutionError and isinstance(exc.__cause__, MemoryError):
            kind = "MemoryLimitError"
            limit = self.settings["limits"].memory_mb
            message = f"{message.rstrip(': ')}: the code asked for more memory than the worker's {limit} MB (memory_mb)"
        return {
            "op": "error", "type": kind, "message": message, "statement": exc.statement,
            "lineno": exc.lineno, "col_offset": exc.col_offset, "executed_code": len(exc.executed_code),
            "traceback": exc.traceback_text, "raised": _raised_by_host(exc, self.raised),
        }

    def _summary(self) -> dict[str, Any]:
        executor = self.executor
        shown = {}
        expose = self.settings.get("expose", ())
        for name, value in executor.namespace.items():
            if (name.startswith("__") and name not in expose) or name in executor.bound:
                continue
            shown[name] = _shown(value)
        error = executor.error
        return {
            "executed_offset": executor.executed_offset, "statements": executor.statements_executed,
            "response": len(executor.response), "variables": shown,
            "error": None if error is None else self._error_reply(error),
        }


def _raised_by_host(error: BaseException, raised: Mapping[int, tuple[BaseException, str]]) -> list[dict[str, str]]:
    """The exceptions in ``error``'s chain that a host's tool raised (``raised``: live or replayed,
    by call), nearest first: the call each came from, its type's name and its message."""
    found: list[dict[str, str]] = []
    seen: set[int] = set()
    pending = [error.__cause__, error.__context__]
    while pending and len(found) < 8:
        exc = pending.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        known = raised.get(id(exc))
        if known is not None and known[0] is exc:
            key = known[1]
            try:
                message = str(exc)
            except Exception:
                message = "?"
            found.append({"key": key, "type": f"{type(exc).__module__}.{type(exc).__qualname__}", "message": message})
        pending += [exc.__cause__, exc.__context__]
    return found


def _observer(path: str | None, namespace: dict[str, Any]) -> Callable[[Any, Any, BaseException | None], None] | None:
    """The host's worker-side call observer (``"module:function"``, called as ``function(namespace,
    call, value, error)`` after every call ends, live or replayed): trusted code of the host's
    package that keeps notes in the namespace, so they are saved with its checkpoints."""
    if path is None:
        return None
    module, _, name = path.partition(":")
    function = getattr(importlib.import_module(module), name)

    def observe(call: Any, value: Any, error: BaseException | None) -> None:
        function(namespace, call, value, error)

    return observe


def _update_in_place(originals: list[Any], changed: list[Any]) -> None:
    """Give each mutable argument the contents the host's tool left in its copy of it."""
    for original, new in zip(originals, changed):
        if type(original) is not type(new) or original == new:
            continue
        if isinstance(original, (list, bytearray)):
            original[:] = new
        elif isinstance(original, (dict, set)):
            original.clear()
            original.update(new)


def _shown(value: Any) -> Any:
    """A value for the host: plain data as itself, anything else as its type and a short repr."""
    if is_plain(value):
        try:
            return {"plain": encode_plain(value)}
        except PlainDataError:
            pass
    try:
        text = repr(value)
    except Exception:
        text = "<unprintable>"
    return {"type": f"{type(value).__module__}.{type(value).__qualname__}", "repr": text[:200]}


def _running_statement(executor: Any, clock: _Clock) -> tuple[str, int | None]:
    if executor is None or not clock.number:
        return "", None
    _, lineno, start, end = STATUS.unpack_from(clock.status, 0)
    return executor.response[start:end], lineno


def _preload() -> None:
    """Import what running code needs while waiting for ``init`` (a worker started ahead is warm)."""
    import playbooks.agent  # noqa: F401
    import playbooks.checkpoints.manager  # noqa: F401
    import playbooks.execution.durable  # noqa: F401
    import playbooks.execution.landlock  # noqa: F401
    import playbooks.execution.streaming_python_executor  # noqa: F401


def main() -> None:
    _die_with_host(int(sys.argv[3]))
    # ``kill -USR1 PID`` writes the worker's stacks to worker.stderr in its scratch folder.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    channel = _Channel(socket.socket(fileno=int(sys.argv[1])))
    status_fd = int(sys.argv[2])
    status = mmap.mmap(status_fd, STATUS.size)
    _preload()
    header, blobs = channel.receive_blocking()
    settings = pickle.loads(blobs[0])
    sys.path[:] = settings["sys_path"]
    os.environ.update(settings["env"])
    settings["report"] = _confine(settings)
    worker = _Worker(channel, settings, status)
    anyio.run(worker.serve, backend=settings["backend"])
    os._exit(0)


if __name__ == "__main__":
    main()
