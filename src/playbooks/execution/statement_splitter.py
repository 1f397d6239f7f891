"""Sans-I/O statement splitter: complete top-level statements out of a growing LLM response.

Rules of this module
--------------------
* No I/O and no asyncio: ``feed(text)`` any number of times, ``close()`` at end of stream, and take
  results with :meth:`StatementSplitter.next_statement` (a :class:`Statement`, :data:`NEED_DATA`, or
  :data:`END`). A statement that does not compile is raised there, in order, as
  :class:`~playbooks.errors.CodeSyntaxError`.
* Chunking never changes the result: for any text and any cutting of it, the statements are exactly
  ``ast.parse(text).body`` (same nodes, same source segments, positions in the whole response).
* Total work is linear in the response length. Every character is examined a bounded number of times:
  the scanner keeps its lexical state (inside a string, bracket depth, at a line start, ...) between
  chunks and never rescans what it has judged. Each complete segment is handed to ``ast.parse`` once.

Theory of operation
-------------------
A small lexer follows just enough of Python's tokenizer to find *logical lines*: a line break ends one
unless it is inside brackets, inside a triple-quoted string, or escaped by a backslash. Each logical line
that is not blank or a comment opens or continues a *segment*:

* a line at column 0 that starts a simple statement is a segment of its own, released at its line break;
* a line at column 0 that starts a compound statement (``if``, ``for``, ``while``, ``try``, ``with``,
  ``def``, ``class``, ``async``, a decorator, or a ``match`` header) opens a segment that stays pending;
  indented lines and the continuations ``else``/``elif``/``except``/``finally`` (and, after decorators,
  the decorated definition) join it; the next other column-0 line, a closing fence or ``close()`` releases it.

Markdown fences: a response whose first code-like line is a fence (```` ```python ````), or that starts
with prose followed by a fence, runs only the code inside ``python``/``py``/unlabelled fences; prose
and other fenced blocks are skipped. Offsets and line numbers always refer to the whole response. A
response with no fence is all code. Prose is recognised only before any statement ran: a first segment
that does not parse is held until a fence shows it was prose, or until ``close()`` shows it was code.
"""

from __future__ import annotations

import ast
import gc
import re
from collections import deque
from dataclasses import dataclass
from typing import Final, Literal

from playbooks.errors import CodeSyntaxError

__all__ = ("END", "NEED_DATA", "Statement", "StatementSplitter")



def _parse(source: str, filename: str = "<unknown>") -> ast.Module:
    """``ast.parse`` with the garbage collector paused.

    CPython 3.11 keeps the AST converter's recursion depth in per-interpreter state: a finalizer that
    runs during a parse and parses too (a task of the LLM's code collected with an exception nobody
    retrieved is logged, and 3.11's traceback formatting calls ``ast.parse`` for its carets) corrupts
    it, and the outer parse fails with ``SystemError: AST constructor recursion depth mismatch``.
    """
    if not gc.isenabled():
        return ast.parse(source, filename=filename)
    gc.disable()
    try:
        return ast.parse(source, filename=filename)
    finally:
        gc.enable()

class _Sentinel:
    def __init__(self, name: str) -> None:
        self._name = name

    def __repr__(self) -> str:
        return self._name


NEED_DATA: Final = _Sentinel("NEED_DATA")
"""Returned by :meth:`StatementSplitter.next_statement` when more text must be fed."""

END: Final = _Sentinel("END")
"""Returned by :meth:`StatementSplitter.next_statement` after ``close()`` once everything was taken."""


@dataclass(frozen=True, slots=True)
class Statement:
    """One top-level statement: its AST node (absolute line numbers) and where it sits in the response.

    ``start``/``end`` are character offsets into the whole response; ``col_offset``/``end_col_offset``
    are in characters (``ast`` counts UTF-8 bytes; these do not).
    """

    source: str
    node: ast.stmt
    start: int
    end: int
    lineno: int
    col_offset: int
    end_lineno: int
    end_col_offset: int


_COMPOUND_WORDS: Final = frozenset({"if", "for", "while", "try", "with", "def", "class", "async"})
_CONTINUATION_WORDS: Final = frozenset({"else", "elif", "except", "finally"})
_DECORATED_WORDS: Final = frozenset({"def", "class", "async"})
_PYTHON_FENCE_INFO: Final = frozenset({"", "python", "py", "python3", "py3"})

