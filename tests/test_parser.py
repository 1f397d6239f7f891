"""Tests of the .pb parser: a realistic multi-agent program, the format's corner cases, every error."""

from __future__ import annotations

import hashlib
import pickle
import textwrap
import warnings
from pathlib import Path

import pytest

import playbooks.program as program_pkg
from playbooks.errors import PlaybooksError
from playbooks.program import (
    AgentSpec,
    CodeBlock,
    PlaybookSpec,
    Program,
    ProgramError,
    ProgramParseError,
    ProgramWarning,
    Step,
    load_program,
    parse_program,
)

SHOP = '''\
# OrderAssistant
Helps customers check on their orders.
Speaks politely.

```python
import json

@playbook(triggers=["When the user asks for an order's status"], public=True)
async def LookupOrder(order_id: str, *, verbose: bool = False) -> dict:
    """Fetch an order from the order service."""
    return json.loads(await Fetch(order_id))

def _helper():
    # a comment that looks like a heading
    return 1
```

## Main
Greets the user and routes the request.

### Triggers
- At the beginning

### Steps
1. Greet the user
2. Ask for their order number
   - If they do not know it,
     ask for their email instead
   - Look the order up with LookupOrder
     - Retry once on failure
3. Tell them the status

### Notes
- Never reveal internal ids
- Be brief
  - one sentence when possible

Escalate when the customer is angry.

## Refund($order_id, $reason)
Refunds an order.

### Steps
- Check the order is refundable
- Issue the refund:
  ```python
  await IssueRefund(order_id)
  ```
- Confirm to the user

# Reporter
Writes a daily report.

## Python playbooks
Helpers used by the report.

```python
@playbook
async def Summarize(text):
    """Summarize some text."""
    return text[:100]

@playbook(triggers="At the end of the day")
async def Publish(report, channel="#general"):
    return None
```

## Daily
### Triggers
- At the beginning
### Steps
- Gather yesterday's orders
- Summarize them with Summarize
'''


@pytest.fixture
def shop() -> Program:
    return parse_program(SHOP, path="shop.pb")


def _parse_error(text: str) -> ProgramParseError:
    with pytest.raises(ProgramParseError) as info:
        parse_program(textwrap.dedent(text), path="agent.pb")
    return info.value


# --- a realistic program ---------------------------------------------------------------------------


def test_agents_in_file_order(shop: Program) -> None:
    assert [agent.name for agent in shop.agents] == ["OrderAssistant", "Reporter"]
    assert shop.path == "shop.pb"
    assert shop.source_hash == hashlib.sha256(SHOP.encode()).hexdigest()
    assert shop.agents[0].line == 1
    assert shop.agents[1].line == SHOP.splitlines().index("# Reporter") + 1


def test_agent_description_excludes_python_blocks(shop: Program) -> None:
    assert shop.agent("OrderAssistant").description == (
        "Helps customers check on their orders.\nSpeaks politely."
    )


def test_playbooks_in_file_order(shop: Program) -> None:
    assert list(shop.agent("OrderAssistant").playbooks) == ["LookupOrder", "Main", "Refund"]
    assert list(shop.agent("Reporter").playbooks) == ["Summarize", "Publish", "Daily"]


def test_markdown_playbook(shop: Program) -> None:
    main = shop.agent("OrderAssistant").playbooks["Main"]
    assert main.kind == "markdown"
    assert main.params == []
    assert main.description == "Greets the user and routes the request."
    assert main.triggers == ["At the beginning"]
    assert main.python_source is None
    assert main.line == SHOP.splitlines().index("## Main") + 1
    assert main.notes == [
        "Never reveal internal ids",
        "Be brief\n  - one sentence when possible",
        "Escalate when the customer is angry.",
    ]


def test_nested_steps_get_stable_ids(shop: Program) -> None:
    main = shop.agent("OrderAssistant").playbooks["Main"]
    lines = SHOP.splitlines()
    assert [(step.id, step.text) for step in main.iter_steps()] == [
        ("01", "Greet the user"),
        ("02", "Ask for their order number"),
        ("02.01", "If they do not know it, ask for their email instead"),
        ("02.02", "Look the order up with LookupOrder"),
        ("02.02.01", "Retry once on failure"),
        ("03", "Tell them the status"),
    ]
    assert [step.id for step in main.steps] == ["01", "02", "03"]
    second = main.steps[1]
    assert second.line == lines.index("2. Ask for their order number") + 1
    assert second.children[0].line == lines.index("   - If they do not know it,") + 1
    found = main.find_step("02.02.01")
    assert found is not None and found.text == "Retry once on failure"
    assert main.find_step("09") is None


