"""Tests of the sans-I/O statement splitter (``playbooks.execution.statement_splitter``).

The reference is always ``ast.parse(text).body``: whatever the chunking, the splitter must return
exactly those statements, with the same source segments and positions in the whole response.
"""

from __future__ import annotations

import ast
import dis
import os
import random
import re
import types
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from playbooks.errors import CodeSyntaxError
from playbooks.execution.statement_splitter import END, NEED_DATA, Statement, StatementSplitter

_BREAK = re.compile(r"\r\n|\r|\n")

Expected = tuple[str, int, int, int, int, int, int]  # source, lineno, col, end_lineno, end_col, start, end


# --------------------------------------------------------------------------- helpers


def drain(splitter: StatementSplitter, out: list[Statement]) -> object:
    """Take every available statement; return the sentinel that stopped the loop."""
    while True:
        item = splitter.next_statement()
        if item is NEED_DATA or item is END:
            return item
        assert isinstance(item, Statement)
        out.append(item)


def split(text: str, cuts: Iterable[int] = (), *, skip_until: int = 0, last_statement: str = "") -> list[Statement]:
    """Feed ``text`` cut at ``cuts`` (character offsets), drain after every chunk, close, drain."""
    splitter = StatementSplitter(skip_until=skip_until, last_statement=last_statement)
    out: list[Statement] = []
    prev = 0
    for cut in [*sorted({c for c in cuts if 0 < c < len(text)}), len(text)]:
        splitter.feed(text[prev:cut])
        prev = cut
        assert drain(splitter, out) is NEED_DATA
    splitter.close()
    assert drain(splitter, out) is END
    assert splitter.next_statement() is END
    return out


def outcome(text: str, cuts: Iterable[int] = ()) -> tuple[list[tuple[str, int]], tuple[int, str] | None]:
    """Statements (source, lineno) and the first syntax error (lineno, statement), for any text."""
    splitter = StatementSplitter()
    out: list[Statement] = []
    prev = 0
    try:
        for cut in [*sorted({c for c in cuts if 0 < c < len(text)}), len(text)]:
            splitter.feed(text[prev:cut])
            prev = cut
            drain(splitter, out)
        splitter.close()
        drain(splitter, out)
    except CodeSyntaxError as exc:
        assert exc.lineno is not None
        return [(s.source, s.lineno) for s in out], (exc.lineno, exc.statement)
    return [(s.source, s.lineno) for s in out], None


def line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in _BREAK.finditer(text)]


def expected(text: str) -> list[Expected]:
    """``ast.parse(text).body`` as char-based positions, computed with a line-offset table (linear)."""
    tree = ast.parse(text)
    starts = line_starts(text)

    def char_col(lineno: int, byte_col: int) -> int:
        begin = starts[lineno - 1]
        stop = starts[lineno] if lineno < len(starts) else len(text)
        line = text[begin:stop]
        if line.isascii():
            return byte_col
        return len(line.encode("utf-8")[:byte_col].decode("utf-8"))

    result: list[Expected] = []
    for node in tree.body:
        assert node.end_lineno is not None and node.end_col_offset is not None
        col = char_col(node.lineno, node.col_offset)
        end_col = char_col(node.end_lineno, node.end_col_offset)
        start = starts[node.lineno - 1] + col
        end = starts[node.end_lineno - 1] + end_col
        result.append((text[start:end], node.lineno, col, node.end_lineno, end_col, start, end))
    return result


def actual(text: str, statements: Sequence[Statement]) -> list[Expected]:
    for s in statements:
        assert text[s.start : s.end] == s.source
        assert s.node.lineno == s.lineno and s.node.end_lineno == s.end_lineno
    return [(s.source, s.lineno, s.col_offset, s.end_lineno, s.end_col_offset, s.start, s.end) for s in statements]


def check(text: str, cuts: Iterable[int] = ()) -> list[Statement]:
    statements = split(text, cuts)
    assert actual(text, statements) == expected(text)
    return statements


def per_char(text: str) -> list[int]:
    """Cut after every character, CRLF halves included."""
    return list(range(1, len(text)))


def per_line(text: str) -> list[int]:
    """Cuts after every line break, so that every chunk ends with a newline."""
    return line_starts(text)[1:]


def sources(statements: Sequence[Statement]) -> list[str]:
    return [s.source for s in statements]


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- LLM-style code generator

