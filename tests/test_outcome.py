"""How a call's outcome is pickled: the fast path for plain values writes what the general one does."""

from __future__ import annotations

import io

from hypothesis import given
from hypothesis import strategies as st

from playbooks.checkpoints.outcome import _Pickler, dump_outcome, load_outcome


@given(st.none() | st.booleans() | st.integers() | st.floats() | st.text() | st.binary())
def test_a_scalar_outcome_is_pickled_as_the_outcome_pickler_would(value: object) -> None:
    buffer = io.BytesIO()
    _Pickler(buffer).dump(value)
    assert dump_outcome(value) == buffer.getvalue()
    assert load_outcome(dump_outcome(value)) == value or value != value  # NaN is not equal to itself