def test_playbook_with_arguments_and_code_in_a_step(shop: Program) -> None:
    refund = shop.agent("OrderAssistant").playbooks["Refund"]
    assert refund.params == ["order_id", "reason"]
    assert refund.triggers == []
    assert refund.notes == []
    assert [step.text for step in refund.steps] == [
        "Check the order is refundable",
        "Issue the refund:\n```python\nawait IssueRefund(order_id)\n```",
        "Confirm to the user",
    ]


def test_python_playbook_at_agent_level(shop: Program) -> None:
    lookup = shop.agent("OrderAssistant").playbooks["LookupOrder"]
    lines = SHOP.splitlines()
    assert lookup.kind == "python"
    assert lookup.params == ["order_id", "verbose"]
    assert lookup.description == "Fetch an order from the order service."
    assert lookup.triggers == ["When the user asks for an order's status"]
    assert lookup.public is True
    assert lookup.steps == [] and lookup.notes == []
    decorator = '@playbook(triggers=["When the user asks for an order\'s status"], public=True)'
    assert lookup.line == lines.index(decorator) + 1
    assert lookup.python_source is not None
    assert lookup.python_source.startswith("@playbook(triggers=")
    assert lookup.python_source.endswith("return json.loads(await Fetch(order_id))\n")
    assert "_helper" not in lookup.python_source
    # python_source line k is file line lookup.line + k - 1
    assert lookup.python_source.splitlines()[1] == lines[lookup.line]


def test_agent_code_blocks_keep_imports_and_helpers(shop: Program) -> None:
    agent = shop.agent("OrderAssistant")
    assert len(agent.code_blocks) == 1
    block = agent.code_blocks[0]
    lines = SHOP.splitlines()
    assert block.line == lines.index("import json") + 1
    assert block.source.startswith("import json\n")
    assert "def _helper():" in block.source
    compile(block.source, "shop.pb", "exec")


def test_python_playbooks_under_their_own_heading(shop: Program) -> None:
    reporter = shop.agent("Reporter")
    summarize = reporter.playbooks["Summarize"]
    publish = reporter.playbooks["Publish"]
    assert summarize.kind == publish.kind == "python"
    assert summarize.description == "Summarize some text."
    assert publish.params == ["report", "channel"]
    assert publish.triggers == ["At the end of the day"]
    assert publish.public is False
    assert "Python playbooks" not in reporter.playbooks
    assert len(reporter.code_blocks) == 1


def test_main_playbook_lookup(shop: Program) -> None:
    assert shop.agent("OrderAssistant").main_playbook().name == "Main"
    assert shop.agent("Reporter").main_playbook().name == "Daily"  # triggered "At the beginning"


def test_main_playbook_missing_is_a_program_error() -> None:
    agent = parse_program("# A\n## Helper\nDoes things.\n").agents[0]
    with pytest.raises(ProgramError, match="agent 'A' .* expected '## Main'"):
        agent.main_playbook()


def test_unknown_agent_lookup(shop: Program) -> None:
    with pytest.raises(ProgramError, match="no agent 'Nope' in shop.pb .*OrderAssistant, Reporter"):
        shop.agent("Nope")


def test_program_pickles(shop: Program) -> None:
    assert pickle.loads(pickle.dumps(shop)) == shop


def test_public_api() -> None:
    assert {
        "AgentSpec",
        "CodeBlock",
        "PlaybookSpec",
        "Program",
        "ProgramError",
        "ProgramParseError",
        "ProgramWarning",
        "Step",
        "load_program",
        "parse_program",
    } <= set(program_pkg.__all__)
    assert len(program_pkg.__all__) == len(set(program_pkg.__all__))
    for name in program_pkg.__all__:
        assert hasattr(program_pkg, name)
    assert issubclass(ProgramParseError, PlaybooksError)
    assert issubclass(ProgramParseError, ProgramError)


# --- format details -------------------------------------------------------------------------------


