"""Retry policies for durable calls: how many attempts, how long between them, which errors retry.

A policy is attached to a function (``@retry(...)``, or ``durable_call(retry=...)``) or given to an
executor for every call it makes (``StreamingPythonExecutor(retry=...)``; ``playbooks run`` reads it
from ``[durability]`` in playbooks.toml). The function's own policy wins.

Every attempt of a durable call is journaled (an ``intent`` record each, written before the attempt
runs) under the call's one idempotency key, so a crash between attempts resumes the count where it
was: the attempt after the kill is numbered after the ones recorded, and ``max_attempts`` counts them
all. A tool reads its attempt number as ``current_tool_call().attempt``. What is retried is an
exception of the tool; a cancellation, or a failure of the interpreter, never is.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = ("RetryPolicy", "policy_of", "retry")

_F = TypeVar("_F", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """``max_attempts`` in all (1: no retry); the wait before attempt ``n + 1`` is
    ``min(max_delay, initial_delay * multiplier ** (n - 1))`` seconds, less up to ``jitter`` of it at
    random (so callers that failed together do not retry together). An exception is retried when it
    is an instance of ``retry_on`` and not of ``give_up_on``."""

    max_attempts: int = 3
    initial_delay: float = 0.5
    multiplier: float = 2.0
    max_delay: float = 30.0
    jitter: float = 0.5
    retry_on: tuple[type[BaseException], ...] = field(default=(Exception,))
    give_up_on: tuple[type[BaseException], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("RetryPolicy.max_attempts must be at least 1")
        if self.initial_delay < 0 or self.max_delay < 0 or self.multiplier < 1:
            raise ValueError("RetryPolicy delays must be >= 0 and its multiplier >= 1")
        if not 0 <= self.jitter <= 1:
            raise ValueError("RetryPolicy.jitter is a fraction of the delay, between 0 and 1")

    def retries(self, error: BaseException, attempt: int) -> bool:
        """Whether attempt ``attempt`` (1-based), which raised ``error``, is followed by another."""
        if attempt >= self.max_attempts or not isinstance(error, Exception):
            return False
        return isinstance(error, self.retry_on) and not isinstance(error, self.give_up_on)

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        base = min(self.max_delay, self.initial_delay * self.multiplier ** max(0, attempt - 1))
        return base * (1 - self.jitter * (rng or random).random())


def retry(policy: RetryPolicy | None = None, /, **options: Any) -> Callable[[_F], _F]:
    """Attach a retry policy to a tool or durable function: ``@retry(max_attempts=5)`` or
    ``@retry(RetryPolicy(...))``. The function itself is returned, marked."""
    chosen = policy if policy is not None else RetryPolicy(**options)
    if policy is not None and options:
        raise TypeError("retry() takes a RetryPolicy or its options, not both")

    def mark(fn: _F) -> _F:
        fn.__playbooks_retry__ = chosen  # type: ignore[attr-defined]
        return fn

    return mark


def policy_of(fn: Callable[..., Any], default: RetryPolicy | None) -> RetryPolicy | None:
    """The policy for calls of ``fn``: its own, else ``default``."""
    own = getattr(fn, "__playbooks_retry__", None)
    return own if isinstance(own, RetryPolicy) else default
