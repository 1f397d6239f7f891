"""The one interception point for calls from LLM code to the host's tools.

Every tool an agent exposes is bound in the LLM's namespace to a thin wrapper that routes the call
through a :class:`ToolCallInterceptor`. Each call gets a **call id** when it starts: its number in the
frame's own code (``"3"``), or, for a call made by a task the LLM's code created, the task's path and
the call's number in that task (``"3-9f2c1a07.0"``; see :mod:`playbooks.execution.tasks`), so the id
does not depend on how concurrent calls interleave. The idempotency key ``{run_id}:{frame_id}:{call_id}``,
which a tool reads with :func:`current_tool_call` to make itself exactly-once, is the same on every
attempt. The durability layer journals calls by subclassing the interceptor; the executor never
changes for it.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar, overload

import anyio

from playbooks.execution.retry import RetryPolicy, policy_of
from playbooks.execution.tasks import TaskNode, calling_owner, node_for_call, running_node

__all__ = (
    "ToolCall",
    "ToolCallInterceptor",
    "bind_tools",
    "calling_interceptor",
    "cheap",
    "current_tool_call",
    "durable_call",
    "is_async_tool",
    "is_cheap",
    "output_written",
    "resumed",
    "when_output_written",
)


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One call of a tool by LLM code: which tool, its arguments, and its stable identity.

    ``call_id`` identifies the call in its frame on every attempt (the journal's key); ``seq`` is the
    order in which calls reached the interceptor in this process, for display only (under concurrency
    it depends on timing).
    """

    name: str
    args: tuple[Any, ...]
    kwargs: Mapping[str, Any]
    seq: int
    idempotency_key: str
    call_id: str = ""
    attempt: int = 1
    """Which attempt this is (1-based): a retry, or the run again of a call that was in flight at a
    crash, counts on from the attempts recorded before (the key stays the same)."""
    resumed: bool = False
    """Whether the call runs in a frame that was resumed from a checkpoint (to word a message
    "resumed", for example)."""


_CURRENT: contextvars.ContextVar[ToolCall | None] = contextvars.ContextVar("playbooks_tool_call", default=None)
_OUTPUT_WRITTEN: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "playbooks_output_written", default=None
)


def output_written() -> None:
    """Called by an output function (one marked ``__playbooks_output__``, such as the durable
    ``print``) the instant its output is out: a durable frame writes the output's record right there,
    with one write, so only a kill within that write can show the output twice."""
    written = _OUTPUT_WRITTEN.get()
    if written is not None:
        written()


@contextlib.contextmanager
def when_output_written(callback: Callable[[], None]) -> Iterator[None]:
    """Within this block, :func:`output_written` calls ``callback``."""
    token = _OUTPUT_WRITTEN.set(callback)
    try:
        yield
    finally:
        _OUTPUT_WRITTEN.reset(token)


def current_tool_call() -> ToolCall | None:
    """The call being served, as seen from inside a tool (``None`` outside a tool call)."""
    return _CURRENT.get()


