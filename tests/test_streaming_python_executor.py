"""Tests of StreamingPythonExecutor (runs on asyncio and trio via the anyio plugin)."""

from __future__ import annotations

import contextlib
import random

import pytest

from playbooks.agent import Agent
from playbooks.errors import (
    CodeExecutionError,
    CodeSyntaxError,
    ExecutorStateError,
    InterpreterError,
    LLMCodeError,
    PlaybooksError,
)
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request):
    return request.param


def chunks_of(text: str, mode: str) -> list[str]:
    if mode == "whole":
        return [text]
    if mode == "char":
        return list(text)
    rng = random.Random(len(text) * 7919 + sum(map(ord, text)))
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 7)
        out.append(text[i : i + n])
        i += n
    return out


CHUNKING = pytest.mark.parametrize("mode", ["whole", "char", "random"])


async def feed_all(ex: StreamingPythonExecutor, text: str, mode: str) -> None:
    for c in chunks_of(text, mode):
        await ex.add_chunk(c)


def make(log: list | None = None, **extra) -> StreamingPythonExecutor:
    log = log if log is not None else []
    tools = {"Note": log.append, **extra}
    return StreamingPythonExecutor(Agent("a1", tools))


# --------------------------------------------------------------------------- streaming


@CHUNKING
async def test_statement_runs_as_soon_as_complete(mode):
    log: list = []
    ex = make(log)
    first = "Note(1)\n"
    second = "Note(2)\n"
    await feed_all(ex, first, mode)
    assert log == [1]  # ran before any of statement 2 was fed
    for c in chunks_of(second, mode)[:-1]:
        await ex.add_chunk(c)
        assert log == [1]
    await ex.add_chunk(chunks_of(second, mode)[-1])
    assert log == [1, 2]
    res = await ex.finalize()
    assert res.success and res.statements_executed == 2
    assert res.executed_code == (first + second).rstrip("\n")  # ends at the statement's end


async def test_statement_after_indented_block_newline_chunks():
    log: list = []
    ex = make(log)
    lines = ["for i in range(2):\n", "    Note(i)\n", "Note('after')\n", "x = 5\n"]
    await ex.add_chunk(lines[0])
    await ex.add_chunk(lines[1])
    assert log == []  # block still pending
    await ex.add_chunk(lines[2])
    assert log == [0, 1, "after"]
    await ex.add_chunk(lines[3])
    assert ex.namespace["x"] == 5
    res = await ex.finalize()
    assert res.success and res.statements_executed == 3


@CHUNKING
async def test_trailing_compound_runs_at_finalize(mode):
    log: list = []
    ex = make(log)
    await feed_all(ex, "Note('a')\nif True:\n    Note('b')\n", mode)
    assert log == ["a"]
    res = await ex.finalize()
    assert log == ["a", "b"]
    assert res.success and res.statements_executed == 2


@CHUNKING
async def test_trailing_simple_statement_without_newline(mode):
    ex = make()
    await feed_all(ex, "x = 1\ny = x + 1", mode)
    res = await ex.finalize()
    assert res.success and ex.namespace["y"] == 2


# --------------------------------------------------------------------------- syntax errors


@CHUNKING
async def test_syntax_error_midstream(mode):
    log: list = []
    ex = make(log)
    good = "Note(1)\nNote(2)\n"
    bad = "x = (1 +* 2)\n"
    later = "Note(3)\n"
    await feed_all(ex, good, mode)
    with pytest.raises(CodeSyntaxError) as info:
        await feed_all(ex, bad, mode)
    err = info.value
    assert err.lineno == 3
    assert err.col_offset is not None and 0 <= err.col_offset < len(bad)
    assert log == [1, 2]
    await feed_all(ex, later, mode)  # recorded, nothing runs, no raise
    assert log == [1, 2]
    res = await ex.finalize()
    assert res.success is False
    assert res.error is err
    assert res.executed_code == good.rstrip("\n")
    assert err.executed_code == good.rstrip("\n")
    assert res.response == good + bad + later


async def test_syntax_error_column_is_absolute():
    ex = make()
    await ex.add_chunk("a = 1\n")
    with pytest.raises(CodeSyntaxError) as info:
        await ex.add_chunk("b = 2 3\n")
    try:
        compile("b = 2 3\n", "x", "exec")
    except SyntaxError as exc:
        expected_col = exc.offset - 1
    assert info.value.lineno == 2
    assert info.value.col_offset == expected_col


# --------------------------------------------------------------------------- runtime errors


