"""A set of record counters kept as sorted, disjoint ranges.

The manager remembers every counter it pruned, and each tombstone lists them all. Nearly all pruned
counters form one run (everything older than the kept snapshots), so as ranges the set stays a few
entries long however long the execution ran; as a plain set, listing it cost time proportional to the
execution's whole history on every prune.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Iterator

__all__ = ("CounterRanges",)


class CounterRanges:
    """Counters as sorted, disjoint, non-adjacent ``[first, last]`` ranges."""

    __slots__ = ("_firsts", "_lasts")

    def __init__(self, counters: Iterable[int] = ()) -> None:
        self._firsts: list[int] = []
        self._lasts: list[int] = []
        self.update(counters)

    @classmethod
    def from_ranges(cls, ranges: Iterable[Iterable[int]]) -> CounterRanges:
        """Rebuild from :meth:`ranges` output (ranges in any order, overlapping or not)."""
        out = cls()
        out._merge(sorted((int(a), int(b)) for a, b in ranges if int(a) <= int(b)))
        return out

    def update(self, counters: Iterable[int]) -> None:
        """Add ``counters``; costs their number plus the number of ranges, not the counters held."""
        runs: list[tuple[int, int]] = []
        for c in sorted(set(counters)):
            if runs and runs[-1][1] == c - 1:
                runs[-1] = (runs[-1][0], c)
            else:
                runs.append((c, c))
        self._merge(runs)

    def __ior__(self, other: Iterable[int] | CounterRanges) -> CounterRanges:
        if isinstance(other, CounterRanges):
            self._merge(list(zip(other._firsts, other._lasts)))
        else:
            self.update(other)
        return self

    def _merge(self, runs: list[tuple[int, int]]) -> None:
        if not runs:
            return
        merged: list[tuple[int, int]] = []
        mine = list(zip(self._firsts, self._lasts))
        i = j = 0
        while i < len(mine) or j < len(runs):
            if j >= len(runs) or (i < len(mine) and mine[i][0] <= runs[j][0]):
                a, b = mine[i]
                i += 1
            else:
                a, b = runs[j]
                j += 1
            if merged and a <= merged[-1][1] + 1:
                if b > merged[-1][1]:
                    merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self._firsts = [a for a, _ in merged]
        self._lasts = [b for _, b in merged]

    def __contains__(self, counter: object) -> bool:
        if not isinstance(counter, int):
            return False
        i = bisect_right(self._firsts, counter) - 1
        return i >= 0 and counter <= self._lasts[i]

    def __iter__(self) -> Iterator[int]:
        for a, b in zip(self._firsts, self._lasts):
            yield from range(a, b + 1)

    def __len__(self) -> int:
        return sum(b - a + 1 for a, b in zip(self._firsts, self._lasts))

    def __bool__(self) -> bool:
        return bool(self._firsts)

    def ranges(self) -> list[list[int]]:
        """``[[first, last], ...]`` in ascending order (how a tombstone stores them)."""
        return [[a, b] for a, b in zip(self._firsts, self._lasts)]

    def __repr__(self) -> str:
        return f"CounterRanges({self.ranges()!r})"