def resumed() -> bool:
    """Whether the code running now belongs to an execution resumed from a checkpoint: from the LLM's
    code (or a notebook's durable cell), its frame was restored; from inside a tool, the call's frame
    was. ``False`` in a first run, and outside any execution."""
    call = _CURRENT.get()
    if call is not None:
        return call.resumed
    owner = calling_owner()
    return bool(getattr(owner, "resumed", False))


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
        retry: RetryPolicy | None = None,
    ) -> None:
        self.run_id = run_id
        self.frame_id = frame_id
        self.retry = retry
        """The retry policy of calls whose function has none of its own (``None``: no retries)."""
        self.resumed = False
        """Whether this interceptor's frame was resumed from a checkpoint."""
        self.root = TaskNode(self, "", next_seq)
        """The frame's own code: its calls are numbered ``0, 1, ...`` (tasks it creates branch off)."""
        self._issued = next_seq
        self.observer = observer
        """Called after every call ends, with its value or exception (also for replayed calls)."""

    def observe(self, call: ToolCall, value: Any, error: BaseException | None) -> None:
        """Tell the observer, if any, how ``call`` ended."""
        if self.observer is not None:
            self.observer(call, value, error)

    @property
    def next_seq(self) -> int:
        """The number the frame's own code's next call gets."""
        return self.root.calls

    @next_seq.setter
    def next_seq(self, value: int) -> None:
        self.root.calls = value

    def start(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> ToolCall:
        """Give a call that is about to run its id (from the task that makes it)."""
        call_id = node_for_call(self.root).next_call()
        seq = self._issued
        self._issued += 1
        key = f"{self.run_id}:{self.frame_id}:{call_id}"
        return ToolCall(name, args, dict(kwargs), seq, key, call_id, resumed=self.resumed)

    async def call_async(self, call: ToolCall, fn: Callable[..., Awaitable[Any]]) -> Any:
        """Run an async tool for ``call``, with its retry policy; override to journal or replay."""
        policy = policy_of(fn, self.retry)
        while True:
            try:
                value = await self.attempt_async(call, fn)
            except Exception as exc:
                if policy is not None and policy.retries(exc, call.attempt):
                    await anyio.sleep(policy.delay(call.attempt))
                    call = dataclasses.replace(call, attempt=call.attempt + 1)
                    continue
                self.observe(call, None, exc)
                raise
            self.observe(call, value, None)
            return value

    async def attempt_async(self, call: ToolCall, fn: Callable[..., Awaitable[Any]]) -> Any:
        """One attempt of an async tool: as host code, with ``call`` as the current call."""
        token = _CURRENT.set(call)
        try:
            with running_node(None):  # the tool is host code: tasks it creates are not the LLM's
                return await fn(*call.args, **call.kwargs)
        finally:
            _CURRENT.reset(token)

    def call_sync(self, call: ToolCall, fn: Callable[..., Any]) -> Any:
        """Run a sync tool for ``call`` (a sync call is not retried: waiting would block the event
        loop); override to journal or replay."""
        token = _CURRENT.set(call)
        try:
            with running_node(None):
                value = fn(*call.args, **call.kwargs)
        except Exception as exc:
            self.observe(call, None, exc)
            raise
        finally:
            _CURRENT.reset(token)
        self.observe(call, value, None)
        return value


def is_async_tool(fn: Callable[..., Any]) -> bool:
    """Whether calling ``fn`` returns an awaitable (an ``async def``, or an object whose ``__call__``
    is one): LLM code awaits such a tool."""
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
    if is_async_tool(fn):

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


_F = TypeVar("_F", bound=Callable[..., Any])


def calling_interceptor() -> ToolCallInterceptor | None:
    """The interceptor of the LLM code calling now; ``None`` in host code and inside a tool call.

    A host function that should be a durable call when LLM code calls it, however it is reached, routes
    itself through it (what :func:`durable_call` and ``LLMProvider.complete`` do)."""
    owner = calling_owner()
    if not isinstance(owner, ToolCallInterceptor) or _CURRENT.get() is not None:
        return None
    return owner


def cheap(fn: _F) -> _F:
    """Mark a tool as cheap: a durable executor runs its calls without journaling them (no records,
    no fsync before them), and a resume calls them again instead of replaying them. For fast,
    deterministic calls without side effects that matter (a lookup in memory, a pure computation):
    a cheap call whose result differs after a resume makes the code diverge."""
    fn.__playbooks_cheap__ = True  # type: ignore[attr-defined]
    return fn


def is_cheap(fn: Callable[..., Any]) -> bool:
    """Whether ``fn`` was marked with :func:`cheap`."""
    return getattr(fn, "__playbooks_cheap__", False) is True


@overload
def durable_call(fn: _F, /) -> _F: ...


@overload
def durable_call(*, name: str | None = None, retry: RetryPolicy | None = None) -> Callable[[_F], _F]: ...


def durable_call(
    fn: Callable[..., Any] | None = None, /, *, name: str | None = None, retry: RetryPolicy | None = None
) -> Any:
    """Mark a host function (sync or async) as a durable call wherever LLM code calls it.

    An agent's tools are durable calls because the executor binds them by name; a function marked
    with ``@durable_call`` is one however the code reaches it (a method, a dict of functions, a helper
    defined earlier): called from code a :class:`~playbooks.execution.StreamingPythonExecutor` runs,
    it goes through that executor's interceptor (numbered, journaled and replayed when the executor
    is durable), under ``name`` (default: the function's ``__name__``). Called anywhere else (host
    code, or from inside another tool call) it is a plain call, so a marked function stays usable on
    its own. A notebook's ``%%durable`` cells use this to know which calls are durable. ``retry``
    gives its calls a :class:`~playbooks.execution.retry.RetryPolicy`.
    """

    def mark(fn: Callable[..., Any]) -> Callable[..., Any]:
        if not callable(fn):
            raise TypeError(f"durable_call() needs a function, got {fn!r}")
        call_name = name or getattr(fn, "__name__", None) or type(fn).__name__
        target = fn
        if retry is not None:  # carried by a partial: the function itself (maybe a method) is not changed
            target = functools.partial(fn)
            target.__playbooks_retry__ = retry  # type: ignore[attr-defined]
        # The wrappers refer to module-level helpers only, so that cloudpickle, which stores a
        # notebook's functions by value, can save a variable holding one.
        if is_async_tool(fn):

            async def async_call(*args: Any, **kwargs: Any) -> Any:
                interceptor = calling_interceptor()
                if interceptor is None:
                    return await fn(*args, **kwargs)
                return await interceptor.call_async(interceptor.start(call_name, args, kwargs), target)

            wrapper: Callable[..., Any] = async_call
        else:

            def sync_call(*args: Any, **kwargs: Any) -> Any:
                interceptor = calling_interceptor()
                if interceptor is None:
                    return fn(*args, **kwargs)
                return interceptor.call_sync(interceptor.start(call_name, args, kwargs), target)

            wrapper = sync_call
        try:
            functools.update_wrapper(wrapper, fn)
        except AttributeError:  # callables without __name__ and friends
            pass
        wrapper.__playbooks_durable__ = call_name  # type: ignore[attr-defined]
        return wrapper

    return mark(fn) if fn is not None else mark