def test_headings_inside_fences_are_ignored() -> None:
    text = textwrap.dedent(
        """\
        # Agent
        ```
        # NotAnAgent
        ## NotAPlaybook
        ```

        ## Main
        ~~~markdown
        ### Steps
        # also not a heading
        ~~~
        ### Steps
        - Do it
          ````text
          ## not a playbook, ``` not a closing fence
          ```
          ````
        """
    )
    program = parse_program(text)
    assert [agent.name for agent in program.agents] == ["Agent"]
    assert list(program.agents[0].playbooks) == ["Main"]
    main = program.agents[0].playbooks["Main"]
    assert main.description.startswith("~~~markdown\n### Steps")
    assert "# NotAnAgent" in program.agents[0].description
    assert [step.id for step in main.iter_steps()] == ["01"]
    assert "## not a playbook" in main.steps[0].text


def test_crlf_and_cr_line_endings() -> None:
    lf = "# A\nDesc.\n\n## Main($x)\n### Steps\n- One\n  - Two\n- Three\n"
    crlf = parse_program(lf.replace("\n", "\r\n"))
    cr = parse_program(lf.replace("\n", "\r"))
    plain = parse_program(lf)
    for program in (crlf, cr):
        assert program.agents == plain.agents
    main = crlf.agents[0].playbooks["Main"]
    assert [(s.id, s.text, s.line) for s in main.iter_steps()] == [
        ("01", "One", 6),
        ("01.01", "Two", 7),
        ("02", "Three", 8),
    ]
    assert "\r" not in crlf.agents[0].description


def test_crlf_python_block_line_numbers() -> None:
    text = "# A\r\n```python\r\n\r\n@playbook\r\nasync def Go():\r\n    pass\r\n```\r\n"
    spec = parse_program(text).agents[0].playbooks["Go"]
    assert spec.line == 4
    assert spec.python_source == "@playbook\nasync def Go():\n    pass\n"


def test_bom_is_ignored() -> None:
    assert parse_program("\ufeff# A\n## Main\nGo.\n").agents[0].name == "A"


def test_main_without_parens_and_empty_parens() -> None:
    agent = parse_program("# A\n## Main\nGo.\n## Other()\nMore.\n## Spaced( $a ,$b )\nX.\n").agents[0]
    assert agent.playbooks["Main"].params == []
    assert agent.playbooks["Other"].params == []
    assert agent.playbooks["Spaced"].params == ["a", "b"]


def test_heading_closing_hashes_and_deep_headings_are_text() -> None:
    agent = parse_program("# A ##\n## Main ##\nIntro.\n#### Detail\nMore.\n").agents[0]
    assert agent.name == "A"
    assert agent.playbooks["Main"].description == "Intro.\n#### Detail\nMore."


def test_singular_and_lowercase_section_names() -> None:
    text = "# A\n## Main\n### trigger\n- At the beginning\n### STEP\n- Go\n### note\n- N\n"
    spec = parse_program(text).agents[0].playbooks["Main"]
    assert (spec.triggers, [s.text for s in spec.steps], spec.notes) == (["At the beginning"], ["Go"], ["N"])


def test_step_markers_and_continuations() -> None:
    text = textwrap.dedent(
        """\
        # A
        ## Main
        ### Steps
        * star
        + plus
        7) paren
        - wrapped
        line
        - with a paragraph

          continued after a blank line
        \t- tab-indented child
        """
    )
    steps = parse_program(text).agents[0].playbooks["Main"].steps
    assert [s.text for s in steps] == [
        "star",
        "plus",
        "paren",
        "wrapped line",
        "with a paragraph\ncontinued after a blank line",
    ]
    assert [c.text for c in steps[4].children] == ["tab-indented child"]
    assert steps[4].children[0].id == "05.01"


def test_many_steps_keep_unique_ids() -> None:
    body = "".join(f"- step {n}\n" for n in range(1, 102))
    steps = parse_program("# A\n## Main\n### Steps\n" + body).agents[0].playbooks["Main"].steps
    assert [s.id for s in steps[:2]] == ["01", "02"]
    assert steps[99].id == "100"
    assert len({s.id for s in steps}) == 101


def test_notes_paragraphs_and_code() -> None:
    text = "# A\n## Main\nGo.\n### Notes\nFirst paragraph\nwraps.\n\n```json\n{\"a\": 1}\n```\n\n- bullet\n"
    notes = parse_program(text).agents[0].playbooks["Main"].notes
    assert notes == ["First paragraph wraps.", '```json\n{"a": 1}\n```', "bullet"]


def test_python_heading_naming_its_function_lends_its_description() -> None:
    text = textwrap.dedent(
        """\
        # A
        ## GetWeather($city)
        Looks up the weather.
        ```python
        @playbook
        async def GetWeather(city):
            return "sunny"
        ```
        """
    )
    spec = parse_program(text).agents[0].playbooks["GetWeather"]
    assert spec.kind == "python"
    assert spec.description == "Looks up the weather."
    assert spec.line == 5


