"""Sets that iterate in the same order before a snapshot and after the resume that restores it.

A set iterates in the order of its hash table's slots, which depends on the hash seed (pinned for
durable runs, see :mod:`playbooks.execution.hash_seed`) and on the history of the table: the order its
elements were inserted in and when it grew. Unpickling rebuilds a set by inserting its elements in the
order it iterated, which for random sets of a few strings gives another table about half of the time,
so ``for name in names`` would make its durable calls in another order after a resume.

So every set a snapshot stores is put in a **canonical layout** first: emptied and filled again with
its elements in the order of their hashes. The layout then depends only on which elements it holds and
on the seed, and a restored set is put in the same layout after loading. The live set is changed in
place (same object, same elements; only its iteration order, which Python leaves unspecified, is
fixed), so the live run and a resumed one iterate alike after every snapshot.

Limits: a ``frozenset`` cannot be rebuilt in place and keeps its loaded order; elements with equal
hashes and are not plain values (str, numbers, bytes) keep their relative order as found; a set changed after a snapshot and iterated before the next
one iterates as Python's table makes it, in the live run and in a replay alike, unless a snapshot was
taken in one and not the other (a replay defers snapshots while it hands back recorded calls).
"""

from __future__ import annotations

from typing import Any

__all__ = ("canonicalize_sets", "may_hold_sets")

_MAX_NODES = 200_000
_EMPTY_SET = b"\x8f"  # the pickle opcode that starts a set


def may_hold_sets(pickled: bytes) -> bool:
    """Whether a pickle may contain a set (cheap; false positives only cost a walk)."""
    return _EMPTY_SET in pickled


_SCALARS = (str, int, float, bytes, bool, complex, type(None))


def _key(element: Any) -> tuple[int, str, str]:
    """The hash, then for elements whose hashes are equal (``""`` and ``0``, ``-1`` and ``-2``) the type
    and, for plain values, their ``repr``."""
    kind = type(element)
    return (hash(element), kind.__qualname__, repr(element) if kind in _SCALARS else "")


def _canonical(found: set[Any]) -> bool:
    """Put one set in its canonical layout; return whether its iteration order changed."""
    if len(found) < 2:
        return False
    before = list(found)
    order = sorted(before, key=_key)
    found.clear()
    found.update(order)
    return any(a is not b for a, b in zip(before, found))


def canonicalize_sets(value: Any) -> tuple[bool, bool]:
    """Put every set reachable from ``value`` (through lists, tuples, dicts and instance attributes)
    in its canonical layout; return whether any iteration order changed, and whether it holds sets."""
    changed = found = False
    seen: set[int] = set()
    stack = [value]
    visited = 0
    while stack and visited < _MAX_NODES:
        item = stack.pop()
        kind = type(item)
        if kind in (str, int, float, bool, bytes, type(None)) or id(item) in seen:
            continue
        seen.add(id(item))
        visited += 1
        if kind is set:
            found = True
            changed = _canonical(item) or changed
            stack.extend(e for e in item if type(e) is tuple)
        elif kind in (list, tuple, frozenset):
            stack.extend(item)
        elif kind is dict:
            stack.extend(item.values())
            stack.extend(k for k in item if type(k) is tuple)
        elif not isinstance(item, type):
            state = getattr(item, "__dict__", None)
            if type(state) is dict:
                stack.extend(state.values())
    return changed, found