@CHUNKING
async def test_runtime_error(mode):
    log: list = []
    ex = make(log)
    text = "Note(1)\ny = 1 / 0\nNote(2)\n"
    with pytest.raises(CodeExecutionError) as info:
        await feed_all(ex, text, mode)
    err = info.value
    assert err.statement == "y = 1 / 0"
    assert err.lineno == 2
    assert isinstance(err.__cause__, ZeroDivisionError)
    assert "y = 1 / 0" in err.traceback_text
    assert "ZeroDivisionError" in err.traceback_text
    assert log == [1]
    res = await ex.finalize()
    assert not res.success and res.error is err
    assert res.executed_code == "Note(1)"
    assert "y" not in ex.namespace


@CHUNKING
async def test_runtime_error_inside_llm_defined_function(mode):
    log: list = []
    ex = make(log)
    text = (
        "def f(v):\n"
        "    w = v + 1\n"
        "    raise ValueError('boom ' + str(w))\n"
        "Note('defined')\n"
        "f(1)\n"
        "Note('never')\n"
    )
    with pytest.raises(CodeExecutionError) as info:
        await feed_all(ex, text, mode)
    err = info.value
    assert err.lineno == 3  # the failing line inside the LLM's function
    assert err.statement == "f(1)"
    assert isinstance(err.__cause__, ValueError)
    assert "raise ValueError('boom ' + str(w))" in err.traceback_text
    assert "f(1)" in err.traceback_text
    assert log == ["defined"]
    res = await ex.finalize()
    assert not res.success
    assert res.executed_code == text[: text.index("f(1)") - 1]


async def test_runtime_error_inside_llm_function_lineno_is_failing_line():
    ex = make()
    text = "def f(v):\n    w = v + 1\n    raise ValueError(w)\nx = 0\nf(1)\n"
    with pytest.raises(CodeExecutionError) as info:
        await ex.add_chunk(text)
    assert info.value.lineno == 3


async def test_multiline_statement_lineno_is_failing_line():
    ex = make()
    with pytest.raises(CodeExecutionError) as info:
        await ex.add_chunk("a = 1\nb = [\n    1,\n    1 / 0,\n]\n")
    assert info.value.lineno == 4
    assert info.value.statement.startswith("b = [")


async def test_runtime_error_in_tool_has_lineno_of_call():
    def Fail():
        raise KeyError("k")

    ex = make(Fail=Fail)
    with pytest.raises(CodeExecutionError) as info:
        await ex.add_chunk("a = 1\n\nFail()\n")
    assert info.value.lineno == 3
    assert isinstance(info.value.__cause__, KeyError)


# --------------------------------------------------------------------------- text shapes


@CHUNKING
async def test_blank_lines_and_comments(mode):
    log: list = []
    ex = make(log)
    text = "# header\n\nNote(1)  # trailing\n\n   \n# between\nNote(2)\n# end\n"
    await feed_all(ex, text, mode)
    res = await ex.finalize()
    assert res.success and log == [1, 2] and res.statements_executed == 2


@CHUNKING
async def test_fenced_code_with_prose(mode):
    log: list = []
    ex = make(log)
    text = (
        "Sure, here is the plan:\n"
        "\n"
        "```python\n"
        "Note('in')\n"
        "z = 1 / 0\n"
        "```\n"
        "And some closing prose.\n"
    )
    with pytest.raises(CodeExecutionError) as info:
        await feed_all(ex, text, mode)
    assert info.value.lineno == 5
    assert log == ["in"]
    res = await ex.finalize()
    assert not res.success


@CHUNKING
async def test_fenced_only_fenced_code_runs(mode):
    log: list = []
    ex = make(log)
    text = (
        "Let me do this. It will work.\n"
        "```python\n"
        "a = 1\n"
        "Note(a)\n"
        "```\n"
        "Then prose with code-like words: print(x) is fine.\n"
    )
    await feed_all(ex, text, mode)
    res = await ex.finalize()
    assert res.success, res.error
    assert log == [1]
    assert res.statements_executed == 2


@CHUNKING
async def test_crlf(mode):
    log: list = []
    ex = make(log)
    text = "a = 1\r\nif a:\r\n    Note('x')\r\nNote('y')\r\nb = a + 1\r\n"
    await feed_all(ex, text, mode)
    res = await ex.finalize()
    assert res.success, res.error
    assert log == ["x", "y"] and ex.namespace["b"] == 2


