"""playbooks: a durable async interpreter for LLM-generated Python."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from playbooks.agent import Agent as Agent
from playbooks.checkpoints import CheckpointManager as CheckpointManager
from playbooks.checkpoints import CheckpointProvider as CheckpointProvider
from playbooks.checkpoints import RecoveryCoordinator as RecoveryCoordinator
from playbooks.errors import CheckpointError as CheckpointError
from playbooks.errors import CheckpointWarning as CheckpointWarning
from playbooks.errors import CodeExecutionError as CodeExecutionError
from playbooks.errors import CodeSyntaxError as CodeSyntaxError
from playbooks.errors import InterpreterError as InterpreterError
from playbooks.errors import LLMCodeError as LLMCodeError
from playbooks.errors import NonDeterminismError as NonDeterminismError
from playbooks.errors import PlaybooksError as PlaybooksError
from playbooks.errors import UnrestoredValueError as UnrestoredValueError
from playbooks.execution.streaming_python_executor import ExecutionResult as ExecutionResult
from playbooks.execution.streaming_python_executor import (
    StreamingPythonExecutor as StreamingPythonExecutor,
)
from playbooks.execution.tool_calls import current_tool_call as current_tool_call

if TYPE_CHECKING:
    from playbooks.checkpoints.providers.filesystem import (
        FilesystemCheckpointProvider as FilesystemCheckpointProvider,
    )

__version__ = "0.1.0"
__all__ = (
    "Agent",
    "CheckpointError",
    "CheckpointManager",
    "CheckpointProvider",
    "CheckpointWarning",
    "CodeExecutionError",
    "CodeSyntaxError",
    "ExecutionResult",
    "FilesystemCheckpointProvider",
    "InterpreterError",
    "LLMCodeError",
    "NonDeterminismError",
    "PlaybooksError",
    "RecoveryCoordinator",
    "StreamingPythonExecutor",
    "UnrestoredValueError",
    "__version__",
    "current_tool_call",
)


def __getattr__(attr: str) -> Any:
    """Import the filesystem provider on first access (``import playbooks`` loads no storage code)."""
    if attr == "FilesystemCheckpointProvider":
        from playbooks.checkpoints.providers.filesystem import FilesystemCheckpointProvider

        return FilesystemCheckpointProvider
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
