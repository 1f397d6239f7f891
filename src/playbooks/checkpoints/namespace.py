"""A frame's namespace as per-variable pickles, so unchanged variables are not written again.

Each variable is pickled on its own with cloudpickle, which stores functions, lambdas and classes the
LLM defined by value. Two things are not stored but *referred to*, because the process that resumes
has its own:

* the namespace dict itself: every function the LLM defined has it as its ``__globals__``, and a
  variable may hold it (``g = globals()``). Restored functions get the namespace they are loaded into,
  not a private copy, so after a resume they see later assignments and call the re-bound tools.
* the *bound* objects (the tool wrappers and ``print``), which the resuming executor binds again; a
  variable that holds one under another name (``alias = Work``, ``[Work]``) gets the new one.

:class:`NamespaceEncoder` remembers what the frame's previous snapshot stored: an immutable value that is
still the same object is not even pickled again, and any value whose pickle has the same digest is
stored as a reference to the snapshot that holds its bytes.

How the namespace reference is stored: the pickler's memo is seeded with the namespace at index 0, so
every reference to it is written as a memo lookup (``BINGET 0``), and every stored pickle starts with a
tiny prefix that loads a persistent id and memoizes it at index 0, which :func:`decode_namespace`
resolves to the target dict. The pickler hooks only ``reducer_override``, not ``persistent_id``: the
C pickler calls ``persistent_id`` for every object (each int of a big list), but skips
``reducer_override`` for plain data, so big plain values pickle at C speed.
"""

from __future__ import annotations

import copyreg
import gc
import hashlib
import inspect
import io
import logging
import pickle
import sys
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache
from typing import Any, Literal

import cloudpickle

from playbooks.checkpoints.model import StoredVar
from playbooks.checkpoints.outcome import reduce_exception
from playbooks.checkpoints.set_order import canonicalize_sets, may_hold_sets
from playbooks.errors import UnpicklableValueError, UnrestoredValueError

__all__ = (
    "EncodedNamespace",
    "ExitedTaskGroup",
    "FinishedTask",
    "NamespaceEncoder",
    "SHARED_PREFIX",
    "SkippedVar",
    "UnrestoredValue",
    "VarBlob",
    "decode_namespace",
    "shared_names",
)

_logger = logging.getLogger("playbooks.checkpoints")

_slotnames: Callable[[type], list[str]] = getattr(copyreg, "_slotnames")  # not in typeshed

_PROTOCOL = 5
_NAMESPACE_PID = "namespace"
_PREFIX = (
    pickle.PROTO
    + bytes([_PROTOCOL])
    + pickle.SHORT_BINUNICODE
    + bytes([len(_NAMESPACE_PID)])
    + _NAMESPACE_PID.encode("ascii")
    + pickle.BINPERSID
    + pickle.MEMOIZE
    + pickle.POP
)
"""Starts every stored pickle: load the namespace (a persistent id) and memoize it at index 0, where
the pickler's seeded memo refers to it. The pickle that follows has its own ``PROTO`` opcode, which
is allowed anywhere in a stream."""

_IMMUTABLE_SCALARS = (int, float, complex, bool, str, bytes, range, type(None))
_PLAIN_SCALARS = frozenset({int, float, bool, str, bytes, type(None)})
"""Exact types whose cloudpickle is plain pickle's, byte for byte (the common case, pickled cheaply)."""
_REF_MIN_SIZE = 4096
"""Smaller pickles are stored inline every time: a reference would pin an old snapshot for nothing."""

_SAVE_PROBLEM = "it could not be saved in the checkpoint"
_LOAD_PROBLEM = "it could not be loaded from the checkpoint"
_TOOL_PROBLEM = "it refers to a tool that the resumed agent does not have"


VarBlob = StoredVar
"""One variable as stored in a snapshot (the record type itself: encoding needs no conversion)."""


@dataclass(frozen=True, slots=True)
class SkippedVar:
    """A variable that could not be pickled (stored as an :class:`UnrestoredValue` instead)."""

    name: str
    type_name: str
    reason: str