async def test_crlf_error_lineno():
    ex = make()
    with pytest.raises(CodeExecutionError) as info:
        await feed_all(ex, "a = 1\r\n\r\nb = undefined_name\r\n", "char")
    assert info.value.lineno == 3
    assert isinstance(info.value.__cause__, NameError)


@CHUNKING
async def test_unicode(mode):
    log: list = []
    ex = make(log)
    text = "café = 'naïve ☕ 日本語'\nπ = 3\nNote(café + str(π))\n"
    await feed_all(ex, text, mode)
    res = await ex.finalize()
    assert res.success
    assert log == ["naïve ☕ 日本語3"]
    assert ex.namespace["π"] == 3


async def test_unicode_error_position():
    ex = make()
    await ex.add_chunk("ü = 'ä'\n")
    with pytest.raises(CodeExecutionError) as info:
        await ex.add_chunk("é = ü + 1\n")
    assert info.value.lineno == 2
    assert "é = ü + 1" in info.value.traceback_text


# --------------------------------------------------------------------------- bindings


@CHUNKING
async def test_binding_forms(mode):
    ex = make(Ctx=contextlib.nullcontext)
    text = (
        "import math\n"
        "from os import path as p\n"
        "a, (b, c) = 1, (2, 3)\n"
        "for i in range(3):\n"
        "    pass\n"
        "if (w := 10) > 5:\n"
        "    pass\n"
        "with Ctx(42) as cm:\n"
        "    pass\n"
        "class CM:\n"
        "    def __enter__(self):\n"
        "        return 'entered'\n"
        "    def __exit__(self, *a):\n"
        "        return False\n"
        "with CM() as (cm2):\n"
        "    pass\n"
        "try:\n"
        "    raise ValueError('v')\n"
        "except ValueError as e:\n"
        "    saved = e\n"
        "def g():\n"
        "    global gv\n"
        "    gv = 'set'\n"
        "g()\n"
        "class K:\n"
        "    attr = 1\n"
        "x: int = 7\n"
        "del_me = 1\n"
        "del del_me\n"
    )
    await feed_all(ex, text, mode)
    res = await ex.finalize()
    assert res.success, res.error
    ns = ex.namespace
    assert ns["math"].sqrt(4) == 2
    assert callable(ns["p"].join)
    assert (ns["a"], ns["b"], ns["c"]) == (1, 2, 3)
    assert ns["i"] == 2
    assert ns["w"] == 10
    assert ns["cm"] == 42
    assert ns["cm2"] == "entered"
    assert "e" not in ns  # Python deletes the except name after the block
    assert isinstance(ns["saved"], ValueError)
    assert ns["gv"] == "set"
    assert ns["K"].attr == 1 and callable(ns["g"])
    assert ns["x"] == 7
    assert "del_me" not in ns


# --------------------------------------------------------------------------- await and tools


@CHUNKING
async def test_top_level_await_async_and_sync_tool(mode, anyio_backend):
    import anyio

    calls: list = []

    async def Fetch(v):
        await anyio.sleep(0)
        calls.append(("fetch", v))
        return v * 2

    def Add(a, b):
        calls.append(("add", a, b))
        return a + b

    ex = make(Fetch=Fetch, Add=Add)
    text = "r = await Fetch(3)\ns = Add(r, 1)\nasync def h():\n    return await Fetch(s)\nt = await h()\n"
    await feed_all(ex, text, mode)
    res = await ex.finalize()
    assert res.success, res.error
    assert ex.namespace["r"] == 6 and ex.namespace["s"] == 7 and ex.namespace["t"] == 14
    assert calls == [("fetch", 3), ("add", 6, 1), ("fetch", 7)]


async def test_tools_visible_by_name():
    def Alpha():
        return "a"

    async def Beta():
        return "b"

    ex = make(Alpha=Alpha, Beta=Beta)
    for name in ("Alpha", "Beta", "Note"):
        assert name in ex.namespace and ex.namespace[name].__name__ == name
    await ex.add_chunk("out = [Alpha(), await Beta(), Alpha.__name__]\n")
    assert ex.namespace["out"] == ["a", "b", "Alpha"]


async def test_shared_namespace_between_executors():
    ns: dict = {}
    agent = Agent("shared", {})
    ex1 = StreamingPythonExecutor(agent, namespace=ns)
    await ex1.add_chunk("counter = 1\ndef inc():\n    global counter\n    counter += 1\n")
    assert (await ex1.finalize()).success
    ex2 = StreamingPythonExecutor(agent, namespace=ns)
    assert ex2.namespace is ns
    await ex2.add_chunk("inc()\nresult = counter\n")
    res = await ex2.finalize()
    assert res.success and ns["result"] == 2
    assert ex1.filename != ex2.filename


