"""The provider interface: a request of chat messages in, a stream of text chunks out.

A provider is an async generator factory. ``stream(request)`` yields the response as chunks of any size
(a token, a word, a whole reply); only their concatenation carries meaning. Providers retry what can be
retried *before* the first chunk and never after it, so a consumer never sees a chunk twice.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ("LLMProvider", "LLMRequest", "Message", "Usage")


@dataclass(frozen=True, slots=True)
class Message:
    """One chat message: ``role`` is ``"system"``, ``"user"`` or ``"assistant"`` (or any role the
    endpoint accepts) and ``content`` its text."""

    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        """Return the message in the OpenAI wire form ``{"role": ..., "content": ...}``."""
        return {"role": self.role, "content": self.content}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Message:
        """Build a message from its wire form; raise ``ValueError`` when a field is missing or not text."""
        role = data.get("role")
        content = data.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise ValueError(f"a message needs string 'role' and 'content', got {dict(data)!r}")
        return cls(role, content)


@dataclass(frozen=True, slots=True)
class LLMRequest:
    """What to ask: the conversation and the sampling settings.

    ``model`` ``None`` means the provider's configured model; ``temperature``, ``max_tokens`` and ``stop``
    ``None`` mean the endpoint's defaults (they are then not sent at all).
    """

    messages: list[Message]
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    stop: list[str] | None = field(default=None)
    continue_final: bool = False
    """The last message is the start of the assistant's answer, to be continued (not answered): the
    response is the rest of it. Endpoints spell this differently; see ``OpenAIProvider(continuation=)``."""

    def to_dict(self) -> dict[str, Any]:
        """Return the request as JSON-ready data; settings left at ``None`` are omitted."""
        data: dict[str, Any] = {
            "messages": [message.to_dict() for message in self.messages],
            "model": self.model,
        }
        if self.temperature is not None:
            data["temperature"] = self.temperature
        if self.max_tokens is not None:
            data["max_tokens"] = self.max_tokens
        if self.stop is not None:
            data["stop"] = list(self.stop)
        if self.continue_final:
            data["continue_final"] = True
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> LLMRequest:
        """Inverse of :meth:`to_dict`; raise ``ValueError`` on malformed data."""
        messages = data.get("messages")
        if not isinstance(messages, list):
            raise ValueError(f"a request needs a list of 'messages', got {messages!r}")
        stop = data.get("stop")
        return cls(
            messages=[Message.from_dict(message) for message in messages],
            model=data.get("model"),
            temperature=data.get("temperature"),
            max_tokens=data.get("max_tokens"),
            stop=list(stop) if stop is not None else None,
            continue_final=bool(data.get("continue_final", False)),
        )

    def last_user_message(self) -> str | None:
        """Return the content of the last ``user`` message, or ``None`` if there is none."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return None


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens an endpoint reported for a request (``prompt_tokens`` read, ``completion_tokens`` written)."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


class LLMProvider(abc.ABC):
    """A source of streamed LLM responses; see the module docstring for the contract.

    ``last_usage`` is the token usage the endpoint reported for the last stream read to its end (set
    just before that stream finishes, so the consumer reads it right after its ``async for``), or
    ``None`` when the endpoint reports none.
    """

    last_usage: Usage | None = None

    @abc.abstractmethod
    def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        """Return an async iterator (normally an async generator) of the response's text chunks.

        Nothing is sent before the first ``__anext__``. Closing the iterator early (``aclose``, or
        leaving an ``async for`` with ``break``) releases the connection. Failures raise
        :class:`~playbooks.llm.errors.LLMError` subclasses.
        """

    async def complete(self, request: LLMRequest) -> str:
        """Return the whole response: the concatenation of :meth:`stream`'s chunks.

        Called from code that a :class:`~playbooks.execution.StreamingPythonExecutor` runs (a
        notebook's ``%%durable`` cell), this is a durable call named ``llm.complete``: journaled, and
        after a crash its response comes back from the journal instead of being asked for again.
        (:meth:`stream` is not: its chunks are used as they come.)
        """
        from playbooks.execution.tool_calls import calling_interceptor

        interceptor = calling_interceptor()
        if interceptor is None:
            return await self._collect(request)
        text: str = await interceptor.call_async(interceptor.start("llm.complete", (request,), {}), self._collect)
        return text

    async def _collect(self, request: LLMRequest) -> str:
        chunks = self.stream(request)
        try:
            return "".join([chunk async for chunk in chunks])
        finally:
            aclose = getattr(chunks, "aclose", None)
            if aclose is not None:
                await aclose()
