"""The program runtime: markdown playbooks through an LLM (replayed), python playbooks, built-ins, agents."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import anyio
import pytest

from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import ToolCall, ToolCallInterceptor
from playbooks.llm import Cassette, CassetteError, LLMProvider, LLMRequest, ReplayProvider, Usage
from playbooks.program import (
    AgentMessage,
    DeadlockError,
    PlaybookRunError,
    ProgramInputError,
    ProgramIO,
    ProgramRuntime,
    RunEvent,
    parse_program,
)
from playbooks.program.prompt import system_prompt
from playbooks.program.runtime import (
    CodeFailed,
    CodeStatement,
    LLMCallStarted,
    MessageSent,
    PlaybookFinished,
    PlaybookFrame,
    PlaybookStarted,
    Printed,
    Said,
    StepStarted,
)

from runtime_modes import runtime_mode  # noqa: E402,F401  (every test in-process and isolated)

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class Capturing(LLMProvider):
    """Replays scripted responses (in small chunks) and keeps every request."""

    def __init__(self, responses: list[str]) -> None:
        self.inner = ReplayProvider(Cassette.from_responses(responses), match="none", chunk_size=(1, 5))
        self.requests: list[LLMRequest] = []

    def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        self.requests.append(request)
        return self.inner.stream(request)

    def last_user(self, index: int) -> str:
        text = self.requests[index].last_user_message()
        assert text is not None
        return text


def code(text: str) -> str:
    return "```python\n" + textwrap.dedent(text).strip("\n") + "\n```\n"


class Harness:
    def __init__(self, pb: str, responses: list[str], *, input: Any = None, **options: Any) -> None:
        self.program = parse_program(textwrap.dedent(pb), path="test.pb")
        self.llm = Capturing(responses)
        self.said: list[str] = []
        self.events: list[RunEvent] = []
        self.runtime = ProgramRuntime(
            self.program,
            llm=self.llm,
            io=ProgramIO(output=self.said.append, input=input),
            on_event=self.events.append,
            **options,
        )

    async def run(self, *args: Any, **kwargs: Any) -> Any:
        return (await self.runtime.run(*args, **kwargs)).value

    def of(self, kind: type[Any]) -> list[Any]:
        return [event for event in self.events if isinstance(event, kind)]


SIMPLE = """\
# Greeter
Greets people.