async def test_on_statement_callback():
    seen: list = []
    ex = StreamingPythonExecutor(Agent("cb", {}), on_statement=lambda s: seen.append(s.source))
    await ex.add_chunk("a = 1\nb = 2\n")
    await ex.finalize()
    assert seen == ["a = 1", "b = 2"]


# --------------------------------------------------------------------------- lifecycle


@CHUNKING
async def test_set_llm_response_then_finalize(mode):
    log: list = []
    ex = make(log)
    full = "Note(1)\nNote(2)\nfor k in 'ab':\n    Note(k)\n"
    part = full[:10]
    await feed_all(ex, part, mode)
    assert log == [1]
    ex.set_llm_response(full)
    res = await ex.finalize()
    assert res.success
    assert log == [1, 2, "a", "b"]
    assert res.response == full and res.executed_code == full.rstrip("\n")


async def test_set_llm_response_with_error_in_remainder():
    log: list = []
    ex = make(log)
    ex.set_llm_response("Note(1)\nboom()\nNote(2)\n")
    res = await ex.finalize()  # not raised
    assert not res.success
    assert isinstance(res.error, CodeExecutionError)
    assert res.error.lineno == 2
    assert log == [1]


async def test_set_llm_response_not_prefix():
    ex = make()
    await ex.add_chunk("a = 1\n")
    with pytest.raises(ExecutorStateError):
        ex.set_llm_response("b = 1\n")


async def test_add_chunk_after_finalize():
    ex = make()
    await ex.add_chunk("a = 1\n")
    res1 = await ex.finalize()
    with pytest.raises(ExecutorStateError):
        await ex.add_chunk("b = 2\n")
    res2 = await ex.finalize()  # idempotent
    assert res1.success and res2.success and res2.statements_executed == 1


async def test_empty_chunk_and_empty_response():
    ex = make()
    await ex.add_chunk("")
    res = await ex.finalize()
    assert res.success and res.statements_executed == 0 and res.executed_code == ""


async def test_error_hierarchy():
    assert issubclass(CodeSyntaxError, LLMCodeError)
    assert issubclass(CodeExecutionError, LLMCodeError)
    assert issubclass(ExecutorStateError, InterpreterError)
    assert issubclass(ExecutorStateError, PlaybooksError)
    assert not issubclass(ExecutorStateError, LLMCodeError)
    ex = make()
    await ex.add_chunk("a = 1\n")
    with pytest.raises(LLMCodeError):
        await ex.add_chunk("x = )\n")
    ex2 = make()
    with pytest.raises(LLMCodeError):
        await ex2.add_chunk("raise RuntimeError('r')\n")
    assert "line 1" in str(ex2.error)


_DIRECT_SHAPES = [
    "await Work()", "await Work(1)", "x = await Work(a, b=2)", "x=await  Work ('s')", "await Work(1)(2)",
    "await Work(f(1))", "x = await Work(1) + 1", "x = await Work(1) or (2)", "x = y = await Work(1)",
    "x: int = await Work(1)", "x += await Work(1)", "await Other(1)", "await work(1)", "x = await Work(1).y()",
    "x = await Work(await Work(1))", "x = await Work('await')", "x = await Work('(')", "await Work(\n  1,\n)",
    "await Work(\n  1,  # (one)\n)", "x = await Work[0](1)", "x.y = await Work(1)", "await Work(*a, **k)",
    "await Work(lambda: 1)", "await Work([1, (2)])", "await Work(1); y = 2",
]


@pytest.mark.parametrize("source", _DIRECT_SHAPES)
def test_direct_tool_shortcut_agrees_with_the_tree(source: str) -> None:
    """The regular expression's answer for a statement is the tree's, on shapes around the direct one."""
    import ast

    from playbooks.execution.statement_splitter import StatementSplitter
    from playbooks.execution.streaming_python_executor import _direct_tool, _direct_tool_of_tree

    async def Work(x: object = None) -> object:
        return x

    bound = {"Work": Work, "Other": Work}
    namespace: dict[str, object] = {"Work": Work, "Other": len}  # Other was rebound by the code
    splitter = StatementSplitter()
    splitter.feed(source + "\n")
    splitter.close()
    for node in ast.parse(source).body:
        statement = splitter.next_statement()
        assert _direct_tool(statement, namespace, bound) == _direct_tool_of_tree(node, namespace, bound)  # type: ignore[arg-type]
