"""Run LLM-written Python while it is still streaming.

Each chunk goes into a :class:`~playbooks.execution.statement_splitter.StatementSplitter`; every
statement it completes runs at once, in the agent's namespace, compiled with top-level ``await`` allowed
and with the line numbers of the whole response (which is registered in :mod:`linecache`, so
tracebacks show the LLM's own lines). The executor stops at the first failing statement: the error is
raised from the :meth:`~StreamingPythonExecutor.add_chunk` call that completed that statement, nothing
after it runs, and :meth:`~StreamingPythonExecutor.finalize` reports it in the result.

With a :class:`~playbooks.checkpoints.CheckpointManager` the executor is durable: every tool call
(and ``print``) is journaled, a snapshot follows every top-level statement that awaited one, and
:meth:`~StreamingPythonExecutor.resume_from_checkpoint` continues a killed run in a new process (see
:mod:`playbooks.execution.durable` and docs/durability.md).

The executor is backend-neutral (it awaits only what the LLM's code awaits), so it runs under asyncio
and trio alike.
"""

from __future__ import annotations

import ast
import builtins
import gc
import inspect
import io
import itertools
import linecache
import re
import secrets
import sys
import traceback
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

import anyio

from playbooks.agent import AgentLike
from playbooks.errors import (
    CheckpointCorruptError,
    CodeExecutionError,
    CodeSyntaxError,
    ExecutorStateError,
    HostIOError,
    InterpreterError,
    LLMCodeError,
    NonDeterminismError,
)
from playbooks.execution.retry import RetryPolicy
from playbooks.execution.statement_splitter import END, NEED_DATA, Statement, StatementSplitter
from playbooks.execution.tasks import current_task, install_task_hooks, running_node
from playbooks.execution.tool_calls import ToolCall, ToolCallInterceptor, bind_tools, output_written

if TYPE_CHECKING:
    from playbooks.checkpoints.manager import CheckpointManager
    from playbooks.checkpoints.model import Checkpoint, FrameState
    from playbooks.execution.durable import DurableFrame

__all__ = ("ExecutionResult", "StreamingPythonExecutor")

_FILENAMES = itertools.count(1)
_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


_AWAITED_NAME: Final = re.compile(r"(?:[^\W\d]\w*[ \t]*=[ \t]*)?await[ \t]+([^\W\d]\w*)[ \t]*\(")


def _direct_tool(statement: Statement, namespace: Mapping[str, Any], bound: Mapping[str, Any]) -> str | None:
    """The tool a statement awaits if that await is all that remains of it once the tool returns:
    ``await Tool(...)`` or ``x = await Tool(...)``, where ``Tool`` is still the bound tool and no other
    ``await`` is in the statement (the arguments are evaluated before the call). Between the tool's
    return and the statement's end no code of the LLM runs, and nothing can fail. (Not ``x: T = ...``:
    its annotation is evaluated after the assignment.)

    A regular expression turns away most statements before the tree is looked at, and answers for
    the commonest shape by itself: its only ``await``, and no parenthesis between the call's and the
    statement's last character, so that the call is the whole value. Otherwise the tree is looked at
    (parsed without moving its lines: only its shape counts)."""
    source = statement.source
    m = _AWAITED_NAME.match(source)
    if m is None:
        return None
    name = m.group(1)
    tool = bound.get(name)
    if tool is None or namespace.get(name) is not tool:
        return None
    arguments = source[m.end() : -1]
    if source.endswith(")") and source.count("await") == 1 and "(" not in arguments and ")" not in arguments:
        return name
    node = statement.parsed_node
    return _direct_tool_of_tree(node if node is not None else ast.parse(source).body[0], namespace, bound)


