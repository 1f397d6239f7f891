"""The execution layer: split a streaming LLM response into statements and run them as they complete."""

from __future__ import annotations

from playbooks.execution.statement_splitter import END as END
from playbooks.execution.statement_splitter import NEED_DATA as NEED_DATA
from playbooks.execution.statement_splitter import Statement as Statement
from playbooks.execution.statement_splitter import StatementSplitter as StatementSplitter
from playbooks.execution.streaming_python_executor import ExecutionResult as ExecutionResult
from playbooks.execution.streaming_python_executor import (
    StreamingPythonExecutor as StreamingPythonExecutor,
)
from playbooks.execution.tool_calls import ToolCall as ToolCall
from playbooks.execution.tool_calls import ToolCallInterceptor as ToolCallInterceptor
from playbooks.execution.tool_calls import current_tool_call as current_tool_call
from playbooks.execution.tool_calls import durable_call as durable_call

__all__ = (
    "END",
    "NEED_DATA",
    "ExecutionResult",
    "Statement",
    "StatementSplitter",
    "StreamingPythonExecutor",
    "ToolCall",
    "ToolCallInterceptor",
    "current_tool_call",
    "durable_call",
)