_ASCII_NAMES = ["x", "y", "total", "items", "result", "data", "i", "n", "value", "_tmp"]
_UNICODE_NAMES = ["名前", "π", "ñandú", "δx", "Ωmega", "café"]
names = st.sampled_from(_ASCII_NAMES + _UNICODE_NAMES)
ints = st.integers(0, 99).map(str)
strings = st.sampled_from(
    ["'hello'", '"wörld"', "'# not a comment'", '"it\'s"', "'日本語 ✓'", "'a\\'b'", '"x\\\\"', "''"]
)
exprs = st.one_of(ints, strings, names, st.builds(lambda a, b: f"{a} + {b}", names, ints))
tools = st.sampled_from(["Tool", "Say", "Search", "LoadFile"])


def _indent(body: str, width: int = 4) -> str:
    return "".join((" " * width + line if line.strip() else line) for line in body.splitlines(True))


@st.composite
def simple_stmt(draw: st.DrawFn) -> str:
    kind = draw(st.integers(0, 9))
    n, e = draw(names), draw(exprs)
    if kind == 0:
        return f"{n} = {e}\n"
    if kind == 1:
        return f"{n} = await {draw(tools)}({draw(ints)})\n"
    if kind == 2:
        return f"{n} = {e}; {draw(names)} = {draw(exprs)}\n"
    if kind == 3:
        return f"{n} = {draw(ints)} + \\\n    {draw(ints)}\n"
    if kind == 4:
        return f"await {draw(tools)}({e}, key={draw(strings)})\n"
    if kind == 5:
        return f"print({e})  # trailing {draw(strings)}\n"
    if kind == 6:
        return f"{n} += {draw(ints)}\n"
    if kind == 7:
        return f"{n} = [{draw(ints)} for _ in range(3) if _]\n"
    if kind == 8:
        return f"{n} = f'{{{draw(names)}}} and {{1 + 2}}'\n"
    return "pass\n"


def block(draw: st.DrawFn, depth: int) -> str:
    parts = [draw(stmt(depth + 1)) for _ in range(draw(st.integers(1, 3)))]
    if draw(st.booleans()):
        parts.insert(draw(st.integers(0, len(parts))), draw(st.sampled_from(["\n", "# inner comment\n", "  \n"])))
    return _indent("".join(parts))


def col0_comment(draw: st.DrawFn) -> str:
    return draw(st.sampled_from(["", "", "# between\n", "\n", "\n# col-0 comment\n\n"]))


@st.composite
def compound_stmt(draw: st.DrawFn, depth: int) -> str:
    kind = draw(st.integers(0, 13))
    n = draw(names)
    if kind == 0:
        return f"for {n} in range({draw(ints)}):\n{block(draw, depth)}"
    if kind == 1:
        text = f"while {n} < {draw(ints)}:\n{block(draw, depth)}"
        if draw(st.booleans()):
            text += f"{col0_comment(draw)}else:\n{block(draw, depth)}"
        return text
    if kind == 2:
        text = f"if {n}:\n{block(draw, depth)}"
        for _ in range(draw(st.integers(0, 2))):
            text += f"{col0_comment(draw)}elif {draw(names)} == {draw(ints)}:\n{block(draw, depth)}"
        if draw(st.booleans()):
            text += f"{col0_comment(draw)}else:\n{block(draw, depth)}"
        return text
    if kind == 3:
        text = f"try:\n{block(draw, depth)}"
        text += f"{col0_comment(draw)}except ValueError as e:\n{block(draw, depth)}"
        if draw(st.booleans()):
            text += f"{col0_comment(draw)}except (KeyError, TypeError):\n{block(draw, depth)}"
        if draw(st.booleans()):
            text += f"{col0_comment(draw)}else:\n{block(draw, depth)}"
        if draw(st.booleans()):
            text += f"{col0_comment(draw)}finally:\n{block(draw, depth)}"
        return text
    if kind == 4:
        return f"with open({draw(strings)}) as f, ctx() as {n}:\n{block(draw, depth)}"
    if kind == 5:
        return f"def fn_{draw(ints)}({n}, *args, k=1, **kw):\n{block(draw, depth)}"
    if kind == 6:
        return f"async def ａsync_{draw(ints)}():\n{block(draw, depth)}    return await {draw(tools)}(1)\n"
    if kind == 7:
        return f"class C{draw(ints)}(Base):\n    attr = {draw(exprs)}\n\n    def m(self):\n{_indent(block(draw, depth))}"
    if kind == 8:
        decorators = "".join(
            f"@{d}\n{col0_comment(draw)}" for d in draw(st.lists(st.sampled_from(["dec", "a.b(1)", "tool"]), min_size=1, max_size=3))
        )
        target = draw(st.sampled_from(["def g():\n", "async def g():\n", "class K:\n"]))
        return f"{decorators}{target}{block(draw, depth)}"
    if kind == 9:
        cases = "".join(
            f"    case {pat}:\n{_indent(block(draw, depth))}"
            for pat in draw(st.lists(st.sampled_from(["1", "[a, b]", "{'k': v}", "Point(x=0)", "str() | bytes()"]), min_size=1, max_size=3))
        )
        return f"match {n}:\n{cases}    case _:\n        pass\n"
    if kind == 10:
        elements = "".join(f"{draw(exprs)},\n" for _ in range(draw(st.integers(0, 3))))
        comment = draw(st.sampled_from(["", "# inside brackets\n", "\n"]))
        return f"{n} = [\n{comment}{elements}]\n"
    if kind == 11:
        inner = draw(st.sampled_from(["x = 1\n# not a comment\n", "def f():\n```python\n", "\n\n'''\n", "if x:\nelse\n"]))
        return f'{n} = """\n{inner}"""\n'
    if kind == 12:
        return f"def doc():\n    '''Doc.\n\nx = 1\n# col 0 inside the string\n'''\n{block(draw, depth)}"
    return f"{n} = {{\n'a': [\n1,\n2],  # c\n    'b': (3,\n4)\n}}\n"