def test_decorator_forms_and_parameters() -> None:
    text = textwrap.dedent(
        """\
        # A
        ```py
        import playbooks

        @playbooks.playbook
        async def One(a, /, b, *args, c, **kwargs):
            pass

        @other
        @playbook()
        async def Two():
            '''Doc.'''

        async def not_a_playbook():
            pass

        @playbook
        class NotAFunction:
            pass
        ```
        """
    )
    agent = parse_program(text).agents[0]
    assert list(agent.playbooks) == ["One", "Two"]
    assert agent.playbooks["One"].params == ["a", "b", "*args", "c", "**kwargs"]
    assert agent.playbooks["Two"].python_source == "@other\n@playbook()\nasync def Two():\n    '''Doc.'''\n"
    assert agent.playbooks["Two"].line == 9


def test_indented_python_fence() -> None:
    text = "# A\n  ```python\n  @playbook\n  async def Go():\n      pass\n  ```\n"
    spec = parse_program(text).agents[0].playbooks["Go"]
    assert spec.python_source == "@playbook\nasync def Go():\n    pass\n"
    assert spec.line == 3


def test_python_block_without_playbook_warns_and_is_kept() -> None:
    text = "# A\n```python\nimport os\n```\n## Main\nGo.\n"
    with pytest.warns(ProgramWarning, match="defines no @playbook function") as record:
        program = parse_program(text, path="agent.pb")
    assert record[0].filename == "agent.pb" and record[0].lineno == 2
    assert program.agents[0].code_blocks == [CodeBlock("import os\n", 3)]


def test_untagged_block_with_playbook_warns() -> None:
    with pytest.warns(ProgramWarning, match=r"tag it ```python"):
        parse_program("# A\n```\n@playbook\nasync def Go(): pass\n```\n## Main\nGo.\n")


def test_heading_without_space_warns() -> None:
    with pytest.warns(ProgramWarning, match="not a heading"):
        program = parse_program("# A\n## Main\nGo.\n##Other\n")
    assert "##Other" in program.agents[0].playbooks["Main"].description


def test_python_code_in_notes_is_text() -> None:
    text = "# A\n## Main\n### Notes\n```python\nx = (  # not parsed\n```\n"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spec = parse_program(text).agents[0].playbooks["Main"]
    assert spec.notes == ["```python\nx = (  # not parsed\n```"]


def test_load_program(tmp_path: Path) -> None:
    path = tmp_path / "shop.pb"
    path.write_bytes(SHOP.replace("\n", "\r\n").encode("utf-8"))
    program = load_program(path)
    assert program.path == str(path)
    assert [agent.name for agent in program.agents] == ["OrderAssistant", "Reporter"]
    assert load_program(str(path)).source_hash == program.source_hash


def test_load_program_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ProgramError, match="cannot read program .*missing.pb"):
        load_program(tmp_path / "missing.pb")


def test_load_program_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "bad.pb"
    path.write_bytes(b"# A\n## Main\n\xff\n")
    with pytest.raises(ProgramParseError, match="UTF-8") as info:
        load_program(path)
    assert info.value.line == 3


def test_model_records() -> None:
    step = Step("01", "Do", 3, [Step("01.01", "Sub", 4)])
    assert [s.id for s in step.walk()] == ["01", "01.01"]
    spec = PlaybookSpec("P", [], "", [], [step], [], "markdown", None, 2)
    assert spec.public is False
    agent = AgentSpec("A", "", {"P": spec}, 1)
    assert agent.code_blocks == []


# --- errors ----------------------------------------------------------------------------------------


def test_error_str_format() -> None:
    error = _parse_error("# A\n## Foo($x\n")
    assert str(error) == (
        "agent.pb:2:4: invalid playbook signature '## Foo($x' — expected '## Name($arg, ...)'"
    )
    assert (error.path, error.line, error.column) == ("agent.pb", 2, 4)
    assert isinstance(error, PlaybooksError)
    clone = pickle.loads(pickle.dumps(error))
    assert str(clone) == str(error)


@pytest.mark.parametrize("text", ["", "\n\n   \n", "\ufeff"])
def test_empty_program(text: str) -> None:
    error = _parse_error(text)
    assert "empty program — expected '# AgentName'" in str(error)
    assert error.line == 1


def test_text_before_first_agent() -> None:
    error = _parse_error("\nSome preamble\n# A\n## Main\nGo.\n")
    assert str(error) == "agent.pb:2:1: expected '# AgentName' as the first heading, found text"