@dataclass(slots=True)
class EncodedNamespace:
    """The variables of one snapshot, and the ones that could not be pickled."""

    blobs: dict[str, VarBlob] = field(default_factory=dict)
    skipped: list[SkippedVar] = field(default_factory=list)
    _values: dict[str, Any] = field(default_factory=dict, repr=False)
    """The encoded objects, for :meth:`NamespaceEncoder.commit` (identity reuse of immutable values)."""
    _without_sets: set[str] = field(default_factory=set, repr=False)
    """Variables that held no set (see :meth:`NamespaceEncoder.settle_sets`)."""

    def total_size(self) -> int:
        """Bytes of every variable, stored here or referred to."""
        return sum(b.size for b in self.blobs.values())

    def new_bytes(self) -> int:
        """Bytes of the variables this snapshot stores itself."""
        return sum(b.size for b in self.blobs.values() if b.data is not None)

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` biggest variables as ``(name, size)``, biggest first."""
        return sorted(((k, b.size) for k, b in self.blobs.items()), key=lambda kv: -kv[1])[:n]


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _unrestored_message(name: str, type_name: str, reason: str, problem: str) -> str:
    return (
        f"variable {name!r} ({type_name}) was not restored after the resume: {problem} ({reason}). "
        f"Re-create it before using it."
    )


class UnrestoredValue:
    """Stands for a variable that was left out of a checkpoint; any use raises
    :class:`~playbooks.errors.UnrestoredValueError` saying which variable it was and why it is missing.

    Only what pickling and copying need works (so the placeholder survives later snapshots), and
    ``repr``. Dunder attributes that are not defined (``__deepcopy__``, ...) raise ``AttributeError``,
    the answer protocol probes expect; any other attribute raises ``UnrestoredValueError``.
    """

    __slots__ = ("_name", "_type_name", "_reason", "_problem")

    def __init__(self, name: str, type_name: str, reason: str, problem: str = _SAVE_PROBLEM) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_type_name", type_name)
        object.__setattr__(self, "_reason", reason)
        object.__setattr__(self, "_problem", problem)

    def _fields(self) -> tuple[str, str, str, str]:
        get = object.__getattribute__
        return (get(self, "_name"), get(self, "_type_name"), get(self, "_reason"), get(self, "_problem"))

    def _message(self) -> str:
        return _unrestored_message(*self._fields())

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise UnrestoredValueError(self._message())

    def __getattr__(self, attr: str) -> Any:
        if attr.startswith("__") and attr.endswith("__"):
            raise AttributeError(self._message())
        return self._fail()

    def __setattr__(self, attr: str, value: Any) -> None:
        self._fail()

    def __delattr__(self, attr: str) -> None:
        self._fail()

    def __reduce__(self) -> tuple[Any, ...]:
        return (UnrestoredValue, self._fields())

    def __repr__(self) -> str:
        short = object.__getattribute__(self, "_type_name").rsplit(".", 1)[-1]
        return f"<unrestored {object.__getattribute__(self, '_name')!r}: {short}>"

    __call__ = __iter__ = __aiter__ = __next__ = __anext__ = __len__ = __bool__ = __reversed__ = _fail
    __contains__ = __getitem__ = __setitem__ = __delitem__ = _fail
    __enter__ = __exit__ = __aenter__ = __aexit__ = __await__ = _fail
    __str__ = __format__ = __bytes__ = __int__ = __float__ = __complex__ = __index__ = __round__ = _fail
    __trunc__ = __floor__ = __ceil__ = _fail
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __matmul__ = __rmatmul__ = _fail
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _fail
    __divmod__ = __rdivmod__ = __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = __invert__ = _fail
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = _fail
    __lshift__ = __rlshift__ = __rshift__ = __rrshift__ = _fail
    __iadd__ = __isub__ = __imul__ = __itruediv__ = __ifloordiv__ = __imod__ = __ior__ = __iand__ = _fail
    __hash__ = _fail


# --- pickling -------------------------------------------------------------------------------------


def _restore_function(func: types.FunctionType, state: dict[str, Any]) -> types.FunctionType:
    """Put back what ``types.FunctionType(...)`` does not take as arguments (the pickle's state setter)."""
    for attr, value in state.items():
        if attr == "__dict__":
            func.__dict__.update(value)
        else:
            setattr(func, attr, value)
    return func


def _reduce_function(func: types.FunctionType, namespace: Mapping[str, Any]) -> tuple[Any, ...]:
    """Reduce a function of the LLM's code so that it loads with the target namespace as its globals.

    Only the code, the namespace (a memo reference), the name and the closure cells are arguments;
    the rest is state set after the function is memoized, so a default that refers back to the
    function does not recurse.

    Names are copied (``"".join``) as cloudpickle does: whether two equal strings are one object
    (interned) or not decides whether the pickle repeats or memo-references them, and that differs
    between the process that defined a function and one that restored it. Fresh copies make a
    restored, unchanged function pickle to the same bytes, so it stays a reference after a resume.
    """
    module = func.__module__
    state: dict[str, Any] = {
        "__qualname__": "".join(func.__qualname__),
        "__module__": "".join(module) if isinstance(module, str) else module,
        "__doc__": func.__doc__,
        "__defaults__": func.__defaults__,
        "__kwdefaults__": func.__kwdefaults__,
        "__annotations__": func.__annotations__,
        "__dict__": {"".join(k): v for k, v in func.__dict__.items()},
    }
    type_params = getattr(func, "__type_params__", None)  # Python 3.12+
    if type_params:
        state["__type_params__"] = type_params
    args = (func.__code__, namespace, "".join(func.__name__), None, func.__closure__)
    return (types.FunctionType, args, state, None, None, _restore_function)


def _empty_cell() -> types.CellType:
    """A new empty closure cell (filled by :func:`_fill_cell` once it is memoized)."""
    return types.CellType()


def _fill_cell(cell: types.CellType, state: tuple[Any]) -> types.CellType:
    cell.cell_contents = state[0]
    return cell


def _reduce_cell(cell: types.CellType) -> tuple[Any, ...]:
    """Reduce a closure cell to "an empty cell, then its contents".

    The cell is memoized before its contents are pickled, so a closure that refers to itself (a
    recursive inner function) does not recurse forever, and two closures that share a cell (two inner
    functions of one call, ``nonlocal``) still share it after loading.
    """
    try:
        contents = cell.cell_contents
    except ValueError:  # not assigned yet
        return (_empty_cell, ())
    return (_empty_cell, (), (contents,), None, None, _fill_cell)


class FinishedTask:
    """A task of the LLM's code that had finished (or been cancelled) when a snapshot was taken, as it
    comes back after a resume: it holds the task's result or exception and answers what a done task
    answers."""

    __slots__ = ("_result", "_exception", "_name", "_cancelled")

    def __init__(self, result: Any, exception: BaseException | None, name: str, cancelled: bool = False) -> None:
        self._result = result
        self._exception = exception
        self._name = name
        self._cancelled = cancelled

    def done(self) -> bool:
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def _raise_cancelled(self) -> None:
        import asyncio

        raise asyncio.CancelledError()

    def result(self) -> Any:
        if self._cancelled:
            self._raise_cancelled()
        if self._exception is not None:
            raise self._exception
        return self._result

    def exception(self) -> BaseException | None:
        if self._cancelled:
            self._raise_cancelled()
        return self._exception

    def get_name(self) -> str:
        return self._name

    def __await__(self) -> Any:
        return self.result()
        yield  # a generator: awaiting it returns the result at once

    def __repr__(self) -> str:
        return f"<{'cancelled' if self._cancelled else 'finished'} task {self._name!r}>"


class ExitedTaskGroup:
    """A task group (asyncio, anyio or a trio nursery) left in a variable by ``async with ... as tg``,
    as it comes back after a resume: it had exited (a snapshot is never taken while a task of the
    LLM's code runs), so it can start nothing; it only says what it was."""

    __slots__ = ("type_name",)

    def __init__(self, type_name: str) -> None:
        self.type_name = type_name

    def __repr__(self) -> str:
        return f"<exited {self.type_name}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return (ExitedTaskGroup, (self.type_name,))


_TASK_GROUP_TYPES = {
    ("asyncio.taskgroups", "TaskGroup"),
    ("anyio._backends._asyncio", "TaskGroup"),
    ("anyio._backends._trio", "TaskGroup"),
    ("trio._core._run", "Nursery"),
    ("trio", "Nursery"),
}


def _is_task_group(obj: Any) -> bool:
    cls = type(obj)
    return (cls.__module__, cls.__qualname__) in _TASK_GROUP_TYPES


def _finished_task(obj: Any) -> tuple[Any, ...] | None:
    """The reduction of a finished or cancelled asyncio task or future, else ``None``."""
    if "asyncio" not in sys.modules:
        return None
    import asyncio

    if not isinstance(obj, asyncio.Future) or not obj.done():
        return None
    name = obj.get_name() if isinstance(obj, asyncio.Task) else "future"
    if obj.cancelled():
        return (FinishedTask, (None, None, name, True))
    exception = obj.exception()
    return (FinishedTask, (None if exception is not None else obj.result(), exception, name))


def _tool_name(value: Any) -> str | None:
    """The name of a tool wrapper (``bind_tools`` marks them), bound again on resume, else ``None``."""
    if isinstance(value, types.FunctionType):
        name = getattr(value, "__playbooks_tool__", None)
        return name if isinstance(name, str) else None
    return None


def _live_bound(key: str) -> Any:
    """Stands, in a pickle, for the host's bound object ``key`` (a tool); the unpickler supplies it."""
    raise pickle.UnpicklingError("a namespace pickle must be loaded with decode_namespace()")


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with the namespace and the bound objects as references, and the LLM's functions
    rebuilt around whatever namespace they are loaded into."""

    def __init__(self, file: io.BytesIO, namespace: Mapping[str, Any], bound_ids: Mapping[int, str]) -> None:
        super().__init__(file, protocol=_PROTOCOL)
        self._namespace = namespace
        self._module_name = namespace.get("__name__")
        self._bound_ids = bound_ids
        # An exact dict never reaches reducer_override; a memo entry makes every reference to the
        # namespace a lookup of index 0, which the stored prefix binds to the target on loading.
        self.memo = {id(namespace): (0, namespace)}

    def reducer_override(self, obj: Any) -> Any:
        key = self._bound_ids.get(id(obj))
        if key is None:
            key = _tool_name(obj)
        if key is not None:
            return (_live_bound, (key,))
        if isinstance(obj, types.FunctionType) and obj.__globals__ is self._namespace:
            return _reduce_function(obj, self._namespace)
        if isinstance(obj, types.CellType):
            return _reduce_cell(obj)
        if isinstance(obj, BaseException):
            return reduce_exception(obj)
        finished = _finished_task(obj)
        if finished is not None:
            return finished
        if _is_task_group(obj):
            return (ExitedTaskGroup, (_type_name(obj),))
        if isinstance(obj, type) and obj.__module__ == self._module_name:
            # Pickling an instance caches ``__slotnames__`` on its class; do it before the class is
            # pickled, so that the class's pickle (and digest) does not change after its first snapshot.
            _slotnames(obj)
        elif isinstance(obj, io.TextIOWrapper) and obj is not sys.stdout and obj is not sys.stderr:
            # cloudpickle would store a copy of a readable file's whole contents as a StringIO (and
            # writes after the resume would go there, not to the file): a file is not checkpointed.
            raise TypeError(f"cannot pickle {_type_name(obj)!r} object")
        return super().reducer_override(obj)


_NO_IDENTITY = frozenset(
    {str, bytes, int, float, complex, bool, type(None), tuple, frozenset, range, type, types.ModuleType,
     types.BuiltinFunctionType, types.CodeType}
)
"""Types whose sharing between variables need not survive: immutable values (a tuple or frozenset
that holds a mutable object shares it, which is seen on that object), classes (kept one per id by
the decoder) and modules, restored by reference."""


def _dump(value: Any, namespace: Mapping[str, Any], bound_ids: Mapping[int, str]) -> bytes:
    """The pickle of one value."""
    return _pickled(value, namespace, bound_ids)[0].getvalue()


def _dump_with_memo(
    value: Any, namespace: Mapping[str, Any], bound_ids: Mapping[int, str]
) -> tuple[bytes, _Pickler]:
    """The pickle of one value, and the pickler that made it: its memo holds every object met while
    pickling (which of them are shared with other variables, and whether that matters, is for
    :func:`_groups` to find; the pickler keeps them alive, so their ids stay theirs meanwhile)."""
    buffer, pickler = _pickled(value, namespace, bound_ids)
    return buffer.getvalue(), pickler


def _pickled(value: Any, namespace: Mapping[str, Any], bound_ids: Mapping[int, str]) -> tuple[io.BytesIO, _Pickler]:
    buffer = io.BytesIO()
    buffer.write(_PREFIX)
    pickler = _Pickler(buffer, namespace, bound_ids)
    pickler.dump(value)
    return buffer, pickler


_Memo = dict[int, tuple[int, Any]]
"""A pickler's memo: the id of every object pickled (that pickle memoizes), its index and the object."""


def _identity_matters(oid: int, obj: Any, namespace: Mapping[str, Any], bound_ids: Mapping[int, str]) -> bool:
    """Whether two variables that both hold ``obj`` must still share it after a resume."""
    if type(obj) in _NO_IDENTITY or obj is namespace or oid in bound_ids or isinstance(obj, type):
        return False
    # A function of the host's modules (or a tool) is restored by reference.
    return not (isinstance(obj, types.FunctionType) and obj.__globals__ is not namespace)


_NOT_SAVED = frozenset({"__builtins__", "__warningregistry__"})
"""Names the interpreter puts in a namespace: the builtins, and the registry of warnings already
shown from the LLM's code (a warning about a replayed call must not become a variable)."""

SHARED_PREFIX = "&"
"""Starts the key under which variables that share objects are stored together, as one tuple: the
names follow, separated by spaces (``"&alias shared"``). A name never contains either character."""


def shared_names(key: str) -> list[str] | None:
    """The variables stored together under ``key``, or ``None`` for a key of one variable."""
    return key[len(SHARED_PREFIX) :].split(" ") if key.startswith(SHARED_PREFIX) else None


def _groups(
    picklers: Mapping[str, _Pickler], sizes: Mapping[str, int], namespace: Mapping[str, Any],
    bound_ids: Mapping[int, str],
) -> list[list[str]]:
    """Variables that share an object whose identity matters, as groups of two or more (in namespace
    order).

    The memos of all variables but the biggest are copied, and the ids they met are intersected as
    sets: only an object met by two variables or more is looked at. The biggest variable's memo (tens
    of thousands of objects for a big list of records, whose copy would cost more than its pickle) is
    not copied: the objects of the others whose identity matters are looked up in it instead
    (:func:`_met_by`), unless they are so many that the copy is cheaper."""
    names = list(picklers)
    if len(names) < 2:
        return []
    biggest = max(names, key=lambda n: sizes[n])
    memos = {n: picklers[n].memo.copy() for n in names if n != biggest}
    parent: dict[str, str] = {name: name for name in names}

    def find(name: str) -> str:
        while parent[name] != name:
            parent[name] = parent[parent[name]]
            name = parent[name]
        return name

    def join(a: str, b: str) -> None:
        a, b = find(a), find(b)
        if a != b:
            parent[b] = a

    earlier: list[tuple[str, _Memo]] = []
    seen: set[int] = set()
    candidates: dict[int, Any] = {}
    for name, memo in memos.items():
        for oid in seen.intersection(memo):
            if _identity_matters(oid, memo[oid][1], namespace, bound_ids):
                for other, other_memo in earlier:
                    if oid in other_memo:
                        join(other, name)
        for oid in memo.keys() - candidates.keys():
            obj = memo[oid][1]
            if _identity_matters(oid, obj, namespace, bound_ids):
                candidates[oid] = obj
        seen.update(memo)
        earlier.append((name, memo))
    if len(candidates) * _PROBE_BYTES <= sizes[biggest]:
        met = _met_by(picklers[biggest], candidates, namespace, bound_ids) if candidates else set()
    else:  # so many that probing them would cost more than the copy
        met = _met_by_copy(picklers[biggest], candidates)
    for oid in met:
        for name, memo in memos.items():
            if oid in memo:
                join(biggest, name)
    members: dict[str, list[str]] = {}
    for name in names:
        members.setdefault(find(name), []).append(name)
    return [group for group in members.values() if len(group) > 1]


_PROBE_BYTES = 64
"""Probing a candidate costs about as much as copying the memo of 64 bytes of pickle (measured:
1.3 µs against 23 ns per byte, for a list of records), so :func:`_groups` probes only when there are
fewer candidates than the biggest pickle has 64-byte pieces."""

def _met_by(
    pickler: _Pickler, candidates: Mapping[int, Any], namespace: Mapping[str, Any], bound_ids: Mapping[int, str]
) -> set[int]:
    """The ids of ``candidates`` that ``pickler`` met, found without copying its memo out.

    A probe pickler starts with a copy of that memo (a table copy in C), learns how many entries it
    has (``size``: a fresh list gets that index, so pickling it again refers to it), then pickles each
    candidate on its own: one the memo holds comes out as nothing but a reference to an index below
    ``size``. A candidate it does not hold is pickled whole, and its new entries get indices from
    ``size`` up, so a later candidate met only through it is not mistaken for one of the biggest
    variable's objects. If anything is unexpected, the memo is copied after all.
    """
    buffer = io.BytesIO()
    probe = _Pickler(buffer, namespace, bound_ids)
    probe.memo = pickler.memo
    fresh: list[Any] = []

    def dump(obj: Any) -> bytes:
        probe.dump(obj)
        out = buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
        return out

    try:
        dump(fresh)  # a new object: it gets the first free index, the memo's size...
        size = _reference(dump(fresh))  # ...which pickling it again refers to
        if size is None:
            raise ValueError("the probe's memo did not answer")
        met: set[int] = set()
        for oid, obj in candidates.items():
            index = _reference(dump(obj))
            if index is not None and index < size:
                met.add(oid)
        return met
    except Exception:
        return _met_by_copy(pickler, candidates)


def _met_by_copy(pickler: _Pickler, candidates: Mapping[int, Any]) -> set[int]:
    """:func:`_met_by` the plain way: a copy of the whole memo."""
    memo = pickler.memo.copy()
    return {oid for oid in candidates if oid in memo}


_PROTO = pickle.PROTO + bytes([_PROTOCOL])


def _reference(data: bytes) -> int | None:
    """The memo index ``data`` refers to if it is a pickle of nothing but a memo reference (protocol
    5: the protocol, a frame header or none, ``BINGET`` or ``LONG_BINGET``, stop), else ``None``."""
    if len(data) > 17 or not data.startswith(_PROTO) or not data.endswith(pickle.STOP):
        return None
    body = data[2:-1]
    if body[:1] == pickle.FRAME:
        body = body[9:]
    if len(body) == 2 and body[:1] == pickle.BINGET:
        return body[1]
    if len(body) == 5 and body[:1] == pickle.LONG_BINGET:
        return int.from_bytes(body[1:], "little")
    return None


# --- unpickling -----------------------------------------------------------------------------------


@cache
def _tracker_index(factory: Callable[..., Any]) -> int | None:
    """Where a cloudpickle class factory takes ``class_tracker_id``, or ``None`` if it does not."""
    try:
        params = list(inspect.signature(factory).parameters)
    except (TypeError, ValueError):
        return None
    return params.index("class_tracker_id") if "class_tracker_id" in params else None


def _isolated_factory(factory: Callable[..., Any], index: int, classes: dict[str, Any]) -> Callable[..., Any]:
    """Wrap a cloudpickle class factory so that one decode shares classes among its own variables only.

    cloudpickle keys classes it pickles by value with a process-wide tracker id, and on loading
    returns the class the process already has under that id, then sets the pickled methods on it.
    Loaded into a second namespace in the same process (the live run's own classes, a checkpoint
    opened for inspection), that would re-point the methods of classes in use to the new namespace.
    Here a decode builds its own class the first time it meets an id and reuses it for the other
    variables; the class is registered with cloudpickle only if the process has none under that id
    (a fresh process after a crash), so that pickling it again gives the same bytes.
    """

    def make(*args: Any) -> Any:
        tracker_id = args[index] if len(args) > index else None
        if tracker_id is None:
            return factory(*args)
        if tracker_id in classes:
            return classes[tracker_id]
        fresh = factory(*args[:index], None, *args[index + 1 :])
        track = getattr(cloudpickle.cloudpickle, "_lookup_class_or_track", None)
        if track is not None:
            track(tracker_id, fresh)  # a no-op when the process already has a class with this id
        classes[tracker_id] = fresh
        return fresh

    return make


class _Unpickler(pickle.Unpickler):
    """Loads one variable: the namespace reference is ``target``, bound references are ``bound``."""

    def __init__(
        self,
        file: io.BytesIO,
        name: str,
        target: dict[str, Any],
        bound: Mapping[str, Any],
        classes: dict[str, Any],
    ) -> None:
        super().__init__(file)
        self._name = name
        self._target = target
        self._bound = bound
        self._classes = classes
        self.missing_tools: list[str] = []

    def persistent_load(self, pid: Any) -> Any:
        if pid == _NAMESPACE_PID:
            return self._target
        raise pickle.UnpicklingError(f"unknown persistent id {pid!r} in a namespace pickle")

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_live_bound":
            return self._bound_object
        found = super().find_class(module, name)
        if module == "cloudpickle.cloudpickle" and callable(found):
            index = _tracker_index(found)
            if index is not None:
                return _isolated_factory(found, index, self._classes)
        return found

    def _bound_object(self, key: str) -> Any:
        if key in self._bound:
            return self._bound[key]
        self.missing_tools.append(key)
        return UnrestoredValue(self._name, f"tool {key!r}", f"no tool named {key!r} is bound", _TOOL_PROBLEM)


# --- encoder --------------------------------------------------------------------------------------


def _deeply_immutable(value: Any, depth: int = 0) -> bool:
    if isinstance(value, _IMMUTABLE_SCALARS):
        return type(value) in _IMMUTABLE_SCALARS  # subclasses may carry mutable state
    if type(value) in (tuple, frozenset) and depth < 4 and len(value) <= 64:
        return all(_deeply_immutable(v, depth + 1) for v in value)
    return False


def _digest(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


@dataclass(slots=True)
class _Remembered:
    digest: str
    size: int
    host: int
    value: Any  # the object itself, for deeply immutable values only (else None)
    immutable: bool
    data: bytes | None  # the pickle itself when it is small (always stored inline)


class NamespaceEncoder:
    """Encodes one frame's namespace again and again, reusing what the last committed snapshot stored.

    ``policy`` is what to do with a value that cannot be pickled: ``"skip"`` (store an
    :class:`UnrestoredValue` placeholder and report it in ``skipped``) or ``"strict"`` (raise
    :class:`~playbooks.errors.UnpicklableValueError`).
    """

    def __init__(self, *, policy: Literal["skip", "strict"] = "skip") -> None:
        self.policy = policy
        self._memory: dict[str, _Remembered] = {}
        self._without_sets: set[str] = set()
        self._committed_without_sets: frozenset[str] = frozenset()  # as the last snapshot found them

    def encode(
        self,
        namespace: Mapping[str, Any],
        *,
        bound: Mapping[str, Any] | None = None,
        unsaved: Callable[[str], bool] | None = None,
    ) -> EncodedNamespace:
        """Pickle every variable but ``__builtins__``, the bound objects under their own names and the
        names ``unsaved`` says the host keeps.

        A variable that is unchanged since the last committed snapshot is a reference to the snapshot
        that holds it (``data`` is ``None``), unless its pickle is small (under 4 KiB), which is
        stored inline again rather than pin an old snapshot.

        The garbage collector is paused meanwhile: finding which variables share objects copies the
        memos of all but the biggest (a tuple per object pickled), which would set it off many times
        over, each time walking every young object; they are all freed before it resumes.
        """
        enabled = gc.isenabled()
        gc.disable()
        try:
            return self._encode(namespace, bound or {}, unsaved)
        finally:
            if enabled:
                gc.enable()

    def _encode(
        self, namespace: Mapping[str, Any], bound: Mapping[str, Any], unsaved: Callable[[str], bool] | None
    ) -> EncodedNamespace:
        bound_ids = {id(v): k for k, v in bound.items()}
        encoded = EncodedNamespace()
        pickled: dict[str, bytes] = {}
        picklers: dict[str, _Pickler] = {}
        digests: dict[str, str] = {}  # of pickles already hashed
        for name, value in namespace.items():
            if name in _NOT_SAVED or (name in bound and bound[name] is value) or _tool_name(value) == name:
                continue  # bound again by the resuming executor (an alias is stored as a reference)
            if unsaved is not None and unsaved(name):
                continue  # the host's own (an IPython shell's history)
            encoded._values[name] = value
            remembered = self._memory.get(name)
            if remembered is not None and remembered.immutable and remembered.value is value:
                if remembered.data is not None:
                    encoded.blobs[name] = VarBlob(remembered.digest, remembered.size, remembered.data, None)
                else:
                    encoded.blobs[name] = VarBlob(remembered.digest, remembered.size, None, remembered.host)
                encoded._without_sets.add(name)
                continue
            if type(value) in _PLAIN_SCALARS:  # no identity, no sets: plain pickle gives the same bytes
                pickled[name] = _PREFIX + pickle.dumps(value, _PROTOCOL)
                encoded._without_sets.add(name)
                continue
            data, pickler = self._pickle(name, value, namespace, bound_ids, encoded)
            holds_sets = False
            if (
                name in self._committed_without_sets and remembered is not None
                and len(data) >= _REF_MIN_SIZE and remembered.size == len(data)
                and remembered.digest == digests.setdefault(name, _digest(data))
            ):
                pass  # the same bytes as in the last snapshot, which had no set in it: none now either
            elif may_hold_sets(data):  # the opcode's byte may also be plain data: the walk decides
                changed, holds_sets = canonicalize_sets(value)
                if changed:  # see set_order: pickle it as fixed
                    data, pickler = self._pickle(name, value, namespace, bound_ids, EncodedNamespace())
                    digests.pop(name, None)
            if not holds_sets:
                encoded._without_sets.add(name)
            if pickler is not None:
                picklers[name] = pickler
            pickled[name] = data
        # Variables that share an object (an alias, two closures over one cell, one list in two
        # dicts) are pickled together, so that they share it after loading too.
        # (A variable that could not be pickled has no pickler, so it is in no group.)
        sizes = {name: len(pickled[name]) for name in picklers}
        for group in _groups(picklers, sizes, namespace, bound_ids):
            values = tuple(namespace[n] for n in group)
            try:
                data = _dump(values, namespace, bound_ids)
            except Exception as exc:  # each of them pickled alone: only their sharing is lost
                _logger.warning("variables %s share objects but could not be saved together (%s: %s); "
                                "after a resume they are copies", ", ".join(group), type(exc).__name__, exc)
                continue
            for n in group:
                del pickled[n]
            pickled[SHARED_PREFIX + " ".join(group)] = data
        del picklers  # the objects they met may go now
        for key, data in pickled.items():
            remembered = self._memory.get(key)
            digest = digests.get(key) or _digest(data)
            if remembered is not None and remembered.digest == digest and len(data) >= _REF_MIN_SIZE:
                encoded.blobs[key] = VarBlob(digest, len(data), None, remembered.host)
            else:
                encoded.blobs[key] = VarBlob(digest, len(data), data, None)
        # In the namespace's order (a group where its first member is), so a restored namespace
        # iterates as the saved one did: unchanged immutable values were put first above.
        order = {name: i for i, name in enumerate(namespace)}
        encoded.blobs = dict(
            sorted(encoded.blobs.items(), key=lambda item: min(order.get(n, 0) for n in shared_names(item[0]) or (item[0],)))
        )
        return encoded

    def _pickle(
        self,
        name: str,
        value: Any,
        namespace: Mapping[str, Any],
        bound_ids: Mapping[int, str],
        encoded: EncodedNamespace,
    ) -> tuple[bytes, _Pickler | None]:
        try:
            return _dump_with_memo(value, namespace, bound_ids)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            type_name = _type_name(value)
            if self.policy == "strict":
                raise UnpicklableValueError(
                    f"variable {name!r} ({type_name}) cannot be saved in a checkpoint: {reason}. "
                    f"Delete it (del {name}) before the next await, or set durability.unpicklable = "
                    f'"skip" to leave it out'
                ) from exc
            encoded.skipped.append(SkippedVar(name, type_name, reason))
            return _dump(UnrestoredValue(name, type_name, reason), namespace, bound_ids), None

    def commit(self, encoded: EncodedNamespace, counter: int) -> None:
        """Remember ``encoded`` as written at ``counter``; its inline variables are hosted there and
        variables it does not have are forgotten."""
        memory: dict[str, _Remembered] = {}
        for name, blob in encoded.blobs.items():
            host = counter if blob.data is not None else blob.host
            assert host is not None
            memory[name] = self._remember(blob, host, name in encoded._values, encoded._values.get(name))
        self._memory = memory
        self._without_sets = set(encoded._without_sets)
        self._committed_without_sets = frozenset(encoded._without_sets)

    def settle_sets(
        self,
        namespace: Mapping[str, Any],
        *,
        bound: Mapping[str, Any] | None = None,
        unsaved: Callable[[str], bool] | None = None,
    ) -> None:
        """Put the sets of the namespace in their canonical layout without taking a snapshot.

        A frame does this after every statement, whether or not it writes a snapshot there (a
        replay, running tasks and big namespaces defer snapshots), so that the live run and a resumed
        one fix set orders at the same points of the code. Variables that held no set at the last
        snapshot, or at their last walk, are not walked again.
        """
        bound = bound or {}
        for name, value in namespace.items():
            if name in _NOT_SAVED or name in self._without_sets or (name in bound and bound[name] is value):
                continue
            if unsaved is not None and unsaved(name):
                continue
            if isinstance(value, (types.FunctionType, types.ModuleType, type)) or _tool_name(value):
                continue
            if not canonicalize_sets(value)[1]:
                self._without_sets.add(name)  # walked once until the next snapshot says otherwise

    def seed(self, blobs: Mapping[str, VarBlob], values: Mapping[str, Any], counter_of_inline: int) -> None:
        """Start from a restored snapshot: its inline variables live at ``counter_of_inline``, the others
        where they refer to; ``values`` are the restored objects."""
        memory: dict[str, _Remembered] = {}
        for name, blob in blobs.items():
            host = counter_of_inline if blob.data is not None else blob.host
            if host is not None:
                memory[name] = self._remember(blob, host, name in values, values.get(name))
        self._memory = memory
        self._without_sets = {
            name for name, blob in blobs.items() if blob.data is not None and not may_hold_sets(blob.data)
        }
        self._committed_without_sets = frozenset(self._without_sets)

    @staticmethod
    def _remember(blob: VarBlob, host: int, known: bool, value: Any) -> _Remembered:
        immutable = known and _deeply_immutable(value)
        small = blob.data if blob.data is not None and blob.size < _REF_MIN_SIZE else None
        return _Remembered(blob.digest, blob.size, host, value if immutable else None, immutable, small)


# --- decoding -------------------------------------------------------------------------------------


def decode_namespace(
    blobs: Mapping[str, bytes], target: dict[str, Any], *, bound: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Unpickle each variable (name to the bytes :class:`NamespaceEncoder` produced) into ``target``;
    return the decoded values.

    Functions the LLM defined get ``target`` as their globals, and a stored reference to the namespace
    is ``target``; references to bound objects get the objects in ``bound`` (a placeholder when the key
    is missing). A variable that cannot be unpickled (a class whose module is gone) becomes an
    :class:`UnrestoredValue` that explains why, with a warning in the log; the others still load.
    """
    bound = bound or {}
    classes: dict[str, Any] = {}
    decoded: dict[str, Any] = {}
    for name, data in blobs.items():
        unpickler = _Unpickler(io.BytesIO(data), name, target, bound, classes)
        try:
            value = unpickler.load()
            if may_hold_sets(data):
                canonicalize_sets(value)
        except Exception as exc:
            reason = f"{type(exc).__name__}: {exc}"
            _logger.warning("variable %r is not restored: it could not be unpickled (%s)", name, reason)
            value = UnrestoredValue(name, "type unknown", reason, _LOAD_PROBLEM)
        for key in unpickler.missing_tools:
            _logger.warning("variable %r refers to the unbound tool %r: a placeholder stands in", name, key)
        names = shared_names(name)
        if names is None:
            decoded[name] = value
        elif isinstance(value, tuple) and len(value) == len(names):
            decoded.update(zip(names, value))
        else:
            for n in names:
                decoded[n] = UnrestoredValue(n, "type unknown", f"the group {name!r} did not load whole", _LOAD_PROBLEM)
    target.update(decoded)
    return decoded