## Main($name)
### Steps
- Greet the person by name
- Return the greeting
"""


async def test_say_and_return() -> None:
    h = Harness(
        SIMPLE,
        [code('await Step("01")\ngreeting = f"Hello, {name}!"\nawait Say("user", greeting)\nawait Step("02")\nawait Return(greeting)')],
    )
    result = await h.runtime.run("Ada")
    assert result.value == "Hello, Ada!"
    assert (result.agent, result.playbook, result.llm_calls) == ("Greeter", "Main", 1)
    assert h.said == ["Hello, Ada!"] == list(result.said)
    assert [e.step_id for e in h.of(StepStarted)] == ["01", "02"]
    assert h.of(StepStarted)[0].text == "Greet the person by name"
    first = h.llm.last_user(0)
    assert "Run the playbook Main." in first and "01. Greet the person by name" in first
    assert "- name = 'Ada'" in first
    system = h.llm.requests[0].messages[0]
    assert system.role == "system" and "await Return(value)" in system.content


async def test_return_ends_the_playbook_at_once() -> None:
    h = Harness(SIMPLE, [code('await Return(1)\nawait Say("user", "never")\n')])
    assert await h.run(name="x") == 1
    assert h.said == []
    assert [e.source for e in h.of(CodeStatement)] == ["await Return(1)"]


async def test_keyword_and_missing_arguments() -> None:
    h = Harness(SIMPLE, [code("await Return(name)")])
    assert await h.run(name="Bo") == "Bo"
    h = Harness(SIMPLE, [])
    with pytest.raises(PlaybookRunError, match=r"Main\(name\) is missing arguments: name"):
        await h.run()


async def test_loop_over_several_responses_reports_state() -> None:
    pb = """\
    # Counter
    ```python
    @playbook
    async def Double(x):
        return 2 * x
    ```
    ## Main
    ### Steps
    - Double 1, 2 and 3
    - Return the total
    """
    h = Harness(
        pb,
        [
            code('await Step("01")\nresults = []\nfor i in [1, 2, 3]:\n    results.append(await Double(i))\nprint("so far", results)'),
            code('await Step("02")\nawait Return(sum(results))'),
        ],
    )
    assert await h.run() == 12
    second = h.llm.last_user(1)
    assert "Your code ran (4 statements)." in second
    assert "- Double(1) -> 2" in second and "- Double(3) -> 6" in second
    assert "Printed:\n  so far [2, 4, 6]" in second
    assert "Current step: 01." in second
    assert "- results = [2, 4, 6]" in second
    assert "Double =" not in second and "Step =" not in second  # tools are not variables
    assert [e.text for e in h.of(Printed)] == ["so far [2, 4, 6]"]
    # the conversation keeps the earlier response as an assistant message
    assert [m.role for m in h.llm.requests[1].messages] == ["system", "user", "assistant", "user"]


NESTED = """\
# Planner
```python
@playbook
async def Forecast(city):
    \"\"\"The forecast for a city.\"\"\"
    return {"Oslo": "rain", "Rome": "sun"}[city]

@playbook
async def Plan(cities):
    \"\"\"A python playbook calling a markdown one and a built-in.\"\"\"
    await Step("py")
    return [await Pack(city) for city in cities]
```

## Main
### Steps
- Plan for Oslo and Rome
- Tell the user
- Return the plan

