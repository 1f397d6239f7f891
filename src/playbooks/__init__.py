"""playbooks: a durable async interpreter for LLM-generated Python."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playbooks.agent import Agent as Agent
    from playbooks.checkpoints import CheckpointManager as CheckpointManager
    from playbooks.checkpoints import CheckpointProvider as CheckpointProvider
    from playbooks.checkpoints import RecoveryCoordinator as RecoveryCoordinator
    from playbooks.checkpoints.providers.filesystem import (
        FilesystemCheckpointProvider as FilesystemCheckpointProvider,
    )
    from playbooks.errors import CheckpointError as CheckpointError
    from playbooks.errors import CheckpointWarning as CheckpointWarning
    from playbooks.errors import CodeExecutionError as CodeExecutionError
    from playbooks.errors import CodeSyntaxError as CodeSyntaxError
    from playbooks.errors import InterpreterError as InterpreterError
    from playbooks.errors import LLMCodeError as LLMCodeError
    from playbooks.errors import NonDeterminismError as NonDeterminismError
    from playbooks.errors import PlaybooksError as PlaybooksError
    from playbooks.errors import UnrestoredValueError as UnrestoredValueError
    from playbooks.execution.isolated_executor import IsolatedPythonExecutor as IsolatedPythonExecutor
    from playbooks.execution.sandbox import SandboxLimits as SandboxLimits
    from playbooks.execution.streaming_python_executor import ExecutionResult as ExecutionResult
    from playbooks.execution.streaming_python_executor import (
        StreamingPythonExecutor as StreamingPythonExecutor,
    )
    from playbooks.execution.tool_calls import current_tool_call as current_tool_call
    from playbooks.execution.tool_calls import cheap as cheap
    from playbooks.execution.tool_calls import durable_call as durable_call
    from playbooks.execution.tool_calls import resumed as resumed
    from playbooks.execution.retry import RetryPolicy as RetryPolicy
    from playbooks.execution.retry import retry as retry

__version__ = "0.1.0"

_WHERE = {
    "Agent": "playbooks.agent",
    "CheckpointError": "playbooks.errors",
    "CheckpointManager": "playbooks.checkpoints",
    "CheckpointProvider": "playbooks.checkpoints",
    "CheckpointWarning": "playbooks.errors",
    "CodeExecutionError": "playbooks.errors",
    "CodeSyntaxError": "playbooks.errors",
    "ExecutionResult": "playbooks.execution.streaming_python_executor",
    "FilesystemCheckpointProvider": "playbooks.checkpoints.providers.filesystem",
    "InterpreterError": "playbooks.errors",
    "IsolatedPythonExecutor": "playbooks.execution.isolated_executor",
    "LLMCodeError": "playbooks.errors",
    "NonDeterminismError": "playbooks.errors",
    "PlaybooksError": "playbooks.errors",
    "RecoveryCoordinator": "playbooks.checkpoints",
    "SandboxLimits": "playbooks.execution.sandbox",
    "StreamingPythonExecutor": "playbooks.execution.streaming_python_executor",
    "UnrestoredValueError": "playbooks.errors",
    "current_tool_call": "playbooks.execution.tool_calls",
    "cheap": "playbooks.execution.tool_calls",
    "durable_call": "playbooks.execution.tool_calls",
    "resumed": "playbooks.execution.tool_calls",
    "retry": "playbooks.execution.retry",
    "RetryPolicy": "playbooks.execution.retry",
}
__all__ = ("__version__", *sorted(_WHERE))
_SUBMODULES = frozenset(
    {"agent", "checkpoints", "cli", "config", "errors", "execution", "llm", "notebook", "program"}
)


def __getattr__(attr: str) -> Any:
    """Import a public name's module on first access: ``import playbooks`` (and the command line's
    start, which imports this package) loads nothing it does not use."""
    where = _WHERE.get(attr)
    if where is not None:
        value = getattr(importlib.import_module(where), attr)
    elif attr in _SUBMODULES:  # ``import playbooks`` then ``playbooks.checkpoints...`` still works
        value = importlib.import_module(f"{__name__}.{attr}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    globals()[attr] = value  # the next access is a plain lookup
    return value


def load_ipython_extension(ip: Any) -> None:
    """``%load_ext playbooks`` in IPython or Jupyter: registers the ``%%durable`` cell magic (see
    :mod:`playbooks.notebook` and docs/notebooks.md)."""
    from playbooks.notebook import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip: Any) -> None:
    """``%unload_ext playbooks``."""
    from playbooks.notebook import unload_ipython_extension as unload

    unload(ip)


def __dir__() -> list[str]:
    return sorted({*globals(), *_WHERE})
