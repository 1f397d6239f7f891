"""A frame's namespace as per-variable pickles, so unchanged variables are not written again.

Each variable is pickled on its own with cloudpickle, which stores functions, lambdas and classes the
LLM defined by value. Two things are not stored but *referred to*, because the
process that resumes has its own: the namespace dict itself (every function the LLM defined has it as
its ``__globals__``; restored functions get the live namespace back, not a private copy) and the
*bound* objects (the tool wrappers and ``print``), which the resuming executor binds again.

:class:`NamespaceEncoder` remembers what the frame's previous snapshot stored: an immutable value that is
still the same object is not even pickled again, and any value whose pickle has the same digest is
stored as a reference to the snapshot that holds its bytes.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import cloudpickle

from playbooks.errors import UnpicklableValueError, UnrestoredValueError

__all__ = (
    "EncodedNamespace",
    "NamespaceEncoder",
    "SkippedVar",
    "UnrestoredValue",
    "VarBlob",
    "decode_namespace",
)

_logger = logging.getLogger("playbooks.checkpoints")

_IMMUTABLE_SCALARS = (int, float, complex, bool, str, bytes, range, type(None))
_REF_MIN_SIZE = 4096
"""Smaller pickles are stored inline every time: a reference would pin an old snapshot for nothing."""


@dataclass(frozen=True, slots=True)
class VarBlob:
    """One variable as stored in a snapshot: its pickle, or where an earlier snapshot holds it."""

    digest: str
    size: int
    data: bytes | None
    host: int | None


@dataclass(frozen=True, slots=True)
class SkippedVar:
    """A variable that could not be pickled (stored as an :class:`UnrestoredValue` instead)."""

    name: str
    type_name: str
    reason: str


@dataclass(slots=True)
class EncodedNamespace:
    """The variables of one snapshot."""

    blobs: dict[str, VarBlob] = field(default_factory=dict)
    skipped: list[SkippedVar] = field(default_factory=list)
    _values: dict[str, Any] = field(default_factory=dict, repr=False)

    def total_size(self) -> int:
        """Bytes of every variable, stored here or referred to."""
        return sum(b.size for b in self.blobs.values())

    def new_bytes(self) -> int:
        """Bytes of the variables this snapshot stores itself."""
        return sum(b.size for b in self.blobs.values() if b.data is not None)

    def largest(self, n: int = 3) -> list[tuple[str, int]]:
        """The ``n`` biggest variables, biggest first."""
        return sorted(((k, b.size) for k, b in self.blobs.items()), key=lambda kv: -kv[1])[:n]


def _type_name(value: Any) -> str:
    cls = type(value)
    return cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"


def _unrestored_message(name: str, type_name: str, reason: str) -> str:
    return (
        f"variable {name!r} ({type_name}) was not restored after the resume: it could not be saved in "
        f"the checkpoint ({reason}). Re-create it before using it."
    )


class UnrestoredValue:
    """Stands for a variable that was left out of a checkpoint; any use raises
    :class:`~playbooks.errors.UnrestoredValueError` saying why it is missing."""

    __slots__ = ("_name", "_type_name", "_reason")

    def __init__(self, name: str, type_name: str, reason: str) -> None:
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_type_name", type_name)
        object.__setattr__(self, "_reason", reason)

    def _fail(self, *args: Any, **kwargs: Any) -> Any:
        raise UnrestoredValueError(
            _unrestored_message(
                object.__getattribute__(self, "_name"),
                object.__getattribute__(self, "_type_name"),
                object.__getattribute__(self, "_reason"),
            )
        )

    def __getattr__(self, attr: str) -> Any:
        return self._fail()

    def __setattr__(self, attr: str, value: Any) -> None:
        self._fail()

    def __reduce__(self) -> tuple[Any, ...]:
        return (
            UnrestoredValue,
            (
                object.__getattribute__(self, "_name"),
                object.__getattribute__(self, "_type_name"),
                object.__getattribute__(self, "_reason"),
            ),
        )

    def __repr__(self) -> str:
        short = object.__getattribute__(self, "_type_name").rsplit(".", 1)[-1]
        return f"<unrestored {object.__getattribute__(self, '_name')!r}: {short}>"

    __call__ = __iter__ = __aiter__ = __next__ = __anext__ = __len__ = __bool__ = _fail
    __contains__ = __getitem__ = __setitem__ = __delitem__ = _fail
    __enter__ = __exit__ = __aenter__ = __aexit__ = __await__ = _fail
    __str__ = __format__ = __bytes__ = __int__ = __float__ = __index__ = _fail
    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = _fail
    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = _fail
    __truediv__ = __rtruediv__ = __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = _fail
    __pow__ = __rpow__ = __neg__ = __pos__ = __abs__ = __invert__ = _fail
    __and__ = __rand__ = __or__ = __ror__ = __xor__ = __rxor__ = __lshift__ = __rshift__ = _fail
    __iadd__ = __isub__ = __imul__ = __itruediv__ = _fail
    __hash__ = _fail


def _restore_function(func: types.FunctionType, state: dict[str, Any]) -> types.FunctionType:
    """Put back what ``types.FunctionType(...)`` does not take as arguments."""
    func.__dict__.update(state.pop("__dict__", {}))
    for attr, value in state.items():
        setattr(func, attr, value)
    return func


def _tool_name(value: Any) -> str | None:
    """The name of a tool wrapper (``bind_tools`` marks them), bound again on resume, else ``None``."""
    if isinstance(value, types.FunctionType):
        name = getattr(value, "__playbooks_tool__", None)
        return name if isinstance(name, str) else None
    return None


def _live_namespace() -> dict[str, Any]:
    """Stands, in a pickle, for the namespace being restored into; the unpickler supplies it."""
    raise pickle.UnpicklingError("a namespace pickle must be loaded with decode_namespace()")


def _live_bound(key: str) -> Any:
    """Stands, in a pickle, for the host's bound object ``key`` (a tool); the unpickler supplies it."""
    raise pickle.UnpicklingError("a namespace pickle must be loaded with decode_namespace()")


