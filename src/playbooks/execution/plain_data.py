"""Plain data as JSON: how values made by untrusted code reach the host without being unpickled.

An isolated worker runs LLM code; whatever it sends the host (a tool call's arguments, the variables a
finished response leaves) is encoded here, and the host decodes it with :func:`decode_plain`, which
builds only ``None``, ``bool``, ``int``, ``float``, ``str``, ``bytes``, ``list``, ``tuple``, ``dict``,
``set`` and ``frozenset``: no class is looked up and no code runs. Anything else is refused when it is
encoded (:class:`PlainDataError`, naming the value's place and type), so the LLM learns at the call
that, say, a file object cannot be a tool's argument.

JSON spells ``None``/``bool``/``int``/``float``/``str``/``list`` as itself; the rest are tagged objects
``{"$t": tag, "v": ...}``: ``tuple``, ``set``, ``frozenset``, ``bytes`` (base64), ``dict`` (a list of
key/value pairs, so keys keep their types), floats JSON cannot spell (``nan``, ``inf``) and ints beyond
a double's range stay ints (Python's JSON reads them back exactly).
"""

from __future__ import annotations

import base64
import math
from typing import Any

__all__ = ("PlainDataError", "decode_plain", "encode_plain", "is_plain")

_MAX_DEPTH = 200
_TAG = "$t"


class PlainDataError(TypeError):
    """A value that is not plain data (or is nested deeper than 200 levels) where plain data is needed."""


def encode_plain(value: Any, where: str = "value") -> Any:
    """``value`` as JSON-ready data (see the module docstring); raise :class:`PlainDataError` if it
    holds anything but plain data. ``where`` names the value in the message."""
    return _encode(value, where, 0)


def is_plain(value: Any) -> bool:
    """Whether ``value`` is plain data that :func:`encode_plain` accepts."""
    try:
        _encode(value, "", 0)
    except PlainDataError:
        return False
    return True


def _encode(value: Any, where: str, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise PlainDataError(f"{where} is nested deeper than {_MAX_DEPTH} levels")
    kind = type(value)
    if value is None or kind is bool or kind is str:
        return value
    if kind is int:
        return value
    if kind is float:
        if math.isfinite(value):
            return value
        return {_TAG: "float", "v": repr(value)}
    if kind is list:
        return [_encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]
    if kind is tuple:
        return {_TAG: "tuple", "v": [_encode(item, f"{where}[{i}]", depth + 1) for i, item in enumerate(value)]}
    if kind is dict:
        if all(type(k) is str for k in value):
            return {_TAG: "dict", "s": {k: _encode(v, f"{where}[{k!r}]", depth + 1) for k, v in value.items()}}
        return {_TAG: "dict", "v": [
            [_encode(k, f"a key of {where}", depth + 1), _encode(v, f"{where}[{k!r}]", depth + 1)]
            for k, v in value.items()
        ]}
    if kind is set or kind is frozenset:
        items = [_encode(item, f"an item of {where}", depth + 1) for item in value]
        return {_TAG: kind.__name__, "v": items}
    if kind is bytes or kind is bytearray:
        return {_TAG: kind.__name__, "v": base64.b64encode(value).decode("ascii")}
    raise PlainDataError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which cannot cross to the host: pass plain "
        "data (None, bool, int, float, str, bytes, list, tuple, dict, set)"
    )


def decode_plain(data: Any) -> Any:
    """The value :func:`encode_plain` encoded as ``data`` (already parsed from JSON); raise
    :class:`PlainDataError` for anything else."""
    return _decode(data, 0)


def _decode(data: Any, depth: int) -> Any:
    if depth > _MAX_DEPTH:
        raise PlainDataError(f"plain data nested deeper than {_MAX_DEPTH} levels")
    kind = type(data)
    if data is None or kind in (bool, int, float, str):
        return data
    if kind is list:
        return [_decode(item, depth + 1) for item in data]
    if kind is not dict or not isinstance(data.get(_TAG), str):
        raise PlainDataError(f"not plain data: {type(data).__name__}")
    tag = data[_TAG]
    try:
        if tag == "dict" and "s" in data:
            return {str(k): _decode(v, depth + 1) for k, v in dict(data["s"]).items()}
        items = data["v"]
        if tag == "float":
            number = float(items)
            if math.isfinite(number):
                raise ValueError(items)
            return number
        if tag in ("bytes", "bytearray"):
            raw = base64.b64decode(str(items).encode("ascii"), validate=True)
            return raw if tag == "bytes" else bytearray(raw)
        if type(items) is not list:
            raise ValueError(tag)
        if tag == "tuple":
            return tuple(_decode(item, depth + 1) for item in items)
        if tag == "set":
            return {_decode(item, depth + 1) for item in items}
        if tag == "frozenset":
            return frozenset(_decode(item, depth + 1) for item in items)
        if tag == "dict":
            return {_decode(k, depth + 1): _decode(v, depth + 1) for k, v in items}
    except PlainDataError:
        raise
    except (KeyError, TypeError, ValueError) as exc:
        raise PlainDataError(f"malformed plain data ({tag!r}: {exc})") from None
    raise PlainDataError(f"unknown plain data tag {tag!r}")

