"""Call identity in concurrent LLM code: which task made a durable call, independent of interleaving.

Theory of operation
-------------------
A durable call is matched to its journal record by a **call id**, not by the order in which calls
reach the interceptor: under ``asyncio.gather``, ``create_task``, ``TaskGroup``, ``as_completed`` or an
anyio task group, that order depends on how long each tool took, and a replayed call returns at once.

* The frame's own code (the statements the executor runs) is the **root task**. Its calls are numbered
  ``0, 1, 2, ...`` in program order: the call id is the number (``"3"``).
* A task that the LLM's code creates is a **child task** of the task that created it. It is named when
  it is created, never later, from three things that do not depend on timing or memory addresses:

  - the number of calls its creator had made so far (``pc``),
  - a label: the coroutine's qualified name and a canonical text of its arguments (so the tasks that
    ``as_completed`` creates in set order, which depends on addresses, still get the same names),
  - ``k``, how many siblings with the same ``pc`` and label were created before it,
  - for a task of the root, the number of the statement that created it (a resume restores that
    count, so a statement re-run after a resume names its tasks as the first run did).

  Its path is ``{creator path}.{pc}-{hash of label and k}`` and its calls are ``{path}.{n}``, numbered
  in its own program order (``"3-9f2c1a07.0"``).

* The hooks that see a task being created are asyncio's task factory and a trio instrument; both run in
  the creator's context, at creation, in program order. The new task's context gets its node.
* A task the hooks did not see (a host that replaced the task factory) is named at its first call,
  from its coroutine, with ``k`` counted in order of first calls; that order can depend on timing, so
  it is only a fallback.

What remains undefined: two sibling tasks created at the same point with the same coroutine and equal
arguments are told apart by creation order only (for ``as_completed`` over such twins, by set order,
which depends on addresses); their calls must then be interchangeable. Tasks created by *tools* (host
code) are not LLM tasks and are not numbered.
"""

from __future__ import annotations

import contextvars
import hashlib
import itertools
import sys
import weakref
from collections.abc import Coroutine
from typing import Any

__all__ = (
    "TaskNode",
    "calling_owner",
    "current_task",
    "install_task_hooks",
    "node_for_call",
    "running_node",
    "task_label",
)

_MAX_LABEL_ARGS = 2000  # characters of canonical arguments kept in a label (hashed anyway)


class TaskNode:
    """One task of a frame's LLM code: its path and the number of calls it has made."""

    __slots__ = ("owner", "path", "calls", "statement", "_siblings", "task", "lazy", "pending", "__weakref__")

    def __init__(self, owner: object, path: str, calls: int = 0) -> None:
        self.owner = owner
        """The interceptor whose frame this task belongs to."""
        self.path = path
        self.calls = calls
        self.statement = 0
        """On a frame's root: the number of the statement running (restored on resume, so a task
        created by a later statement never takes the name of one created by an earlier one)."""
        self._siblings: dict[tuple[int, int, str], itertools.count[int]] = {}
        self.task: object | None = None
        """The backend task running this node (bound at creation, or at the first call)."""
        self.lazy: dict[int, TaskNode] = {}
        """Child nodes named at their first call (tasks the creation hooks did not see), by task id."""
        self.pending: set[object] = set()
        """On a frame's root: the tasks of its LLM code that have not finished."""

    def begin_statement(self, number: int) -> None:
        """On a frame's root: statement ``number`` starts (tasks it creates are named after it)."""
        if number != self.statement:
            self.statement = number
            self._siblings.clear()

    def next_call(self) -> str:
        """The id of this task's next call."""
        n = self.calls
        self.calls += 1
        return f"{self.path}.{n}" if self.path else str(n)

    def spawn(self, label: str) -> TaskNode:
        """The node of a task this one creates now."""
        pc = self.calls
        k = next(self._siblings.setdefault((self.statement, pc, label), itertools.count()))
        name = f"{label}#{k}#{self.statement}"
        digest = hashlib.blake2b(name.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        component = f"{pc}-{digest}"
        child = TaskNode(self.owner, f"{self.path}.{component}" if self.path else component)
        return child


_NODE: contextvars.ContextVar[TaskNode | None] = contextvars.ContextVar("playbooks_task_node", default=None)


class running_node:
    """Context manager: run the block as ``node`` (``None``: as host code, e.g. a tool)."""

    __slots__ = ("_node", "_token")

    def __init__(self, node: TaskNode | None) -> None:
        self._node = node
        self._token: contextvars.Token[TaskNode | None] | None = None

    def __enter__(self) -> None:
        self._token = _NODE.set(self._node)

    def __exit__(self, *exc: object) -> None:
        assert self._token is not None
        _NODE.reset(self._token)


def task_label(coro: object) -> str:
    """The coroutine's qualified name and a canonical text of the arguments it was created with."""
    from playbooks.execution.fingerprint import canonical

    code = getattr(coro, "cr_code", None)
    frame = getattr(coro, "cr_frame", None)
    if code is None:
        return type(coro).__qualname__
    name = str(getattr(code, "co_qualname", code.co_name))
    if frame is None:
        return name
    count = code.co_argcount + code.co_kwonlyargcount
    count += bool(code.co_flags & 0x04) + bool(code.co_flags & 0x08)  # *args, **kwargs
    names = code.co_varnames[:count]
    args = frame.f_locals
    text = ", ".join(f"{n}={canonical(args.get(n))}" for n in names)
    return f"{name}({text[:_MAX_LABEL_ARGS]})"


def _spawned(parent: TaskNode, coro: object, task: object) -> TaskNode:
    """The node of ``task``, just created from ``parent``; it counts as pending on the frame's root."""
    child = parent.spawn(task_label(coro))
    child.task = task
    root: TaskNode = getattr(parent.owner, "root")
    root.pending.add(task)
    return child


def _finished(node: TaskNode | None, task: object) -> None:
    if node is not None and node.task is task:
        root: TaskNode = getattr(node.owner, "root")
        root.pending.discard(task)
        ended = getattr(node.owner, "task_ended", None)  # a durable frame's replay order
        if ended is not None:
            ended(node.path)


# --- asyncio ---------------------------------------------------------------------------------------

_PATCHED_LOOPS: weakref.WeakSet[Any] = weakref.WeakSet()


def _install_asyncio() -> None:
    import asyncio

    loop = asyncio.get_running_loop()
    if loop in _PATCHED_LOOPS:
        return
    previous = loop.get_task_factory()

    def factory(loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any], **kwargs: Any) -> Any:
        parent = _NODE.get()
        if parent is not None and asyncio.iscoroutine(coro):
            context = kwargs.get("context") or contextvars.copy_context()
            kwargs["context"] = context
            task = previous(loop, coro, **kwargs) if previous is not None else asyncio.Task(coro, loop=loop, **kwargs)
            child = _spawned(parent, coro, task)
            context.run(_NODE.set, child)
            task.add_done_callback(lambda t: _finished(child, t))
            return task
        if previous is not None:
            return previous(loop, coro, **kwargs)
        return asyncio.Task(coro, loop=loop, **kwargs)

    loop.set_task_factory(factory)  # type: ignore[arg-type]
    _PATCHED_LOOPS.add(loop)


