"""The one interception point for calls from LLM code to the host's tools.

Every tool an agent exposes is bound in the LLM's namespace to a thin wrapper that routes the call
through a :class:`ToolCallInterceptor`. Each call gets a sequence number *when it starts* (so concurrent
calls under ``asyncio.gather`` are numbered in the order the code issued them) and an idempotency key
``{run_id}:{frame_id}:{seq}`` that a tool can read with :func:`current_tool_call` to make itself
exactly-once. The durability layer journals calls by subclassing the interceptor; the executor never
changes for it.
"""

from __future__ import annotations

import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ("ToolCall", "ToolCallInterceptor", "bind_tools", "current_tool_call")


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool by LLM code: which tool, its arguments, and its stable identity."""

    name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    seq: int
    idempotency_key: str


_CURRENT: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar("playbooks_tool_call", default=None)


def current_tool_call() -> ToolCall | None:
    """The call being served, as seen from inside a tool (``None`` outside a tool call)."""
    return _CURRENT.get()


class ToolCallInterceptor:
    """Numbers tool calls and runs them; subclasses record or replay them.

    ``run_id`` and ``frame_id`` scope the idempotency keys: the same call of the same frame gets the
    same key on every attempt, including after a resume.
    """

    def __init__(
        self,
        *,
        run_id: str,
        frame_id: str = "0",
        next_seq: int = 0,
        observer: Callable[[ToolCall, Any, BaseException | None], None] | None = None,
    ) -> None:
        self.run_id = run_id
        self.frame_id = frame_id
        self.next_seq = next_seq
        self.observer = observer
        """Called after every call ends, with its value or exception (also for replayed calls)."""

    def observe(self, call: ToolCall, value: Any, error: BaseException | None) -> None:
        """Tell the observer, if any, how ``call`` ended."""
        if self.observer is not None:
            self.observer(call, value, error)

    def start(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ToolCall:
        """Assign the next sequence number to a call that is about to run."""
        seq = self.next_seq
        self.next_seq += 1
        return ToolCall(name, args, dict(kwargs), seq, f"{self.run_id}:{self.frame_id}:{seq}")

    async def call_async(self, call: ToolCall, fn: Callable[..., Awaitable[Any]]) -> Any:
        """Run an async tool for ``call``; override to journal or replay."""
        token = _CURRENT.set(call)
        try:
            value = await fn(*call.args, **call.kwargs)
        except Exception as exc:
            self.observe(call, None, exc)
            raise
        finally:
            _CURRENT.reset(token)
        self.observe(call, value, None)
        return value

    def call_sync(self, call: ToolCall, fn: Callable[..., Any]) -> Any:
        """Run a sync tool for ``call``; override to journal or replay."""
        token = _CURRENT.set(call)
        try:
            value = fn(*call.args, **call.kwargs)
        except Exception as exc:
            self.observe(call, None, exc)
            raise
        finally:
            _CURRENT.reset(token)
        self.observe(call, value, None)
        return value


def _is_async(fn: Callable[..., Any]) -> bool:
    target = getattr(fn, "__call__", None)
    return inspect.iscoroutinefunction(fn) or (
        not inspect.isfunction(fn) and target is not None and inspect.iscoroutinefunction(target)
    )


def bind_tools(
    tools: Mapping[str, Callable[..., Any]], interceptor: ToolCallInterceptor
) -> dict[str, Callable[..., Any]]:
    """Wrap each tool so that calling it from LLM code goes through ``interceptor``.

    Async tools stay awaitable (``await Work(1)``); sync tools stay plain calls.
    """
    bound: dict[str, Callable[..., Any]] = {}
    for name, fn in tools.items():
        if not callable(fn):
            raise TypeError(f"tool {name!r} is not callable: {fn!r}")
        bound[name] = _wrap(name, fn, interceptor)
    return bound


def _wrap(name: str, fn: Callable[..., Any], interceptor: ToolCallInterceptor) -> Callable[..., Any]:
    if _is_async(fn):

        async def async_tool(*args: Any, **kwargs: Any) -> Any:
            return await interceptor.call_async(interceptor.start(name, args, kwargs), fn)

        wrapper: Callable[..., Any] = async_tool
    else:

        def sync_tool(*args: Any, **kwargs: Any) -> Any:
            return interceptor.call_sync(interceptor.start(name, args, kwargs), fn)

        wrapper = sync_tool
    try:
        functools.update_wrapper(wrapper, fn)
    except AttributeError:  # callables without __name__ and friends
        pass
    wrapper.__name__ = name
    wrapper.__qualname__ = name
    wrapper.__playbooks_tool__ = name  # type: ignore[attr-defined]  # not saved in checkpoints: bound again
    return wrapper