def test_code_before_first_agent() -> None:
    error = _parse_error("```python\n@playbook\nasync def X(): pass\n```\n# A\n")
    assert "found a code block" in str(error) and error.line == 1


def test_playbook_heading_before_agent() -> None:
    error = _parse_error("## Main\n- step\n")
    assert str(error) == "agent.pb:1:1: expected '# AgentName' before playbook heading '## Main'"


def test_section_heading_before_agent() -> None:
    assert "expected '# AgentName' before section heading '### Steps'" in str(_parse_error("### Steps\n"))


def test_section_heading_before_playbook() -> None:
    error = _parse_error("# A\nDesc.\n### Steps\n- x\n")
    assert "expected '## PlaybookName' before section heading '### Steps' (in agent 'A')" in str(error)
    assert error.line == 3


def test_missing_agent_name() -> None:
    error = _parse_error("#\n## Main\nGo.\n")
    assert "expected an agent name after '#'" in str(error)


def test_invalid_agent_name() -> None:
    error = _parse_error("# Customer support agent\n## Main\nGo.\n")
    assert str(error) == (
        "agent.pb:1:3: invalid agent name 'Customer support agent' — expected an identifier such as "
        "'CustomerSupportAgent'"
    )


def test_duplicate_agent() -> None:
    error = _parse_error("# A\n## Main\nGo.\n# A\n## Main\nGo.\n")
    assert str(error) == "agent.pb:4:3: duplicate agent 'A' (first at line 1)"


def test_agent_without_playbooks() -> None:
    error = _parse_error("# A\nJust a description.\n# B\n## Main\nGo.\n")
    assert "agent 'A' has no playbooks — expected '## PlaybookName'" in str(error)
    assert error.line == 1


def test_duplicate_playbook() -> None:
    error = _parse_error("# Y\n## X\nOne.\n\n## X($a)\nTwo.\n")
    assert str(error) == "agent.pb:5:4: duplicate playbook 'X' in agent 'Y' (first at line 2)"


def test_duplicate_between_python_and_markdown() -> None:
    error = _parse_error("# Y\n```python\n@playbook\nasync def X(): pass\n```\n## X\nTwo.\n")
    assert "duplicate playbook 'X' in agent 'Y' (first at line 3)" in str(error)
    assert error.line == 6


def test_same_playbook_name_in_two_agents_is_fine() -> None:
    program = parse_program("# A\n## Main\nGo.\n# B\n## Main\nGo.\n")
    assert [agent.main_playbook().name for agent in program.agents] == ["Main", "Main"]


@pytest.mark.parametrize(
    ("heading", "message", "column"),
    [
        ("## Foo($x", "invalid playbook signature '## Foo($x' — expected '## Name($arg, ...)'", 4),
        ("## Foo($x))", "invalid playbook signature", 4),
        ("## Greet the user", "invalid playbook signature '## Greet the user'", 4),
        ("## Foo($x) extra", "invalid playbook signature", 4),
        ("##", "expected a playbook name after '##'", 3),
        ("## 1st($x)", "invalid playbook name '1st' — expected an identifier", 4),
        ("## class", "invalid playbook name 'class'", 4),
        ("## Foo(x)", "argument names must start with $: got 'x' in '## Foo(x)', expected '$x'", 8),
        ("## Foo($a, b)", "argument names must start with $: got 'b'", 12),
        ("## Foo($a, )", "expected an argument name in '## Foo($a, )'", 12),
        ("## Foo($1a)", "invalid argument name '$1a'", 8),
        ("## Foo($)", "invalid argument name '$'", 8),
        ("## Foo($a, $a)", "duplicate argument '$a'", 12),
    ],
)
def test_invalid_signatures(heading: str, message: str, column: int) -> None:
    error = _parse_error(f"# A\n{heading}\nText.\n")
    assert message in str(error)
    assert (error.line, error.column) == (2, column)


def test_empty_playbook() -> None:
    error = _parse_error("# A\n## Main\n\n## Other\nText.\n")
    assert "playbook 'Main' is empty — expected a description, '### Steps'" in str(error)
    assert error.line == 2


def test_unknown_section_suggests_closest() -> None:
    error = _parse_error("# A\n## Main\n### Stesp\n- x\n")
    assert "unknown section '### Stesp' in playbook '## Main' — did you mean '### Steps'?" in str(error)
    assert (error.line, error.column) == (3, 5)