def stmt(depth: int = 0) -> st.SearchStrategy[str]:
    if depth >= 2:
        return simple_stmt()
    return st.one_of(simple_stmt(), compound_stmt(depth))


@st.composite
def llm_code(draw: st.DrawFn) -> str:
    parts: list[str] = []
    for _ in range(draw(st.integers(1, 6))):
        parts.append(draw(stmt()))
        parts.append(draw(st.sampled_from(["", "", "\n", "# comment\n", "\n\n# x = 1\n", "   \n", "    # indented\n"])))
    text = "".join(parts)
    endings = draw(st.sampled_from(["lf", "crlf", "cr", "mixed"]))
    if endings == "crlf":
        text = text.replace("\n", "\r\n")
    elif endings == "cr":
        text = text.replace("\n", "\r")
    elif endings == "mixed":
        pieces = text.split("\n")
        text = pieces[0] + "".join(draw(st.sampled_from(["\n", "\r\n", "\r"])) + p for p in pieces[1:])
    if draw(st.booleans()):
        text = text.rstrip("\r\n")
    try:
        ast.parse(text)
    except SyntaxError:  # pragma: no cover - the generator is meant to produce valid code
        assume(False)
    return text


def cuts_for(text: str) -> st.SearchStrategy[list[int]]:
    return st.lists(st.integers(0, len(text)), max_size=40)


# --------------------------------------------------------------------------- properties


@FAST
@given(st.data())
def test_generated_code_any_chunking(data: st.DataObject) -> None:
    text = data.draw(llm_code(), label="text")
    cuts = data.draw(cuts_for(text), label="cuts")
    want = expected(text)
    assert actual(text, split(text, cuts)) == want
    assert actual(text, split(text)) == want


@settings(max_examples=30, deadline=None)
@given(st.data())
def test_skip_until_a_statement_end_releases_the_same_later_statements(data: st.DataObject) -> None:
    """A resumed executor's splitter skips what ran (``skip_until`` = its executed offset, always a
    statement's end): whatever the chunking, every statement ending after it comes out as before,
    with the same positions and nodes, and none ending at or before it is parsed."""
    text = data.draw(llm_code(), label="text")
    whole = split(text)
    assume(whole)
    offset = data.draw(st.sampled_from([0, *(s.end for s in whole)]), label="skip_until")
    cuts = data.draw(cuts_for(text), label="cuts")
    out = split(text, cuts, skip_until=offset)

    def key(statements: Iterable[Statement]) -> list[tuple[int, int, int, str]]:
        return [(s.start, s.end, s.lineno, ast.dump(s.node)) for s in statements if s.end > offset]

    assert key(out) == key(whole)


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_history_skipped_unscanned_releases_the_same_later_statements(data: st.DataObject) -> None:
    """Given the statement that ended at ``skip_until`` too (what a resumed executor has), the
    splitter starts scanning at that statement's line, whatever came before it: every statement
    ending after it comes out as from the whole text, for any chunking, with or without a fence in
    the history (then it scans all of it) and with a wrong statement given (likewise)."""
    text = data.draw(llm_code(), label="text")
    if data.draw(st.booleans(), label="fenced"):
        text = "Here it is:\n```python\n" + text + "\n```\n"
    whole = split(text)
    assume(whole)
    last = data.draw(st.sampled_from(whole), label="last statement")
    statement = last.source if data.draw(st.integers(0, 9), label="wrong?") else last.source + " "
    cuts = data.draw(cuts_for(text), label="cuts")
    out = split(text, cuts, skip_until=last.end, last_statement=statement)

    def key(statements: Iterable[Statement]) -> list[tuple[int, int, int, int, str]]:
        return [
            (s.start, s.end, s.lineno, s.end_col_offset, ast.dump(s.node, include_attributes=True))
            for s in statements if s.end > last.end
        ]

    assert key(out) == key(whole)