class _LiveNamespace:
    """Pickles as a reference to the namespace that the value is loaded into."""

    def __reduce__(self) -> tuple[Any, ...]:
        return (_live_namespace, ())


_LIVE_NAMESPACE = _LiveNamespace()


class _Pickler(cloudpickle.Pickler):  # type: ignore[misc]
    """cloudpickle, with the bound objects as references and the LLM's functions rebuilt around
    whatever namespace they are loaded into.

    Only ``reducer_override`` is hooked (no ``persistent_id``): the C pickler does not call it for
    plain data (dicts, lists, strings, numbers), so big plain values pickle at C speed.
    """

    def __init__(self, file: io.BytesIO, namespace: Mapping[str, Any], bound_ids: Mapping[int, str]) -> None:
        super().__init__(file, protocol=5)
        self._namespace = namespace
        self._bound_ids = bound_ids

    def reducer_override(self, obj: Any) -> Any:
        key = self._bound_ids.get(id(obj)) or _tool_name(obj)
        if key is not None:
            return (_live_bound, (key,))
        if isinstance(obj, types.FunctionType) and obj.__globals__ is self._namespace:
            state = {
                "__qualname__": obj.__qualname__,
                "__module__": obj.__module__,
                "__doc__": obj.__doc__,
                "__kwdefaults__": obj.__kwdefaults__,
                "__annotations__": obj.__annotations__,
                "__dict__": dict(obj.__dict__),
            }
            args = (obj.__code__, _LIVE_NAMESPACE, obj.__name__, obj.__defaults__, obj.__closure__)
            return (types.FunctionType, args, state, None, None, _restore_function)
        return super().reducer_override(obj)