_WORD: Final = re.compile(r"\w+")
_INDENT: Final = re.compile(r"[ \t\f]*")
_CODE_SPECIAL: Final = re.compile(r"[\"'#\\\r\n()\[\]{}]")
_LINE_END: Final = re.compile(r"[\r\n]")
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_STRING_END: Final = {"'": re.compile(r"['\\\r\n]"), '"': re.compile(r'["\\\r\n]')}
_TRIPLE_END: Final = {"'": re.compile(r"['\\]"), '"': re.compile(r'["\\]')}

_Mode = Literal["raw", "fenced", "prose", "other"]
_State = Literal["line_start", "code", "string", "triple", "comment", "fence_line", "prose_line"]
_Kind = Literal["simple", "compound", "match"]


def _count_breaks(text: str, start: int, end: int) -> int:
    return text.count("\n", start, end) + text.count("\r", start, end) - text.count("\r\n", start, end)


def _char_col(line: str, byte_col: int) -> int:
    if line.isascii():
        return byte_col
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


class StatementSplitter:
    """Turn a stream of text chunks into complete top-level statements; see the module docstring."""

    def __init__(self, *, filename: str = "<llm-response>", skip_until: int = 0) -> None:
        self.filename = filename
        self.skip_until = skip_until
        """Offset up to which the text ran before (a resumed executor's executed offset): a segment
        that ends there or before is scanned, so that the state after it is right, but neither parsed
        nor released. A resume then costs no parse per statement of its history."""
        self._tail = ""  # text not yet dropped; _tail[0] is at absolute offset _base
        self._base = 0
        self._pos = 0  # scan position in _tail
        self._line = 1  # line number at _base + _pos
        self._closed = False
        self._ready: deque[Statement | CodeSyntaxError] = deque()

        self._mode: _Mode = "raw"
        self._state: _State = "line_start"
        self._depth = 0
        self._quote = ""
        self._in_logical = False  # a significant logical line is being scanned
        self._released_any = False
        self._held_error: CodeSyntaxError | None = None

        # the segment being collected: text from _seg_start, kept as parts plus a live slice of _tail
        self._seg_active = False
        self._seg_kind: _Kind = "simple"
        self._seg_start = 0
        self._seg_line = 1
        self._seg_end = 0
        self._seg_decorators_only = False
        self._parts: list[str] = []
        self._part_start = 0  # index in _tail where the not-yet-saved part of the segment starts
        self._after_cr = False  # the last character consumed was a CR (its LF may come next chunk)
        self._rewound = False  # set when a failed first segment sent the scanner back as prose

    # ----------------------------------------------------------------- public API

    @property
    def offset(self) -> int:
        """Absolute offset up to which the response has been judged."""
        return self._base + self._pos

    def feed(self, text: str) -> None:
        """Add the next chunk of the response."""
        if self._closed:
            raise RuntimeError("feed() after close()")
        if not text:
            return
        if self._seg_active:
            self._parts.append(self._tail[self._part_start : self._pos])
        self._base += self._pos
        self._tail = self._tail[self._pos :] + text
        self._pos = 0
        self._part_start = 0
        self._scan(eof=False)

    def close(self) -> None:
        """Mark the end of the stream: pending statements are released, held errors raised."""
        if self._closed:
            return
        self._closed = True
        while True:
            self._scan(eof=True)
            if self._in_logical:
                self._end_logical_line(self._base + self._pos)
            if self._seg_active and not self._rewound:
                self._release_pending()
            if not self._rewound:
                break
            self._rewound = False
        if self._held_error is not None:
            self._ready.append(self._held_error)
            self._held_error = None

    def next_statement(self) -> Statement | _Sentinel:
        """Return the next complete statement, :data:`NEED_DATA` or :data:`END`.

        Raises :class:`~playbooks.errors.CodeSyntaxError` for a complete statement that does not parse.
        """
        if self._ready:
            item = self._ready.popleft()
            if isinstance(item, CodeSyntaxError):
                raise item
            return item
        return END if self._closed else NEED_DATA

    # ----------------------------------------------------------------- scanner

    def _scan(self, *, eof: bool) -> None:
        while True:
            state = self._state
            if state == "line_start":
                progressed = self._scan_line_start(eof)
            elif state == "code":
                progressed = self._scan_code(eof)
            elif state == "string":
                progressed = self._scan_string(eof)
            elif state == "triple":
                progressed = self._scan_triple(eof)
            elif state == "comment":
                progressed = self._scan_comment()
            elif state == "fence_line":
                progressed = self._scan_fence_line(eof)
            else:
                progressed = self._scan_prose_line(eof)
            if not progressed:
                return

    def _advance(self, new_pos: int) -> None:
        tail, pos = self._tail, self._pos
        if new_pos <= pos:
            self._pos = new_pos
            return
        breaks = _count_breaks(tail, pos, new_pos)
        if self._after_cr and tail[pos] == "\n":  # the LF of a CRLF cut by a chunk boundary
            breaks -= 1
        self._line += breaks
        self._after_cr = tail[new_pos - 1] == "\r"
        self._pos = new_pos

    def _scan_line_start(self, eof: bool) -> bool:
        tail, start = self._tail, self._pos
        if start >= len(tail):
            return False
        indent_end = _INDENT.match(tail, start)
        q = indent_end.end() if indent_end else start
        if q >= len(tail):
            if eof:
                self._advance(len(tail))
            return False
        ch = tail[q]
        if ch in "\r\n":  # blank line
            return self._take_line_break(q, eof)
        if ch == "#":
            self._pos = q + 1
            self._state = "comment"
            return True
        if ch == "`" and q - start <= 3:
            if len(tail) - q < 3 and not eof:
                return False
            if tail.startswith("```", q):
                self._state = "fence_line"
                return True
        indent = q - start
        word = ""
        if indent == 0:
            m = _WORD.match(tail, q)
            if m is not None:
                if m.end() >= len(tail) and not eof:
                    return False
                word = m.group()
        self._begin_logical_line(start, indent, ch, word)
        if self._rewound:
            self._rewound = False
            return True
        self._pos = q
        self._state = "code"
        return True

    def _take_line_break(self, i: int, eof: bool) -> bool:
        """Consume the blank-line break at ``i`` (waiting if a CR might be followed by LF)."""
        tail = self._tail
        if tail[i] == "\r" and i + 1 >= len(tail) and not eof:
            return False
        width = 2 if tail.startswith("\r\n", i) else 1
        self._advance(i + width)
        return True

    def _scan_code(self, eof: bool) -> bool:
        tail = self._tail
        while True:
            m = _CODE_SPECIAL.search(tail, self._pos)
            if m is None:
                self._advance(len(tail))
                return False
            i = m.start()
            ch = tail[i]
            if ch in "'\"":
                if len(tail) - i < 3 and not eof:
                    self._advance(i)
                    return False
                if tail.startswith(ch * 3, i):
                    self._quote = ch
                    self._advance(i + 3)
                    self._state = "triple"
                    return True
                self._quote = ch
                self._advance(i + 1)
                self._state = "string"
                return True
            if ch == "#":
                self._advance(i + 1)
                self._state = "comment"
                return True
            if ch == "\\":
                if len(tail) - i < 3 and not eof:
                    self._advance(i)
                    return False
                nxt = tail[i + 1 : i + 3]
                if nxt.startswith("\r\n"):
                    self._advance(i + 3)
                elif nxt[:1] in ("\r", "\n"):
                    self._advance(i + 2)
                else:
                    self._advance(i + 1)
                continue
            if ch in "([{":
                self._depth += 1
                self._advance(i + 1)
                continue
            if ch in ")]}":
                self._depth = max(0, self._depth - 1)
                self._advance(i + 1)
                continue
            # a line break
            if ch == "\r" and i + 1 >= len(tail) and not eof:
                self._advance(i)
                return False
            width = 2 if tail.startswith("\r\n", i) else 1
            self._advance(i + width)
            if self._depth == 0:
                self._end_logical_line(self._base + i + width)
                if self._rewound:
                    self._rewound = False
                else:
                    self._state = "line_start"
                return True

    def _scan_string(self, eof: bool) -> bool:
        tail = self._tail
        pattern = _STRING_END[self._quote]
        while True:
            m = pattern.search(tail, self._pos)
            if m is None:
                self._advance(len(tail))
                return False
            i = m.start()
            ch = tail[i]
            if ch == self._quote:
                self._advance(i + 1)
                self._state = "code"
                return True
            if ch == "\\":
                if not self._skip_escape(i, eof):
                    return False
                continue
            # an unescaped line break ends an (unterminated) single-quoted string
            self._advance(i)
            self._state = "code"
            return True

    def _scan_triple(self, eof: bool) -> bool:
        tail = self._tail
        pattern = _TRIPLE_END[self._quote]
        while True:
            m = pattern.search(tail, self._pos)
            if m is None:
                self._advance(len(tail))
                return False
            i = m.start()
            if tail[i] == "\\":
                if not self._skip_escape(i, eof):
                    return False
                continue
            if len(tail) - i < 3 and not eof:
                self._advance(i)
                return False
            if tail.startswith(self._quote * 3, i):
                self._advance(i + 3)
                self._state = "code"
                return True
            self._advance(i + 1)

    def _skip_escape(self, i: int, eof: bool) -> bool:
        tail = self._tail
        if len(tail) - i < 3 and not eof:
            self._advance(i)
            return False
        width = 3 if tail.startswith("\r\n", i + 1) else 2
        self._advance(min(i + width, len(tail)))
        return True

    def _scan_comment(self) -> bool:
        m = _LINE_END.search(self._tail, self._pos)
        if m is None:
            self._advance(len(self._tail))
            return False
        self._advance(m.start())
        self._state = "code" if self._in_logical else "line_start"
        return True

    def _physical_line(self, eof: bool) -> tuple[str, int] | None:
        """The physical line at the scan position and the index after its break, once complete."""
        tail, start = self._tail, self._pos
        m = _LINE_END.search(tail, start)
        if m is None:
            if not eof or start >= len(tail):
                return None
            return tail[start:], len(tail)
        i = m.start()
        if tail[i] == "\r" and i + 1 >= len(tail) and not eof:
            return None
        width = 2 if tail.startswith("\r\n", i) else 1
        return tail[start:i], i + width

    def _scan_fence_line(self, eof: bool) -> bool:
        found = self._physical_line(eof)
        if found is None:
            if eof:
                self._advance(len(self._tail))
            return False
        line, after = found
        info = line.strip()[3:].strip().lower()
        if self._seg_active:
            self._release_pending()
            if self._rewound:
                self._rewound = False
                return True
        if self._mode == "fenced" or (self._mode == "raw" and not info and self._released_any):
            self._mode = "prose"
        else:
            self._mode = "fenced" if info.split(" ")[0] in _PYTHON_FENCE_INFO else "other"
            self._held_error = None
        self._advance(after)
        self._state = "line_start" if self._mode == "fenced" else "prose_line"
        return True

    def _scan_prose_line(self, eof: bool) -> bool:
        found = self._physical_line(eof)
        if found is None:
            if eof:
                self._advance(len(self._tail))
            return False
        line, after = found
        stripped = line.lstrip(" ")
        if stripped.startswith("```") and len(line) - len(stripped) <= 3:
            info = stripped[3:].strip().lower()
            if self._mode == "other":
                self._mode = "prose"
            elif info.split(" ")[0] in _PYTHON_FENCE_INFO:
                self._mode = "fenced"
                self._held_error = None
                self._state = "line_start"
            else:
                self._mode = "other"
        self._advance(after)
        return True

    # ----------------------------------------------------------------- segments

    def _begin_logical_line(self, line_start: int, indent: int, first: str, word: str) -> None:
        """Attach the significant logical line starting at ``_tail[line_start]`` to a segment."""
        self._in_logical = True
        if indent > 0:
            if not self._seg_active:
                self._open_segment(line_start, "simple")
            return
        if self._seg_active:
            continuation = word in _CONTINUATION_WORDS or (
                self._seg_decorators_only and (first == "@" or word in _DECORATED_WORDS)
            )
            if continuation:
                self._seg_decorators_only = first == "@"
                return
            self._release_pending(next_start=line_start)
            if self._rewound:
                return
        if first == "@":
            self._open_segment(line_start, "compound")
            self._seg_decorators_only = True
        elif word in _COMPOUND_WORDS:
            self._open_segment(line_start, "compound")
        elif word == "match":
            self._open_segment(line_start, "match")
        else:
            self._open_segment(line_start, "simple")

    def _open_segment(self, line_start: int, kind: _Kind) -> None:
        if self._seg_active:  # carried over by _release_pending(next_start=...)
            self._seg_kind = kind
            return
        self._seg_active = True
        self._seg_kind = kind
        self._seg_start = self._base + line_start
        self._seg_line = self._line
        self._seg_end = self._seg_start
        self._seg_decorators_only = False
        self._parts = []
        self._part_start = line_start

    def _end_logical_line(self, end: int) -> None:
        self._in_logical = False
        if not self._seg_active:
            return
        self._seg_end = end
        if self._seg_kind == "match":
            self._seg_kind = "simple" if self._parses(self._segment_text()) else "compound"
        if self._seg_kind == "simple":
            self._release_pending()

    def _segment_text(self) -> str:
        return "".join(self._parts) + self._tail[self._part_start : self._pos]

    @staticmethod
    def _parses(text: str) -> bool:
        try:
            _parse(text)
        except (SyntaxError, ValueError):
            return False
        return True

    def _release_pending(self, next_start: int | None = None) -> None:
        """Release the pending segment; if ``next_start`` is given, a new segment starts there."""
        text = self._segment_text()
        seg_start, seg_line = self._seg_start, self._seg_line
        source = text[: self._seg_end - seg_start]
        self._seg_active = False
        self._parts = []
        if next_start is not None:
            self._seg_active = True
            self._seg_start = self._base + next_start
            self._seg_line = self._line
            self._seg_end = self._seg_start
            self._seg_decorators_only = False
            self._part_start = next_start
        self._emit(source, seg_start, seg_line, text)

    def _emit(self, source: str, seg_start: int, seg_line: int, scanned: str) -> None:
        if seg_start + len(source.rstrip()) <= self.skip_until:
            self._released_any = True  # it parsed and ran before
            return
        try:
            tree = _parse(source, filename=self.filename)
        except (SyntaxError, ValueError) as exc:
            error = self._syntax_error(exc, source, seg_start, seg_line)
            if self._mode == "raw" and not self._released_any and self._held_error is None:
                self._hold_as_prose(error, scanned, seg_start, seg_line)
            else:
                self._ready.append(error)
            return
        self._released_any = True
        line_starts = [0] + [m.end() for m in _LINE_BREAK.finditer(source)]
        ast.increment_lineno(tree, seg_line - 1)
        for node in tree.body:
            first, last = node.lineno - seg_line, (node.end_lineno or node.lineno) - seg_line
            start = line_starts[first] + _char_col(self._line_of(source, line_starts, first), node.col_offset)
            end_col = node.end_col_offset if node.end_col_offset is not None else 0
            end = line_starts[last] + _char_col(self._line_of(source, line_starts, last), end_col)
            self._ready.append(
                Statement(
                    source=source[start:end],
                    node=node,
                    start=seg_start + start,
                    end=seg_start + end,
                    lineno=node.lineno,
                    col_offset=start - line_starts[first],
                    end_lineno=node.end_lineno or node.lineno,
                    end_col_offset=end - line_starts[last],
                )
            )

    @staticmethod
    def _line_of(source: str, line_starts: list[int], index: int) -> str:
        end = line_starts[index + 1] if index + 1 < len(line_starts) else len(source)
        return source[line_starts[index] : end]

    def _syntax_error(
        self, exc: SyntaxError | ValueError, source: str, seg_start: int, seg_line: int
    ) -> CodeSyntaxError:
        if isinstance(exc, SyntaxError):
            rel_line = exc.lineno or 1
            lineno = seg_line + rel_line - 1
            col = max(0, (exc.offset or 1) - 1)
            message = f"{type(exc).__name__}: {exc.msg}"
        else:
            lineno, col, message = seg_line, 0, f"SyntaxError: {exc}"
        error = CodeSyntaxError(message, statement=source, lineno=lineno, col_offset=col)
        error.__cause__ = exc if isinstance(exc, SyntaxError) else None
        return error

    def _hold_as_prose(self, error: CodeSyntaxError, scanned: str, seg_start: int, seg_line: int) -> None:
        """Rescan from the second line of a failed first segment as prose, looking for a fence."""
        everything = scanned + self._tail[self._pos :]
        m = _LINE_BREAK.search(everything)
        cut = m.end() if m is not None else len(everything)
        self._held_error = error
        self._seg_active = False
        self._parts = []
        self._in_logical = False
        self._depth = 0
        self._tail = everything[cut:]
        self._base = seg_start + cut
        self._pos = 0
        self._part_start = 0
        self._line = seg_line + (1 if m is not None else 0)
        self._after_cr = False
        self._mode = "prose"
        self._state = "prose_line"
        self._rewound = True