def test_history_is_kept_not_scanned(monkeypatch: pytest.MonkeyPatch) -> None:
    text = "".join(f"x = await Work({i})  # call {i}\ntotal += x\n" for i in range(500))
    text += "if total:\n    a = 1; last = total\nnext = 1\n"
    end = text.index("last = total") + len("last = total")
    scans: list[int] = []
    real = StatementSplitter._scan

    def counting(self: StatementSplitter, *, eof: bool) -> None:
        scans.append(self._base)
        real(self, eof=eof)

    monkeypatch.setattr(StatementSplitter, "_scan", counting)
    splitter = StatementSplitter(skip_until=end, last_statement="last = total")
    for i in range(0, len(text), 7):
        splitter.feed(text[i : i + 7])
    splitter.close()
    out: list[Statement] = []
    drain(splitter, out)
    assert [(s.source, s.lineno) for s in out] == [("next = 1", 1003)]
    assert min(scans) == text.index("    a = 1")  # nothing before the last statement's line


@pytest.mark.parametrize("cut", [None, 3, 8, 13])
def test_skip_until_inside_a_line_of_two_statements_keeps_the_second(cut: int | None) -> None:
    text = "a = 1; b = await Work(a)\nc = 3\n"
    splitter = StatementSplitter(skip_until=text.index(";"))  # a ran before the crash, b did not
    for part in ([text] if cut is None else [text[:cut], text[cut:]]):
        splitter.feed(part)
    splitter.close()
    out: list[Statement] = []
    drain(splitter, out)
    assert [s.source for s in out if s.end > text.index(";")] == ["b = await Work(a)", "c = 3"]


def test_skip_until_parses_nothing_of_the_history(monkeypatch: pytest.MonkeyPatch) -> None:
    from playbooks.execution import statement_splitter

    text = "".join(f"x = await Work({i})  # call {i}\ntotal += x\n" for i in range(500)) + "last = total\n"
    parsed: list[str] = []
    compiled: list[str] = []
    real = statement_splitter._parse

    def counting_compile(source: str, *args: object, **kwargs: object) -> object:
        compiled.append(source)
        return compile(source, *args, **kwargs)  # type: ignore[call-overload]

    monkeypatch.setattr(statement_splitter, "_parse", lambda source, **kw: parsed.append(source) or real(source, **kw))
    monkeypatch.setattr(statement_splitter, "compile", counting_compile, raising=False)
    splitter = StatementSplitter(skip_until=text.index("last"))
    for i in range(0, len(text), 7):
        splitter.feed(text[i : i + 7])
    splitter.close()
    out: list[Statement] = []
    drain(splitter, out)
    assert [s.source for s in out] == ["last = total"]
    assert len(parsed) <= 2  # the last statement, and at most the one whose segment reaches it
    assert compiled == ["last = total"]


def _codes(code: types.CodeType) -> Iterable[types.CodeType]:
    yield code
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            yield from _codes(const)


def _body_positions(code: types.CodeType) -> list[tuple[int | None, int | None, int | None, int | None]]:
    """Positions of ``code``'s instructions after its prologue (up to RESUME: for top-level
    ``await`` RETURN_GENERATOR and POP_TOP too): a module's prologue stands at the module's first line
    (and RESUME one before it), which a tree of one statement puts at 1 and a moved compilation at the
    statement's own line."""
    positions = list(code.co_positions())
    if code.co_name == "<module>":
        units = code.co_code[::2]  # one position per 2-byte code unit
        return positions[units.index(dis.opmap["RESUME"]) + 1 :]
    return positions


def _same_code(fast: types.CodeType, reference: types.CodeType) -> None:
    """``fast`` (compiled from the statement's source, lines moved) runs as ``reference`` (compiled
    from its node): same instructions, names and constants, same line and column of every
    instruction but the module's prologue (see ``_body_positions``)."""
    for a, b in zip(_codes(fast), _codes(reference), strict=True):
        assert a.co_code == b.co_code and a.co_names == b.co_names and a.co_varnames == b.co_varnames
        assert [c for c in a.co_consts if not isinstance(c, types.CodeType)] == [
            c for c in b.co_consts if not isinstance(c, types.CodeType)
        ]
        assert _body_positions(a) == _body_positions(b)
        assert a.co_filename == b.co_filename


