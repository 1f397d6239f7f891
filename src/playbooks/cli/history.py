"""A run's history as ``playbooks checkpoints history RUN`` shows it: one row per checkpoint.

Each snapshot is a row: its counter and time, its frame, the statement it follows, the durable calls
that finished since the previous row (named as the journal shows them), and the progress of the
playbook: the last ``Step`` reached, of the steps the playbook has (when the program can be read).
Values set at a fork or a resume (``@override`` state records) and calls that raised are rows too.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from playbooks.checkpoints.model import Record

__all__ = ("HistoryRow", "history")

_STEP = re.compile(r"Step\('([^']*)'\)")


@dataclass(slots=True)
class HistoryRow:
    counter: int
    time: float
    event: str
    """``snapshot``, ``finished`` (a frame's last snapshot), ``raised`` (a call's exception) or ``set``."""
    frame_id: str
    statement: str = ""
    calls: list[str] = field(default_factory=list)
    """Durable calls that finished since the previous row (``print`` lines counted, not listed)."""
    printed: int = 0
    step: str = ""
    """The playbook's progress: ``"03 of 05"`` (the last step reached, of the steps known)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def history(records: Mapping[int, Record], steps_known: Callable[[str], int | None]) -> list[HistoryRow]:
    """The rows of a run whose loaded ``records`` are given; ``steps_known(frame_id)`` is how many
    steps the playbook of that frame has (``None``: unknown)."""
    rows: list[HistoryRow] = []
    calls: list[str] = []
    printed = 0
    steps: dict[str, str] = {}  # the last step reached, by the frame that made the Step call
    for counter in sorted(records):
        record = records[counter]
        if record.kind == "result":
            if record.name == "print":
                printed += 1
                continue
            match = _STEP.fullmatch(record.display or "")
            if match:
                steps[record.frame_id] = match.group(1)
            if record.outcome == "raise" and record.name != "Return":  # (Return ends a playbook by raising)
                rows.append(HistoryRow(counter, record.timestamp, "raised", record.frame_id, calls=[record.display]))
                continue
            calls.append(record.display)
        elif record.kind == "state" and record.name.startswith("override:") and record.value is not None:
            values = pickle.loads(record.value)
            shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
            rows.append(HistoryRow(counter, record.timestamp, "set", record.frame_id, statement=shown))
        elif record.kind == "snapshot":
            step = _progress(record.frame_id, steps, steps_known)
            rows.append(HistoryRow(
                counter, record.timestamp, "finished" if record.done else "snapshot", record.frame_id,
                statement=record.statement, calls=calls, printed=printed, step=step,
            ))
            calls, printed = [], 0
    return rows


def _progress(frame_id: str, steps: Mapping[str, str], steps_known: Callable[[str], int | None]) -> str:
    """The last step reached by this frame or one of its own (its responses are its children)."""
    reached = [step for frame, step in steps.items() if frame == frame_id or frame.startswith(frame_id + "/")]
    if not reached:
        return ""
    last = max(reached)
    known = steps_known(frame_id)
    return f"{last} of {known:02d}" if known else last
