"""The program runtime: run a parsed ``.pb`` program, playbook by playbook, with an LLM writing the code.

Theory of operation
-------------------
Each agent of the program becomes a :class:`RuntimeAgent`: an object with the agent's *tools* (the
built-ins of :mod:`playbooks.program.builtins`, ``print``, every playbook of the agent and the public
playbooks of the other agents), the module globals its python blocks ran in, and an inbox.

A run starts the first agent's start playbook (``Main``, or the first whose trigger says "at the
beginning"), and at the same time the start playbook of every other agent that has one. The run ends
when the first agent's start playbook has finished and every other agent has finished too or sits idle
in ``WaitForMessage``; if the first agent waits for a message while every running agent waits too, the
run fails with :class:`DeadlockError`.

Calling a playbook (:meth:`ProgramRuntime._call_playbook`) makes a :class:`PlaybookFrame`:

* a **python** playbook (an ``@playbook async def``) is awaited; its globals hold the same tools, so it
  calls built-ins and other playbooks by name;
* a **markdown** playbook is a conversation with the LLM (:meth:`ProgramRuntime._run_markdown`): each
  response is streamed into a fresh :class:`~playbooks.execution.StreamingPythonExecutor` sharing the
  frame's namespace, so its statements run while it streams. ``Return(value)`` ends the playbook; code
  that ends without it gets a continuation message (calls, printed output, variables), a failing
  statement gets an error message (``max_retries`` failures in a row are allowed), and at most
  ``max_llm_calls`` responses are asked for.

The frame being run is in a context variable, so a built-in knows which playbook called it. Every side
effect goes through one small method: :meth:`ProgramRuntime._stream_llm` (LLM requests),
:meth:`~ProgramRuntime._new_executor` (every executor), :meth:`~ProgramRuntime._write_output` (``Say``
to the user), :meth:`~ProgramRuntime._read_input` (``AskUser``), :meth:`~ProgramRuntime._deliver` and
:meth:`~ProgramRuntime._receive` (messages), :meth:`~ProgramRuntime._emit` (progress events). Every
built-in and playbook call from LLM code is a tool call through the executor's interceptor.
"""

from __future__ import annotations

import contextvars
import copy
import hashlib
import inspect
import itertools
import os
import secrets
import stat
import sys
import traceback
import types
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import anyio
import anyio.to_thread

from playbooks.agent import Agent
from playbooks.checkpoints.manager import CheckpointManager
from playbooks.errors import CodeSyntaxError, HostIOError, InterpreterError, LLMCodeError, PlaybooksError
from playbooks.execution.durable import current_durable_call
from playbooks.execution.isolated_executor import IsolatedPythonExecutor, OpaqueValue, RecordedError
from playbooks.execution.retry import RetryPolicy
from playbooks.execution.sandbox import SandboxLimits
from playbooks.execution.statement_splitter import Statement, StatementSplitter
from playbooks.execution.streaming_python_executor import ExecutionResult, StreamingPythonExecutor
from playbooks.execution.tool_calls import ToolCall, ToolCallInterceptor, current_tool_call
from playbooks.llm.base import LLMProvider, LLMRequest, Message, Usage
from playbooks.llm.replay import ReplayProvider
from playbooks.program.builtins import AgentMessage, PlaybookReturn, make_builtins, playbook
from playbooks.program.model import AgentSpec, PlaybookSpec, Program, ProgramError
from playbooks.program.handles import _CURRENT_FRAME, AgentHandle, current_frame
from playbooks.program.prompt import (
    _NOTES,
    _PRINTED,
    _RETURNED,
    _STEP,
    _TRACE,
    ResponseReport,
    continuation_note,
    continuation_prompt,
    describe_value,
    note_call,
    error_prompt,
    playbook_prompt,
    system_prompt,
)

__all__ = (
    "AgentHandle",
    "AnswerNeeded",
    "CodeFailed",
    "CodeStatement",
    "DeadlockError",
    "LLMCallFinished",
    "LLMCallStarted",
    "MessageSent",
    "PlaybookFinished",
    "PlaybookFrame",
    "PlaybookRunError",
    "PlaybookStarted",
    "Printed",
    "ProgramIO",
    "ProgramInputError",
    "ProgramRuntime",
    "RunEvent",
    "RunResult",
    "RuntimeAgent",
    "Said",
    "StepStarted",
    "current_frame",
)


# --------------------------------------------------------------------------------------------------
# Errors.