def _direct_tool_of_tree(node: ast.stmt, namespace: Mapping[str, Any], bound: Mapping[str, Any]) -> str | None:
    """:func:`_direct_tool` from the statement's tree alone."""
    if isinstance(node, ast.Expr):
        value: ast.expr = node.value
    elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
        value = node.value
    else:
        return None
    if not isinstance(value, ast.Await) or not isinstance(value.value, ast.Call):
        return None
    call = value.value
    if not isinstance(call.func, ast.Name):
        return None
    name = call.func.id
    tool = bound.get(name)
    if tool is None or namespace.get(name) is not tool:
        return None
    for part in (*call.args, *(k.value for k in call.keywords)):
        if any(isinstance(n, ast.Await) for n in ast.walk(part)):
            return None
    return name


def _compile(module: ast.Module, filename: str) -> types.CodeType:
    """Compile one statement with the garbage collector paused: CPython 3.11 keeps the AST
    converter's recursion depth in per-interpreter state, which a finalizer that parses during the
    conversion (a collected task's unretrieved exception is logged, and 3.11's tracebacks parse
    source for their carets) corrupts (see ``statement_splitter._parse``)."""
    paused = gc.isenabled()
    gc.disable()
    try:
        code: types.CodeType = compile(module, filename, "exec", flags=_COMPILE_FLAGS, dont_inherit=True)
    finally:
        if paused:
            gc.enable()
    return code


def _durable_print(*args: Any, **kwargs: Any) -> None:
    """``print`` for durable LLM code: the whole line is written at once and flushed, so a line
    recorded as shown was shown, and a kill cannot leave half of it (unbuffered standard output
    would get one write per argument).

    Standard output that cannot be written (closed by ``| head``, a full disk) is a failure of the
    host, not of the LLM's code: it ends the execution with :class:`~playbooks.errors.HostIOError`,
    is not journaled, and the line is printed again by a resume.
    """
    target = kwargs.pop("file", None)
    kwargs.pop("flush", None)
    line = io.StringIO()
    builtins.print(*args, file=line, **kwargs)  # one write for the whole line: a kill cannot cut it
    out = target if target is not None else sys.stdout
    if out is None:
        return
    try:
        out.write(line.getvalue())
        out.flush()
    except OSError as exc:
        if target not in (None, sys.stdout, sys.stderr):
            raise  # a file of the LLM's own
        raise HostIOError(f"cannot write to standard output: {exc.strerror or exc}") from exc
    output_written()  # the line is out: its record lands now, one write later


_durable_print.__playbooks_output__ = True  # type: ignore[attr-defined]  # its record is made before it writes


@dataclass(slots=True)
class ExecutionResult:
    """What a finished (or failed) stream did.

    ``executed_code`` is the response up to the end of the last statement that ran (an offset into the
    whole response, never a substring search); ``error`` is the first failure, if any.
    """

    success: bool
    error: LLMCodeError | None
    executed_code: str
    executed_offset: int
    statements_executed: int
    response: str
    namespace: dict[str, Any] = field(repr=False)


