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
import struct
from dataclasses import fields
from typing import Any

from playbooks.checkpoints.model import FrameRef, Record, StoredVar
from playbooks.checkpoints.model import _defaults as _defaults  # the fields a record may leave out
from playbooks.errors import CheckpointCorruptError

__all__ = ("WIRE_MAGIC", "decode_fields", "encode_fields", "record_from_fields", "record_to_fields")

WIRE_MAGIC = b"PBW1"
_LEN = struct.Struct(">I")
_BLOB = struct.Struct(">Q")
_BLOB_KEY = "$b"


def encode_fields(state: dict[str, Any]) -> bytes:
    """Encode a dict of JSON values, tuples and ``bytes`` (at any depth)."""
    blobs: list[bytes] = []

    def strip(value: Any) -> Any:
        if isinstance(value, (bytes, bytearray, memoryview)):
            blobs.append(bytes(value))
            return {_BLOB_KEY: len(blobs) - 1}
        if isinstance(value, (list, tuple)):
            return [strip(v) for v in value]
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items()}
        return value

    text = json.dumps(strip(state), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    parts = [WIRE_MAGIC, _LEN.pack(len(text)), text]
    for blob in blobs:
        parts.append(_BLOB.pack(len(blob)))
        parts.append(blob)
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

        def hook(obj: dict[str, Any]) -> Any:
            if len(obj) == 1 and _BLOB_KEY in obj:
                return blobs[obj[_BLOB_KEY]]
            return obj

        state = json.loads(text.decode("utf-8"), object_hook=hook)
        if not isinstance(state, dict):
            raise ValueError("its field table is not a mapping")
        return state
    except (ValueError, IndexError, KeyError, TypeError, struct.error, UnicodeDecodeError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {where} passed its signature check but does not hold a playbooks record ({exc})"
        ) from exc


def record_to_fields(record: Record) -> dict[str, Any]:
    """A record's fields that differ from their defaults, as plain values."""
    defaults = _defaults()
    state: dict[str, Any] = {}
    for f in fields(Record):
        value = getattr(record, f.name)
        if f.name in defaults and value == defaults[f.name]:
            continue
        if f.name == "call_stack":
            value = [
                [r.frame_id, r.agent_id, r.parent_seq, r.executed_offset, r.statement] for r in value
            ]
        elif f.name == "variables":
            value = {n: [v.digest, v.size, v.data, v.host] for n, v in value.items()}
        state[f.name] = value
    return state


def record_from_fields(state: dict[str, Any], where: str) -> Record:
    """Rebuild a :class:`Record` from :func:`record_to_fields` output."""
    try:
        state = dict(state)
        state["call_stack"] = tuple(FrameRef(*ref) for ref in state.get("call_stack", ()))
        state["variables"] = {n: StoredVar(*v) for n, v in state.get("variables", {}).items()}
        state["skipped"] = tuple(tuple(s) for s in state.get("skipped", ()))
        defaults = _defaults()
        for name, value in state.items():
            if isinstance(value, list) and isinstance(defaults.get(name), tuple):
                state[name] = tuple(value)
        return Record(**state)
    except (TypeError, ValueError) as exc:
        raise CheckpointCorruptError(
            f"checkpoint {where} passed its signature check but does not hold a playbooks record "
            f"({type(exc).__name__}: {exc})"
        ) from exc
