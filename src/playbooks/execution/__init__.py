"""The execution layer: split a streaming LLM response into statements and run them as they complete.

``IsolatedPythonExecutor`` (the same contract, in a limited worker process) and ``SandboxLimits`` are
imported on first use: the worker machinery is not loaded by a host that runs code in-process.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

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

if TYPE_CHECKING:
    from playbooks.execution.isolated_executor import IsolatedPythonExecutor as IsolatedPythonExecutor
    from playbooks.execution.isolated_executor import OpaqueValue as OpaqueValue
    from playbooks.execution.sandbox import SandboxLimits as SandboxLimits

_LAZY = {
    "IsolatedPythonExecutor": "playbooks.execution.isolated_executor",
    "OpaqueValue": "playbooks.execution.isolated_executor",
    "SandboxLimits": "playbooks.execution.sandbox",
}

__all__ = (
    "END",
    "NEED_DATA",
    "ExecutionResult",
    "IsolatedPythonExecutor",
    "OpaqueValue",
    "SandboxLimits",
    "Statement",
    "StatementSplitter",
    "StreamingPythonExecutor",
    "ToolCall",
    "ToolCallInterceptor",
    "current_tool_call",
    "durable_call",
)


def __getattr__(attr: str) -> Any:
    where = _LAZY.get(attr)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    value = getattr(importlib.import_module(where), attr)
    globals()[attr] = value
    return value