## Pack($city)
Packs for a city.
### Steps
- Get the forecast
- Return the item
"""


async def test_nested_markdown_and_python_playbooks() -> None:
    pack = code('await Step("01")\nweather = await Forecast(city)\nawait Step("02")\nawait Return("umbrella" if weather == "rain" else "hat")')
    h = Harness(
        NESTED,
        [
            code('await Step("01")\nplan = await Plan(["Oslo", "Rome"])\nawait Step("02")\nawait Say("user", ", ".join(plan))\nawait Return(plan)'),
            pack,
            pack,
        ],
    )
    assert await h.run() == ["umbrella", "hat"]
    assert h.said == ["umbrella, hat"]
    started = [(e.playbook, e.kind, e.depth, dict(e.args)) for e in h.of(PlaybookStarted)]
    assert started == [
        ("Main", "markdown", 0, {}),
        ("Plan", "python", 1, {"cities": ["Oslo", "Rome"]}),
        ("Pack", "markdown", 2, {"city": "Oslo"}),
        ("Forecast", "python", 3, {"city": "Oslo"}),
        ("Pack", "markdown", 2, {"city": "Rome"}),
        ("Forecast", "python", 3, {"city": "Rome"}),
    ]
    finished = [(e.playbook, e.value) for e in h.of(PlaybookFinished)]
    assert finished[-1] == ("Main", ["umbrella", "hat"])
    assert ("Plan", "py") in [(e.playbook, e.step_id) for e in h.of(StepStarted)]
    # each child playbook is its own conversation, with a fresh namespace
    assert "Run the playbook Pack." in h.llm.last_user(1)
    assert "- city = 'Oslo'" in h.llm.last_user(1)
    assert "- city = 'Rome'" in h.llm.last_user(2)


async def test_python_main_runs_without_llm() -> None:
    pb = """\
    # Tool
    ```python
    @playbook(triggers=["At the beginning"])
    async def Start(n=2):
        await Say("user", f"n is {n}")
        return n * 10
    ```
    """
    h = Harness(pb, [])
    assert await h.run(3) == 30
    assert h.said == ["n is 3"]
    assert h.runtime.llm_calls == 0


async def test_python_playbook_error_goes_to_the_llm() -> None:
    pb = """\
    # A
    ```python
    @playbook
    async def Fetch(key):
        raise KeyError(key)
    ```
    ## Main
    Fetch something.
    """
    h = Harness(pb, [code('x = await Fetch("k")'), code('await Return("recovered")')])
    assert await h.run() == "recovered"
    feedback = h.llm.last_user(1)
    assert "Your code failed at line 2 of your response:\n    x = await Fetch(\"k\")" in feedback
    assert "KeyError: 'k'" in feedback
    assert "- Fetch('k') raised KeyError: 'k'" in feedback


async def test_code_error_is_sent_back_and_fixed_on_retry() -> None:
    h = Harness(
        SIMPLE,
        [
            code('await Step("01")\nparts = name.split()\ngreeting = "Hi " + parts[5]\nnever = 1'),
            code('greeting = "Hi " + parts[0]\nawait Return(greeting)'),
        ],
    )
    assert await h.run("Ada Lovelace") == "Hi Ada"
    feedback = h.llm.last_user(1)
    assert "Your code failed at line 4 of your response:" in feedback
    assert 'greeting = "Hi " + parts[5]' in feedback
    assert "IndexError: list index out of range" in feedback
    assert "The 2 statements before it ran" in feedback
    assert "(1 more failure allowed.)" in feedback
    assert "- parts = ['Ada', 'Lovelace']" in feedback
    failed = h.of(CodeFailed)
    assert [(e.lineno, e.retries_left) for e in failed] == [(4, 1)]


async def test_syntax_error_is_sent_back() -> None:
    h = Harness(SIMPLE, [code("x = 1\ny = (1 +\nz = 2\n"), code("await Return(x)")])
    assert await h.run("a") == 1
    feedback = h.llm.last_user(1)
    assert "Your code failed at line 3 of your response:\n    y = (1 +\nSyntaxError: '(' was never closed" in feedback
    assert "The statement before it ran" in feedback


async def test_retries_exhausted_fails_the_playbook() -> None:
    bad = code("1 / 0")
    h = Harness(SIMPLE, [bad, bad, bad], max_retries=2)
    with pytest.raises(PlaybookRunError) as info:
        await h.run("a")
    message = str(info.value)
    assert message.startswith("test.pb:4: playbook Greeter.Main failed")
    assert "failed 3 times in a row (max_retries=2)" in message
    assert "ZeroDivisionError" in message
    assert h.runtime.llm_calls == 3
    assert isinstance(h.of(PlaybookFinished)[-1].error, str)


async def test_failures_in_a_row_reset_after_success() -> None:
    bad = code("1 / 0")
    ok = code("x = 1")
    h = Harness(SIMPLE, [bad, ok, bad, code("await Return(5)")], max_retries=1)
    assert await h.run("a") == 5


async def test_llm_call_cap() -> None:
    h = Harness(SIMPLE, [code("x = 1")] * 5, max_llm_calls=3)
    with pytest.raises(PlaybookRunError, match=r"made 3 LLM calls without calling Return"):
        await h.run("a")


async def test_response_without_code_is_told_so() -> None:
    h = Harness(SIMPLE, ["", code("await Return(0)")])
    assert await h.run("a") == 0
    assert "Your response ran no code" in h.llm.last_user(1)


async def test_cassette_exhausted_is_a_clear_error() -> None:
    h = Harness(SIMPLE, [code("x = 1")])
    with pytest.raises(CassetteError, match="ran out"):
        await h.run("a")


async def test_cassette_exhausted_in_a_child_is_not_shown_to_the_llm() -> None:
    h = Harness(NESTED, [code('plan = await Pack("Oslo")')])
    with pytest.raises(CassetteError, match="ran out"):
        await h.run()
    assert len(h.llm.requests) == 2


async def test_child_failure_fails_the_parent() -> None:
    h = Harness(NESTED, [code('plan = await Pack("Oslo")'), code("1/0"), code("1/0")], max_retries=1)
    with pytest.raises(PlaybookRunError, match="Planner.Pack failed"):
        await h.run()


async def test_unknown_step_and_bad_target_go_to_the_llm() -> None:
    h = Harness(SIMPLE, [code('await Step("09")'), code('await Say("nobody", "hi")'), code("await Return(1)")])
    assert await h.run("a") == 1
    assert "playbook Main has no such step (its steps: 01, 02)" in h.llm.last_user(1)
    assert "no agent 'nobody'" in h.llm.last_user(2)


async def test_no_stream_mode() -> None:
    h = Harness(SIMPLE, [code('await Say("user", "one")\nawait Return(2)')], stream=False)
    assert await h.run("a") == 2
    assert h.said == ["one"]


async def test_events_in_order() -> None:
    h = Harness(SIMPLE, [code('await Step("01")\nawait Say("user", "hi")\nawait Return(None)')])
    await h.run("a")
    kinds = [type(e).__name__ for e in h.events]
    assert kinds == [
        "PlaybookStarted",
        "LLMCallStarted",
        "CodeStatement",
        "StepStarted",
        "CodeStatement",
        "Said",
        "CodeStatement",
        "LLMCallFinished",
        "PlaybookFinished",
    ]
    assert h.of(LLMCallStarted)[0].number == 1
    assert h.of(Said)[0] == Said("Greeter", "hi")


# --- user input ------------------------------------------------------------------------------------

ASK = """\
# Asker
## Main
### Steps
- Ask the user for their name
- Greet them
"""

ASK_CODE = code('name = await AskUser("Your name?")\nawait Say("user", f"Hi {name}")\nawait Return(name)')


async def test_ask_user_from_an_anyio_stream() -> None:
    send, receive = anyio.create_memory_object_stream[str](1)
    await send.send("Grace")
    h = Harness(ASK, [ASK_CODE], input=receive)
    assert await h.run() == "Grace"
    assert h.said == ["Your name?", "Hi Grace"]


async def test_ask_user_from_an_asyncio_queue() -> None:
    queue: asyncio.Queue[str] = asyncio.Queue()
    h = Harness(ASK, [ASK_CODE], input=queue)

    async def answer_later() -> None:
        await asyncio.sleep(0.01)
        await queue.put("Linus\n")

    task = asyncio.ensure_future(answer_later())
    assert await h.run() == "Linus"
    await task


async def test_ask_user_from_a_list_and_input_end() -> None:
    h = Harness(ASK, [ASK_CODE], input=["Ada"])
    assert await h.run() == "Ada"
    h = Harness(ASK, [ASK_CODE], input=[])
    with pytest.raises(ProgramInputError, match="no more answers"):
        await h.run()


async def test_async_output_callable() -> None:
    seen: list[str] = []

    async def output(text: str) -> None:
        await anyio.lowlevel.checkpoint()
        seen.append(text)

    program = parse_program(textwrap.dedent(SIMPLE), path="t.pb")
    runtime = ProgramRuntime(
        program, llm=Capturing([code('await Say("user", 42)\nawait Return(None)')]), io=ProgramIO(output=output)
    )
    await runtime.run("a")
    assert seen == ["42"]


# --- agents ----------------------------------------------------------------------------------------

TWO = """\
# Buyer
## Main
### Steps
- Ask the Seller for a price
- Tell the user
# Seller
```python
@playbook(public=True)
async def Catalog():
    \"\"\"What is for sale.\"\"\"
    return ["widget"]
```
## Main
### Steps
- Answer a request
"""


async def test_two_agents_exchange_messages() -> None:
    h = Harness(
        TWO,
        [
            # Buyer, first: sends, then waits for the answer
            code('items = await Seller.Catalog()\nawait SendMessage("Seller", f"price of {items[0]}?")\nreply = await WaitForMessage("Seller")'),
            # Seller, first: waits for a request
            code("request = await WaitForMessage()"),
            # Seller, second: sees the request in its state and answers
            code('await Say(request.sender, "5 coins")\nawait Return("answered")'),
            # Buyer, second
            code('await Say("user", f"The Seller says {reply.content}")\nawait Return(reply.content)'),
        ],
    )
    assert await h.run() == "5 coins"
    assert h.said == ["The Seller says 5 coins"]
    sent = [(e.sender, e.recipient, e.message) for e in h.of(MessageSent)]
    assert sent == [("Buyer", "Seller", "price of widget?"), ("Seller", "Buyer", "5 coins")]
    seller_second = h.llm.last_user(2)
    assert "- request = AgentMessage(sender='Buyer', content='price of widget?')" in seller_second
    assert "WaitForMessage() -> AgentMessage(sender='Buyer'" in seller_second
    assert ("Seller", "Main", "answered") in [(e.agent, e.playbook, e.value) for e in h.of(PlaybookFinished)]


async def test_idle_agents_end_with_the_run() -> None:
    h = Harness(
        TWO,
        [code('await SendMessage("Seller", "hi")\nawait Return("done")'), code("while True:\n    m = await WaitForMessage()\n")],
    )
    assert await h.run() == "done"


async def test_deadlock_is_detected() -> None:
    h = Harness(TWO, [code('m = await WaitForMessage("Seller")'), code('m = await WaitForMessage("Buyer")')])
    with anyio.fail_after(5):
        with pytest.raises(DeadlockError, match="every running agent waits for a message"):
            await h.run()


async def test_waiting_for_a_finished_agent_is_a_deadlock() -> None:
    h = Harness(TWO, [code('m = await WaitForMessage("Seller")'), code('await Return("gone")')])
    with anyio.fail_after(5):
        with pytest.raises(DeadlockError, match="Buyer waits for a message to Buyer from Seller"):
            await h.run()


async def test_unknown_public_playbook() -> None:
    # requests: Buyer's first, Seller's (returns at once), Buyer's second (after the error)
    h = Harness(TWO, [code("await Seller.Secret()"), code('await Return("seller")'), code('await Return("buyer")')])
    assert await h.run() == "buyer"
    assert "agent Seller has no public playbook 'Secret' (public playbooks: Catalog)" in h.llm.last_user(2)


def test_system_prompt_lists_playbooks_builtins_and_agents() -> None:
    program = parse_program(textwrap.dedent(TWO) + "## Hidden\nPrivate.\n", path="t.pb")
    text = system_prompt(program.agents[0], program.agents[1:])
    assert "You are Buyer" in text
    for builtin in ("Step(step_id)", "Say(target, message)", "AskUser(question)", "SendMessage(agent_name, message)"):
        assert builtin in text
    assert "WaitForMessage(from_agent=None)" in text and "Return(value)" in text
    assert "- await Main()" in text
    assert "- Seller" in text and "await Seller.Catalog(): What is for sale." in text
    assert "Hidden" not in text


def test_agent_code_failure_names_the_line() -> None:
    pb = "# A\n```python\nimport os\nx = 1 / 0\n@playbook\nasync def P():\n    pass\n```\n"
    with pytest.raises(PlaybookRunError, match=r"t.pb:4: the python code of agent A failed: ZeroDivisionError"):
        ProgramRuntime(parse_program(pb, path="t.pb"), llm=Capturing([]))


def test_start_playbook_with_arguments_for_a_second_agent_is_an_error() -> None:
    pb = "# A\n## Main\nGo.\n# B\n## Main($x)\nGo.\n"
    runtime = ProgramRuntime(parse_program(pb, path="t.pb"), llm=Capturing([]))
    with pytest.raises(Exception, match="only the first agent's start playbook gets arguments"):
        anyio.run(runtime.run)


# --- integration points ----------------------------------------------------------------------------


class RecordingInterceptor(ToolCallInterceptor):
    def __init__(self, log: list[str], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log = log

    async def call_async(self, call: ToolCall, fn: Callable[..., Awaitable[Any]]) -> Any:
        self.log.append(f"{call.idempotency_key} {call.name}")
        return await super().call_async(call, fn)


async def test_every_builtin_and_playbook_call_goes_through_the_interceptor() -> None:
    log: list[str] = []
    chunks_seen: list[str] = []

    class Durableish(ProgramRuntime):
        async def _new_executor(self, frame: PlaybookFrame, number: int, segment: int = 0) -> StreamingPythonExecutor:
            return StreamingPythonExecutor(
                frame.agent,
                namespace=frame.namespace,
                interceptor=RecordingInterceptor(log, run_id="r", frame_id=f"{frame.frame_id}/{number}"),
            )

        async def _stream_llm(self, request: LLMRequest, spent: list[Usage]) -> AsyncIterator[str]:
            async for chunk in super()._stream_llm(request, spent):
                chunks_seen.append(chunk)
                yield chunk

    pack = code('await Step("01")\nw = await Forecast(city)\nawait Return(w)')
    program = parse_program(textwrap.dedent(NESTED), path="t.pb")
    llm = Capturing([code('await Step("01")\nx = await Pack("Oslo")\nawait Say("user", x)\nawait Return(x)'), pack])
    runtime = Durableish(program, llm=llm, io=ProgramIO(output=lambda text: None), isolation=None)  # (its executors)
    assert (await runtime.run()).value == "rain"
    assert log == [
        "r:Planner/1:0 Step",
        "r:Planner/1:1 Pack",
        "r:Planner.1/1:0 Step",
        "r:Planner.1/1:1 Forecast",
        "r:Planner.1/1:2 Return",
        "r:Planner/1:2 Say",
        "r:Planner/1:3 Return",
    ]
    assert "".join(chunks_seen).count("```python") == 2


async def test_agent_message_str() -> None:
    assert str(AgentMessage("A", "hello")) == "hello"


@pytest.mark.parametrize(
    ("prefill", "lead", "rest", "failing", "col"),
    [
        # The usual cut: the prefill ends after a statement (no newline), the rest starts a new line.
        ('```python\nawait Step("01")\nx = 1', "```python\n", "\ny = 2\nz = nope\n", "z = nope", 4),
        # The rest's first line continues the prefill's last line: the column moves too.
        ('```python\nx = 1\ny = ', "```python\n", "nope\n", "y = nope", 4),
        # A cut outside the code fence: no lead is fed.
        ("Here:\n```python\nx = 1\n```\nmore ", "", "\n```python\nz = nope\n", "z = nope", 4),
    ],
)
def test_continued_segment_errors_count_from_the_whole_message(
    prefill: str, lead: str, rest: str, failing: str, col: int
) -> None:
    """What the segment's executor reports, moved to where the failing text is in prefill + rest."""
    from playbooks.errors import CodeExecutionError
    from playbooks.program.runtime import _in_whole_response

    segment = lead + rest
    seg_line = next(i for i, text in enumerate(segment.splitlines(), 1) if "nope" in text)
    seg_col = segment.splitlines()[seg_line - 1].index("nope")
    cause = NameError("name 'nope' is not defined")
    error = CodeExecutionError("NameError: boom", statement=failing, lineno=seg_line, col_offset=seg_col,
                               executed_code=lead)
    error.__cause__ = cause
    moved = _in_whole_response(error, prefill, lead)
    whole = (prefill + rest).splitlines()
    assert whole[moved.lineno - 1] == failing and moved.col_offset == col  # type: ignore[operator]
    assert whole[moved.lineno - 1][moved.col_offset :].startswith("nope")  # type: ignore[index]
    assert moved.executed_code == prefill and moved.__cause__ is cause and type(moved) is CodeExecutionError
    assert (error.lineno, error.col_offset) == (seg_line, seg_col)  # the segment's own error is left as it was
