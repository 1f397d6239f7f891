"""The agent: who runs the LLM's code, and which host callables that code may call."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

__all__ = ("Agent", "AgentLike")


@runtime_checkable
class AgentLike(Protocol):
    """Anything with an ``id`` and a mapping of ``tools`` can run LLM code."""

    @property
    def id(self) -> str: ...

    @property
    def tools(self) -> Mapping[str, Callable[..., Any]]: ...


class Agent:
    """An agent id plus the host's callables (sync or async) that LLM code may call by name.

    The id scopes the agent's checkpoints; each tool appears in the LLM's namespace under its key, and
    every call to it is a durable call (journaled, replayed after a crash, given an idempotency key).
    """

    def __init__(self, id: str, tools: Mapping[str, Callable[..., Any]] | None = None) -> None:
        if not isinstance(id, str) or not id:
            raise ValueError("Agent id must be a non-empty string")
        self.id = id
        self.tools: dict[str, Callable[..., Any]] = dict(tools or {})

    def __repr__(self) -> str:
        return f"Agent({self.id!r}, tools={sorted(self.tools)!r})"