class PlaybookRunError(PlaybooksError):
    """Raised when a playbook cannot finish: its LLM code kept failing, it made too many LLM calls, a
    python playbook raised, or the agents' python code failed to load. ``agent``/``playbook`` say where
    (``None`` when the failure is not tied to one)."""

    def __init__(self, message: str, *, agent: str | None = None, playbook: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.agent = agent
        self.playbook = playbook


class ProgramInputError(PlaybookRunError):
    """Raised when ``AskUser`` needs a line but the input has ended."""


class AnswerNeeded(BaseException):
    """Raised by ``AskUser`` when the run suspends for a person's answer (``ProgramIO(suspend=True)``)
    instead of waiting for it. A ``BaseException``, like ``KeyboardInterrupt``: the LLM's code cannot
    catch it, and the ``AskUser`` call stays unfinished in the journal (its question asked, no
    answer recorded), so the resume that brings the answer runs it again and records the answer once.
    """

    def __init__(self, question: str, agent: str, playbook: str) -> None:
        super().__init__(question)
        self.question = question
        self.agent = agent
        self.playbook = playbook


class DeadlockError(PlaybookRunError):
    """Raised when the first agent waits for a message that no running agent can send any more."""


_FATAL: tuple[type[BaseException], ...] = (InterpreterError, PlaybookRunError)
"""Errors that end the run even when raised inside LLM code: outages, set-up mistakes, failed playbooks."""
_FATAL_NAMES = frozenset(
    {f"{__name__}.{name}" for name in ("PlaybookRunError", "ProgramInputError", "DeadlockError")}
)
"""The run's own fatal errors by type name, as an isolated worker names a replayed one."""
_RETURN_NAME = f"{PlaybookReturn.__module__}.{PlaybookReturn.__qualname__}"


# --------------------------------------------------------------------------------------------------
# Events.


@dataclass(frozen=True, slots=True)
class PlaybookStarted:
    """A playbook was called (``depth`` 0 for an agent's start playbook)."""

    agent: str
    playbook: str
    kind: Literal["markdown", "python"]
    args: Mapping[str, Any]
    depth: int


@dataclass(frozen=True, slots=True)
class PlaybookFinished:
    """A playbook returned ``value``, or failed with ``error`` (its message)."""

    agent: str
    playbook: str
    depth: int
    value: Any = None
    error: str | None = None


@dataclass(frozen=True, slots=True)
class StepStarted:
    """``Step(step_id)`` was called; ``text`` is the step's text (empty when the playbook has no steps)."""

    agent: str
    playbook: str
    step_id: str
    text: str
    depth: int


@dataclass(frozen=True, slots=True)
class Said:
    """``Say("user", message)`` (or ``AskUser``'s question) was shown to the user."""

    agent: str
    message: str


@dataclass(frozen=True, slots=True)
class MessageSent:
    """A message went into ``recipient``'s inbox."""

    sender: str
    recipient: str
    message: Any


@dataclass(frozen=True, slots=True)
class LLMCallStarted:
    """The ``number``-th LLM request (1-based) of a run of a markdown playbook is about to be sent."""

    agent: str
    playbook: str
    number: int
    depth: int


@dataclass(frozen=True, slots=True)
class LLMCallFinished:
    """The ``number``-th LLM call of a markdown playbook ended; the tokens the endpoint reported for it
    (0 and 0 when it reports none)."""

    agent: str
    playbook: str
    number: int
    depth: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class CodeStatement:
    """A statement of the LLM's code is about to run (``lineno`` in the LLM's response)."""

    agent: str
    playbook: str
    lineno: int
    source: str
    depth: int


@dataclass(frozen=True, slots=True)
class CodeFailed:
    """A statement of the LLM's code failed; the error goes back to the LLM if ``retries_left`` >= 0."""

    agent: str
    playbook: str
    message: str
    lineno: int | None
    retries_left: int
    depth: int


@dataclass(frozen=True, slots=True)
class Printed:
    """LLM code printed ``text`` (it is reported to the LLM in the next message)."""

    agent: str
    playbook: str
    text: str
    depth: int


RunEvent = (
    PlaybookStarted
    | PlaybookFinished
    | StepStarted
    | Said
    | MessageSent
    | LLMCallStarted
    | LLMCallFinished
    | CodeStatement
    | CodeFailed
    | Printed
)


# --------------------------------------------------------------------------------------------------
# User input and output.


class ProgramIO:
    """Where ``Say("user", ...)`` goes and where ``AskUser`` reads from.

    ``output`` is called with each message (it may be async); by default messages are printed to
    standard output. ``input`` is where answers come from: ``None`` reads lines from standard input; an
    object with ``receive()`` (an anyio memory object stream) or ``get()`` (an ``asyncio.Queue``) is
    awaited; a callable is called (and awaited if it returns an awaitable); any other iterable (a list
    of answers, say) is consumed item by item. When the input ends, ``AskUser`` raises
    :class:`ProgramInputError`.
    """

    def __init__(
        self, *, input: Any = None, output: Callable[[str], Any] | None = None, suspend: bool = False
    ) -> None:
        self.suspend = suspend
        """When the input has no answer left, ``AskUser`` raises :class:`AnswerNeeded` (the run
        suspends) instead of :class:`ProgramInputError`; with ``suspend`` and no ``input``, standard
        input is not read."""
        if suspend and input is None:
            input = []
        self._input = input
        self._iterator: Iterator[Any] | None = None
        if input is not None and not (
            hasattr(input, "receive") or hasattr(input, "get") or callable(input)
        ):
            if isinstance(input, (str, bytes)) or not isinstance(input, Iterable):
                raise TypeError(f"ProgramIO input must be a queue, a stream, a callable or an iterable, got {input!r}")
            self._iterator = iter(input)
        self._output = output
        self._stdin = b""  # standard input read but not answered yet

    async def say(self, message: str) -> None:
        """Show ``message`` to the user."""
        if self._output is None:
            try:
                sys.stdout.write(message + "\n")
                sys.stdout.flush()
            except OSError as exc:  # a closed pipe, a full disk: the host's failure, not the code's
                raise HostIOError(f"cannot write to standard output: {exc.strerror or exc}") from exc
            return
        result = self._output(message)
        if inspect.isawaitable(result):
            await result

    async def _stdin_line(self) -> str:
        """The next line of standard input (``""`` at its end).

        The descriptor is read directly once it is readable, so a cancelled wait (Ctrl-C) leaves no
        thread blocked in ``readline`` that would keep the process waiting for Enter and eat the next
        line typed into the shell. Without a usable descriptor, a worker thread reads the line.
        """
        try:
            fd = sys.stdin.fileno()
            regular = stat.S_ISREG(os.fstat(fd).st_mode)
        except (AttributeError, OSError, ValueError):
            return str(await anyio.to_thread.run_sync(sys.stdin.readline, abandon_on_cancel=True))
        while b"\n" not in self._stdin:
            if not regular:
                await anyio.wait_readable(fd)
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            self._stdin += chunk
        line, newline, self._stdin = self._stdin.partition(b"\n")
        return (line + newline).decode(sys.stdin.encoding or "utf-8", "replace")

    async def read_line(self) -> str:
        """Return the user's next answer (without its line ending)."""
        source = self._input
        if self._iterator is not None:
            try:
                value = next(self._iterator)
            except StopIteration:
                raise ProgramInputError("AskUser: no more answers in the program's input") from None
        elif source is None:
            line = await self._stdin_line()
            if not line:
                raise ProgramInputError("AskUser: standard input ended before the user answered")
            value = line
        elif hasattr(source, "receive"):
            try:
                value = await source.receive()
            except (anyio.EndOfStream, anyio.ClosedResourceError):
                raise ProgramInputError("AskUser: the input stream was closed") from None
        elif hasattr(source, "get"):
            value = await source.get()
        else:
            value = source()
            if inspect.isawaitable(value):
                value = await value
        return str(value).rstrip("\r\n")


# --------------------------------------------------------------------------------------------------
# Agents and frames.


class RuntimeAgent:
    """An agent at run time: its spec, tools (``id``/``tools`` make it an executor agent), module
    globals (where its python blocks ran) and inbox."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.id = spec.name
        self.tools: dict[str, Callable[..., Any]] = {}
        self.globals: dict[str, Any] = {}
        self.functions: dict[str, Callable[..., Awaitable[Any]]] = {}
        self.inbox: list[AgentMessage] = []
        self.changed: anyio.Event | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"RuntimeAgent({self.name!r})"


@dataclass(eq=False)
class PlaybookFrame:
    """One call of a playbook: what runs, its arguments and namespace, and what its code has done.

    ``frame_id`` is a stable path (``"Agent"``, then ``"Agent.1"`` for its first child call, ...).
    """

    agent: RuntimeAgent
    spec: PlaybookSpec
    args: dict[str, Any]
    frame_id: str
    depth: int
    namespace: dict[str, Any] = field(default_factory=dict)
    current_step: str | None = None
    returned: bool = False
    return_value: Any = None
    llm_calls: int = 0
    turn_ran: bool = False
    children: Iterator[int] = field(default_factory=lambda: itertools.count(1))
    scope_id: str = ""
    """The durable frame of a markdown playbook call (its LLM turns are its calls)."""
    code_store: CheckpointManager | None = None
    """Isolated runs: the execution holding the checkpoints of this call's LLM code (its workers')."""


@dataclass(frozen=True)
class RunResult:
    """What a run produced: the first agent's start playbook's return value, and some totals."""

    value: Any
    agent: str
    playbook: str
    llm_calls: int
    said: tuple[str, ...]
    usage: Usage = Usage()
    """Tokens the endpoint reported for this run's LLM requests (zero when it reports none)."""


_ROOT_AGENT: contextvars.ContextVar[str | None] = contextvars.ContextVar("playbooks_root_agent", default=None)


def _frame_name(frame: PlaybookFrame) -> str | None:
    """The durable frame id of a playbook call: ``None`` for a child of the durable call running it
    (the executor derives it); a start playbook's is its agent's name; one called by an isolated
    worker's code (whose call is no durable call of this process) is named after that call's
    idempotency key, which a resumed run gives the same call again."""
    if current_durable_call() is not None:
        return None
    call = current_tool_call()
    if call is None:
        return frame.agent.name
    return f"{frame.agent.name}@{hashlib.sha256(call.idempotency_key.encode()).hexdigest()[:16]}"


def _fatal_cause(error: BaseException | None) -> BaseException | None:
    """The outage or failed playbook behind an error of LLM code, if there is one."""
    seen: set[int] = set()
    pending = [error.__cause__, error.__context__] if error is not None else []
    while pending:
        exc = pending.pop(0)
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if isinstance(exc, _FATAL):
            return exc
        if isinstance(exc, RecordedError) and exc.type_name in _FATAL_NAMES:
            # (an isolated worker's replay of a call that had failed so before a crash)
            return PlaybookRunError(str(exc).partition(": ")[2] or str(exc))
        pending += [exc.__cause__, exc.__context__]
    return None


