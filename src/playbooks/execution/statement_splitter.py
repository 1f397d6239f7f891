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
import types
from collections import deque
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


class Statement:
    """One top-level statement: its AST node (absolute line numbers) and where it sits in the response.

    ``start``/``end`` are character offsets into the whole response; ``col_offset``/``end_col_offset``
    are in characters (``ast`` counts UTF-8 bytes; these do not). Read-only.

    ``code`` is the statement compiled (top-level ``await`` allowed, line numbers of the response)
    when the splitter compiled it from its source, else ``None``. ``node`` is then parsed on first use:
    most statements never need their tree, and parsing one, moving its line numbers and compiling the
    tree cost three times compiling its source once. (Read-only through properties rather than a
    frozen dataclass: a frozen instance costs a microsecond more to make, per statement.)
    """

    __slots__ = ("_source", "_node", "_start", "_end", "_lineno", "_col_offset", "_end_lineno", "_end_col", "_code")

    def __init__(
        self,
        source: str,
        node: ast.stmt | None,
        start: int,
        end: int,
        lineno: int,
        col_offset: int,
        end_lineno: int,
        end_col_offset: int,
        code: types.CodeType | None = None,
    ) -> None:
        if node is None and col_offset != 0:
            raise ValueError("a statement without its node must start at column 0")
        self._source = source
        self._node = node
        self._start = start
        self._end = end
        self._lineno = lineno
        self._col_offset = col_offset
        self._end_lineno = end_lineno
        self._end_col = end_col_offset
        self._code = code

    @property
    def source(self) -> str:
        return self._source

    @property
    def node(self) -> ast.stmt:
        """The statement's AST node, as ``ast.parse`` of the whole response has it."""
        node = self._node
        if node is None:
            node = self._node = _parse(self._source).body[0]
            if self._lineno != 1:
                ast.increment_lineno(node, self._lineno - 1)
        return node

    @property
    def parsed_node(self) -> ast.stmt | None:
        """:attr:`node` if it was parsed already, else ``None`` (nothing is parsed)."""
        return self._node

    @property
    def start(self) -> int:
        return self._start

    @property
    def end(self) -> int:
        return self._end

    @property
    def lineno(self) -> int:
        return self._lineno

    @property
    def col_offset(self) -> int:
        return self._col_offset

    @property
    def end_lineno(self) -> int:
        return self._end_lineno

    @property
    def end_col_offset(self) -> int:
        return self._end_col

    @property
    def code(self) -> types.CodeType | None:
        return self._code

    def __repr__(self) -> str:
        return (
            f"Statement(source={self._source!r}, start={self._start}, end={self._end}, lineno={self._lineno}, "
            f"col_offset={self._col_offset}, end_lineno={self._end_lineno}, end_col_offset={self._end_col})"
        )


_COMPOUND_WORDS: Final = frozenset({"if", "for", "while", "try", "with", "def", "class", "async"})
_CONTINUATION_WORDS: Final = frozenset({"else", "elif", "except", "finally"})
_DECORATED_WORDS: Final = frozenset({"def", "class", "async"})
_PYTHON_FENCE_INFO: Final = frozenset({"", "python", "py", "python3", "py3"})

_WORD: Final = re.compile(r"\w+")
_INDENT: Final = re.compile(r"[ \t\f]*")
_CODE_SPECIAL: Final = re.compile(r"[\"'#;\\\r\n()\[\]{}]")
_LINE_END: Final = re.compile(r"[\r\n]")
_LINE_BREAK: Final = re.compile(r"\r\n|\r|\n")
_STRING_END: Final = {"'": re.compile(r"['\\\r\n]"), '"': re.compile(r'["\\\r\n]')}
_TRIPLE_END: Final = {"'": re.compile(r"['\\]"), '"': re.compile(r'["\\]')}

_Mode = Literal["raw", "fenced", "prose", "other"]
_State = Literal["line_start", "code", "string", "triple", "comment", "fence_line", "prose_line"]
_Kind = Literal["simple", "compound", "match"]


_COMPILE_FLAGS: Final = ast.PyCF_ALLOW_TOP_LEVEL_AWAIT
# One line at column 0 that starts with a name and holds no ';', backslash or open string: see
# StatementSplitter._plain_line. Its alternatives start with different characters, so it never
# backtracks more than linearly.
_PLAIN_LINE: Final = re.compile(
    r"""(?P<word>[^\W\d]\w*)(?:[^\r\n'"#;\\]|"[^"\\\r\n]*"|'[^'\\\r\n]*')*(?P<comment>\#[^\r\n]*)?\n"""
)
_NOT_PLAIN_WORDS: Final = frozenset({"if", "for", "while", "try", "with", "def", "class", "async", "match"})
_TRAILING_BLANK: Final = " \t\f\r\n"
_NON_BLANK_LINE: Final = re.compile(r"[\r\n][ \t\f\r\n]*[^ \t\f\r\n]")


