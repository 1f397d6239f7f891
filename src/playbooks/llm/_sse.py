"""A sans-I/O, incremental decoder of Server-Sent Events (the ``text/event-stream`` format).

Theory of operation: bytes go in with :meth:`SSEDecoder.feed`, complete events come out. Bytes are
decoded as UTF-8 incrementally (a character split between two feeds is fine), lines end at CRLF, LF or
CR (a CR at the end of one feed and an LF at the start of the next are one line end), and an event is
dispatched at a blank line. Only the new text of each feed is scanned, and a line still incomplete is
kept as a list of pieces, so the total work is linear in the stream's length however it is cut.

Field rules follow the WHATWG specification: ``data`` lines are joined with ``\\n``; a line starting
with ``:`` is a comment; a field name without a colon has the empty value; one space after the colon
is dropped; an event with no ``data`` is not dispatched.
"""

from __future__ import annotations

import codecs
import re
from dataclasses import dataclass

__all__ = ("SSEDecoder", "SSEEvent")

_LINE_END = re.compile(r"\r\n|\r|\n")


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One dispatched event: its type (``"message"`` unless an ``event`` field said otherwise), its data
    and the last event id seen (``None`` if none)."""

    data: str
    event: str = "message"
    id: str | None = None


class SSEDecoder:
    """Turn the bytes of an event stream, cut anyhow, into :class:`SSEEvent` values."""

    def __init__(self) -> None:
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending: list[str] = []
        self._skip_lf = False
        self._at_start = True
        self._data: list[str] = []
        self._event = ""
        self._last_id: str | None = None

    def feed(self, data: bytes) -> list[SSEEvent]:
        """Take the next bytes of the stream; return the events they complete (maybe none)."""
        return self._feed_text(self._utf8.decode(data))

    def close(self) -> list[SSEEvent]:
        """Signal the end of the stream; return the events completed by it.

        Per the specification an event not terminated by a blank line is discarded, so this returns an
        empty list unless the last bytes completed a line that completed an event.
        """
        events = self._feed_text(self._utf8.decode(b"", final=True))
        self._pending.clear()
        self._data.clear()
        self._event = ""
        return events

    def _feed_text(self, text: str) -> list[SSEEvent]:
        if self._at_start and text:
            self._at_start = False
            if text.startswith("\ufeff"):
                text = text[1:]
        start = 0
        if self._skip_lf and text:
            self._skip_lf = False
            if text.startswith("\n"):
                start = 1
        events: list[SSEEvent] = []
        for match in _LINE_END.finditer(text, start):
            if self._pending:
                self._pending.append(text[start : match.start()])
                line = "".join(self._pending)
                self._pending.clear()
            else:
                line = text[start : match.start()]
            start = match.end()
            if match.group() == "\r" and start == len(text):
                # The LF of a CRLF may arrive with the next feed.
                self._skip_lf = True
            event = self._process_line(line)
            if event is not None:
                events.append(event)
        if start < len(text):
            self._pending.append(text[start:])
        return events

    def _process_line(self, line: str) -> SSEEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self._last_id = value
        # "retry" and unknown fields are ignored: reconnection is the provider's business.
        return None

    def _dispatch(self) -> SSEEvent | None:
        if not self._data:
            self._event = ""
            return None
        event = SSEEvent(data="\n".join(self._data), event=self._event or "message", id=self._last_id)
        self._data.clear()
        self._event = ""
        return event
