"""Run LLM-written Python while it is still streaming.

Each chunk goes into a :class:`~playbooks.execution.statement_splitter.StatementSplitter`; every
statement it completes runs at once, in the agent's namespace, compiled with top-level ``await`` allowed
and with the line numbers of the whole response (which is registered in :mod:`linecache`, so
tracebacks show the LLM's own lines). The executor stops at the first failing statement: the error is
raised from the :meth:`~StreamingPythonExecutor.add_chunk` call that completed that statement, nothing
after it runs, and :meth:`~StreamingPythonExecutor.finalize` reports it in the result.

The executor is backend-neutral (it awaits only what the LLM's code awaits), so it runs under asyncio
and trio alike.
"""

from __future__ import annotations

import ast
import inspect
import itertools
import linecache
import traceback
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from playbooks.agent import AgentLike
from playbooks.errors import (
    CodeExecutionError,
    CodeSyntaxError,
    ExecutorStateError,
    LLMCodeError,
)
from playbooks.execution.statement_splitter import END, NEED_DATA, Statement, StatementSplitter
from playbooks.execution.tool_calls import ToolCallInterceptor, bind_tools

__all__ = ("ExecutionResult", "StreamingPythonExecutor")

_FILENAMES = itertools.count(1)
_COMPILE_FLAGS = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT


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
    (for progress displays and logs).
    """

    def __init__(
        self,
        agent: AgentLike,
        *,
        namespace: dict[str, Any] | None = None,
        interceptor: ToolCallInterceptor | None = None,
        on_statement: Callable[[Statement], None] | None = None,
    ) -> None:
        self.agent = agent
        self.namespace: dict[str, Any] = namespace if namespace is not None else {}
        self.namespace.setdefault("__name__", "__llm__")
        self.interceptor = interceptor or ToolCallInterceptor(run_id=agent.id)
        self.namespace.update(bind_tools(agent.tools, self.interceptor))
        self.filename = f"<llm-response-{agent.id}-{next(_FILENAMES)}>"
        self._splitter = StatementSplitter(filename=self.filename)
        self._chunks: list[str] = []
        self._response_cache: str | None = ""
        self._expected_response: str | None = None
        self._executed_offset = 0
        self._statements_executed = 0
        self._error: LLMCodeError | None = None
        self._finalized = False
        self._on_statement = on_statement

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
        further chunks are recorded but nothing runs.
        """
        if self._finalized:
            raise ExecutorStateError("add_chunk() after finalize()")
        if not text:
            return
        self._chunks.append(text)
        self._response_cache = None
        if self._error is not None:
            return
        self._splitter.feed(text)
        await self._run_ready()

    async def finalize(self) -> ExecutionResult:
        """End the stream: run what was pending (a trailing compound statement) and report.

        Errors in the LLM's code are returned in the result, not raised (``add_chunk`` already raised
        them when they happened).
        """
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
        return ExecutionResult(
            success=self._error is None,
            error=self._error,
            executed_code=self.get_executed_code(),
            executed_offset=self._executed_offset,
            statements_executed=self._statements_executed,
            response=self.response,
            namespace=self.namespace,
        )

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
            await self._run(item)

    async def _run(self, statement: Statement) -> None:
        try:
            module = ast.Module(body=[statement.node], type_ignores=[])
            code = compile(module, self.filename, "exec", flags=_COMPILE_FLAGS, dont_inherit=True)
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
        try:
            if code.co_flags & inspect.CO_COROUTINE:
                await eval(code, self.namespace)
            else:
                exec(code, self.namespace)
        except Exception as exc:
            failure = self._execution_error(exc, statement)
            self._fail(failure)
            raise failure from exc
        self._executed_offset = statement.end
        self._statements_executed += 1

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
        return CodeExecutionError(
            f"{type(exc).__name__}: {exc}",
            statement=statement.source,
            lineno=lineno,
            col_offset=statement.col_offset if lineno == statement.lineno else None,
            traceback_text=text,
        )

    def _register_source(self) -> None:
        """Make the response visible to :mod:`linecache` so tracebacks show the LLM's lines."""
        text = self.response
        linecache.cache[self.filename] = (len(text), None, text.splitlines(keepends=True), self.filename)