def _returned(error: BaseException | None) -> bool:
    cause = error.__cause__ if error is not None else None
    return isinstance(cause, PlaybookReturn) or (
        isinstance(cause, RecordedError) and cause.type_name == _RETURN_NAME
    )


# --------------------------------------------------------------------------------------------------
# The runtime.


_LOOP = "__playbook_loop__"
_MAILBOX = "mailbox"
_TURN = "__llm_turn__"
_CUT = "__turn_cut__"
_LLM_FRAME = "__llm_frame__"
_NOT_VARIABLES = frozenset(
    {"builtins.module", "builtins.function", "builtins.type", f"{AgentHandle.__module__}.AgentHandle"}
)
"""Types of a worker's values that a report leaves out, as it leaves them out in-process."""


@dataclass
class _TurnOutcome:
    """One LLM call of a markdown playbook and the run of its response: what the loop needs next.

    It is the result of a durable call, so after a crash a finished turn is replayed from the journal
    (no new request) and only the turn that was cut off runs again.
    """

    response: str
    error: LLMCodeError | None
    returned: bool
    return_value: Any
    report: ResponseReport
    frame_id: str = ""
    """The durable frame that ran the response: its final snapshot holds what the code assigned."""
    preamble: tuple[Message, ...] = ()
    """Responses a crash cut off, each with the message that asked for the rest, before ``response``."""