@FAST
@given(st.data())
def test_statements_compiled_from_source_match_their_nodes(data: st.DataObject) -> None:
    """A statement the splitter compiled from its source runs exactly as its node compiled where it
    stands in the whole response, and its node (parsed on demand) is the whole response's node."""
    text = data.draw(llm_code(), label="text")
    cuts = data.draw(cuts_for(text), label="cuts")
    nodes = ast.parse(text).body
    statements = split(text, cuts)
    assert len(statements) == len(nodes)
    for statement, node in zip(statements, nodes):
        assert ast.dump(statement.node, include_attributes=True) == ast.dump(node, include_attributes=True)
        if statement.code is None:
            continue
        reference = compile(
            ast.Module(body=[node], type_ignores=[]), "<llm-response>", "exec",
            flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT, dont_inherit=True,
        )
        _same_code(statement.code, reference)


@pytest.mark.parametrize(
    "text",
    [
        'x = ")("\n',
        'x = """a"""\n',
        "x = '''a\nb'''\n",
        'x = "a#b"  # c\n',
        "print('it' 's')  #\n",
        "f(x) ;\n",
        "a = 1; b = 2\n",
        "else_ = 1\n",
        "x = [1,\n2]  # two lines\n",
        "x = 1 + \\\n  2\n",
        "s = 'a\\'b'\n",
        "if x: y = 1; z = 2\nw = 3\n",
        "名前 = 'héllo'  # note\n",
        "x = 1\t \f\n",
        "x = (\n  1  # one\n)  # end\n",
        "f = lambda y: [z for z in y]\ng = f\n",
    ],
)
@pytest.mark.parametrize("chunk", [0, 1, 4])
def test_plain_lines_and_their_look_alikes(text: str, chunk: int) -> None:
    """Lines the splitter may take whole (one regular expression, one compilation) and lines that
    look like them but must go through the scanner agree with ``ast.parse``, whatever the chunking."""
    cuts = list(range(chunk, len(text), chunk)) if chunk else []
    check(text, cuts)


@pytest.mark.parametrize("chunk", [0, 1, 4])
def test_closing_bracket_before_opening_is_an_error_at_its_line(chunk: int) -> None:
    text = "x = )(\ny = 1\n"
    cuts = list(range(chunk, len(text), chunk)) if chunk else []
    assert outcome(text, cuts) == outcome(text)
    assert outcome(text)[1] is not None


def test_compiler_only_errors_still_reach_the_executor() -> None:
    """``break`` outside a loop parses, and only the compiler refuses it: the splitter releases it
    (with no compiled code) and the executor's compilation reports it, as before."""
    out = split("x = 1\nbreak\ny = 2\n")
    assert [(s.source, s.code is None) for s in out] == [("x = 1", False), ("break", True), ("y = 2", False)]


@given(llm_code())
def test_generated_code_every_character_and_every_line(text: str) -> None:
    want = expected(text)
    assert actual(text, split(text, per_char(text))) == want
    assert actual(text, split(text, per_line(text))) == want


@FAST
@given(st.data())
def test_chunking_never_changes_errors(data: st.DataObject) -> None:
    """With a broken line inserted, whole-text and chunked runs agree (statements and the error)."""
    text = data.draw(llm_code(), label="text")
    lines = text.splitlines(True)
    at = data.draw(st.integers(0, len(lines)), label="at")
    bad = data.draw(st.sampled_from(["x = = 1\n", ")\n", "if x\n", "    y = 2\n", "def f(:\n"]), label="bad")
    broken = "".join(lines[:at]) + bad + "".join(lines[at:])
    cuts = data.draw(cuts_for(broken), label="cuts")
    assert outcome(broken, cuts) == outcome(broken)
    assert outcome(broken, per_char(broken)) == outcome(broken)


def _stdlib_files() -> list[Path]:
    root = Path(os.path.dirname(os.__file__))
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and p.stat().st_size <= 100_000)
    return random.Random(20240531).sample(files, min(300, len(files)))


def _stdlib_text(path: Path) -> str | None:
    try:
        text = path.read_text(encoding="utf-8")
        ast.parse(text)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return None
    return text


@pytest.mark.integration
@pytest.mark.parametrize("path", _stdlib_files(), ids=lambda p: str(p.name))
def test_stdlib_file(path: Path) -> None:
    text = _stdlib_text(path)
    if text is None:
        pytest.skip("does not parse on this interpreter")
    want = expected(text)
    assert actual(text, split(text)) == want
    rng = random.Random(str(path))
    assert actual(text, split(text, rng.sample(range(len(text) + 1), min(len(text), 60)))) == want
    assert actual(text, split(text, per_line(text))) == want
    if len(text) <= 8_000:
        assert actual(text, split(text, per_char(text))) == want


