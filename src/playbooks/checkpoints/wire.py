"""Records as plain data: JSON for the fields, raw bytes for the pickles they carry. No pickle here.

A record's payload (inside the codec's signed envelope) is::

    b"PBW1" | u32 length of the JSON | JSON | for each blob: u64 length | bytes

The JSON holds every field of a :class:`~playbooks.checkpoints.model.Record` that differs from its
default; a ``bytes`` value (a pickled variable, a call's result) is replaced by ``{"$b": i}``, the index
of a blob after the JSON. Reading a record therefore unpickles nothing: listing runs and checkpoints
reads only this metadata, and the pickles inside are unpickled by whoever needs their values (a
resume, ``checkpoints show``), after the envelope verified them.

The manager's own bookkeeping entries (tombstones: which counters were pruned) are records of the
same shape with the single field ``tombstone``.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import fields
from functools import cache
from operator import attrgetter
from typing import Any

from playbooks.checkpoints.model import FrameRef, Record, StoredVar
from playbooks.checkpoints.model import _defaults as _defaults  # the fields a record may leave out
from playbooks.errors import CheckpointCorruptError

__all__ = (
    "WIRE_MAGIC", "decode_fields", "encode_fields", "encode_record", "record_from_fields", "record_to_fields",
)

WIRE_MAGIC = b"PBW1"
_LEN = struct.Struct(">I")
_BLOB = struct.Struct(">Q")
_BLOB_KEY = "$b"
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=False)
_C_ENCODER = getattr(json.encoder, "c_make_encoder", None)
_encode_json = (  # what _ENCODER.encode does, without making a new C encoder on every call
    _C_ENCODER(None, _ENCODER.default, json.encoder.encode_basestring, None, ":", ",", False, False, True)
    if _C_ENCODER is not None else None
)


def encode_fields(state: dict[str, Any]) -> bytes:
    """Encode a dict of JSON values in which ``bytes`` may appear as a top-level value, as an item of
    a top-level list, or in a list that is a value of a top-level dict (a record's variables)."""
    blobs: list[bytes] = []

    def blob(value: bytes | bytearray | memoryview) -> dict[str, int]:
        blobs.append(bytes(value))
        return {_BLOB_KEY: len(blobs) - 1}

    plain: dict[str, Any] = {}
    for name, value in state.items():
        if isinstance(value, (bytes, bytearray, memoryview)):
            value = blob(value)
        elif isinstance(value, dict) and any(isinstance(v, list) for v in value.values()):
            value = {
                k: [blob(x) if isinstance(x, bytes) else x for x in v] if isinstance(v, list) else v
                for k, v in value.items()
            }
        elif isinstance(value, list) and any(isinstance(v, bytes) for v in value):
            value = [blob(x) if isinstance(x, bytes) else x for x in value]
        plain[name] = value
    return _payload(plain, blobs)


def _payload(plain: dict[str, Any], blobs: list[bytes]) -> bytes:
    """The wire payload: magic, the JSON field table, then each blob with its length."""
    return _framed(
        ("".join(_encode_json(plain, 0)) if _encode_json is not None else _ENCODER.encode(plain)).encode("utf-8"),
        blobs,
    )


def _framed(text: bytes, blobs: list[bytes]) -> bytes:
    parts = [WIRE_MAGIC, _LEN.pack(len(text)), text]
    for item in blobs:
        parts.append(_BLOB.pack(len(item)))
        parts.append(item)
    return b"".join(parts)


def decode_fields(payload: bytes, where: str) -> dict[str, Any]:
    """Decode :func:`encode_fields` output; anything malformed is a :class:`CheckpointCorruptError`."""
    try:
        if payload[:4] != WIRE_MAGIC:
            raise ValueError(f"it starts with {payload[:4]!r}, not {WIRE_MAGIC!r}")
        (size,) = _LEN.unpack_from(payload, 4)
        offset = 8 + size
        text = payload[8:offset]
        if len(text) != size:
            raise ValueError("its field table is cut short")
        blobs: list[bytes] = []
        while offset < len(payload):
            (n,) = _BLOB.unpack_from(payload, offset)
            offset += _BLOB.size
            if offset + n > len(payload):
                raise ValueError("a blob is cut short")
            blobs.append(payload[offset : offset + n])
            offset += n

        if blobs:

            def hook(obj: dict[str, Any]) -> Any:
                if len(obj) == 1 and _BLOB_KEY in obj:
                    return blobs[obj[_BLOB_KEY]]
                return obj

            state = json.JSONDecoder(object_hook=hook).decode(text.decode("utf-8"))
        else:  # no blob to refer to (most intents): a shared decoder, not one made per record
            state = _DECODER.decode(text.decode("utf-8"))
        if not isinstance(state, dict):
            raise ValueError("its field table is not a mapping")
        return state
    except (ValueError, IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {where} passed its signature check but does not hold a playbooks record ({exc})"
        ) from exc


@cache
def _layout() -> tuple[tuple[str, Any], ...]:
    """Every field of :class:`Record` with its default (``_NO_DEFAULT`` when it has none)."""
    defaults = _defaults()
    return tuple((f.name, defaults.get(f.name, _NO_DEFAULT)) for f in fields(Record))


_NO_DEFAULT = object()


@cache
def _getter() -> Any:
    """Every field of a record in one call, in :func:`_layout` order."""
    return attrgetter(*(name for name, _ in _layout()))


def record_to_fields(record: Record) -> dict[str, Any]:
    """A record's fields that differ from their defaults, as plain values."""
    state: dict[str, Any] = {}
    for name, default in _layout():
        value = getattr(record, name)
        if default is not _NO_DEFAULT and value == default:
            continue
        if name == "call_stack":
            value = [
                [r.frame_id, r.agent_id, r.parent_seq, r.executed_offset, r.statement] for r in value
            ]
        elif name == "variables":
            value = {n: [v.digest, v.size, v.data, v.host] for n, v in value.items()}
        state[name] = value
    return state


def encode_record(record: Record) -> bytes:
    """``encode_fields(record_to_fields(record))`` in one pass, byte for byte: a record is encoded on
    every await, and the two passes cost about twice as much."""
    if record.kind in _CALL_KINDS:
        check, defaults, required, optional = _call_plan()
        if check(record) == defaults:  # no snapshot field set: the usual intent or result
            return _encode_call(record, required, optional)
    blobs: list[bytes] = []
    plain: dict[str, Any] = {}
    for (name, default, how), value in zip(_plan(), _getter()(record)):
        if default is not _NO_DEFAULT and (value is default or value == default):
            continue
        if how is _PLAIN:
            plain[name] = value
        elif how is _BYTES:
            blobs.append(bytes(value))
            plain[name] = {_BLOB_KEY: len(blobs) - 1}
        elif how is _STACK:
            plain[name] = [[r.frame_id, r.agent_id, r.parent_seq, r.executed_offset, r.statement] for r in value]
        else:
            table: dict[str, Any] = {}
            for n, v in value.items():
                data: Any = v.data
                if data is not None:
                    blobs.append(bytes(data))
                    data = {_BLOB_KEY: len(blobs) - 1}
                table[n] = [v.digest, v.size, data, v.host]
            plain[name] = table
    return _payload(plain, blobs)


_PLAIN, _BYTES, _STACK, _VARIABLES = "plain", "bytes", "stack", "variables"
_BYTES_FIELDS = frozenset({"error", "value", "mutations"})
"""The fields of :class:`Record` that hold a pickle (``bytes | None``): stored as blobs."""


_CALL_KINDS = frozenset({"intent", "result"})
_CALL_FIELDS = frozenset({"seq", "name", "fingerprint", "display", "key", "outcome", "value", "mutations", "sync"})
"""The fields an intent or a result may set besides the ones every record has."""
_REQUIRED = (
    "kind", "execution_id", "counter", "timestamp", "frame_id", "agent_id", "call_stack", "response_start",
    "response_text",
)
"""The fields of :class:`Record` without a default, in order (a test keeps this in step with the class)."""


@cache
def _call_plan() -> tuple[Any, tuple[Any, ...], Any, tuple[tuple[str, Any, str], ...]]:
    """For :func:`_encode_call`: a getter of every other field that has a default, and those defaults
    (all must hold for the fast path); a getter of the fields every record has; and the call fields
    in :func:`_plan` order."""
    plan = _plan()
    others = [(name, default) for name, default, _ in plan if default is not _NO_DEFAULT and name not in _CALL_FIELDS]
    return (
        attrgetter(*(name for name, _ in others)),
        tuple(default for _, default in others),
        attrgetter(*_REQUIRED),
        tuple(entry for entry in plan if entry[0] in _CALL_FIELDS),
    )


def _encode_call(record: Record, required: Any, optional: tuple[tuple[str, Any, str], ...]) -> bytes:
    """:func:`encode_record` of an intent or result whose snapshot fields are all at their defaults:
    the same bytes, with the JSON written here in the encoder's spelling (one join, not a dict
    encoded key by key: this runs twice per await)."""
    kind, execution_id, counter, timestamp, frame_id, agent_id, stack, start, text = required(record)
    parts = [
        '{"kind":', _json(kind), ',"execution_id":', _json(execution_id), ',"counter":', _json(counter),
        ',"timestamp":', _json(timestamp), ',"frame_id":', _json(frame_id), ',"agent_id":', _json(agent_id),
        ',"call_stack":[',
        ",".join(
            f"[{_json(r.frame_id)},{_json(r.agent_id)},{_json(r.parent_seq)},{_json(r.executed_offset)},"
            f"{_json(r.statement)}]"
            for r in stack
        ),
        '],"response_start":', _json(start), ',"response_text":', _json(text),
    ]
    blobs: list[bytes] = []
    for name, default, how in optional:
        value = getattr(record, name)
        if value is default or value == default:
            continue
        parts.append(f',"{name}":')
        if how is _BYTES:
            blobs.append(bytes(value))
            parts.append(f'{{"{_BLOB_KEY}":{len(blobs) - 1}}}')
        else:
            parts.append(_json(value))
    parts.append("}")
    return _framed("".join(parts).encode("utf-8"), blobs)


def _json(value: Any) -> str:
    """One JSON value as :data:`_ENCODER` writes it (plain scalars directly, the rest through it)."""
    kind = type(value)
    if kind is str:
        return _quote(value)
    if kind is int:
        return int.__repr__(value)
    if kind is float and math.isfinite(value):
        return float.__repr__(value)
    if value is None:
        return "null"
    if kind is bool:
        return "true" if value else "false"
    return _ENCODER.encode(value)


_quote = json.encoder.encode_basestring  # what the encoder uses for strings when ensure_ascii is off


@cache
def _tuple_fields() -> tuple[str, ...]:
    """The fields of :class:`Record` whose default is a tuple (JSON gives them as lists)."""
    return tuple(name for name, default in _defaults().items() if isinstance(default, tuple))


_DECODER = json.JSONDecoder()


@cache
def _plan() -> tuple[tuple[str, Any, str], ...]:
    """Every field of :class:`Record` with its default and how :func:`encode_record` writes it."""
    special = {"call_stack": _STACK, "variables": _VARIABLES}
    return tuple(
        (name, default, special.get(name, _BYTES if name in _BYTES_FIELDS else _PLAIN))
        for name, default in _layout()
    )


def record_from_fields(state: dict[str, Any], where: str) -> Record:
    """Rebuild a :class:`Record` from :func:`record_to_fields` output."""
    try:
        state = dict(state)
        state["call_stack"] = tuple(FrameRef(*ref) for ref in state.get("call_stack", ()))
        variables = state.get("variables")
        if variables:
            state["variables"] = {n: StoredVar(*v) for n, v in variables.items()}
        skipped = state.get("skipped")
        if skipped:
            state["skipped"] = tuple(tuple(s) for s in skipped)
        for name in _tuple_fields():
            value = state.get(name)
            if isinstance(value, list):
                state[name] = tuple(value)
        return Record(**state)
    except (TypeError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {where} passed its signature check but does not hold a playbooks record "
            f"({type(exc).__name__}: {exc})"
        ) from exc