class ProgramRuntime:
    """Run ``program`` with ``llm`` writing the code of its markdown playbooks.

    * ``io``: user input and output (default: standard input and output).
    * ``on_event``: called with every :data:`RunEvent`, for progress displays.
    * ``max_retries``: how many failing responses in a row a playbook may get past (each failure is
      shown to the LLM); one more and the playbook fails with :class:`PlaybookRunError`.
    * ``max_llm_calls``: the most LLM responses one call of a markdown playbook may take.
    * ``entry_agent``: the agent whose start playbook is the run's result (default: the first).
    * ``model``/``temperature``/``max_tokens``: sent with every request (``None``: the provider's defaults).
    * ``continuation``: how a live model goes on with a response a crash cut off: ``"message"`` (a new
      message shows it what ran and asks for the rest) or, for an endpoint that continues a partial
      assistant message (``OpenAIProvider(continuation=...)``), anything else: the request ends with
      that partial message (``LLMRequest.continue_final``).
    * ``stream``: run statements as the response streams (default); ``False`` receives the whole
      response before running any of it.
    * ``run_id``: scopes the tool calls' idempotency keys (default: the program file's name).
    * ``checkpoint_manager``: makes the run durable. Every markdown playbook call is a frame whose
      LLM calls are durable calls (a finished response is never requested again after a crash) and
      whose responses run in child executors; built-ins and playbook calls are journaled tool calls.
      A runtime built on a manager whose records were loaded (``await manager.load_records()``)
      resumes the run: each frame re-attaches to its checkpoints.
    * ``isolation``: run the LLM's code in limited worker processes
      (:class:`~playbooks.execution.IsolatedPythonExecutor`) with these limits; ``None`` runs it in
      this process (trusted code). Tools, built-ins, playbooks and the LLM stay in this process. Each
      markdown playbook call keeps its code's checkpoints in an execution of its own (the run's id,
      ``~`` and the call's frame), written only by its worker; without ``checkpoint_manager`` they
      are kept in memory, so a worker that dies is still replaced without repeating a call.

    The agents' python blocks run when the runtime is built; a failure there raises
    :class:`PlaybookRunError` naming the file and line.
    """

    def __init__(
        self,
        program: Program,
        *,
        llm: LLMProvider,
        io: ProgramIO | None = None,
        on_event: Callable[[RunEvent], None] | None = None,
        max_retries: int = 2,
        max_llm_calls: int = 20,
        entry_agent: str | None = None,
        model: str | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
        continuation: str = "message",
        stream: bool = True,
        run_id: str | None = None,
        checkpoint_manager: CheckpointManager | None = None,
        tool_retry: RetryPolicy | None = None,
        isolation: SandboxLimits | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if max_llm_calls < 1:
            raise ValueError(f"max_llm_calls must be >= 1, got {max_llm_calls}")
        if not program.agents:
            raise ProgramError(f"program {program.path} has no agents")
        self.program = program
        self.llm = llm
        self.io = io if io is not None else ProgramIO()
        self.on_event = on_event
        self.max_retries = max_retries
        self.tool_retry = tool_retry
        """The retry policy of tool calls made by the program's code (``None``: one attempt each)."""
        self.max_llm_calls = max_llm_calls
        self.model = model
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.continuation = continuation
        self.stream = stream
        self.run_id = run_id or os.path.basename(program.path)
        self.isolation = isolation
        self.manager = checkpoint_manager
        self._memory_manager: CheckpointManager | None = None
        self.entry = program.agent(entry_agent) if entry_agent is not None else program.agents[0]
        self.agents: dict[str, RuntimeAgent] = {spec.name: RuntimeAgent(spec) for spec in program.agents}
        self._system_prompts = {
            spec.name: system_prompt(spec, [other for other in program.agents if other is not spec])
            for spec in program.agents
        }
        for agent in self.agents.values():
            agent.tools = self._make_tools(agent)
        for agent in self.agents.values():
            self._load_python(agent)
        self._reset()

    def _reset(self) -> None:
        self.llm_calls = 0
        self.usage = Usage()
        self.said: list[str] = []
        self._live: set[str] = set()
        self._waiting: dict[str, tuple[str, str | None]] = {}
        self._entry_done = False
        self._scope: anyio.CancelScope | None = None
        self._failure: BaseException | None = None
        self._sent: set[str] = set()
        self._received: dict[str, AgentMessage] = {}
        for agent in self.agents.values():
            agent.inbox.clear()
            agent.changed = None
        self._load_mailbox()

    # ------------------------------------------------------------------ set-up

    def _make_tools(self, agent: RuntimeAgent) -> dict[str, Callable[..., Any]]:
        """The agent's tools: its playbooks, other agents' public playbooks, built-ins and ``print``."""
        tools: dict[str, Callable[..., Any]] = {}
        for spec in agent.spec.playbooks.values():
            tools[spec.name] = self._playbook_tool(agent, spec)
        for other in self.agents.values():
            if other is agent:
                continue
            for spec in other.spec.playbooks.values():
                if spec.public:
                    name = f"{other.name}.{spec.name}"
                    tools[name] = self._playbook_tool(other, spec)
        for name, builtin in make_builtins(self).items():
            tools[name] = builtin
        tools["print"] = self._print
        return tools

    def _playbook_tool(self, agent: RuntimeAgent, spec: PlaybookSpec) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return await self._call_playbook(agent, spec, args, kwargs)

        call.__name__ = call.__qualname__ = spec.name
        call.__doc__ = spec.description or None
        return call

    def _handles(self, agent: RuntimeAgent) -> dict[str, AgentHandle]:
        """``OtherAgent`` objects for ``agent``'s code, one per other agent."""
        return {
            other.name: AgentHandle(other.name, [spec.name for spec in other.spec.playbooks.values() if spec.public])
            for other in self.agents.values()
            if other is not agent
        }

    def _load_python(self, agent: RuntimeAgent) -> None:
        """Run the agent's python blocks as its module code and collect its ``@playbook`` functions.

        The globals then hold the agent's tools, so a python playbook calling another playbook by name
        goes through the runtime like LLM code does; and ``print`` (:func:`_python_print`), which in a
        durable run is a journaled call of the running python playbook's frame.
        """
        path = self.program.path
        tools = {
            name: _frame_tool(name, fn) for name, fn in agent.tools.items() if name != "print" and "." not in name
        }
        namespace: dict[str, Any] = {
            "__name__": f"playbooks_agent_{agent.name}",
            "__file__": path,
            "playbook": playbook,
            "AgentMessage": AgentMessage,
            "print": _python_print,
        }
        namespace.update(tools)
        namespace.update(self._handles(agent))
        for block in agent.spec.code_blocks:
            try:
                code = compile("\n" * (block.line - 1) + block.source, path, "exec")
                exec(code, namespace)
            except Exception as exc:
                line = _program_line(exc, path) or block.line
                raise PlaybookRunError(
                    f"{path}:{line}: the python code of agent {agent.name} failed: {type(exc).__name__}: {exc}",
                    agent=agent.name,
                ) from exc
        for spec in agent.spec.playbooks.values():
            if spec.kind != "python":
                continue
            function = namespace.get(spec.name)
            if not inspect.iscoroutinefunction(function):
                raise PlaybookRunError(
                    f"{path}:{spec.line}: python playbook {agent.name}.{spec.name} is not an async function "
                    "after the agent's code ran (was it redefined?)",
                    agent=agent.name,
                    playbook=spec.name,
                )
            agent.functions[spec.name] = function
            namespace[spec.name] = tools[spec.name]
        agent.globals = namespace

    # ------------------------------------------------------------------ running

    async def run(self, *args: Any, **kwargs: Any) -> RunResult:
        """Run the program: the entry agent's start playbook with these arguments, and every other
        agent's start playbook (without arguments) alongside it. Return its result.

        Raises :class:`PlaybookRunError` (a playbook failed, :class:`DeadlockError`, ...), the LLM
        layer's :class:`~playbooks.llm.LLMError` (no endpoint, cassette exhausted or mismatched) or
        :class:`ProgramError` (no start playbook).
        """
        if self.isolation is not None and (self.manager is None or self.manager is self._memory_manager):
            # The workers' frames need somewhere to be resumed from when one dies: memory will do
            # (a new store for each run, as a run without checkpoints starts afresh).
            from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider

            self.manager = self._memory_manager = CheckpointManager(
                f"run-{secrets.token_hex(6)}", MemoryCheckpointProvider(), key=secrets.token_bytes(32),
                keep_last_n=2,
            )
        self._reset()
        entry = self.agents[self.entry.name]
        entry_spec = entry.spec.main_playbook()
        starts: list[tuple[RuntimeAgent, PlaybookSpec]] = [(entry, entry_spec)]
        for agent in self.agents.values():
            if agent is entry:
                continue
            try:
                spec = agent.spec.main_playbook()
            except ProgramError:
                continue  # a passive agent: it only serves calls to its public playbooks
            required = [p for p in spec.params if not p.startswith("*")] if spec.kind == "markdown" else []
            if required:
                raise ProgramError(
                    f"{self.program.path}:{spec.line}: agent {agent.name} starts with {spec.name}, which takes "
                    f"arguments ({', '.join(required)}); only the first agent's start playbook gets arguments"
                )
            starts.append((agent, spec))
        result: list[Any] = []
        self._live = {agent.name for agent, _ in starts}
        async with anyio.create_task_group() as group:
            self._scope = group.cancel_scope
            for agent, spec in starts:
                is_entry = agent is entry
                group.start_soon(
                    self._run_agent, agent, spec, args if is_entry else (), kwargs if is_entry else {},
                    result if is_entry else None,
                )
        self._scope = None
        if self._failure is not None:
            raise self._failure
        return RunResult(
            value=result[0] if result else None,
            agent=entry.name,
            playbook=entry_spec.name,
            llm_calls=self.llm_calls,
            said=tuple(self.said),
            usage=self.usage,
        )

    async def _run_agent(
        self,
        agent: RuntimeAgent,
        spec: PlaybookSpec,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        result: list[Any] | None,
    ) -> None:
        _ROOT_AGENT.set(agent.name)
        try:
            value = await self._call_playbook(agent, spec, args, kwargs)
        except PlaybooksError as exc:
            self._fail(exc)
            return
        except Exception as exc:
            where = _program_line(exc, self.program.path)
            at = f"{self.program.path}:{where}: " if where else ""
            error = PlaybookRunError(
                f"{at}playbook {agent.name}.{spec.name} failed: {type(exc).__name__}: {exc}",
                agent=agent.name,
                playbook=spec.name,
            )
            error.__cause__ = exc
            self._fail(error)
            return
        if result is not None:
            result.append(value)
            self._entry_done = True
        self._live.discard(agent.name)
        self._check_quiescence()

    def _fail(self, error: BaseException) -> None:
        if self._failure is None:
            self._failure = error
        if self._scope is not None:
            self._scope.cancel()

    def _check_quiescence(self) -> None:
        """End the run when nothing can happen any more: every live agent waits for a message."""
        if self._scope is None or any(name not in self._waiting for name in self._live):
            return
        if self._entry_done:
            self._scope.cancel()  # the others are idle, waiting for messages nobody will send
            return
        waits = "; ".join(
            f"{root} waits for a message to {agent} from {sender or 'anyone'}"
            for root, (agent, sender) in sorted(self._waiting.items())
        )
        self._fail(DeadlockError(f"deadlock: every running agent waits for a message ({waits})"))

    async def _call_playbook(
        self, agent: RuntimeAgent, spec: PlaybookSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> Any:
        """Call a playbook (from LLM code, a python playbook or the run itself) and return its value."""
        parent = _CURRENT_FRAME.get()
        bound = _bind_arguments(spec, args, kwargs) if spec.kind == "markdown" else {}
        frame = PlaybookFrame(
            agent=agent,
            spec=spec,
            args=bound,
            frame_id=f"{parent.frame_id}.{next(parent.children)}" if parent is not None else agent.name,
            depth=parent.depth + 1 if parent is not None else 0,
            namespace=dict(bound),
        )
        shown = bound if spec.kind == "markdown" else _python_arguments(spec, args, kwargs)
        self._emit(PlaybookStarted(agent.name, spec.name, spec.kind, shown, frame.depth))
        token = _CURRENT_FRAME.set(frame)
        try:
            if spec.kind == "markdown":
                value = await self._run_markdown(frame)
            else:
                value = await self._run_python(frame, args, kwargs)
        except Exception as exc:
            self._emit(PlaybookFinished(agent.name, spec.name, frame.depth, error=f"{type(exc).__name__}: {exc}"))
            raise
        finally:
            _CURRENT_FRAME.reset(token)
        self._emit(PlaybookFinished(agent.name, spec.name, frame.depth, value=value))
        return value

    async def _run_python(self, frame: PlaybookFrame, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        """Await a python playbook. In a durable run it is a frame of its own: the built-ins, playbooks
        and tools it calls are journaled calls of that frame, so after a crash it runs again from its
        start with its finished calls replayed (nothing said twice), and a call that had finished
        returns its stored outcome without running at all."""
        function = frame.agent.functions[frame.spec.name]
        executor = self._python_executor(frame)
        if executor is None:
            try:
                return await function(*args, **kwargs)
            except PlaybookReturn as returned:
                return returned.value
        if executor.finished:  # it had finished before the crash: its outcome is in its final snapshot
            return _stored_outcome(frame, executor.namespace)
        if not executor.restored:
            await executor.start()  # before the function runs: its prints are recorded at once
        try:
            value = await function(*args, **kwargs)
        except PlaybookReturn as returned:
            value = returned.value
        except Exception as exc:
            if not isinstance(exc, InterpreterError):
                executor.namespace[_OUTCOME] = ("raise", _pickled(exc))
                await executor.finalize()
            raise
        executor.namespace[_OUTCOME] = ("value", _pickled(value))
        await executor.finalize()
        return value

    def _python_executor(self, frame: PlaybookFrame) -> StreamingPythonExecutor | None:
        """The durable frame of a python playbook call (``None`` when the run is not durable).

        No code is fed to it: it only journals the calls the function makes, through its bound tools,
        which the function's globals reach by name (see :func:`_frame_tool`) and agent handles through
        the frame's namespace. A start playbook's frame is named after its agent; a nested one derives
        from the call that runs it.
        """
        if self.manager is None:
            return None
        explicit = _frame_name(frame)
        # Without the agent's ``print`` (LLM code's, which keeps the text for the LLM), the executor
        # binds its own durable ``print``: the line goes to standard output, as a python playbook's
        # print always did, and is journaled (record made before the line is written, stored right after).
        tools = {name: tool for name, tool in frame.agent.tools.items() if name != "print"}
        executor = StreamingPythonExecutor(
            Agent(frame.agent.id, tools), namespace={}, checkpoint_manager=self.manager, frame_id=explicit,
            retry=self.tool_retry,
        )
        executor.namespace.update(self._handles(frame.agent))
        frame.namespace = executor.namespace
        return executor

    async def _run_markdown(self, frame: PlaybookFrame) -> Any:
        """The LLM loop of a markdown playbook; return what its code passed to ``Return``."""
        try:
            return await self._markdown_loop(frame)
        finally:
            if frame.code_store is not None:
                with anyio.CancelScope(shield=True):
                    await frame.code_store.close()

    async def _markdown_loop(self, frame: PlaybookFrame) -> Any:
        agent, spec = frame.agent, frame.spec
        scope = self._new_scope(frame)
        if scope is not None and scope.finished:
            return frame.namespace.get(_RETURNED)  # it had returned before the crash
        loop = frame.namespace.setdefault(
            _LOOP,
            {
                "messages": [
                    Message("system", self._system_prompts[agent.name]),
                    Message("user", playbook_prompt(spec, frame.args)),
                ],
                "failures": 0,
                "number": 0,
            },
        )
        while loop["number"] < self.max_llm_calls:
            number = loop["number"] + 1
            if scope is not None:
                frame.turn_ran = False
                outcome: _TurnOutcome = await scope.bound[_TURN](number)
                if not frame.turn_ran:
                    await self._restore_turn(frame, outcome)
            else:
                outcome = await self._turn(frame, number)
            messages = loop["messages"] + list(outcome.preamble) + [Message("assistant", outcome.response)]
            if outcome.returned:
                if scope is not None:
                    await scope.finalize()
                return outcome.return_value
            error = outcome.error
            if error is None:
                failures = 0
                messages.append(Message("user", continuation_prompt(spec, outcome.report)))
            else:
                failures = loop["failures"] + 1
                self._emit(
                    CodeFailed(
                        agent.name, spec.name, error.message, error.lineno,
                        self.max_retries - failures, frame.depth,
                    )
                )
                if failures > self.max_retries:
                    statement = error.statement.strip().splitlines()[0] if error.statement.strip() else ""
                    raise PlaybookRunError(
                        f"{self.program.path}:{spec.line}: playbook {agent.name}.{spec.name} failed: the LLM's code "
                        f"failed {failures} times in a row (max_retries={self.max_retries}); last error: {error}"
                        + (f"\n    {statement}" if statement else ""),
                        agent=agent.name,
                        playbook=spec.name,
                    ) from error
                retries_left = self.max_retries - failures
                messages.append(
                    Message("user", error_prompt(spec, error, outcome.report, retries_left, outcome.response))
                )
            frame.namespace[_LOOP] = loop = {
                "messages": messages,
                "failures": failures,
                "number": number,
            }
            if scope is not None:
                await scope.checkpoint()  # the loop's state, before the next LLM call
        raise PlaybookRunError(
            f"{self.program.path}:{spec.line}: playbook {agent.name}.{spec.name} made {self.max_llm_calls} LLM "
            "calls without calling Return(...); giving up (max_llm_calls)",
            agent=agent.name,
            playbook=spec.name,
        )

    async def _restore_turn(self, frame: PlaybookFrame, outcome: _TurnOutcome) -> None:
        """Give the namespace what a turn replayed from the journal had assigned.

        The turn's result record can be the last record before a crash: the playbook's own snapshot
        (taken after the turn) is then missing, and the variables the response's code assigned are only
        in the final snapshot of the frame that ran it. Re-attaching to that finished frame restores
        them into the shared namespace; nothing runs again.
        """
        assert self.manager is not None
        if not outcome.frame_id:
            return
        store = await self._code_store(frame) if self.isolation is not None else self.manager
        if outcome.frame_id not in store.loaded_frame_ids():
            raise PlaybookRunError(
                f"the checkpoints of LLM call {frame.llm_calls or '?'} of {frame.agent.name}.{frame.spec.name} "
                f"(frame {outcome.frame_id!r}) are missing: the variables its code assigned cannot be restored",
                agent=frame.agent.name,
                playbook=frame.spec.name,
            )
        if self.isolation is not None:  # the next response's worker starts from them
            frame.namespace[_LLM_FRAME] = outcome.frame_id
            return
        StreamingPythonExecutor(
            frame.agent, namespace=frame.namespace, checkpoint_manager=self.manager, frame_id=outcome.frame_id
        )

    def _new_scope(self, frame: PlaybookFrame) -> StreamingPythonExecutor | None:
        """The durable frame of one markdown playbook call (``None`` when the run is not durable).

        Its one tool is the LLM turn, so every turn is a durable call; the responses run in child
        executors of those calls, sharing the playbook's namespace. A start playbook's frame is named
        after its agent (so a resumed run finds it again); a nested one derives from its caller's call.
        """
        if self.manager is None:
            return None

        async def turn(number: int) -> _TurnOutcome:
            return await self._turn(frame, number)

        scope_agent = Agent(frame.agent.name, tools={_TURN: turn})
        scope = StreamingPythonExecutor(
            scope_agent, namespace=frame.namespace, checkpoint_manager=self.manager, frame_id=_frame_name(frame)
        )
        frame.scope_id = scope.frame_id
        return scope

    async def _turn(self, frame: PlaybookFrame, number: int) -> _TurnOutcome:
        """Ask the LLM for the ``number``-th response of ``frame`` and run it as it streams."""
        agent, spec = frame.agent, frame.spec
        # What this turn's code does is kept in the namespace, so a response cut off by a crash and
        # resumed reports the calls and output of its statements that ran before the crash too.
        frame.namespace[_TRACE] = []
        frame.namespace[_PRINTED] = []
        frame.namespace.pop(_RETURNED, None)
        frame.returned = False
        frame.llm_calls = number
        frame.turn_ran = True
        self.llm_calls += 1
        frame.namespace[_CUT] = []
        request = LLMRequest(
            list(frame.namespace[_LOOP]["messages"]), model=self.model, temperature=self.temperature,
            max_tokens=self.max_tokens,
        )
        self._emit(LLMCallStarted(agent.name, spec.name, number, frame.depth))
        preamble: list[Message] = []
        spent: list[Usage] = []
        base = request.messages
        prefill = ""  # with a continuing endpoint: the assistant's message so far
        lead = ""  # ... and the fence the rest of it is inside, fed before the rest
        cuts: list[tuple[str, str, str]] | None = None  # (frame, executed text, note) of each cut segment
        for segment in itertools.count():
            executor = await self._new_executor(frame, number, segment)
            if cuts is None:
                # Kept as run-level state, which pruning never drops: a cut segment's own records
                # may be pruned before the turn ends, once it has finished.
                where = f"{frame.code_store.execution_id}:" if frame.code_store is not None else ""
                key = f"cut segments of {where}{executor.frame_id}"
                cuts = list(self.manager.loaded_state(key) or []) if self.manager is not None else []
            known = next((cut for cut in cuts if cut[0] == executor.frame_id), None)
            if known is not None:
                text, note = known[1], known[2]
            else:
                try:
                    result = await self._run_response(frame, executor, request, spent, lead)
                finally:
                    if isinstance(executor, IsolatedPythonExecutor):
                        await executor.aclose()
                if executor.frame_id not in frame.namespace[_CUT]:
                    break
                # A response a crash cut off: its executed part stays executed, and the model is
                # asked for the rest (a new segment of this turn, in a frame of its own).
                text = result.response if result.executed_offset else ""
                note = continuation_note(spec, self._report(frame, executor, result)) if text else ""
                cuts.append((executor.frame_id, text, note))
                if self.manager is not None:
                    await self.manager.save_state(key, cuts)
            if frame.code_store is not None:
                frame.namespace[_LLM_FRAME] = executor.frame_id  # the next segment starts from its variables
            if not text:
                continue  # nothing of it had run: ask the same again
            if self.continuation == "message":
                added = [Message("assistant", text), Message("user", note)]
                preamble += added
                messages = request.messages + added
            else:  # the endpoint continues its own partial message
                prefill += text[len(lead) :]
                lead = "```python\n" if prefill.count("```") % 2 else ""
                messages = base + [Message("assistant", prefill)]
            request = LLMRequest(
                messages, model=request.model, temperature=request.temperature, max_tokens=request.max_tokens,
                stop=request.stop, continue_final=self.continuation != "message",
            )
        used = sum(spent, Usage())
        self._emit(
            LLMCallFinished(agent.name, spec.name, number, frame.depth, used.prompt_tokens, used.completion_tokens)
        )
        notes = self._notes(frame, executor)
        if frame.code_store is not None:
            frame.namespace[_LLM_FRAME] = executor.frame_id
            if _RETURNED in notes:  # (the value Return got, also when its call was replayed)
                frame.namespace[_RETURNED] = notes[_RETURNED]
        returned = _RETURNED in notes
        error = result.error
        if error is not None and prefill:
            # The segment's executor counted lines from its own start; the LLM sees (and the error
            # message quotes) its whole message, the prefill and the segment's rest.
            error = _in_whole_response(error, prefill, lead)
        return _TurnOutcome(
            response=prefill + _response_seen(result)[len(lead) :],
            error=error,
            returned=returned,
            return_value=notes[_RETURNED] if returned else None,
            report=self._report(frame, executor, result),
            frame_id=executor.frame_id if self.manager is not None else "",
            preamble=tuple(preamble),
        )

    async def _run_response(
        self,
        frame: PlaybookFrame,
        executor: StreamingPythonExecutor | IsolatedPythonExecutor,
        request: LLMRequest,
        spent: list[Usage],
        lead: str = "",
    ) -> ExecutionResult:
        """Stream one response (one segment of a turn) into ``executor``; stop reading at the first
        failing statement (or Return). ``lead`` is fed first (the fence a continued message is inside).

        A restored executor of a live model whose response a crash cut off is not asked to repeat
        itself: it is given the stored response up to the end of its last complete statement (those
        statements run again with their finished calls replayed from the journal; the cut-off
        statement never ran), finishes there, and is marked cut (``_CUT``) for :meth:`_turn` to ask
        for the rest. A replayed cassette is streamed the whole response again instead: the executor
        skips the statements that had run and checks that their text is the same.
        """
        if executor.finished:
            return await executor.finalize()
        live = self.manager is not None and not isinstance(self.llm, ReplayProvider)
        if live and executor.restored:
            store = frame.code_store or self.manager
            assert store is not None
            state = store.frame_state(executor.frame_id)
            try:
                await executor.add_chunk(_complete_statements(state.response if state is not None else ""))
            except LLMCodeError:
                pass
            if executor.error is None:
                frame.namespace[_CUT].append(executor.frame_id)
            return await self._finish_response(frame, executor)
        chunks = self._stream_llm(request, spent)
        if lead:
            try:
                await executor.add_chunk(lead)  # the fence a continued message's rest is inside
            except LLMCodeError:
                pass
        try:
            if self.stream:
                tail: int | None = None  # characters read after Return, to let the stream end cleanly
                async for chunk in chunks:
                    if tail is not None:
                        tail += len(chunk)
                        if tail > _TAIL_AFTER_RETURN:
                            break
                        continue
                    try:
                        await executor.add_chunk(chunk)
                    except LLMCodeError as exc:
                        if not (_returned(exc) or frame.returned):
                            break
                        tail = 0  # usually just the closing fence: read it, so a recording is complete
            else:
                text = "".join([chunk async for chunk in chunks])
                try:
                    await executor.add_chunk(text)
                except LLMCodeError:
                    pass
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
        return await self._finish_response(frame, executor)

    async def _finish_response(
        self, frame: PlaybookFrame, executor: StreamingPythonExecutor | IsolatedPythonExecutor
    ) -> ExecutionResult:
        """Finalize a response's executor: an outage behind its error ends the run; a Return is noted."""
        result = await executor.finalize()
        fatal = _fatal_cause(result.error)
        if fatal is not None:
            raise fatal
        if _returned(result.error):
            frame.returned = True
        return result

    def _notes(
        self, frame: PlaybookFrame, executor: StreamingPythonExecutor | IsolatedPythonExecutor
    ) -> Mapping[str, Any]:
        """Where a response's code kept its variables and notes: the frame's namespace, or, isolated,
        the host's view of its worker's namespace (refreshed by ``finalize``)."""
        return executor.namespace if isinstance(executor, IsolatedPythonExecutor) else frame.namespace

    def _report(
        self, frame: PlaybookFrame, executor: StreamingPythonExecutor | IsolatedPythonExecutor, result: ExecutionResult
    ) -> ResponseReport:
        hidden = set(frame.agent.tools) | set(self.agents) | {"__name__", "__builtins__"}
        namespace = self._notes(frame, executor)
        variables = {
            name: describe_value(value)
            for name, value in namespace.items()
            if not name.startswith("_")
            and name not in hidden
            and not isinstance(value, (types.ModuleType, types.FunctionType, type, AgentHandle))
            and not (isinstance(value, OpaqueValue) and value.type in _NOT_VARIABLES)
        }
        trace, printed = namespace.get(_TRACE), namespace.get(_PRINTED)
        return ResponseReport(
            statements=result.statements_executed,
            calls=[str(item) for item in trace] if isinstance(trace, list) else [],
            printed=[str(item) for item in printed] if isinstance(printed, list) else [],
            current_step=namespace.get(_STEP),
            variables=variables,
        )

    # ------------------------------------------------------------------ side effects (integration points)

    async def _stream_llm(self, request: LLMRequest, spent: list[Usage]) -> AsyncIterator[str]:
        """Every LLM request of the run: the chunks of the response to ``request``; the tokens the
        endpoint reports for it are added to ``spent`` and to the run's :attr:`usage`."""
        chunks = self.llm.stream(request)
        try:
            async for chunk in chunks:
                yield chunk
            usage = self.llm.last_usage  # set as the stream ended, read before anything else runs
            if usage is not None:
                spent.append(usage)
                self.usage += usage
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()

    async def _new_executor(
        self, frame: PlaybookFrame, number: int, segment: int = 0
    ) -> StreamingPythonExecutor | IsolatedPythonExecutor:
        """Every executor of the run: the one running the ``number``-th response of ``frame`` (its
        ``segment``-th part, when crashes cut the response off)."""
        agent = frame.agent
        if self.isolation is not None:
            return await self._isolated_executor(frame, number, segment)

        def on_statement(statement: Statement) -> None:
            self._emit(CodeStatement(agent.name, frame.spec.name, statement.lineno, statement.source, frame.depth))

        def on_call(call: ToolCall, value: Any, error: BaseException | None) -> None:
            note_call(frame.namespace, call, value, error)

        if self.manager is not None:  # a child frame of the durable LLM turn that is running
            executor = StreamingPythonExecutor(
                agent,
                namespace=frame.namespace,
                checkpoint_manager=self.manager,
                on_statement=on_statement,
                on_call=on_call,
                retry=self.tool_retry,
            )
        else:
            executor = StreamingPythonExecutor(
                agent,
                namespace=frame.namespace,
                interceptor=ToolCallInterceptor(
                    run_id=self.run_id, frame_id=f"{frame.frame_id}/{number}", retry=self.tool_retry
                ),
                on_statement=on_statement,
                on_call=on_call,
            )
        executor.namespace.update(self._handles(agent))
        return executor

    async def _isolated_executor(self, frame: PlaybookFrame, number: int, segment: int) -> IsolatedPythonExecutor:
        """The executor of a response of an isolated run: its code runs in a worker process, in a
        frame of the execution that holds this playbook call's LLM code (:meth:`_code_store`), and
        starts from the variables the previous response's frame ended with."""
        agent = frame.agent
        store = await self._code_store(frame)
        frame_id = f"t{number}" + (f".{segment}" if segment else "")
        inherit = frame.namespace.get(_LLM_FRAME)
        initial: dict[str, Any] = {}
        if frame_id not in store.loaded_frame_ids():  # (a frame with checkpoints restores its own)
            if inherit is None:
                initial.update(frame.args)
            if segment == 0:
                initial.update({_TRACE: [], _PRINTED: []})
            initial.update(self._handles(agent))

        def on_statement(statement: Statement) -> None:
            self._emit(CodeStatement(agent.name, frame.spec.name, statement.lineno, statement.source, frame.depth))

        def on_call(call: ToolCall, value: Any, error: BaseException | None) -> None:
            if call.name == "Return" and error is not None:  # (live, or replayed by the worker)
                frame.returned = True

        return IsolatedPythonExecutor(
            agent, namespace=initial, checkpoint_manager=store, frame_id=frame_id, inherit=inherit,
            on_statement=on_statement, on_call=on_call, retry=self.tool_retry, limits=self.isolation,
            observer="playbooks.program.prompt:note_call", expose=_NOTES,
        )

    async def _code_store(self, frame: PlaybookFrame) -> CheckpointManager:
        """The execution that holds the checkpoints of ``frame``'s isolated LLM code: one per markdown
        playbook call, named after the run and the call's durable frame, so each has one writer (its
        worker of the moment) and a resumed run finds it again."""
        if frame.code_store is None:
            assert self.manager is not None and frame.scope_id
            store = self.manager.for_execution(f"{self.manager.execution_id}~{frame.scope_id.replace('/', '~')}")
            await store.load_records()
            frame.code_store = store
        return frame.code_store

    async def _write_output(self, frame: PlaybookFrame, text: str) -> None:
        """Every message to the user (``Say("user", ...)`` and ``AskUser``'s question)."""
        self.said.append(text)
        self._emit(Said(frame.agent.name, text))
        await self.io.say(text)

    async def _read_input(self, frame: PlaybookFrame, question: str) -> str:
        """Every answer from the user: show ``question``, then read a line (or, when the input
        suspends and has no answer left, stop the run with :class:`AnswerNeeded`)."""
        await self._write_output(frame, question)
        try:
            return await self.io.read_line()
        except ProgramInputError:
            if self.io.suspend:
                raise AnswerNeeded(question, frame.agent.name, frame.spec.name) from None
            raise

    async def _save_mailbox(self) -> None:
        """With durability, store the unread messages and what each wait received (run-level state),
        so a resumed run loses no message and a wait that runs again gets the same one."""
        if self.manager is not None:
            await self.manager.save_state(
                _MAILBOX,
                {
                    "inboxes": {name: list(agent.inbox) for name, agent in self.agents.items()},
                    "sent": set(self._sent),
                    "received": dict(self._received),
                },
            )

    def _load_mailbox(self) -> None:
        state = self.manager.loaded_state(_MAILBOX) if self.manager is not None else None
        if state is None:
            return
        for name, messages in state["inboxes"].items():
            if name in self.agents:
                self.agents[name].inbox[:] = messages
        self._sent = set(state["sent"])
        self._received = dict(state["received"])

    async def _deliver(self, sender: str, recipient: str, message: Any) -> None:
        """Every message between agents: put it in ``recipient``'s inbox and wake its waiters.

        A send that runs again after a crash (same idempotency key) is not delivered twice.
        """
        target = self.agents[recipient]
        call = current_tool_call()
        key = call.idempotency_key if call is not None else None
        if key is not None and key in self._sent:
            return
        target.inbox.append(AgentMessage(sender, message))
        if key is not None:
            self._sent.add(key)
        await self._save_mailbox()
        for root, (agent, expected) in list(self._waiting.items()):
            if agent == recipient and expected in (None, sender):
                del self._waiting[root]  # at once, so no one mistakes it for idle meanwhile
        self._emit(MessageSent(sender, recipient, message))
        if target.changed is not None:
            target.changed.set()
            target.changed = None

    async def _receive(self, frame: PlaybookFrame, from_agent: str | None) -> AgentMessage:
        """Every wait for a message: the first one in the frame's agent's inbox (from ``from_agent``)."""
        agent = frame.agent
        root = _ROOT_AGENT.get() or agent.name
        call = current_tool_call()
        key = call.idempotency_key if call is not None else None
        if key is not None and key in self._received:
            return self._received[key]  # this wait had taken its message before a crash
        while True:
            for index, message in enumerate(agent.inbox):
                if from_agent is None or message.sender == from_agent:
                    del agent.inbox[index]
                    if key is not None:
                        self._received[key] = message
                    await self._save_mailbox()
                    return message
            if agent.changed is None:
                agent.changed = anyio.Event()
            changed = agent.changed
            self._waiting[root] = (agent.name, from_agent)
            self._check_quiescence()
            try:
                await changed.wait()
            finally:
                self._waiting.pop(root, None)

    def _emit(self, event: RunEvent) -> None:
        """Every progress event."""
        if self.on_event is not None:
            self.on_event(event)

    # ------------------------------------------------------------------ built-ins (BuiltinHost)

    def _frame(self, builtin: str) -> PlaybookFrame:
        frame = _CURRENT_FRAME.get()
        if frame is None:
            raise PlaybookRunError(f"{builtin}() was called outside a playbook")
        return frame

    def _check_agent(self, builtin: str, name: str) -> None:
        if name not in self.agents:
            known = ", ".join(sorted(self.agents))
            raise ValueError(f'{builtin}(): no agent {name!r}; expected "user" or one of: {known}')

    async def builtin_step(self, step_id: str) -> None:
        frame = self._frame("Step")
        spec = frame.spec
        text = ""
        if spec.steps:
            step = spec.find_step(step_id)
            if step is None:
                ids = ", ".join(s.id for s in spec.iter_steps())
                raise ValueError(f"Step({step_id!r}): playbook {spec.name} has no such step (its steps: {ids})")
            text = step.text
        frame.current_step = step_id
        frame.namespace[_STEP] = step_id  # saved with the frame
        self._emit(StepStarted(frame.agent.name, spec.name, step_id, text, frame.depth))

    async def builtin_say(self, target: str, message: Any) -> None:
        frame = self._frame("Say")
        if target.lower() in ("user", "human"):
            await self._write_output(frame, message if isinstance(message, str) else str(message))
            return
        self._check_agent("Say", target)
        await self._deliver(frame.agent.name, target, message)

    async def builtin_return(self, value: Any) -> None:
        frame = self._frame("Return")
        frame.returned = True
        frame.return_value = value
        frame.namespace[_RETURNED] = value  # saved with the frame: a resumed turn knows it returned
        raise PlaybookReturn(value)

    async def builtin_ask_user(self, question: str) -> str:
        return await self._read_input(self._frame("AskUser"), question)

    async def builtin_send_message(self, agent_name: str, message: Any) -> None:
        frame = self._frame("SendMessage")
        if agent_name.lower() in ("user", "human"):
            await self._write_output(frame, message if isinstance(message, str) else str(message))
            return
        self._check_agent("SendMessage", agent_name)
        await self._deliver(frame.agent.name, agent_name, message)

    async def builtin_wait_for_message(self, from_agent: str | None) -> AgentMessage:
        frame = self._frame("WaitForMessage")
        if from_agent is not None:
            self._check_agent("WaitForMessage", from_agent)
        return await self._receive(frame, from_agent)

    def _print(self, *values: Any, sep: str | None = " ", end: str | None = "\n", file: Any = None, flush: bool = False) -> None:
        """``print`` in LLM code: the text is kept for the next message to the LLM (and an event)."""
        frame = _CURRENT_FRAME.get()
        if file is not None or frame is None:
            print(*values, sep=sep, end=end, file=file, flush=flush)
            return
        text = (" " if sep is None else sep).join(str(value) for value in values)
        self._emit(Printed(frame.agent.name, frame.spec.name, text, frame.depth))


_OUTCOME = "__playbook_outcome__"
_TAIL_AFTER_RETURN = 400


def _pickled(value: Any) -> bytes | None:
    """``value`` pickled for a python playbook's final snapshot (``None`` if it cannot be)."""
    import cloudpickle

    try:
        return bytes(cloudpickle.dumps(value))
    except Exception:
        return None


def _stored_outcome(frame: PlaybookFrame, namespace: Mapping[str, Any]) -> Any:
    """What a python playbook that had finished before a crash returned (or raised)."""
    import pickle

    kind, data = namespace.get(_OUTCOME, ("value", None))
    if data is None:
        raise PlaybookRunError(
            f"python playbook {frame.agent.name}.{frame.spec.name} had finished before the crash, but what it "
            "returned could not be saved, so it cannot be given again without running it twice",
            agent=frame.agent.name,
            playbook=frame.spec.name,
        )
    value = pickle.loads(data)
    if kind == "raise" and isinstance(value, BaseException):
        raise value
    return value


def _response_seen(result: ExecutionResult) -> str:
    """The response as the conversation keeps it: whole, or, when its code failed, up to the end of
    the line where the failing statement ends. What arrived after that depends on how the endpoint cut
    its stream into chunks; leaving it out keeps the next request the same however the text was cut
    (so a recorded cassette replays at any chunk size)."""
    error, text = result.error, result.response
    if error is None:
        return text
    start = text.find(error.statement, result.executed_offset) if error.statement else -1
    if start >= 0:
        end = start + len(error.statement)
    elif error.lineno is not None:
        end = sum(len(line) for line in text.splitlines(keepends=True)[: error.lineno])
    else:
        return text
    newline = text.find("\n", end)
    return text if newline < 0 else text[: newline + 1]


def _in_whole_response(error: LLMCodeError, prefill: str, lead: str) -> LLMCodeError:
    """``error`` of a continuing segment (fed ``lead``, then the rest of a message that began with
    ``prefill``), with its line and column counted from the start of the whole message.

    The segment's line ``L`` is line ``L - (lines of lead)`` of the rest, and the rest's first line
    continues the prefill's last one (which has no newline after it when a statement ended there).
    ``executed_code`` becomes the whole message's executed prefix too. A copy: the original stays in
    the segment's own records, in its own coordinates.
    """
    moved = copy.copy(error)
    moved.__cause__, moved.__context__ = error.__cause__, error.__context__
    moved.__traceback__ = error.__traceback__
    lead_lines = lead.count("\n")
    if error.lineno is not None:
        rest_line = max(1, error.lineno - lead_lines)
        moved.lineno = prefill.count("\n") + rest_line
        if rest_line == 1 and error.col_offset is not None and error.lineno > lead_lines:
            moved.col_offset = error.col_offset + len(prefill) - (prefill.rfind("\n") + 1)
    if error.executed_code.startswith(lead):
        moved.executed_code = prefill + error.executed_code[len(lead) :]
    return moved


def _complete_statements(text: str) -> str:
    """``text`` up to the end of its last complete top-level statement: what of a response cut off by
    a crash had run (or was running). The statement splitter decides, as it did while the text streamed."""
    splitter = StatementSplitter()
    splitter.feed(text)
    end = 0
    while True:
        try:
            item = splitter.next_statement()
        except CodeSyntaxError:
            return text  # it failed there before the crash too: feeding it all fails it the same way
        if not isinstance(item, Statement):
            return text[:end]
        end = item.end


def _python_print(*values: Any, **options: Any) -> None:
    """``print`` in the agents' python code.

    Inside a python playbook of a durable run it is the playbook frame's journaled ``print``: the line
    goes to standard output and its record is stored right after it, so a resumed run replays it
    instead of showing it again (a kill in the microseconds between the line and its record shows it
    again: at least once, like LLM code's durable calls). Elsewhere (a run without checkpoints, module
    code of a python block, a markdown frame) and with ``file=`` naming anything but standard output,
    it is the built-in ``print``.
    """
    frame = _CURRENT_FRAME.get()
    bound = frame.namespace.get("print") if frame is not None and frame.spec.kind == "python" else None
    target = options.get("file")
    if bound is None or getattr(bound, "__playbooks_tool__", None) != "print" or target not in (None, sys.stdout):
        print(*values, **options)
        return
    options.pop("file", None)
    options.pop("flush", None)  # the durable print always flushes; leaving it out keeps the fingerprint
    bound(*values, **options)


def _frame_tool(name: str, tool: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
    """A tool as python playbooks see it in their globals: in a durable run, the running frame's
    bound (journaled) tool of that name; otherwise the tool itself."""

    async def call(*args: Any, **kwargs: Any) -> Any:
        frame = _CURRENT_FRAME.get()
        bound = frame.namespace.get(name) if frame is not None else None
        if bound is None or getattr(bound, "__playbooks_tool__", None) != name:
            bound = tool
        return await bound(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = tool.__doc__
    return call


def _bind_arguments(spec: PlaybookSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Match a call's arguments to a markdown playbook's parameters; ``TypeError`` like Python's."""
    params = spec.params
    signature = f"{spec.name}({', '.join(params)})"
    if len(args) > len(params):
        raise TypeError(f"{signature} takes {len(params)} arguments but {len(args)} were given")
    bound = dict(zip(params, args))
    for key, value in kwargs.items():
        if key not in params:
            raise TypeError(f"{signature} got an unexpected argument {key!r}")
        if key in bound:
            raise TypeError(f"{signature} got multiple values for argument {key!r}")
        bound[key] = value
    missing = [param for param in params if param not in bound]
    if missing:
        raise TypeError(f"{signature} is missing arguments: {', '.join(missing)}")
    return {param: bound[param] for param in params}


def _python_arguments(spec: PlaybookSpec, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A python playbook's arguments by parameter name, for events (best effort)."""
    shown: dict[str, Any] = {}
    names = [param for param in spec.params if not param.startswith("*")]
    for name, value in zip(names, args):
        shown[name] = value
    for index, value in enumerate(args[len(names) :]):
        shown[f"*{index}"] = value
    shown.update(kwargs)
    return shown


def _program_line(exc: BaseException, path: str) -> int | None:
    """The innermost line of the ``.pb`` file in ``exc``'s traceback, if any."""
    line: int | None = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if frame.filename == path:
            line = frame.lineno
    return line
