"""The built-ins of a playbook program: what LLM code and python playbooks call besides playbooks.

``Step``, ``Say``, ``Return``, ``AskUser``, ``SendMessage`` and ``WaitForMessage`` are async functions
made by :func:`make_builtins` for one agent. They do nothing themselves: each forwards to a
:class:`BuiltinHost` (the runtime), which owns every side effect. The runtime gives the functions to the
agent as *tools*, so every call from LLM code goes through the executor's tool-call interceptor (where
calls are numbered, and can be journaled and replayed).

:data:`BUILTIN_DOCS` describes them for the prompt; :func:`playbook` is the decorator of python
playbooks in ``.pb`` files.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar, overload

__all__ = (
    "BUILTIN_DOCS",
    "BUILTIN_NAMES",
    "AgentMessage",
    "BuiltinHost",
    "PlaybookReturn",
    "make_builtins",
    "playbook",
)


@dataclass(frozen=True, slots=True)
class AgentMessage:
    """A message in an agent's inbox: who sent it and what they said."""

    sender: str
    content: Any

    def __str__(self) -> str:
        return str(self.content)


class PlaybookReturn(Exception):
    """Raised by ``Return(value)`` to end the running playbook; the runtime catches it.

    It is an ``Exception`` on purpose: the executor then reports it like any statement that raised, so
    nothing after ``Return`` runs, and a journal of tool calls records it as the call's outcome.
    """

    def __init__(self, value: Any) -> None:
        super().__init__("Return() ended the playbook")
        self.value = value

    def __reduce__(self) -> tuple[Any, ...]:
        return (PlaybookReturn, (self.value,))


class BuiltinHost(Protocol):
    """What the built-ins forward to: one method per built-in (the runtime implements it)."""

    async def builtin_step(self, step_id: str) -> None: ...

    async def builtin_say(self, target: str, message: Any) -> None: ...

    async def builtin_return(self, value: Any) -> None: ...

    async def builtin_ask_user(self, question: str) -> str: ...

    async def builtin_send_message(self, agent_name: str, message: Any) -> None: ...

    async def builtin_wait_for_message(self, from_agent: str | None) -> AgentMessage: ...


BUILTIN_DOCS: tuple[tuple[str, str], ...] = (
    ("await Step(step_id)", 'Say which step you start, by its id: await Step("02"). Call it for every step.'),
    ("await Say(target, message)", 'Tell something to "user" (shown at once), or to another agent by name.'),
    ("await AskUser(question)", "Ask the user a question; returns their answer as a string."),
    ("await SendMessage(agent_name, message)", "Put a message in another agent's inbox."),
    (
        "await WaitForMessage(from_agent=None)",
        "Wait for the next message to you (from that agent only, if named); returns "
        "AgentMessage(sender, content).",
    ),
    ("await Return(value)", "End this playbook with that value (None if there is nothing to return)."),
)
"""Signatures and one-line descriptions of the built-ins, as the prompt shows them."""

BUILTIN_NAMES: tuple[str, ...] = ("Step", "Say", "AskUser", "SendMessage", "WaitForMessage", "Return")


def make_builtins(host: BuiltinHost) -> dict[str, Callable[..., Awaitable[Any]]]:
    """Return the built-in functions, by name, each forwarding to ``host``.

    Arguments are checked here (a wrong type raises ``TypeError``, which the LLM sees as an error in
    its code); what a call does is up to the host.
    """

    async def Step(step_id: str | int) -> None:  # noqa: N802 - the LLM calls it by this name
        if isinstance(step_id, bool) or not isinstance(step_id, (str, int)):
            raise TypeError(f'Step() expects a step id such as "01", got {step_id!r}')
        text = f"{step_id:02d}" if isinstance(step_id, int) else step_id.strip()
        await host.builtin_step(text)

    async def Say(target: str, message: Any) -> None:  # noqa: N802
        if not isinstance(target, str):
            raise TypeError(f'Say() expects a target such as "user" first, got {target!r}')
        await host.builtin_say(target, message)

    async def Return(value: Any = None) -> None:  # noqa: N802
        await host.builtin_return(value)

    async def AskUser(question: str) -> str:  # noqa: N802
        return await host.builtin_ask_user(str(question))

    async def SendMessage(agent_name: str, message: Any) -> None:  # noqa: N802
        if not isinstance(agent_name, str):
            raise TypeError(f"SendMessage() expects an agent name first, got {agent_name!r}")
        await host.builtin_send_message(agent_name, message)

    async def WaitForMessage(from_agent: str | None = None) -> AgentMessage:  # noqa: N802
        if from_agent is not None and not isinstance(from_agent, str):
            raise TypeError(f"WaitForMessage() expects an agent name or None, got {from_agent!r}")
        return await host.builtin_wait_for_message(from_agent)

    return {
        "Step": Step,
        "Say": Say,
        "AskUser": AskUser,
        "SendMessage": SendMessage,
        "WaitForMessage": WaitForMessage,
        "Return": Return,
    }


_F = TypeVar("_F", bound=Callable[..., Any])


@overload
def playbook(fn: _F, /) -> _F: ...


@overload
def playbook(*, triggers: list[str] | str | None = None, public: bool = False) -> Callable[[_F], _F]: ...


def playbook(
    fn: Any = None, /, *, triggers: list[str] | str | None = None, public: bool = False
) -> Any:
    """Mark an ``async def`` in a ``.pb`` python block as a playbook: ``@playbook`` or
    ``@playbook(triggers=[...], public=True)``.

    The parser reads the options from the source; at run time the decorator only tags the function
    (``__playbook__ = True``) and returns it unchanged.
    """

    def mark(function: _F) -> _F:
        function.__playbook__ = True  # type: ignore[attr-defined]
        return function

    if fn is not None:
        return mark(fn)
    return mark
