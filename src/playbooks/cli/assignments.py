"""``NAME=VALUE`` pairs of the command line (``--arg``, ``--set``): a value is JSON when it parses as
JSON (``3``, ``"x"``, ``["A100"]``, ``{"k": 1}``), else the text itself."""

from __future__ import annotations

import json
from typing import Any

__all__ = ("parse_assignments",)


def parse_assignments(pairs: list[str], option: str) -> dict[str, Any]:
    """The values of ``pairs``; raises ``ValueError`` with a message naming ``option`` for a bad one."""
    values: dict[str, Any] = {}
    for pair in pairs:
        name, sep, text = pair.partition("=")
        if not sep or not name.isidentifier():
            raise ValueError(f"{option} expects NAME=VALUE with NAME an identifier, got {pair!r}")
        try:
            values[name] = json.loads(text)
        except json.JSONDecodeError:
            values[name] = text
        except RecursionError:
            raise ValueError(f"{option} {name}: the JSON value is nested too deeply") from None
    return values
