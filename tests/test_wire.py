"""The one-pass record encoder writes the same bytes as the two-pass one the format was defined by."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from playbooks.checkpoints.model import FrameRef, Record, StoredVar
from playbooks.checkpoints.wire import decode_fields, encode_fields, encode_record, record_from_fields, record_to_fields

_text = st.text(max_size=30)
_blob = st.binary(max_size=40)
_refs = st.builds(
    FrameRef, _text, _text, st.none() | _text, st.integers(min_value=0, max_value=10**6), _text
)
_vars = st.dictionaries(
    _text,
    st.builds(StoredVar, _text, st.integers(min_value=0, max_value=10**6), st.none() | _blob, st.none() | st.integers(1, 99)),
    max_size=5,
)
_every_record = dict(  # the fields without a default
    execution_id=_text,
    counter=st.integers(min_value=1, max_value=10**9),
    timestamp=st.floats(allow_nan=False, allow_infinity=False),
    frame_id=_text,
    agent_id=_text,
    call_stack=st.lists(_refs, max_size=3).map(tuple),
    response_start=st.integers(min_value=0, max_value=10**6),
    response_text=_text,
)
_records = st.builds(
    Record,
    kind=st.sampled_from(["snapshot", "intent", "result", "state"]),
    **_every_record,
    executed_offset=st.integers(min_value=0, max_value=10**6),
    statement=_text,
    variables=_vars,
    skipped=st.lists(st.tuples(_text, _text, _text), max_size=2).map(tuple),
    done=st.booleans(),
    error=st.none() | _blob,
    response_host=st.none() | st.integers(1, 99),
    seq=_text,
    value=st.none() | _blob,
    mutations=st.none() | _blob,
    sync=st.booleans(),
)


@given(_records)
def test_one_pass_encoding_is_byte_identical(record: Record) -> None:
    data = encode_record(record)
    assert data == encode_fields(record_to_fields(record))
    assert record_from_fields(decode_fields(data, "test"), "test") == record


def test_every_bytes_field_of_a_record_is_stored_as_a_blob() -> None:
    from dataclasses import fields

    from playbooks.checkpoints.wire import _BYTES_FIELDS

    holding_bytes = {f.name for f in fields(Record) if "bytes" in str(f.type)}
    assert holding_bytes == set(_BYTES_FIELDS)


_calls = st.builds(
    Record,
    kind=st.sampled_from(["intent", "result"]),
    **_every_record,
    seq=_text,
    name=_text,
    fingerprint=_text,
    display=_text,
    key=_text,
    outcome=st.sampled_from(["value", "raise", "cancelled", "unrecorded", "interrupted"]),
    value=st.none() | _blob,
    mutations=st.none() | _blob,
    sync=st.booleans(),
)


@given(_calls, st.sampled_from([None, "executed_offset", "statement", "done", "error", "variables"]))
def test_the_fast_path_of_calls_is_byte_identical(record: Record, snapshot_field: str | None) -> None:
    """Intents and results take a shorter path (and one that sets a snapshot field falls back)."""
    if snapshot_field is not None:
        setattr(record, snapshot_field, {"executed_offset": 7, "statement": "x", "done": True, "error": b"e",
                                         "variables": {"v": StoredVar("d", 1, b"x", None)}}[snapshot_field])
    data = encode_record(record)
    assert data == encode_fields(record_to_fields(record))
    assert record_from_fields(decode_fields(data, "test"), "test") == record


def test_the_fields_without_a_default_are_the_ones_every_call_record_writes() -> None:
    from dataclasses import MISSING, fields

    from playbooks.checkpoints.wire import _REQUIRED

    required = tuple(f.name for f in fields(Record) if f.default is MISSING and f.default_factory is MISSING)
    assert required == _REQUIRED


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@given(st.dictionaries(st.text(max_size=8), _json, max_size=6))
def test_the_kept_c_encoder_writes_what_the_json_encoder_writes(table: dict[str, object]) -> None:
    from playbooks.checkpoints.wire import _ENCODER, _encode_json

    assert _encode_json is not None  # CPython ships the C encoder
    assert "".join(_encode_json(table, 0)) == _ENCODER.encode(table)


@given(_json)
def test_one_value_is_spelled_as_the_json_encoder_spells_it(value: object) -> None:
    from playbooks.checkpoints.wire import _ENCODER
    from playbooks.checkpoints.wire import _json as spelled

    assert spelled(value) == _ENCODER.encode(value)
