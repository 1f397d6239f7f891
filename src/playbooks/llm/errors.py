"""Exceptions of the LLM layer.

They are all :class:`~playbooks.errors.InterpreterError`: an unreachable endpoint, a rate limit or a
cassette that does not match the program are outages or set-up mistakes, never something to show the
LLM.
"""

from __future__ import annotations

from playbooks.errors import InterpreterError

__all__ = (
    "CassetteError",
    "LLMConnectionError",
    "LLMError",
    "LLMRateLimitError",
    "LLMResponseError",
)


class LLMError(InterpreterError):
    """Base class of every failure to get a response from an LLM provider."""


class LLMConnectionError(LLMError):
    """Raised when the endpoint cannot be reached, times out or drops the connection.

    Before the first chunk of text this is raised only after the retries are used up. After text was
    handed to the caller it is raised at once (retrying would duplicate text); ``received_chars`` then
    says how many characters of the response had been received.
    """

    def __init__(self, message: str, *, received_chars: int = 0) -> None:
        super().__init__(message)
        self.received_chars = received_chars


class LLMResponseError(LLMError):
    """Raised when the server answers with an error status or a malformed stream.

    ``status`` is the HTTP status (``None`` when the failure is not tied to one) and ``body`` an excerpt
    of what the server sent.
    """

    def __init__(self, message: str, *, status: int | None = None, body: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


class LLMRateLimitError(LLMResponseError):
    """Raised when the server still answers 429 after the retries, or asks to wait longer than allowed.

    ``retry_after`` is the wait in seconds the server asked for, if it said.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int | None = 429,
        body: str = "",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message, status=status, body=body)
        self.retry_after = retry_after


class CassetteError(LLMError):
    """Raised when a cassette is missing or unreadable, runs out, or does not match a request.

    ``path`` is the cassette file and ``index`` the 0-based number of the request concerned (``None``
    for problems with the file as a whole). The message says how to re-record the cassette.
    """

    def __init__(self, message: str, *, path: str = "", index: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.index = index
