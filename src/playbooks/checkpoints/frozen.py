"""The globals a checkpoint may name: frozen paths that every later version keeps importable.

A checkpoint stores pickles (namespace variables, call results, exceptions, host state), and a pickle
names classes and functions by ``module:qualname``. A run killed under one version of playbooks and
resumed under the next can only be unpickled if every such name still resolves. So:

* :data:`FROZEN_GLOBALS` lists every ``playbooks`` global that real checkpoints name (the test
  ``tests/test_storage_format.py`` runs every example and durable scenario, collects the globals
  their records name, and fails on a ``playbooks`` global missing here, or on a module outside
  :data:`STABLE_MODULES`; it prints what to add).
* A name listed here is never removed. To move or rename one, keep the old path as an alias
  (``OldName = NewName`` in the old module, or a module that re-exports it); the same test checks that
  every listed name still imports.
* Other modules that pickles may name are the standard library and cloudpickle
  (:data:`STABLE_MODULES`), whose compatibility is theirs.

The on-disk format around the pickles is versioned separately: see
:data:`playbooks.checkpoints.codec.FORMAT_VERSION` and docs/durability.md ("On-disk format").
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ("FROZEN_GLOBALS", "STABLE_MODULES", "is_allowed", "resolve")

FROZEN_GLOBALS: frozenset[str] = frozenset(
    {
        # functions and classes of the LLM's code (cloudpickle by value) come back through this
        "playbooks.checkpoints.namespace:_restore_function",
        # closure cells (shared between closures), tools referred to by alias, placeholders
        "playbooks.checkpoints.namespace:_empty_cell",
        "playbooks.checkpoints.namespace:_fill_cell",
        "playbooks.checkpoints.namespace:_live_bound",
        "playbooks.checkpoints.namespace:UnrestoredValue",
        # tasks and task groups of the LLM's code, as they come back after a resume
        "playbooks.checkpoints.namespace:FinishedTask",
        "playbooks.checkpoints.namespace:ExitedTaskGroup",
        # exceptions raised by tools and by the LLM's code
        "playbooks.checkpoints.outcome:rebuild_exception",
        "playbooks.checkpoints.outcome:restore_exception_state",
        "playbooks.checkpoints.outcome:StoredExceptionStandIn",
        "playbooks.errors:_rebuild_error",
        "playbooks.errors:CodeExecutionError",
        "playbooks.errors:CodeSyntaxError",
        "playbooks.errors:NonDeterminismError",
        # the program runtime's host state and results
        "playbooks.llm.base:Message",
        "playbooks.program.builtins:AgentMessage",
        "playbooks.program.builtins:PlaybookReturn",
        "playbooks.program.handles:AgentHandle",
        "playbooks.program.prompt:ResponseReport",
        "playbooks.program.runtime:AgentHandle",  # (its name before handles.py: still resolves)
        "playbooks.program.runtime:_TurnOutcome",
    }
)
"""``module:qualname`` of every playbooks global a checkpoint may name."""

STABLE_MODULES: tuple[str, ...] = (
    "builtins",
    "cloudpickle",
    "collections",
    "copyreg",
    "datetime",
    "decimal",
    "fractions",
    "enum",
    "functools",
    "operator",
    "types",
    "_codecs",
    "re",
    "pathlib",
    "uuid",
    "array",
    "_collections_abc",
    "abc",
    "typing",
    "__main__",
    "__builtin__",
)
"""Modules outside playbooks that checkpoints may name (and their submodules)."""


def is_allowed(name: str) -> bool:
    """Whether a ``module:qualname`` that a checkpoint names is frozen or in a stable module."""
    module = name.split(":", 1)[0]
    if module == "playbooks" or module.startswith("playbooks."):
        return name in FROZEN_GLOBALS
    return any(module == m or module.startswith(m + ".") for m in STABLE_MODULES)


def resolve(name: str) -> Any:
    """Import and return the object named ``module:qualname``; raise if it no longer exists."""
    module, qualname = name.split(":", 1)
    obj: Any = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return obj