def test_duplicate_section() -> None:
    error = _parse_error("# A\n## Main\n### Steps\n- a\n### Steps\n- b\n")
    assert "duplicate '### Steps' in playbook 'Main' (first at line 3)" in str(error)
    assert error.line == 5


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ("### Steps\n", "'### Steps' of playbook 'Main' is empty — expected a list of steps"),
        ("### Triggers\n\n", "'### Triggers' of playbook 'Main' is empty — expected bullet items"),
        ("### Steps\nDo this, then that.\n", "expected a list item ('- ...' or '1. ...') in '### Steps'"),
        ("### Steps\n```\ncode\n```\n- a\n", "expected a list item"),
        ("### Steps\n- \n", "empty step in playbook 'Main'"),
        ("### Steps\n- a\n  -\n", "empty step in playbook 'Main'"),
        ("### Triggers\nWhen asked\n", "expected a bullet item such as '- At the beginning'"),
        ("### Triggers\n- At start\n  - nested\n", "nested list item in '### Triggers'"),
        ("### Triggers\n-\n", "empty trigger in playbook 'Main'"),
    ],
)
def test_section_content_errors(section: str, message: str) -> None:
    error = _parse_error(f"# A\n## Main\n{section}")
    assert message in str(error)
    assert error.line is not None and error.line >= 3


@pytest.mark.parametrize(
    "text",
    [
        "# A\n```python\ncode\n",
        "# A\n## Main\n### Steps\n- a\n  ```\n  code\n",
        "# A\n~~~\ncode\n```\n",
        "# A\n````\ncode\n```\n",
    ],
)
def test_unterminated_code_fence(text: str) -> None:
    error = _parse_error(text)
    assert "unterminated code fence — expected a closing" in str(error)
    lines = text.splitlines()
    opening = next(n for n, line in enumerate(lines, 1) if line.strip().startswith(("```", "~~~")))
    assert error.line == opening


def test_python_syntax_error_reports_file_line() -> None:
    text = "# A\nDesc.\n\n```python\n@playbook\nasync def Go(:\n    pass\n```\n"
    error = _parse_error(text)
    assert "python syntax error in code block" in str(error)
    assert error.line == 6
    assert str(error).startswith("agent.pb:6:")


def test_python_syntax_error_in_indented_fence_column() -> None:
    error = _parse_error("# A\n  ```python\n  x = = 1\n  ```\n")
    assert (error.line, error.column) == (3, 7)


def test_sync_playbook_function() -> None:
    error = _parse_error("# A\n```python\n@playbook\ndef Go():\n    pass\n```\n")
    assert str(error) == "agent.pb:4:1: @playbook function 'Go' must be 'async def'"


def test_nested_playbook_function() -> None:
    text = "# A\n```python\nclass Tools:\n    @playbook\n    async def Go(self):\n        pass\n```\n"
    error = _parse_error(text)
    assert "@playbook function 'Go' must be defined at the top level" in str(error)
    assert (error.line, error.column) == (5, 5)


@pytest.mark.parametrize(
    ("decorator", "message"),
    [
        ('@playbook("x")', "@playbook(...) takes keyword arguments only"),
        ("@playbook(trigger=['x'])", "unknown @playbook option 'trigger' — did you mean 'triggers'?"),
        ("@playbook(**opts)", "@playbook(**...) is not supported"),
        ("@playbook(triggers=make())", "@playbook option triggers= must be a literal value"),
        ("@playbook(triggers=[1])", "@playbook option triggers= expected a list of strings"),
        ("@playbook(public='yes')", "@playbook option public= expected True or False"),
    ],
)
def test_bad_decorator_options(decorator: str, message: str) -> None:
    error = _parse_error(f"# A\n```python\n{decorator}\nasync def Go():\n    pass\n```\n")
    assert message in str(error)
    assert error.line == 3


def test_playbook_function_inside_markdown_playbook() -> None:
    text = "# A\n## Main\n### Steps\n- Go\n### Notes\n```python\n@playbook\nasync def X(): pass\n```\n"
    error = _parse_error(text)
    assert "@playbook functions cannot be defined inside markdown playbook '## Main'" in str(error)
    assert error.line == 6


def test_python_heading_signature_mismatch() -> None:
    text = "# A\n## Go($town)\n```python\n@playbook\nasync def Go(city):\n    pass\n```\n"
    error = _parse_error(text)
    assert "'## Go($town)' declares ($town) but 'async def Go' takes (city)" in str(error)
    assert error.line == 2
