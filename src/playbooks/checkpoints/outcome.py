"""A durable call's outcome as bytes: its value, or its exception with everything the code could see.

Plain ``pickle`` rebuilds an exception by calling its class with ``self.args``, which fails for a class
whose ``__init__`` takes other arguments (``def __init__(self, order, reason)``), and it drops
``__cause__``, ``__context__`` and ``__suppress_context__``. Here an exception is rebuilt without
calling ``__init__`` (``cls.__new__`` then ``args`` and ``__dict__``), and its chain is stored too, so
a replayed tool error has the same class, args, attributes and chain as the live one.

An exception that cannot be stored whole (an attribute that cannot be pickled) is stored as a
stand-in of the same class: the attributes that can be pickled, and ``repr`` texts for the others,
with a warning naming them. A class that cannot be pickled at all (defined inside a function of the
host) gets a stand-in subclass of the nearest ancestor that can, with the same message.

:func:`rebuild_exception` and :func:`restore_exception_state` are named by stored records: they are
part of the checkpoint format.
"""

from __future__ import annotations

import functools
import io
import pickle
import sys
import warnings
from typing import Any

from playbooks.errors import CheckpointWarning

__all__ = (
    "StoredExceptionStandIn",
    "dump_outcome",
    "load_outcome",
    "rebuild_exception",
    "reduce_exception",
    "restore_exception_state",
)

_PROTOCOL = 5
_MAX_CHAIN = 32  # causes and contexts kept in a stand-in


class StoredExceptionStandIn(Exception):
    """Stands for a tool's exception whose class could not be stored: same message, class name kept."""

    def __init__(self, class_name: str, message: str) -> None:
        super().__init__(message)
        self.class_name = class_name

    def __str__(self) -> str:
        return f"{self.args[0]} (a stand-in for {self.class_name}, which could not be saved)"


def rebuild_exception(cls: type[BaseException], args: tuple[Any, ...]) -> BaseException:
    """A new ``cls`` exception with ``args``, made without calling its ``__init__``."""
    exc = cls.__new__(cls, *args)
    exc.args = args
    return exc


def restore_exception_state(exc: BaseException, state: tuple[Any, ...]) -> BaseException:
    """Set what :func:`rebuild_exception` did not: attributes, ``__cause__``, ``__context__`` and
    ``__suppress_context__`` (set after the exception is memoized, so a cyclic chain loads)."""
    attributes, cause, context, suppress_context = state
    if attributes:
        try:
            exc.__dict__.update(attributes)
        except AttributeError:  # a class with __slots__ only
            for name, value in attributes.items():
                try:
                    setattr(exc, name, value)
                except Exception:
                    pass
    exc.__cause__ = cause
    exc.__context__ = context
    exc.__suppress_context__ = suppress_context
    return exc


def reduce_exception(obj: BaseException) -> tuple[Any, ...]:
    """The pickle reduction of an exception: its class and args, then its attributes and chain."""
    state = (_attributes(obj), obj.__cause__, obj.__context__, obj.__suppress_context__)
    return (rebuild_exception, (type(obj), obj.args), state, None, None, restore_exception_state)


def _attributes(exc: BaseException) -> dict[str, Any] | None:
    state = getattr(exc, "__dict__", None)
    return dict(state) if state else None


class _Pickler(pickle.Pickler):
    """Pickles exceptions through :func:`rebuild_exception`, keeping their chain (bounded)."""

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file, protocol=_PROTOCOL)

    def reducer_override(self, obj: Any) -> Any:
        if not isinstance(obj, BaseException):
            return NotImplemented
        return reduce_exception(obj)


@functools.cache
def _cloud_pickler() -> type[Any]:
    """The same reduction on top of cloudpickle (classes and functions the LLM defined, by value)."""
    import cloudpickle

    class _CloudPickler(cloudpickle.Pickler):  # type: ignore[misc]
        def __init__(self, file: io.BytesIO) -> None:
            super().__init__(file, protocol=_PROTOCOL)

        def reducer_override(self, obj: Any) -> Any:
            if isinstance(obj, BaseException):
                return reduce_exception(obj)
            if isinstance(obj, io.IOBase) and obj not in (sys.stdout, sys.stderr):
                # cloudpickle would store a copy of a file's contents: a file is not saved
                raise TypeError(f"cannot pickle {type(obj).__qualname__!r} object")
            return super().reducer_override(obj)

    return _CloudPickler


