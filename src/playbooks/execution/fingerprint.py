"""A text and digest for a durable call's arguments that are the same in every process.

The journal matches a replayed call to its record by its call id and checks that its name and this
fingerprint are the same; a task's name includes the canonical text of its coroutine's arguments. So
the text must not depend on memory addresses, on the hash seed (set and dict order) or on the
interleaving of tasks.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from typing import Any

__all__ = ("canonical", "fingerprint")

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def canonical(value: Any, depth: int = 0) -> str:
    """A text for ``value`` that is the same in every process: sets and dicts sorted, no addresses."""
    if depth > 20:
        return "..."
    if value is None or isinstance(value, (bool, int, float, complex, str, bytes, bytearray)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        inner = ", ".join(canonical(v, depth + 1) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if isinstance(value, (set, frozenset)):
        return "{" + ", ".join(sorted(canonical(v, depth + 1) for v in value)) + "}"
    if isinstance(value, dict):
        items = sorted(f"{canonical(k, depth + 1)}: {canonical(v, depth + 1)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if getattr(type(value), "__repr__") is object.__repr__ and isinstance(getattr(value, "__dict__", None), dict):
        # A plain object: its attributes, so that two objects with other contents differ.
        return f"{type(value).__qualname__}{canonical(vars(value), depth + 1)}"
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__qualname__}>"
    return _ADDRESS.sub("", text)


def fingerprint(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[str, str]:
    """``(digest, display)`` of a call: equal across processes for equal arguments."""
    parts = [canonical(a) for a in args] + [f"{k}={canonical(v)}" for k, v in sorted(kwargs.items())]
    display = f"{name}({', '.join(parts)})"
    digest = hashlib.blake2b(display.encode("utf-8", "surrogatepass"), digest_size=16).hexdigest()
    if len(display) > 300:
        display = display[:297] + "..."
    return digest, display


