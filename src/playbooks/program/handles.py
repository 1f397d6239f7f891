"""What LLM code and python playbooks hold of the runtime: ``OtherAgent`` handles, and which playbook
frame is running.

Kept apart from :mod:`playbooks.program.runtime` because a handle travels in checkpoints and into
isolated workers: unpickling one imports this small module, not the runtime and its LLM client.
"""

from __future__ import annotations

import contextvars
import sys
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playbooks.program.runtime import PlaybookFrame

__all__ = ("AgentHandle", "current_frame")

_CURRENT_FRAME: contextvars.ContextVar[PlaybookFrame | None] = contextvars.ContextVar(
    "playbooks_current_frame", default=None
)


def current_frame() -> PlaybookFrame | None:
    """The playbook frame running in this task (``None`` outside a playbook)."""
    return _CURRENT_FRAME.get()


class AgentHandle:
    """``OtherAgent`` in LLM code and python playbooks: its public playbooks as attributes.

    It holds only names: ``Other.Playbook`` resolves, at call time, to the tool ``"Other.Playbook"``
    of the running frame's namespace (bound through its executor's interceptor) or, in python
    playbooks, of the frame's agent. So a handle pickles as its names and never goes stale.
    """

    def __init__(self, name: str, public: Iterable[str] = ()) -> None:
        self._name = name
        self._public = tuple(public)

    def __getattr__(self, attribute: str) -> Callable[..., Any]:
        if attribute.startswith("__") or attribute in ("_name", "_public"):
            raise AttributeError(attribute)
        key = f"{self._name}.{attribute}"
        frame = _CURRENT_FRAME.get()
        if frame is not None and attribute in self._public:
            tool = frame.namespace.get(key) or frame.agent.tools.get(key)
            if tool is not None:
                return tool
        if frame is None and attribute in self._public:
            # In an isolated worker (which runs no playbook frames): the tool bound in the namespace
            # of the code that asks.
            found: Callable[..., Any] | None = sys._getframe(1).f_globals.get(key)
            if callable(found) and getattr(found, "__playbooks_tool__", None) == key:
                return found
            raise AttributeError(f"{key} can only be called from a running playbook")
        public = ", ".join(self._public) or "none"
        raise AttributeError(f"agent {self._name} has no public playbook {attribute!r} (public playbooks: {public})")

    def __reduce__(self) -> tuple[Any, ...]:
        return (AgentHandle, (self._name, self._public))

    def __repr__(self) -> str:
        return f"<agent {self._name}>"