def _shift_lines(code: types.CodeType, delta: int) -> types.CodeType:
    """``code`` with every line number ``delta`` further down, nested code objects included: what
    compiling the statement where it stands in the response gives (its line table is relative to
    ``co_firstlineno``, so this is a copy of the object, not a new compilation)."""
    consts = code.co_consts
    for const in consts:
        if isinstance(const, types.CodeType):
            consts = tuple(_shift_lines(c, delta) if isinstance(c, types.CodeType) else c for c in consts)
            return code.replace(co_firstlineno=code.co_firstlineno + delta, co_consts=consts)
    return code.replace(co_firstlineno=code.co_firstlineno + delta)


def _count_breaks(text: str, start: int, end: int) -> int:
    return text.count("\n", start, end) + text.count("\r", start, end) - text.count("\r\n", start, end)


def _char_col(line: str, byte_col: int) -> int:
    if line.isascii():
        return byte_col
    return len(line.encode("utf-8")[:byte_col].decode("utf-8", errors="replace"))


class StatementSplitter:
    """Turn a stream of text chunks into complete top-level statements; see the module docstring."""

    def __init__(self, *, filename: str = "<llm-response>", skip_until: int = 0, last_statement: str = "") -> None:
        self.filename = filename
        self.skip_until = skip_until
        """Offset up to which the text ran before (a resumed executor's executed offset): a segment
        that ends there or before is scanned, so that the state after it is right, but neither parsed
        nor released. A resume then costs no parse per statement of its history.

        With ``last_statement``, the source of the statement that ended at ``skip_until``, the history
        is not even scanned when it holds no fence: the text is kept until ``skip_until`` has arrived,
        and scanning starts at the line where that statement starts (a top-level statement starts
        where the scanner is between statements, so its state there is known: code, nothing pending).
        A resume then costs the same whatever the length of its history."""
        self._history = skip_until if last_statement and skip_until > 0 else 0
        self._history_statement = last_statement
        self._history_fed = 0  # characters kept while the history arrives
        self._tail = ""  # text not yet dropped; _tail[0] is at absolute offset _base
        self._base = 0
        self._pos = 0  # scan position in _tail
        self._line = 1  # line number at _base + _pos
        self._closed = False
        self._unscanned: list[str] = []  # chunks kept by feed() until a line break makes them worth scanning
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
        # the segment is one statement at column 0 whose extent the scan knows (see _emit_plain)
        self._seg_plain = False
        self._seg_comment = -1  # absolute offset of the segment's last comment, -1 if none
        self._parts: list[str] = []
        self._part_start = 0  # index in _tail where the not-yet-saved part of the segment starts
        self._after_cr = False  # the last character consumed was a CR (its LF may come next chunk)
        self._rewound = False  # set when a failed first segment sent the scanner back as prose

    # ----------------------------------------------------------------- public API

    @property
    def ready(self) -> bool:
        """Whether :meth:`next_statement` has a statement (or an error) to give now."""
        return bool(self._ready)

    @property
    def offset(self) -> int:
        """Absolute offset up to which the response has been judged."""
        return self._base + self._pos

    def feed(self, text: str) -> None:
        """Add the next chunk of the response.

        A chunk with no line break is only kept when nothing could be released before the next line
        break anyway (mid-line, or at a line start with no statement pending): most chunks of a
        token stream cost an append, and a line is scanned once, when its break arrives.
        """
        if self._closed:
            raise RuntimeError("feed() after close()")
        if not text:
            return
        if self._history:
            self._unscanned.append(text)
            self._history_fed += len(text)
            if self._history_fed >= self._history:
                self._skip_history()
            return
        if "\n" not in text and "\r" not in text and self._may_wait(text):
            self._unscanned.append(text)
            return
        if self._unscanned:
            self._unscanned.append(text)
            text = "".join(self._unscanned)
            self._unscanned = []
        self._take(text)

    def _skip_history(self) -> None:
        """The executed prefix has arrived: start scanning at the start of the line of the statement
        that ended it, or scan it all if that cannot be known (the text there is not that statement,
        or a fence before it may have changed what is code)."""
        text = "".join(self._unscanned)
        self._unscanned = []
        end, statement = self._history, self._history_statement
        self._history = 0
        begin = end - len(statement)
        if begin < 0 or text[begin:end] != statement or "```" in text[:end]:
            self._take(text)
            return
        line_start = max(text.rfind("\n", 0, begin), text.rfind("\r", 0, begin)) + 1
        self._line = 1 + _count_breaks(text, 0, line_start)
        self._base = line_start
        self._released_any = True
        self._take(text[line_start:])

    def _may_wait(self, text: str) -> bool:
        """Whether nothing could be released before the next line break: inside a line, or at the
        start of one when no statement is pending or the line is indented (it joins the pending one)."""
        if self._state != "line_start" or not self._seg_active:
            return True
        if self._pos < len(self._tail):
            first = self._tail[self._pos]
        else:
            first = self._unscanned[0][0] if self._unscanned else text[0]
        return first in " \t\f"

    def _take(self, text: str) -> None:
        """Append ``text`` to the tail and scan as far as it allows."""
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
        self._history = 0  # the stream ended inside its history: scan all of it
        if self._unscanned:
            self._take("".join(self._unscanned))
            self._unscanned = []
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
        if not self._seg_active and self._plain_line(tail, start):
            return True
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

    def _plain_line(self, tail: str, start: int) -> bool:
        """Release the line at ``start`` as one statement without running the scanner, if it is the
        commonest kind: a simple statement at column 0 on one line ending in LF, with strings only
        where no backslash or line break is in them, and no ``;`` or backslash. It must compile; if
        it does not (an open bracket or string, prose), nothing is consumed and the scanner takes the
        line. A line that compiles alone and has no open bracket or string, as these then cannot
        have, is a logical line the scanner would end at the same break: this is the scanner's result
        in one regular expression and one compilation."""
        m = _PLAIN_LINE.match(tail, start)
        if m is None or m.group("word") in _NOT_PLAIN_WORDS:
            return False
        code_end = m.start("comment") if m.start("comment") >= 0 else m.end() - 1
        text = tail[start:code_end].rstrip(" \t\f")
        seg_start = self._base + start
        if seg_start + len(text) > self.skip_until:  # else it ran before the crash: no compilation
            statement = self._compiled(text, seg_start, self._line)
            if statement is None:
                return False
            self._ready.append(statement)
        self._released_any = True
        self._line += 1
        self._after_cr = False
        self._pos = m.end()
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
                self._seg_comment = self._base + i
                self._advance(i + 1)
                self._state = "comment"
                return True
            if ch == ";":
                if self._seg_kind == "simple":
                    self._seg_plain = False  # two statements on one line
                self._advance(i + 1)
                continue
            if ch == "\\":
                self._seg_plain = False
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
                self._seg_plain = False  # an unexpected indent: the parser words the error
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
            self._seg_plain = False  # the node starts at its ``def``, not at the segment
        elif word in _COMPOUND_WORDS:
            self._open_segment(line_start, "compound")
        elif word == "match":
            self._open_segment(line_start, "match")
        else:
            self._open_segment(line_start, "simple")

    def _open_segment(self, line_start: int, kind: _Kind) -> None:
        self._seg_plain = kind != "match"
        self._seg_comment = -1
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
            self._seg_plain = False
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
        plain = self._seg_plain and self._seg_kind != "match"
        comment = self._seg_comment - seg_start if self._seg_comment >= seg_start else -1
        self._seg_active = False
        self._seg_plain = False
        self._parts = []
        if next_start is not None:
            self._seg_active = True
            self._seg_start = self._base + next_start
            self._seg_line = self._line
            self._seg_end = self._seg_start
            self._seg_decorators_only = False
            self._part_start = next_start
        if plain and self._emit_plain(source, seg_start, seg_line, comment):
            return
        self._emit(source, seg_start, seg_line, text)

    def _emit_plain(self, source: str, seg_start: int, seg_line: int, comment: int) -> bool:
        """Release a plain segment compiled from its source, with no tree: one simple statement at
        column 0 with no ``;`` at its top level, or one compound statement that starts at column 0
        with no decorator, either with no backslash continuation. Its extent is the segment less a
        trailing comment and whitespace.
        Returns False, having released nothing, when it does not compile: :meth:`_emit` then parses it
        and words the error (or finds the code the parser accepts and only the compiler refuses, such
        as ``break`` outside a loop, which runs into its error in the executor as before)."""
        end = len(source)
        if comment >= 0:
            if not source.startswith("#", comment):
                return False
            if _NON_BLANK_LINE.search(source, comment) is None:
                end = comment  # the comment is on the segment's last line: nothing after it but its break
        end = len(source[:end].rstrip(_TRAILING_BLANK))
        if seg_start + end <= self.skip_until:
            self._released_any = True  # it parsed and ran before
            return True
        statement = self._compiled(source[:end], seg_start, seg_line)
        if statement is None:
            return False
        self._released_any = True
        self._ready.append(statement)
        return True

    def _compiled(self, text: str, start: int, line: int) -> Statement | None:
        """``text``, a statement at column 0 starting at offset ``start`` on line ``line``, compiled
        where it stands (no tree); ``None`` if it does not compile."""
        try:
            code = compile(text, self.filename, "exec", flags=_COMPILE_FLAGS, dont_inherit=True)
        except (SyntaxError, ValueError):
            return None
        if line != 1:
            code = _shift_lines(code, line - 1)
        last_line = max(text.rfind("\n"), text.rfind("\r")) + 1
        end_line = line + _count_breaks(text, 0, len(text))
        return Statement(text, None, start, start + len(text), line, 0, end_line, len(text) - last_line, code)

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
