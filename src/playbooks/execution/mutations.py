"""What a tool changed in its arguments, recorded live and done again on replay.

A tool that appends to the list it was given changes the LLM's namespace as a side effect of the call.
A replayed call does not run the tool, so the change has to be recorded with the call's result and
applied again to the arguments of the replayed call.

* Before an async or sync tool runs, every argument that could be changed in place is pickled (plain
  ``pickle``, C speed), or, when plain pickle refuses it (an instance of a class the LLM defined),
  turned into its canonical text (:func:`playbooks.execution.fingerprint.canonical`).
* After it returns or raises, an argument whose pickle differs was changed. For the built-in containers
  (``list``, ``dict``, ``set``, ``bytearray``) and plain objects (instances whose state is their
  ``__dict__``) the new contents are recorded; for anything else only the fact that it changed.
* On replay, recorded contents are applied in place, recursively where the old and new contents are
  containers of the same kind, so objects nested in the argument keep their identity. A change that
  could not be recorded raises :class:`~playbooks.errors.NonDeterminismError`: a replay would give a
  silently different result.
"""

from __future__ import annotations

import pickle
from collections.abc import Mapping
from typing import Any

from playbooks.errors import NonDeterminismError

__all__ = ("ArgumentWatch", "apply_mutations")

_PROTOCOL = 5
_SCALARS = (int, float, complex, bool, str, bytes, type(None), range)
_CONTAINERS = (list, dict, set, bytearray)
_UNRECORDABLE = "changed in place (not a list, dict, set, bytearray or plain object)"


def _replayable(value: Any) -> bool:
    """A built-in container, or a plain object: its whole state is its ``__dict__``."""
    if type(value) in _CONTAINERS:
        return True
    cls = type(value)
    return (
        isinstance(getattr(value, "__dict__", None), dict)
        and getattr(cls, "__reduce_ex__") is object.__reduce_ex__
        and getattr(cls, "__reduce__") is object.__reduce__
        and getattr(cls, "__getstate__", object.__getstate__) is object.__getstate__
        and not hasattr(cls, "__setstate__")
        and not hasattr(cls, "__slots__")
    )


def _state_of(value: Any) -> bytes | str:
    """What a change of ``value`` shows in: its pickle, or (for what plain pickle refuses, such as an
    instance of a class the LLM defined) its canonical text."""
    try:
        return pickle.dumps(value, protocol=_PROTOCOL)
    except Exception:
        from playbooks.execution.fingerprint import canonical

        return canonical(value)


class ArgumentWatch:
    """The arguments of one call as they were before it ran."""

    __slots__ = ("_args", "_before")

    def __init__(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        self._args: list[tuple[str, Any]] = []
        self._before: list[bytes | str] = []
        for place, value in [(str(i), a) for i, a in enumerate(args)] + [(k, v) for k, v in kwargs.items()]:
            if isinstance(value, _SCALARS) or type(value) in (tuple, frozenset) and not value:
                continue
            self._args.append((place, value))
            self._before.append(_state_of(value))

    def changes(self) -> bytes | None:
        """The pickled changes the call made, or ``None`` if it changed nothing."""
        found: list[tuple[str, bool, Any]] = []
        for (place, value), before in zip(self._args, self._before):
            if _state_of(value) == before:
                continue
            if _replayable(value):
                state = value if type(value) in _CONTAINERS else dict(vars(value))
                found.append((place, True, state))
            else:
                found.append((place, False, type(value).__qualname__))
        if not found:
            return None
        try:
            return pickle.dumps(found, protocol=_PROTOCOL)
        except Exception:
            pass
        import cloudpickle

        try:
            return bytes(cloudpickle.dumps(found, protocol=_PROTOCOL))
        except Exception:
            return pickle.dumps([(p, False, None) for p, _, _ in found], protocol=_PROTOCOL)


def _patch(target: Any, new: Any) -> Any:
    """Make ``target`` equal to ``new`` in place where both are containers of one kind; return the
    object to store (``target`` if patched, else ``new``)."""
    if type(target) is not type(new):
        return new
    if isinstance(target, list):
        if len(target) == len(new):
            for i, item in enumerate(new):
                target[i] = _patch(target[i], item)
        else:
            target[:] = new
        return target
    if isinstance(target, dict):
        for key in [k for k in target if k not in new]:
            del target[key]
        for key, item in new.items():
            target[key] = _patch(target[key], item) if key in target else item
        return target
    if isinstance(target, (set, bytearray)):
        if target != new:
            if isinstance(target, set):
                target.clear()
                target.update(new)
            else:
                target[:] = new
        return target
    if isinstance(getattr(target, "__dict__", None), dict) and isinstance(new, type(target)):
        _patch(vars(target), vars(new))
        return target
    return new


def apply_mutations(data: bytes, args: tuple[Any, ...], kwargs: Mapping[str, Any], display: str) -> None:
    """Apply the changes recorded for a call to the arguments of its replay."""
    for place, recorded, state in pickle.loads(data):
        target = args[int(place)] if place.isdigit() else kwargs[place]
        if not recorded:
            kind = f" ({state})" if isinstance(state, str) else ""
            raise NonDeterminismError(
                f"the call {display} changed its argument {place}{kind} in place before the crash, in a "
                f"way that cannot be recorded ({_UNRECORDABLE}); a replay cannot redo it. Make the tool "
                f"return the new value instead of changing its argument."
            )
        if type(target) in _CONTAINERS:
            _patch(target, state)
        else:
            _patch(vars(target), state)
