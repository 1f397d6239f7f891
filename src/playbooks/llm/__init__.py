"""The LLM layer: streamed chat responses from OpenAI-compatible endpoints, and cassettes to replay them.

Only the standard library and anyio are used (the HTTP/1.1 client and the Server-Sent Events decoder
are in private modules), so this layer runs under asyncio and trio alike.
"""

from __future__ import annotations

from typing import Any

from playbooks.llm.base import LLMProvider as LLMProvider
from playbooks.llm.base import LLMRequest as LLMRequest
from playbooks.llm.base import Message as Message
from playbooks.llm.base import Usage as Usage
from playbooks.llm.errors import CassetteError as CassetteError
from playbooks.llm.errors import LLMConnectionError as LLMConnectionError
from playbooks.llm.errors import LLMError as LLMError
from playbooks.llm.errors import LLMRateLimitError as LLMRateLimitError
from playbooks.llm.errors import LLMResponseError as LLMResponseError
from playbooks.llm.openai import OpenAIProvider as OpenAIProvider
from playbooks.llm.replay import Cassette as Cassette
from playbooks.llm.replay import Interaction as Interaction
from playbooks.llm.replay import RecordingProvider as RecordingProvider
from playbooks.llm.replay import ReplayProvider as ReplayProvider

__all__ = (
    "Cassette",
    "CassetteError",
    "Interaction",
    "LLMConnectionError",
    "LLMError",
    "LLMProvider",
    "LLMRateLimitError",
    "LLMRequest",
    "LLMResponseError",
    "Message",
    "Usage",
    "OpenAIProvider",
    "PROVIDER_NAMES",
    "RecordingProvider",
    "ReplayProvider",
    "create_llm_provider",
)

PROVIDER_NAMES = ("openai", "replay", "record")


def create_llm_provider(name: str, **kwargs: Any) -> LLMProvider:
    """Build a provider by name, passing ``kwargs`` to its constructor.

    * ``"openai"``: :class:`OpenAIProvider` (``base_url``, ``model``, ``api_key``, ...).
    * ``"replay"``: :class:`ReplayProvider` (``cassette_path`` required, ``seed``, ``match``, ...).
    * ``"record"``: :class:`RecordingProvider` (``cassette_path`` required, ``append``). ``inner`` is a
      provider or the name of one (default ``"openai"``); the remaining arguments build that inner
      provider.

    Raises ``ValueError`` for an unknown name and ``TypeError`` for missing or unknown arguments.
    """
    if name == "openai":
        return OpenAIProvider(**kwargs)
    if name == "replay":
        return ReplayProvider(**kwargs)
    if name == "record":
        if "cassette_path" not in kwargs:
            raise TypeError("create_llm_provider('record', ...) needs cassette_path=")
        cassette_path = kwargs.pop("cassette_path")
        append = bool(kwargs.pop("append", False))
        secrets = tuple(kwargs.pop("secrets", ()))
        inner = kwargs.pop("inner", "openai")
        if isinstance(inner, str):
            if inner == "record":
                raise ValueError("a recording provider cannot record another recording provider")
            inner = create_llm_provider(inner, **kwargs)
        elif kwargs:
            raise TypeError(f"unexpected arguments with an inner provider instance: {sorted(kwargs)}")
        if not isinstance(inner, LLMProvider):
            raise TypeError(f"inner must be an LLMProvider or a provider name, got {inner!r}")
        return RecordingProvider(inner, cassette_path, append=append, secrets=secrets)
    raise ValueError(f"unknown LLM provider {name!r}; known providers: {', '.join(PROVIDER_NAMES)}")
