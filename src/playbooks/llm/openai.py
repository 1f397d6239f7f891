"""A provider for OpenAI-compatible ``/chat/completions`` endpoints, streamed over Server-Sent Events.

Works with api.openai.com and the many servers that copy its protocol (vLLM, llama.cpp, Ollama,
LiteLLM, ...). Configuration comes from the arguments, else from ``OPENAI_BASE_URL``,
``OPENAI_API_KEY`` and ``PLAYBOOKS_MODEL``.

Retry rules, chosen so that a consumer never sees a chunk twice:

* Connection failures, timeouts, ``429`` and ``500``/``502``/``503``/``504`` are retried with
  exponential backoff and jitter (``Retry-After`` / ``retry-after-ms`` are honoured), but only until
  the first chunk of text has been yielded. Each retry is logged on the ``playbooks.llm`` logger.
* After that, a broken stream raises :class:`~playbooks.llm.errors.LLMConnectionError` at once, saying
  how much text had arrived; the caller (the durable LLM call) decides how to continue.
* Any other ``4xx`` raises :class:`~playbooks.llm.errors.LLMResponseError` at once with the server's
  own error message.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import anyio

from playbooks.llm._http import (
    URL,
    HTTPResponse,
    ProtocolError,
    TransportError,
    check_header,
    open_request,
    parse_url,
)
from playbooks.llm._sse import SSEDecoder, SSEEvent
from playbooks.llm.base import LLMProvider, LLMRequest, Usage
from playbooks.llm.errors import LLMConnectionError, LLMError, LLMRateLimitError, LLMResponseError

__all__ = ("DEFAULT_BASE_URL", "OpenAIProvider")

DEFAULT_BASE_URL = "https://api.openai.com/v1"
RETRYABLE_STATUSES = frozenset({429, 500, 502, 503, 504})

_logger = logging.getLogger("playbooks.llm")
_ERROR_BODY_LIMIT = 64 * 1024
_JSON_BODY_LIMIT = 64 * 1024 * 1024
_EXCERPT = 500


def _excerpt(text: str, limit: int = _EXCERPT) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more characters]"


def _server_message(body: bytes) -> str:
    """The error message an OpenAI-style error body carries, else an excerpt of the body."""
    text = body.decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        return _excerpt(text) or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return str(error["message"])
        if isinstance(error, str):
            return error
        for key in ("message", "detail"):
            if isinstance(data.get(key), str):
                return str(data[key])
    return _excerpt(text)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait that the server asked for (``retry-after-ms`` or ``Retry-After``), if any."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds is not None:
        try:
            return max(0.0, float(milliseconds) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


@dataclass(slots=True)
class _Failure:
    """Why one attempt failed, and whether another may succeed."""

    kind: str  # "connection", "rate_limit" or "status"
    reason: str
    retryable: bool = True
    status: int | None = None
    body: str = ""
    retry_after: float | None = None

    def error(self, url: URL, attempts: int) -> LLMError:
        tried = f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}"
        if self.kind == "connection":
            return LLMConnectionError(f"cannot stream a response from {url}: {self.reason} ({tried})")
        if self.kind == "rate_limit":
            return LLMRateLimitError(
                f"{url} is rate limiting requests (HTTP {self.status}): {self.reason} ({tried})",
                status=self.status,
                body=self.body,
                retry_after=self.retry_after,
            )
        return LLMResponseError(
            f"{url} answered HTTP {self.status}: {self.reason} ({tried})", status=self.status, body=self.body
        )


class _ChatStream:
    """The text deltas of one successful (status 200) response."""

    def __init__(self, response: HTTPResponse, url: URL) -> None:
        self._response = response
        self._url = url
        self._decoder = SSEDecoder()
        self._events: deque[SSEEvent] = deque()
        self._eof = False
        self._finished = False
        self._saw_finish_reason = False
        self._json = response.content_type == "application/json"
        self.received_chars = 0
        self.usage: Usage | None = None

    async def next_text(self) -> str | None:
        """Return the next non-empty piece of text, or ``None`` when the response is complete.

        Raises :class:`TransportError` when the stream breaks or ends early, and
        :class:`LLMResponseError` when it is malformed or reports an error.
        """
        if self._json:
            return await self._whole_json()
        while not self._finished:
            if self._events:
                text = self._handle(self._events.popleft())
                if text:
                    self.received_chars += len(text)
                    return text
                continue
            if self._eof:
                if self._saw_finish_reason:
                    # Some servers end after the finish_reason without sending [DONE].
                    break
                raise TransportError("the stream ended before 'data: [DONE]'")
            data = await self._response.receive()
            if data:
                self._events.extend(self._decoder.feed(data))
            else:
                self._eof = True
                self._events.extend(self._decoder.close())
        self._finished = True
        return None

    async def _whole_json(self) -> str | None:
        # The server ignored "stream": true and sent one JSON completion.
        if self._finished:
            return None
        self._finished = True
        body = await self._response.read(_JSON_BODY_LIMIT)
        try:
            data = json.loads(body)
            content = data["choices"][0]["message"]["content"]
            usage = data.get("usage") or {}
            if isinstance(usage.get("prompt_tokens"), int) and isinstance(usage.get("completion_tokens"), int):
                self.usage = Usage(usage["prompt_tokens"], usage["completion_tokens"])
        except (ValueError, KeyError, IndexError, TypeError):
            raise self._malformed("a JSON body that is not a chat completion", body.decode("utf-8", "replace"))
        if content is not None and not isinstance(content, str):
            raise self._malformed("a chat completion whose content is not text", body.decode("utf-8", "replace"))
        self.received_chars += len(content or "")
        return content or None

    def _handle(self, event: SSEEvent) -> str:
        if event.data.strip() == "[DONE]":
            self._finished = True
            return ""
        try:
            data = json.loads(event.data)
        except ValueError:
            raise self._malformed("an event whose data is not JSON", event.data) from None
        if not isinstance(data, dict):
            raise self._malformed("an event whose data is not a JSON object", event.data)
        if "error" in data:
            raise LLMResponseError(
                f"{self._url} reported an error in the stream after {self.received_chars} characters: "
                f"{_server_message(event.data.encode())}",
                status=self._response.status,
                body=_excerpt(event.data),
            )
        usage = data.get("usage")
        if isinstance(usage, dict):
            prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
            if isinstance(prompt, int) and isinstance(completion, int):
                self.usage = Usage(prompt, completion)
        choices = data.get("choices")
        if not choices:
            return ""  # e.g. the usage chunk, sent with an empty list of choices
        choice = choices[0] if isinstance(choices, list) else None
        if not isinstance(choice, dict):
            raise self._malformed("an event with malformed 'choices'", event.data)
        if choice.get("finish_reason"):
            self._saw_finish_reason = True
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content is None:
            return ""
        if not isinstance(content, str):
            raise self._malformed("an event whose delta content is not text", event.data)
        return content

    def _malformed(self, what: str, data: str) -> LLMResponseError:
        return LLMResponseError(
            f"malformed stream from {self._url}: {what} (after {self.received_chars} characters of text)",
            status=self._response.status,
            body=_excerpt(data),
        )

    async def aclose(self) -> None:
        await self._response.aclose()


class OpenAIProvider(LLMProvider):
    """Stream chat completions from an OpenAI-compatible endpoint; see the module docstring.

    ``timeout`` bounds connecting, sending and each wait for data, not the whole response.
    ``backoff_base`` is the first retry's delay (doubled for each next one, capped at ``backoff_max``,
    with jitter); a server asking to wait longer than ``backoff_max`` is not retried. ``headers`` are
    sent with every request; ``ssl_context`` replaces the default certificate checks for ``https``.
    ``usage`` asks the endpoint for token usage (``stream_options.include_usage``); what it reports is
    :attr:`last_usage` after each stream. ``continuation`` says how the endpoint continues a partial
    assistant message (``LLMRequest.continue_final``): ``"vllm"`` (``continue_final_message``) or
    ``"prefix"`` (``"prefix": true`` on the message).
    """

    def __init__(
        self,
        base_url: str | None = None,
        model: str | None = None,
        api_key: str | None = None,
        *,
        max_retries: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        timeout: float = 60.0,
        headers: Mapping[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
        usage: bool = True,
        continuation: str | None = None,
    ) -> None:
        if max_retries < 0:
            raise ValueError(f"max_retries must be >= 0, got {max_retries}")
        if backoff_base < 0 or backoff_max < 0:
            raise ValueError("backoff_base and backoff_max must be >= 0")
        if timeout <= 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
        self.model = model or os.environ.get("PLAYBOOKS_MODEL") or None
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")
        self._api_key = key.strip() if key else None
        self.max_retries = max_retries
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.timeout = timeout
        self._extra_headers = dict(headers or {})
        self._url = parse_url(self.base_url + "/chat/completions")
        for name, value in self._headers():
            check_header(name, value)
        self._ssl_context = ssl_context
        self._random = random.Random()
        self.request_usage = usage
        if continuation not in (None, "vllm", "prefix"):
            raise ValueError(f'continuation must be "vllm", "prefix" or None, got {continuation!r}')
        self.continuation = continuation

    def __repr__(self) -> str:
        return f"OpenAIProvider(base_url={self.base_url!r}, model={self.model!r})"

    @property
    def url(self) -> str:
        """The chat completions endpoint requests are sent to."""
        return str(self._url)

    def _headers(self) -> list[tuple[str, str]]:
        headers = [
            ("Content-Type", "application/json"),
            ("Accept", "text/event-stream"),
            ("Accept-Encoding", "identity"),
            ("User-Agent", "playbooks"),
        ]
        if self._api_key:
            headers.append(("Authorization", f"Bearer {self._api_key}"))
        headers += self._extra_headers.items()
        return headers

    def _payload(self, request: LLMRequest) -> bytes:
        model = request.model or self.model
        if not model:
            raise LLMError(
                "no model to ask: set LLMRequest.model, pass model= to OpenAIProvider, "
                "or set the PLAYBOOKS_MODEL environment variable"
            )
        payload: dict[str, Any] = request.to_dict()
        payload["model"] = model
        payload["stream"] = True
        if payload.pop("continue_final", False):
            if self.continuation == "vllm":  # vLLM, SGLang and other servers of chat templates
                payload["continue_final_message"] = True
                payload["add_generation_prompt"] = False
            elif self.continuation == "prefix":  # Mistral, DeepSeek
                payload["messages"][-1]["prefix"] = True
            else:
                raise LLMError("this request continues the assistant's last message, and the provider does not "
                               'know how its endpoint says so: pass continuation="vllm" or "prefix"')
        if self.request_usage:
            payload["stream_options"] = {"include_usage": True}
        return json.dumps(payload, ensure_ascii=False).encode("utf-8")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return retry_after
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (attempt - 1))
        return self._random.uniform(ceiling / 2, ceiling)

    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        payload = self._payload(request)
        chat, text = await self._open(payload)
        try:
            while text is not None:
                yield text
                try:
                    text = await chat.next_text()
                except TransportError as exc:
                    raise LLMConnectionError(
                        f"connection to {self._url} lost mid-stream after {chat.received_chars} characters "
                        f"of the response had been received: {exc}; not retried, because that text was "
                        f"already handed on and a new request would repeat it",
                        received_chars=chat.received_chars,
                    ) from exc
                except ProtocolError as exc:
                    raise LLMResponseError(
                        f"malformed HTTP from {self._url} after {chat.received_chars} characters: {exc}"
                    ) from exc
        finally:
            await chat.aclose()
        self.last_usage = chat.usage  # last, with no await after it: the consumer reads it next

    async def _open(self, payload: bytes) -> tuple[_ChatStream, str | None]:
        """Send the request until an attempt yields its first text (or completes), retrying per the rules."""
        if self._url.scheme == "https" and self._ssl_context is None:
            self._ssl_context = ssl.create_default_context()
        attempt = 0
        while True:
            attempt += 1
            failure = await self._attempt(payload)
            if isinstance(failure, tuple):
                return failure
            if not failure.retryable or attempt > self.max_retries:
                raise failure.error(self._url, attempt)
            if failure.retry_after is not None and failure.retry_after > self.backoff_max:
                failure.reason += (
                    f"; the server asked to wait {failure.retry_after:g} s, more than "
                    f"backoff_max={self.backoff_max:g} s"
                )
                raise failure.error(self._url, attempt)
            delay = self._delay(attempt, failure.retry_after)
            _logger.warning(
                "LLM request to %s failed (%s); retry %d of %d in %.2f s",
                self._url,
                failure.reason,
                attempt,
                self.max_retries,
                delay,
            )
            await anyio.sleep(delay)

    async def _attempt(self, payload: bytes) -> tuple[_ChatStream, str | None] | _Failure:
        try:
            response = await open_request(
                "POST", self._url, self._headers(), payload, timeout=self.timeout, ssl_context=self._ssl_context
            )
        except TransportError as exc:
            return _Failure("connection", str(exc), retryable=exc.retryable)
        except ProtocolError as exc:
            raise LLMResponseError(f"{self._url} did not answer in HTTP/1.1: {exc}") from exc
        if response.status == 200:
            chat = _ChatStream(response, self._url)
            try:
                return chat, await chat.next_text()
            except TransportError as exc:
                await chat.aclose()
                return _Failure("connection", f"{exc} (before any text was received)", retryable=exc.retryable)
            except ProtocolError as exc:
                await chat.aclose()
                raise LLMResponseError(f"malformed HTTP from {self._url}: {exc}") from exc
            except BaseException:
                await chat.aclose()
                raise
        try:
            body = await response.read(_ERROR_BODY_LIMIT)
        except (TransportError, ProtocolError):
            body = b""
        finally:
            await response.aclose()
        message = _server_message(body)
        excerpt = _excerpt(body.decode("utf-8", "replace"))
        if response.status in RETRYABLE_STATUSES:
            return _Failure(
                "rate_limit" if response.status == 429 else "status",
                message,
                status=response.status,
                body=excerpt,
                retry_after=_retry_after(response.headers),
            )
        raise LLMResponseError(
            f"{self._url} answered HTTP {response.status} {response.reason}: {message}",
            status=response.status,
            body=excerpt,
        )