# --------------------------------------------------------------------------- named behaviours


def test_statement_after_indented_block_with_newline_terminated_chunks() -> None:
    text = "for i in range(3):\n    x = i\ny = 2\nz = 3\n"
    splitter = StatementSplitter()
    out: list[Statement] = []
    splitter.feed("for i in range(3):\n")
    splitter.feed("    x = i\n")
    assert drain(splitter, out) is NEED_DATA and out == []
    splitter.feed("y ")  # the next column-0 line starts: the block is complete
    assert drain(splitter, out) is NEED_DATA
    assert sources(out) == ["for i in range(3):\n    x = i"]
    splitter.feed("= 2\n")
    assert drain(splitter, out) is NEED_DATA
    assert sources(out) == ["for i in range(3):\n    x = i", "y = 2"]
    splitter.feed("z = 3\n")
    splitter.close()
    assert drain(splitter, out) is END
    assert actual(text, out) == expected(text)
    assert check(text, per_line(text))[1].source == "y = 2"


def test_compound_statement_at_end_released_only_at_close() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1\nif x:\n    y = 2\n")
    assert isinstance(first := splitter.next_statement(), Statement) and first.source == "x = 1"
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("    z = 3\n\n")
    assert splitter.next_statement() is NEED_DATA
    splitter.close()
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "if x:\n    y = 2\n    z = 3"
    assert isinstance(item.node, ast.If)
    assert splitter.next_statement() is END