class _Unpickler(pickle.Unpickler):
    def __init__(self, file: io.BytesIO, target: dict[str, Any], bound: Mapping[str, Any]) -> None:
        super().__init__(file)
        self._target = target
        self._bound = bound

    def find_class(self, module: str, name: str) -> Any:
        if module == __name__ and name == "_live_namespace":
            return lambda: self._target
        if module == __name__ and name == "_live_bound":
            return self._bound_object
        return super().find_class(module, name)

    def _bound_object(self, key: str) -> Any:
        if key in self._bound:
            return self._bound[key]
        return UnrestoredValue(key, "tool", "the agent has no tool of that name any more")


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

    ``policy`` is what to do with a value that cannot be pickled: ``"skip"`` (store a placeholder and
    report it) or ``"strict"`` (raise :class:`~playbooks.errors.UnpicklableValueError`).
    """

    def __init__(self, *, policy: Literal["skip", "strict"] = "skip") -> None:
        self.policy = policy
        self._memory: dict[str, _Remembered] = {}

    def encode(self, namespace: Mapping[str, Any], *, bound: Mapping[str, Any] | None = None) -> EncodedNamespace:
        """Pickle every variable but ``__builtins__`` and the bound objects under their own names."""
        bound = bound or {}
        bound_ids = {id(v): k for k, v in bound.items()}
        encoded = EncodedNamespace()
        for name, value in namespace.items():
            if name == "__builtins__" or (name in bound and bound[name] is value) or _tool_name(value) == name:
                continue  # bound again by the resuming executor (an alias is stored as a reference)
            remembered = self._memory.get(name)
            if remembered is not None and remembered.immutable and remembered.value is value:
                if remembered.data is not None:
                    blob = VarBlob(remembered.digest, remembered.size, remembered.data, None)
                else:
                    blob = VarBlob(remembered.digest, remembered.size, None, remembered.host)
                encoded.blobs[name] = blob
                encoded._values[name] = value
                continue
            data = self._pickle(name, value, namespace, bound_ids, encoded)
            digest = _digest(data)
            if remembered is not None and remembered.digest == digest and len(data) >= _REF_MIN_SIZE:
                encoded.blobs[name] = VarBlob(digest, len(data), None, remembered.host)
            else:
                encoded.blobs[name] = VarBlob(digest, len(data), data, None)
            encoded._values[name] = value
        return encoded

    def _pickle(
        self,
        name: str,
        value: Any,
        namespace: Mapping[str, Any],
        bound_ids: Mapping[int, str],
        encoded: EncodedNamespace,
    ) -> bytes:
        buffer = io.BytesIO()
        try:
            _Pickler(buffer, namespace, bound_ids).dump(_LIVE_NAMESPACE if value is namespace else value)
            return buffer.getvalue()
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
            return pickle.dumps(UnrestoredValue(name, type_name, reason), protocol=5)

    def commit(self, encoded: EncodedNamespace, counter: int) -> None:
        """Remember ``encoded`` as written at ``counter``; its inline variables are hosted there."""
        memory: dict[str, _Remembered] = {}
        for name, blob in encoded.blobs.items():
            host = counter if blob.data is not None else blob.host
            assert host is not None
            value = encoded._values.get(name)
            immutable = _deeply_immutable(value)
            small = blob.data if blob.data is not None and blob.size < _REF_MIN_SIZE else None
            memory[name] = _Remembered(blob.digest, blob.size, host, value if immutable else None, immutable, small)
        self._memory = memory

    def seed(self, blobs: Mapping[str, VarBlob], values: Mapping[str, Any], counter_of_inline: int) -> None:
        """Start from a restored snapshot: its inline variables live at ``counter_of_inline``."""
        memory: dict[str, _Remembered] = {}
        for name, blob in blobs.items():
            host = counter_of_inline if blob.data is not None else blob.host
            if host is None:
                continue
            value = values.get(name)
            immutable = name in values and _deeply_immutable(value)
            small = blob.data if blob.data is not None and blob.size < _REF_MIN_SIZE else None
            memory[name] = _Remembered(blob.digest, blob.size, host, value if immutable else None, immutable, small)
        self._memory = memory


def decode_namespace(
    blobs: Mapping[str, bytes], target: dict[str, Any], *, bound: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """Unpickle each variable into ``target``; return the decoded values.

    Functions the LLM defined get ``target`` as their globals; references to bound objects get the
    objects in ``bound``. A variable that cannot be unpickled (a class whose module is gone) becomes an
    :class:`UnrestoredValue` that explains why, with a warning in the log; the others still load.
    """
    bound = bound or {}
    decoded: dict[str, Any] = {}
    for name, data in blobs.items():
        try:
            value = _Unpickler(io.BytesIO(data), target, bound).load()
        except Exception as exc:
            reason = f"it could not be unpickled: {type(exc).__name__}: {exc}"
            _logger.warning("variable %r is not restored: %s", name, reason)
            value = UnrestoredValue(name, "unknown", reason)
        decoded[name] = value
    target.update(decoded)
    return decoded