# --- trio ------------------------------------------------------------------------------------------

_PATCHED_RUNS: weakref.WeakSet[Any] = weakref.WeakSet()


def _install_trio() -> None:
    import trio

    root = trio.lowlevel.current_root_task()
    if root is None or root in _PATCHED_RUNS:
        return

    class _Spawns(trio.abc.Instrument):
        def task_spawned(self, task: trio.lowlevel.Task) -> None:
            parent = _NODE.get()
            if parent is None:
                return
            task.context.run(_NODE.set, _spawned(parent, task.coro, task))

        def task_exited(self, task: trio.lowlevel.Task) -> None:
            _finished(task.context.get(_NODE), task)

    trio.lowlevel.add_instrument(_Spawns())
    _PATCHED_RUNS.add(root)


def install_task_hooks() -> None:
    """Make tasks created from now on in this event loop (asyncio or trio) get their own node."""
    if "trio" in sys.modules:
        try:
            import trio

            trio.lowlevel.current_root_task()
        except RuntimeError:
            pass
        else:
            _install_trio()
            return
    try:
        _install_asyncio()
    except RuntimeError:
        pass  # no asyncio loop running (an unknown backend): tasks are named at their first call


def calling_owner() -> object | None:
    """The interceptor whose frame's LLM code runs now, or ``None`` in host code (a tool included)."""
    node = _NODE.get()
    return node.owner if node is not None else None


def node_for_call(root: TaskNode) -> TaskNode:
    """The node that makes a call now, for a frame whose root is ``root``.

    A call from a task the hooks did not see runs in a context inherited from its creator: it gets a
    node of its own, named from its coroutine at its first call.
    """
    node = _NODE.get()
    if node is None or node.owner is not root.owner:
        return root  # host code calling a tool, or a frame's statement
    task = current_task()
    if task is None or node.task is None or node.task is task:
        return node
    known = node.lazy.get(id(task))
    if known is None or known.task is not task:
        coro = task.get_coro() if hasattr(task, "get_coro") else getattr(task, "coro", None)
        known = node.spawn(task_label(coro))
        known.task = task
        node.lazy[id(task)] = known
    return known


def current_task() -> object | None:
    """The running task of whichever backend runs now (``None`` outside one)."""
    if "trio" in sys.modules:
        import trio

        try:
            return trio.lowlevel.current_task()
        except RuntimeError:
            pass
    import asyncio

    try:
        return asyncio.current_task()
    except RuntimeError:
        return None