def _dump_with(pickler_cls: Any, value: Any) -> bytes:
    buffer = io.BytesIO()
    pickler_cls(buffer).dump(value)
    return buffer.getvalue()


def _safe(value: Any) -> Any:
    """``value`` if it pickles, else its ``repr`` (for a stand-in)."""
    try:
        _dump_with(_cloud_pickler(), value)
        return value
    except Exception:
        try:
            return f"<unsaved {type(value).__qualname__}: {value!r}>"[:500]
        except Exception:
            return f"<unsaved {type(value).__qualname__}>"


def _stand_in(exc: BaseException, lossy: list[str], depth: int = 0) -> BaseException:
    """An exception of the same class with what could be stored; ``lossy`` gets what could not."""
    args = tuple(_safe(a) for a in exc.args)
    attributes = {k: _safe(v) for k, v in (_attributes(exc) or {}).items()}
    lossy.extend(
        [f"args[{i}]" for i, (a, b) in enumerate(zip(args, exc.args)) if a is not b]
        + [k for k, v in attributes.items() if v is not (_attributes(exc) or {}).get(k)]
    )
    deeper = depth < _MAX_CHAIN
    cause = _stand_in(exc.__cause__, lossy, depth + 1) if exc.__cause__ is not None and deeper else None
    context: BaseException | None = None
    if exc.__context__ is exc.__cause__:
        context = cause
    elif exc.__context__ is not None and deeper:
        context = _stand_in(exc.__context__, lossy, depth + 1)
    cls: type[BaseException] = type(exc)
    try:
        _dump_with(_cloud_pickler(), cls)
    except Exception:
        lossy.append(f"class {cls.__qualname__}")
        stand_in: BaseException = StoredExceptionStandIn(cls.__qualname__, str(exc))
        return restore_exception_state(stand_in, (None, cause, context, exc.__suppress_context__))
    return restore_exception_state(rebuild_exception(cls, args), (attributes, cause, context, exc.__suppress_context__))


_SCALARS = frozenset({int, float, str, bytes, bool, type(None)})
"""Types whose pickle never meets :meth:`_Pickler.reducer_override`."""


def dump_outcome(value: Any, *, what: str = "a call") -> bytes | None:
    """The bytes of a call's value or exception; ``None`` if a value cannot be pickled.

    Plain pickle first (C speed; it refuses what it cannot rebuild, such as functions the LLM
    defined), then cloudpickle. An exception is always stored, as a faithful stand-in if need be
    (with a :class:`~playbooks.errors.CheckpointWarning` that names what was left out).
    """
    if type(value) in _SCALARS:  # the usual tool result: the same bytes without a pickler object
        return pickle.dumps(value, _PROTOCOL)
    if isinstance(value, BaseException):
        for pickler in (_Pickler, _cloud_pickler()):
            try:
                return _dump_with(pickler, value)
            except Exception:
                continue
        lossy: list[str] = []
        stand_in = _stand_in(value, lossy)
        warnings.warn(
            f"the exception {type(value).__qualname__}: {value} raised by {what} could not be saved "
            f"whole; a replay raises a stand-in of the same class without: {', '.join(lossy) or 'its traceback'}",
            CheckpointWarning,
            stacklevel=3,
        )
        try:
            return _dump_with(_cloud_pickler(), stand_in)
        except Exception:
            return _dump_with(_Pickler, StoredExceptionStandIn(type(value).__qualname__, str(value)))
    try:  # exceptions inside a value (gather(..., return_exceptions=True)) are rebuilt faithfully too
        return _dump_with(_Pickler, value)
    except Exception:
        pass
    try:
        return _dump_with(_cloud_pickler(), value)
    except Exception:
        return None


def load_outcome(data: bytes) -> Any:
    """Rebuild what :func:`dump_outcome` stored."""
    return pickle.loads(data)