class StreamingPythonExecutor:
    """Execute an LLM response statement by statement as its chunks arrive.

    ``agent`` is anything with ``.id`` and ``.tools``; each tool is bound in the namespace by name and
    every call to it goes through ``interceptor`` (by default one that numbers calls and gives them
    idempotency keys). ``namespace`` is shared with the caller if given, so state can carry over from
    one LLM response to the next. ``on_statement`` is called with each statement just before it runs
    (for progress displays and logs); ``on_call`` after every tool call ends, with its value or
    exception, including calls replayed from the journal after a resume.

    ``checkpoint_manager`` makes the execution durable (then ``interceptor`` must not be given: the
    frame's own journaling interceptor is used). ``retry`` is the
    :class:`~playbooks.execution.retry.RetryPolicy` of calls whose function has none of its own
    (default: no retries). ``unsaved`` names the variables of a shared namespace
    that belong to the host and are never saved or restored (an IPython shell's ``In``, ``Out``,
    ``_i3``). An executor created while a durable tool call runs
    (a tool that runs LLM code) is a child frame of that call and uses the parent's manager by
    default; after a resume it re-attaches to its checkpoints, skipping the code it already ran.
    """

    def __init__(
        self,
        agent: AgentLike,
        *,
        namespace: dict[str, Any] | None = None,
        interceptor: ToolCallInterceptor | None = None,
        on_statement: Callable[[Statement], None] | None = None,
        on_call: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
        checkpoint_manager: CheckpointManager | None = None,
        frame_id: str | None = None,
        unsaved: Callable[[str], bool] | None = None,
        retry: RetryPolicy | None = None,
        _state: FrameState | None = None,
    ) -> None:
        self.agent = agent
        self.unsaved = unsaved
        self.namespace: dict[str, Any] = namespace if namespace is not None else {}
        self.namespace.setdefault("__name__", "__llm__")
        self._frame: DurableFrame | None = None
        self._resume_offset = 0
        self._last_statement = ""
        self._executed_offset = 0
        self._statements_executed = 0
        self._fatal: InterpreterError | None = None
        self._restored_error: LLMCodeError | None = None
        self._recovered_response = ""
        manager = checkpoint_manager
        if _state is not None:
            frame_id = _state.frame_id
        elif frame_id is not None:
            if manager is None:
                raise ExecutorStateError("frame_id= names a durable frame; pass checkpoint_manager= too")
            if frame_id in manager.loaded_frame_ids():
                _state = manager.frame_state(frame_id)
        else:
            manager, frame_id, _state = self._attach(agent, manager, secrets.token_hex(4))
        if manager is not None:
            if interceptor is not None:
                raise ExecutorStateError(
                    "a durable executor journals calls with its own interceptor; do not pass interceptor="
                )
            self._init_frame(manager, frame_id, _state, on_call, retry)
            assert self._frame is not None
            self.interceptor: ToolCallInterceptor = self._frame_interceptor
        else:
            self.interceptor = interceptor or ToolCallInterceptor(run_id=agent.id, frame_id=frame_id, retry=retry)
            if on_call is not None:
                self.interceptor.observer = on_call
        self.bound = bind_tools(agent.tools, self.interceptor)
        if self._frame is not None and "print" not in self.bound:
            self.bound["print"] = bind_tools({"print": _durable_print}, self.interceptor)["print"]
        self.namespace.update(self.bound)
        if self._frame is not None and _state is not None:
            self._restore(_state)
        self.filename = f"<llm-response-{agent.id}-{next(_FILENAMES)}>"
        self._splitter = StatementSplitter(
            filename=self.filename, skip_until=self._resume_offset, last_statement=self._last_statement
        )
        self._chunks: list[str] = []
        self._response_cache: str | None = ""
        self._expected_response: str | None = None
        self._error: LLMCodeError | None = self._restored_error
        self._finalized = False
        self._finished_before_crash = False
        self._refed = 0
        self._on_statement = on_statement
        self._hooked_task: object | None = None  # the task whose event loop has the task hooks
        if _state is not None and _state.done:
            self._finalized_from_checkpoint()

    # ----------------------------------------------------------------- durability

    @staticmethod
    def _attach(
        agent: AgentLike, manager: CheckpointManager | None, frame_id: str
    ) -> tuple[CheckpointManager | None, str, FrameState | None]:
        """Find this executor's manager and frame: a child of the durable call running now, if any."""
        from playbooks.execution.durable import current_durable_call

        parent = current_durable_call()
        if parent is None or (manager is not None and manager is not parent.frame.manager):
            return manager, frame_id, None
        k = next(parent.children)
        frame_id = f"{parent.frame.frame_id}/{parent.seq}" + (f".{k}" if k else "")
        manager = parent.frame.manager
        state = manager.frame_state(frame_id) if frame_id in manager.loaded_frame_ids() else None
        return manager, frame_id, state

    def _init_frame(
        self,
        manager: CheckpointManager,
        frame_id: str,
        state: FrameState | None,
        on_call: Callable[[ToolCall, Any, BaseException | None], None] | None,
        retry: RetryPolicy | None,
    ) -> None:
        from playbooks.execution.durable import DurableFrame, DurableInterceptor, current_durable_call

        parent = current_durable_call()
        if parent is not None and parent.frame.manager is not manager:
            parent = None
        if parent is not None and not frame_id.startswith(parent.frame.frame_id + "/"):
            parent = None  # a root frame resumed from inside an unrelated call
        self._frame = DurableFrame(manager, self, frame_id=frame_id, parent=parent, state=state)
        self._frame_interceptor = DurableInterceptor(
            self._frame,
            run_id=manager.execution_id,
            frame_id=frame_id,
            next_seq=state.next_seq if state is not None else 0,
            observer=on_call,
            retry=retry,
        )

    def _restore(self, state: FrameState) -> None:
        from playbooks.checkpoints.namespace import decode_namespace

        assert self._frame is not None
        state.check_openable()
        # A value that could not be saved, where the namespace already holds one under its name (a
        # notebook whose setup cell made a new connection), keeps that one instead of a placeholder.
        live = {name: self.namespace[name] for name, _, _ in state.skipped if name in self.namespace}
        resolved = state.resolved
        if self.unsaved is not None:
            resolved = {k: v for k, v in resolved.items() if not self._any_unsaved(k)}
        values = decode_namespace(resolved, self.namespace, bound=self.bound)
        self.namespace.update(live)
        values.update(live)
        self._frame.seed(values)
        # Variables set for this resume (a fork's or a resume's --set): after seeding, so the next
        # snapshot pickles them anew. A frame sharing its namespace with its parent sets them too,
        # or its own snapshot's values would win.
        for name, value in self._frame.manager.overrides_after(state.snapshot_counter).items():
            if self._frame.parent is None or name in self.namespace:
                self.namespace[name] = value
                self._frame.overridden = True
        self._resume_offset = state.executed_offset
        self._executed_offset = state.executed_offset
        self._statements_executed = state.statements_executed
        self._last_statement = state.statement
        self._recovered_response = state.response
        if state.done and state.error is not None:
            from playbooks.checkpoints.outcome import load_outcome

            error = load_outcome(state.error)
            if isinstance(error, LLMCodeError):
                self._restored_error = error

    def _any_unsaved(self, key: str) -> bool:
        from playbooks.checkpoints.namespace import shared_names

        assert self.unsaved is not None
        return any(self.unsaved(name) for name in shared_names(key) or (key,))

    @classmethod
    async def resume_from_checkpoint(
        cls,
        agent: AgentLike,
        checkpoint: Checkpoint,
        *,
        checkpoint_manager: CheckpointManager,
        namespace: dict[str, Any] | None = None,
        on_statement: Callable[[Statement], None] | None = None,
        on_call: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
        unsaved: Callable[[str], bool] | None = None,
        upto: int | None = None,
    ) -> StreamingPythonExecutor:
        """Continue the execution ``checkpoint`` belongs to, in this process.

        The root frame of the checkpoint's call stack is rebuilt (namespace, journal, response), the
        code of the stored response after the executed offset runs (durable calls in the journal
        return their recorded results; nested executors re-attach), and the executor is returned as
        if it had been fed the stored response: feed the rest of the stream, if any, from
        ``len(executor.response)``, then :meth:`finalize`. LLM code errors are kept for
        :meth:`finalize`, as with :meth:`add_chunk`. ``upto`` feeds the stored response only up to that
        offset (where a statement starts that must not run again: the one whose worker died).
        """
        return await cls.resume_frame(
            agent, checkpoint.root_frame_id, checkpoint_manager=checkpoint_manager, namespace=namespace,
            on_statement=on_statement, on_call=on_call, unsaved=unsaved, upto=upto,
        )

    @classmethod
    async def resume_frame(
        cls,
        agent: AgentLike,
        frame_id: str,
        *,
        checkpoint_manager: CheckpointManager,
        namespace: dict[str, Any] | None = None,
        on_statement: Callable[[Statement], None] | None = None,
        on_call: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
        unsaved: Callable[[str], bool] | None = None,
        upto: int | None = None,
        retry: RetryPolicy | None = None,
    ) -> StreamingPythonExecutor:
        """:meth:`resume_from_checkpoint` for the frame ``frame_id`` of the manager's execution (its
        newest state), for a host that names its frames (an execution holding several)."""
        manager = checkpoint_manager
        await manager.load_records()
        state = manager.frame_state(frame_id)
        if state is None:
            raise CheckpointCorruptError(
                f"no readable checkpoint of frame {frame_id!r} in execution {manager.execution_id!r}"
            )
        state.check_openable()
        if state.agent_id != agent.id:
            raise ExecutorStateError(
                f"frame {frame_id!r} of execution {manager.execution_id!r} belongs to agent "
                f"{state.agent_id!r}, not {agent.id!r}"
            )
        await manager.open()
        executor = cls(
            agent,
            namespace=namespace,
            on_statement=on_statement,
            on_call=on_call,
            checkpoint_manager=manager,
            unsaved=unsaved,
            retry=retry,
            _state=state,
        )
        if state.done:
            return executor
        try:
            await executor.add_chunk(state.response if upto is None else state.response[:upto])
        except LLMCodeError:
            pass
        return executor

    def _finalized_from_checkpoint(self) -> None:
        """A frame that had finished: nothing runs again; finalize reports what it reported."""
        self._chunks = [self._recovered_response]
        self._response_cache = self._recovered_response
        self._finalized = True
        self._finished_before_crash = True

    def _skip_refed(self, text: str) -> None:
        """A finished frame is fed its code again (its host re-runs after a resume): skip what it had
        run; anything else is not the code it had run."""
        start = self._refed
        expected = self._recovered_response[start : start + len(text)]
        if text != expected:
            error = NonDeterminismError(
                f"frame {self.frame_id!r} had finished before the crash, and is now fed other code than it "
                f"ran: at offset {start} expected {expected[:80]!r} but got {text[:80]!r}"
            )
            self._fatal = error
            raise error
        self._refed += len(text)

    @property
    def restored(self) -> bool:
        """Whether this executor continues a frame from its checkpoints (resumed or re-attached)."""
        return self._frame is not None and self._frame.state is not None

    @property
    def finished(self) -> bool:
        """Whether :meth:`finalize` ran (in this process, or before the crash for a restored frame).

        A restored frame that had finished skips the code it is fed again (it must be the code it had
        run) and :meth:`finalize` returns the result it had returned.
        """
        return self._finalized

    async def start(self) -> None:
        """Start the durable frame now (take the lock, write its first, unsynced snapshot) instead of
        at the first chunk or call; idempotent, and nothing to do for an executor without
        checkpoints. A host that lets code of its own make durable calls (a python playbook's
        ``print``) before any code is fed starts it first, so their records are written at once."""
        if self._frame is not None:
            await self._durable(self._frame.start())

    async def checkpoint(self) -> None:
        """Take a snapshot now (durable executors only): for hosts that change the namespace between
        responses, so the change is saved before the next durable call."""
        if self._frame is None:
            raise ExecutorStateError("checkpoint() needs an executor created with checkpoint_manager=")
        await self._durable(self._frame.start())
        await self._durable(self._frame.snapshot())

    @property
    def executed_offset(self) -> int:
        """Length of the executed prefix of the response."""
        return self._executed_offset

    @property
    def statements_executed(self) -> int:
        return self._statements_executed

    @property
    def last_statement(self) -> str:
        """Source of the last statement that ran."""
        return self._last_statement

    @property
    def frame_id(self) -> str:
        """This executor's frame id (part of every idempotency key)."""
        return self.interceptor.frame_id

    def _check_replayed_text(self, start: int, text: str) -> None:
        """After a resume, the code fed again must be the code that ran before the crash."""
        end = min(start + len(text), self._resume_offset)
        if start >= end:
            return
        expected = self._recovered_response[start:end]
        if text[: end - start] != expected:
            error = NonDeterminismError(
                f"frame {self.frame_id!r} resumed with different code than it had run before the crash: "
                f"at offset {start} expected {expected[:80]!r} but got {text[: end - start][:80]!r}"
            )
            self._fatal = error
            raise error

    # ----------------------------------------------------------------- input

    @property
    def response(self) -> str:
        """The whole response received so far."""
        if self._response_cache is None:
            self._response_cache = "".join(self._chunks)
            self._chunks = [self._response_cache]
        return self._response_cache

    @property
    def error(self) -> LLMCodeError | None:
        """The first failure of this stream, if any."""
        return self._error

    def set_llm_response(self, full_text: str) -> None:
        """Declare the whole response up front; :meth:`finalize` feeds whatever was not fed yet."""
        if not full_text.startswith(self.response):
            raise ExecutorStateError(
                "set_llm_response(): the text already fed is not a prefix of the full response"
            )
        self._expected_response = full_text

    async def add_chunk(self, text: str) -> None:
        """Feed the next chunk and run every statement it completes.

        Raises :class:`~playbooks.errors.CodeSyntaxError` or
        :class:`~playbooks.errors.CodeExecutionError` for the first statement that fails; after that,
        further chunks are recorded but nothing runs. Durability failures raise an
        :class:`~playbooks.errors.InterpreterError` (a checkpoint that cannot be written, a replay that
        diverged) and stop the executor.
        """
        if self._fatal is not None:
            raise self._fatal
        if self._finalized:
            if self._finished_before_crash:
                self._skip_refed(text)
                return
            raise ExecutorStateError("add_chunk() after finalize()")
        if not text:
            return
        if self._resume_offset:
            self._check_replayed_text(len(self.response), text)
        self._chunks.append(text)
        self._response_cache = None
        if self._error is not None:
            return
        if self._frame is not None:
            await self._durable(self._frame.start())
        self._splitter.feed(text)
        if self._splitter.ready:  # most chunks complete no statement
            await self._run_ready()

    async def _durable(self, step: Any) -> None:
        """Await a durability step; its failure stops the executor."""
        try:
            await step
        except InterpreterError as exc:
            self._fatal = exc
            raise

    async def finalize(self) -> ExecutionResult:
        """End the stream: run what was pending (a trailing compound statement) and report.

        Errors in the LLM's code are returned in the result, not raised (``add_chunk`` already raised
        them when they happened).
        """
        if self._fatal is not None:
            raise self._fatal
        if not self._finalized:
            expected = self._expected_response
            if expected is not None and len(expected) > len(self.response):
                remainder = expected[len(self.response) :]
                try:
                    await self.add_chunk(remainder)
                except LLMCodeError:
                    pass
            self._finalized = True
            if self._error is None:
                self._splitter.close()
                try:
                    await self._run_ready()
                except LLMCodeError:
                    pass
            self._register_source()
            if self._frame is not None:
                if self._fatal is not None:
                    raise self._fatal
                await self._durable(self._frame.start())
                await self._durable(self._frame.finish(self._error))
        return ExecutionResult(
            success=self._error is None,
            error=self._error,
            executed_code=self.get_executed_code(),
            executed_offset=self._executed_offset,
            statements_executed=self._statements_executed,
            response=self.response,
            namespace=self.namespace,
        )

    def report_failure(self, error: LLMCodeError) -> None:
        """Stop this stream with ``error``, raised outside the statements (a limit of the isolated
        worker that ran them, a statement that ended it): nothing more runs, as after a failing
        statement, and :meth:`finalize` reports it. Ignored if the stream already failed."""
        if self._error is None:
            self._fail(error)

    def get_executed_code(self) -> str:
        """The response up to the end of the last statement that ran."""
        return self.response[: self._executed_offset]

    # ----------------------------------------------------------------- execution

    async def _run_ready(self) -> None:
        while True:
            try:
                item = self._splitter.next_statement()
            except CodeSyntaxError as exc:
                self._fail(exc)
                raise
            if item is NEED_DATA or item is END:
                return
            assert isinstance(item, Statement)
            if item.end <= self._resume_offset:
                continue  # ran before the crash; its effects are in the restored namespace
            await self._run(item)

    async def _run(self, statement: Statement) -> None:
        try:
            code = statement.code
            if code is None or code.co_filename != self.filename:
                code = _compile(ast.Module(body=[statement.node], type_ignores=[]), self.filename)
        except SyntaxError as exc:
            error = CodeSyntaxError(
                f"{type(exc).__name__}: {exc.msg}",
                statement=statement.source,
                lineno=exc.lineno or statement.lineno,
                col_offset=max(0, (exc.offset or 1) - 1),
            )
            error.__cause__ = exc
            self._fail(error)
            raise error from exc
        if self._on_statement is not None:
            self._on_statement(statement)
        if self._frame is not None:
            self._frame.direct_tool = _direct_tool(statement, self.namespace, self.bound)
        root = self.interceptor.root
        task = root.task = current_task()
        root.begin_statement(self._statements_executed)
        if task is None or task is not self._hooked_task:  # the hooks are per event loop, a task in one
            install_task_hooks()
            self._hooked_task = task
        try:
            with running_node(root):
                if code.co_flags & inspect.CO_COROUTINE:
                    await eval(code, self.namespace)
                else:
                    exec(code, self.namespace)
        except InterpreterError as exc:
            self._fatal = exc
            raise
        except anyio.get_cancelled_exc_class():
            if self._frame is not None:
                await self._frame.interrupted()
            raise
        except Exception as exc:
            if self._frame is not None and self._frame.fatal is not None:
                self._fatal = self._frame.fatal
                raise self._fatal from exc
            failure = self._execution_error(exc, statement)
            self._fail(failure)
            raise failure from exc
        self._executed_offset = statement.end
        self._statements_executed += 1
        self._last_statement = statement.source
        if self._frame is not None:
            if self._frame.fatal is not None:  # swallowed by the LLM's code: still fatal
                self._fatal = self._frame.fatal
                raise self._fatal
            await self._durable(self._frame.after_statement())

    def _fail(self, error: LLMCodeError) -> None:
        error.executed_code = self.get_executed_code()
        self._error = error

    def _execution_error(self, exc: Exception, statement: Statement) -> CodeExecutionError:
        self._register_source()
        tb: types.TracebackType | None = exc.__traceback__
        while tb is not None and tb.tb_frame.f_code.co_filename != self.filename:
            tb = tb.tb_next
        lineno = statement.lineno
        frame = tb
        while frame is not None:  # the innermost frame of the LLM's own code is where it failed
            if frame.tb_frame.f_code.co_filename == self.filename:
                lineno = frame.tb_lineno
            frame = frame.tb_next
        text = "".join(traceback.format_exception(type(exc), exc, tb))
        # An exception that stands for a limit of the sandbox names its own error class and message.
        kind: type[CodeExecutionError] = getattr(type(exc), "__playbooks_error__", CodeExecutionError)
        return kind(
            str(exc) if kind is not CodeExecutionError else f"{type(exc).__name__}: {exc}",
            statement=statement.source,
            lineno=lineno,
            col_offset=statement.col_offset if lineno == statement.lineno else None,
            traceback_text=text,
        )

    def _register_source(self) -> None:
        """Make the response visible to :mod:`linecache` so tracebacks show the LLM's lines."""
        text = self.response
        linecache.cache[self.filename] = (len(text), None, text.splitlines(keepends=True), self.filename)
