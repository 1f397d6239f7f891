"""CounterRanges behaves as a set of ints, whatever order and overlap the counters come in."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from playbooks.checkpoints.counter_ranges import CounterRanges

_batches = st.lists(st.lists(st.integers(min_value=1, max_value=300), max_size=40), max_size=8)


@given(_batches, st.lists(st.integers(min_value=0, max_value=310), max_size=30))
def test_ranges_hold_exactly_the_counters_added(batches: list[list[int]], probes: list[int]) -> None:
    ranges, plain = CounterRanges(), set()
    for batch in batches:
        ranges.update(batch)
        plain.update(batch)
    assert set(ranges) == plain
    assert len(ranges) == len(plain)
    assert bool(ranges) == bool(plain)
    for probe in probes:
        assert (probe in ranges) == (probe in plain)
    spans = ranges.ranges()
    # Sorted, disjoint and not adjacent: the shortest listing.
    assert all(a <= b for a, b in spans)
    assert all(spans[i][1] + 1 < spans[i + 1][0] for i in range(len(spans) - 1))
    assert set(CounterRanges.from_ranges(reversed(spans))) == plain


@given(_batches)
def test_union_of_two_range_sets(batches: list[list[int]]) -> None:
    left, right = CounterRanges(), CounterRanges()
    for i, batch in enumerate(batches):
        (left if i % 2 else right).update(batch)
    expected = set(left) | set(right)
    left |= right
    assert set(left) == expected


def test_a_long_history_stays_a_few_ranges() -> None:
    pruned = CounterRanges()
    for start in range(1, 100_000, 8):
        pruned.update(range(start, start + 8))
    assert pruned.ranges() == [[1, 100_000]]


def test_a_huge_listed_range_is_not_expanded() -> None:
    listed = CounterRanges.from_ranges([[1, 10**15]])
    assert 10**15 in listed and 10**15 + 1 not in listed
    assert listed.ranges() == [[1, 10**15]]