def test_simple_statement_released_at_its_newline() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1")
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "x = 1" and (item.start, item.end) == (0, 5)
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("y = await Tool(2)\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "y = await Tool(2)" and item.lineno == 2
    assert splitter.next_statement() is NEED_DATA
    splitter.close()
    assert splitter.next_statement() is END


def test_statement_without_final_newline_released_at_close() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1\ny = 2")
    assert isinstance(splitter.next_statement(), Statement)
    assert splitter.next_statement() is NEED_DATA
    splitter.close()
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "y = 2"
    assert splitter.next_statement() is END


@pytest.mark.parametrize("chunking", ["whole", "lines", "chars"])
def test_syntax_error_in_the_middle_of_a_stream(chunking: str) -> None:
    text = "a = 1\nfor i in x:\n    b = 2\nc = (1,\n2 3)\nd = 4\n"
    cuts = {"whole": [], "lines": per_line(text), "chars": per_char(text)}[chunking]
    with pytest.raises(SyntaxError) as reference:
        ast.parse(text)
    splitter = StatementSplitter()
    out: list[Statement] = []
    prev = 0
    with pytest.raises(CodeSyntaxError) as info:
        for cut in [*cuts, len(text)]:
            splitter.feed(text[prev:cut])
            prev = cut
            drain(splitter, out)
            if prev >= text.index("d = 4"):
                pytest.fail("the error was not raised once its statement was complete")
    assert sources(out) == ["a = 1", "for i in x:\n    b = 2"]
    assert info.value.lineno == reference.value.lineno
    assert info.value.lineno in (4, 5)
    assert "c = (1," in info.value.statement and "2 3)" in info.value.statement
    assert info.value.col_offset is not None


def test_syntax_error_simple_line_absolute_position() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1\n\n# note\ny = 1 +\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "x = 1"
    with pytest.raises(CodeSyntaxError) as info:
        splitter.next_statement()
    assert info.value.lineno == 4
    assert info.value.statement.startswith("y = 1 +")


def test_blank_lines_and_comments_between_statements() -> None:
    text = "\n\n# leading\nx = 1\n\n   \n# c1\n    # indented comment\ny = 2  # trailing\n\n\n# end\n"
    for cuts in ([], per_line(text), per_char(text)):
        statements = check(text, cuts)
        assert sources(statements) == ["x = 1", "y = 2"]
        assert [s.lineno for s in statements] == [4, 9]


FENCED = (
    "Sure, here's the code:\n"
    "```python\n"
    "x = await Tool(1)\n"
    "for i in range(x):\n"
    "    print(i)\n"
    "```\n"
    "Hope that helps"
)


@pytest.mark.parametrize("chunking", ["whole", "lines", "chars"])
def test_fenced_code_with_prose_around(chunking: str) -> None:
    text = FENCED
    cuts = {"whole": [], "lines": per_line(text), "chars": per_char(text)}[chunking]
    statements = split(text, cuts)
    assert sources(statements) == ["x = await Tool(1)", "for i in range(x):\n    print(i)"]
    assert [(s.lineno, s.end_lineno) for s in statements] == [(3, 3), (4, 5)]
    for s in statements:
        assert text[s.start : s.end] == s.source
    assert statements[0].start == text.index("x = await")


def test_fence_at_the_start_of_the_response() -> None:
    text = "```python\nx = 1\nif x:\n    y = 2\n```\n"
    statements = split(text, per_line(text))
    assert sources(statements) == ["x = 1", "if x:\n    y = 2"]
    assert [s.lineno for s in statements] == [2, 3]


def test_closing_fence_releases_pending_compound_statement() -> None:
    splitter = StatementSplitter()
    splitter.feed("Here:\n```python\nif a:\n    b = 1\n")
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("```\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "if a:\n    b = 1" and item.lineno == 3


@pytest.mark.parametrize("chunking", ["whole", "lines", "chars"])
def test_several_fenced_blocks_and_json_block_skipped(chunking: str) -> None:
    text = (
        "First we load:\n"
        "```python\n"
        "a = 1\n"
        "```\n"
        "The config looks like:\n"
        "```json\n"
        '{"a": 1, "x": [1, 2]}\n'
        "x = 'not python'\n"
        "```\n"
        "Then:\n"
        "\n"
        "```py\n"
        "b = a + 1\n"
        "def f():\n"
        "    return b\n"
        "```\n"
        "Done.\n"
    )
    cuts = {"whole": [], "lines": per_line(text), "chars": per_char(text)}[chunking]
    statements = split(text, cuts)
    assert sources(statements) == ["a = 1", "b = a + 1", "def f():\n    return b"]
    assert [s.lineno for s in statements] == [3, 13, 14]
    for s in statements:
        assert text[s.start : s.end] == s.source


def test_crlf_line_endings() -> None:
    text = "x = 1\r\nif x:\r\n    y = 2\r\n\r\n# c\r\nelse:\r\n    y = 3\r\nz = '''a\r\nb'''\r\n"
    for cuts in ([], per_line(text), per_char(text)):
        statements = check(text, cuts)
        assert sources(statements) == ["x = 1", "if x:\r\n    y = 2\r\n\r\n# c\r\nelse:\r\n    y = 3", "z = '''a\r\nb'''"]
        assert [s.lineno for s in statements] == [1, 2, 8]


def test_lone_cr_at_chunk_end_followed_by_lf() -> None:
    text = "x = 1\r\ny = 2\r\n\r\nz = 3\r\n"
    cuts = [i + 1 for i, ch in enumerate(text) if ch == "\r"]  # every chunk ends with a bare '\r'
    statements = check(text, cuts)
    assert [(s.source, s.lineno) for s in statements] == [("x = 1", 1), ("y = 2", 2), ("z = 3", 4)]
    splitter = StatementSplitter()
    splitter.feed("x = 1\r")
    splitter.feed("\ny = 2\r")
    out: list[Statement] = []
    drain(splitter, out)
    splitter.feed("\n")
    drain(splitter, out)
    assert [(s.source, s.lineno) for s in out] == [("x = 1", 1), ("y = 2", 2)]


def test_crlf_split_inside_triple_quoted_string() -> None:
    text = 's = """a\r\nb"""\ny = 1\n'
    statements = split(text, [9])  # first chunk 's = """a\r', second '\nb"""\ny = 1\n'
    assert [(s.source, s.lineno) for s in statements] == [('s = """a\r\nb"""', 1), ("y = 1", 3)]


def test_lone_cr_line_endings() -> None:
    text = "x = 1\ry = 2\rif y:\r    z = 3\rw = 4"
    for cuts in ([], per_char(text)):
        assert [s.lineno for s in check(text, cuts)] == [1, 2, 3, 5]


def test_unicode_identifiers_and_strings_use_character_columns() -> None:
    text = "名前 = 'héllo'; ñ = 1\nπ = '∂' + \"日本\"  # ünï\nif π:\n    δ = 'é'; ε = 2\nprint(名前, π)\n"
    for cuts in ([], per_char(text)):
        statements = check(text, cuts)
        second = statements[1]
        assert second.source == "ñ = 1"
        assert second.col_offset == text.index("ñ") and second.end_col_offset == text.index("ñ") + 5
        assert second.node.col_offset == len("名前 = 'héllo'; ".encode())  # ast itself counts bytes


def test_decorators_followed_by_def() -> None:
    text = "@dec\n# comment\n\n@tool(name='x')\nasync def f():\n    return 1\n@dataclass\nclass K:\n    a: int = 1\nx = 1\n"
    for cuts in ([], per_line(text), per_char(text)):
        statements = check(text, cuts)
        assert [type(s.node) for s in statements] == [ast.AsyncFunctionDef, ast.ClassDef, ast.Assign]
        assert len(statements[0].node.decorator_list) == 2  # type: ignore[attr-defined]


def test_decorated_def_is_pending_until_the_next_column0_line() -> None:
    splitter = StatementSplitter()
    splitter.feed("@dec\n")
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("def f():\n    pass\n")
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("f()\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and isinstance(item.node, ast.FunctionDef)
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "f()"


def test_continuations_with_column0_comments_in_between() -> None:
    text = (
        "if a:\n    x = 1\n# comment\nelif b:\n    x = 2\n\n# c2\nelse:\n    x = 3\n"
        "try:\n    pass\n# c\nexcept E:\n    pass\n# c\nelse:\n    pass\n\n# c\nfinally:\n    pass\n"
        "for i in y:\n    pass\n# c\nelse:\n    pass\n"
        "while 0:\n    pass\nelse:\n    pass\n"
        "y = 1\n"
    )
    for cuts in ([], per_line(text), per_char(text)):
        statements = check(text, cuts)
        assert [type(s.node) for s in statements] == [ast.If, ast.Try, ast.For, ast.While, ast.Assign]
    splitter = StatementSplitter()
    splitter.feed("if a:\n    x = 1\n# comment\n\n")
    assert splitter.next_statement() is NEED_DATA
    splitter.feed("else:\n    x = 2\n")
    assert splitter.next_statement() is NEED_DATA


def test_match_statement_versus_match_as_a_name() -> None:
    text = (
        "match x:\n    case 1:\n        y = 1\n# c\n    case [a, b]:\n        pass\n    case _:\n        pass\n"
        "match(x)\nmatch = 1\nmatch.attr = 2\nmatch[0] = 3\nprint(match)\n"
        "match (x):\n    case _:\n        pass\n"
        "z = 0\n"
    )
    for cuts in ([], per_line(text), per_char(text)):
        statements = check(text, cuts)
        assert [type(s.node).__name__ for s in statements] == [
            "Match", "Expr", "Assign", "Assign", "Assign", "Expr", "Match", "Assign",
        ]
    splitter = StatementSplitter()
    splitter.feed("match(x)\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and isinstance(item.node, ast.Expr)
    splitter.feed("match = 1\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and isinstance(item.node, ast.Assign)
    splitter.feed("match y:\n    case _:\n        pass\n")
    assert splitter.next_statement() is NEED_DATA


def test_prose_line_without_fences_raises_at_close() -> None:
    splitter = StatementSplitter()
    splitter.feed("Sure, I will look into that for you.\n")
    assert splitter.next_statement() is NEED_DATA
    splitter.close()
    with pytest.raises(CodeSyntaxError) as info:
        splitter.next_statement()
    assert info.value.lineno == 1


def test_unexpected_indent() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1\n    y = 2\nz = 3\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "x = 1"
    with pytest.raises(CodeSyntaxError) as info:
        splitter.next_statement()
    assert info.value.lineno == 2
    assert "indent" in str(info.value).lower()


def test_unterminated_triple_quoted_string_raises_at_close() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1\ns = '''abc\n\ny = 2\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "x = 1"
    assert splitter.next_statement() is NEED_DATA
    splitter.close()
    with pytest.raises(CodeSyntaxError) as info:
        splitter.next_statement()
    assert info.value.lineno == 2


def test_feed_after_close_raises() -> None:
    splitter = StatementSplitter()
    splitter.feed("x = 1\n")
    splitter.close()
    splitter.close()  # idempotent
    with pytest.raises(RuntimeError):
        splitter.feed("y = 2\n")
    item = splitter.next_statement()
    assert isinstance(item, Statement) and item.source == "x = 1"
    assert splitter.next_statement() is END


def test_empty_and_comment_only_responses() -> None:
    for text in ["", "\n\n", "# just a comment", "# c\n\n   \n"]:
        assert split(text) == [] and split(text, per_char(text)) == []


CORPUS = Path(__file__).parent / "corpus" / "llm_responses"


@pytest.mark.parametrize("path", sorted(CORPUS.glob("*.txt")) if CORPUS.is_dir() else [], ids=lambda p: p.name)
def test_corpus_responses_chunking_invariant(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    reference = outcome(text)
    assert reference[1] is None, reference
    assert outcome(text, per_char(text)) == reference
    assert outcome(text, per_line(text)) == reference
