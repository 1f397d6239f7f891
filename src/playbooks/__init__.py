"""playbooks: a durable async interpreter for LLM-generated Python."""

from __future__ import annotations

from playbooks.agent import Agent as Agent
from playbooks.errors import CodeExecutionError as CodeExecutionError
from playbooks.errors import CodeSyntaxError as CodeSyntaxError
from playbooks.errors import InterpreterError as InterpreterError
from playbooks.errors import LLMCodeError as LLMCodeError
from playbooks.errors import PlaybooksError as PlaybooksError
from playbooks.execution.streaming_python_executor import ExecutionResult as ExecutionResult
from playbooks.execution.streaming_python_executor import (
    StreamingPythonExecutor as StreamingPythonExecutor,
)
from playbooks.execution.tool_calls import current_tool_call as current_tool_call

__version__ = "0.1.0"
__all__ = (
    "Agent",
    "CodeExecutionError",
    "CodeSyntaxError",
    "ExecutionResult",
    "InterpreterError",
    "LLMCodeError",
    "PlaybooksError",
    "StreamingPythonExecutor",
    "__version__",
    "current_tool_call",
)
