"""The prompts of a natural-language playbook: what the LLM is told, turn by turn.

A markdown playbook is one conversation:

1. the **system** message (:func:`system_prompt`): who the agent is, how to answer (Python only, top-level
   ``await``, ``Step``/``Return``), the built-ins, the playbooks it can call and the other agents;
2. the first **user** message (:func:`playbook_prompt`): the playbook (description, numbered steps,
   notes) and its arguments;
3. after each response, a **user** message saying what happened: :func:`continuation_prompt` when the
   code ran to its end without ``Return``, :func:`error_prompt` when a statement failed. Both show the
   calls made and their results, what was printed, the current step and the variables.

Everything here is a pure function of its arguments and renders values with :func:`describe_value`,
which never shows memory addresses, so the same run asks the same questions (cassettes replay).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from playbooks.errors import LLMCodeError
from playbooks.program.builtins import BUILTIN_DOCS, PlaybookReturn
from playbooks.program.model import AgentSpec, PlaybookSpec, Step

__all__ = (
    "ResponseReport",
    "continuation_prompt",
    "describe_value",
    "error_prompt",
    "note_call",
    "playbook_prompt",
    "playbook_signature",
    "system_prompt",
)

_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
VALUE_LIMIT = 300


def describe_value(value: Any, limit: int = VALUE_LIMIT) -> str:
    """``repr(value)``, without memory addresses, cut to ``limit`` characters."""
    try:
        text = repr(value)
    except Exception as exc:  # a broken __repr__ must not break the prompt
        text = f"<{type(value).__name__} (repr failed: {type(exc).__name__})>"
    text = _ADDRESS.sub("", text)
    if len(text) > limit:
        text = text[:limit] + f"... ({len(text)} characters)"
    return text


def playbook_signature(spec: PlaybookSpec, owner: str | None = None) -> str:
    """How LLM code calls ``spec``: ``await Name(a, b)``, or ``await Agent.Name(a, b)`` from outside."""
    name = f"{owner}.{spec.name}" if owner else spec.name
    return f"await {name}({', '.join(spec.params)})"


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def system_prompt(agent: AgentSpec, others: Sequence[AgentSpec] = ()) -> str:
    """The system message for every playbook of ``agent``; ``others`` are the program's other agents."""
    lines = [f"You are {agent.name}, an agent of a playbooks program."]
    if agent.description:
        lines += ["", agent.description]
    lines += [
        "",
        "You carry out playbooks (step-by-step procedures in plain language) by writing Python code.",
        "Your code runs while you write it, one top-level statement at a time, in a namespace that keeps",
        "its variables from one of your responses to the next.",
        "",
        "How to answer:",
        "- Answer with Python code only, in one ```python block.",
        "- Use top-level `await` for every call of a built-in or a playbook.",
        '- Call `await Step("01")` as you start each step, with the step\'s id.',
        "- When you need to see a result before deciding what to do next, end your response there: you",
        "  will be told what ran, what the calls returned and the variables, and you continue from there.",
        "  Never repeat code that already ran.",
        "- When the playbook is done, call `await Return(value)` (`await Return(None)` if there is nothing",
        "  to return). Nothing after it runs.",
        "- If a statement fails you are shown the error; the statements before it already ran.",
        "",
        "Built-ins:",
    ]
    lines += [f"- {signature}: {doc}" for signature, doc in BUILTIN_DOCS]
    lines += ["", "Playbooks you can call (each returns its result):"]
    for spec in agent.playbooks.values():
        doc = _first_line(spec.description)
        lines.append(f"- {playbook_signature(spec)}" + (f": {doc}" if doc else ""))
    if others:
        lines += ["", "Other agents (send them messages by name):"]
        for other in others:
            doc = _first_line(other.description)
            lines.append(f"- {other.name}" + (f": {doc}" if doc else ""))
            for spec in other.playbooks.values():
                if spec.public:
                    pdoc = _first_line(spec.description)
                    lines.append(f"  - {playbook_signature(spec, other.name)}" + (f": {pdoc}" if pdoc else ""))
    return "\n".join(lines) + "\n"


def _step_lines(steps: Sequence[Step], depth: int = 0) -> list[str]:
    lines: list[str] = []
    for step in steps:
        text = step.text.replace("\n", "\n" + "  " * (depth + 1) + "   ")
        lines.append(f"{'  ' * depth}{step.id}. {text}")
        lines.extend(_step_lines(step.children, depth + 1))
    return lines


def playbook_prompt(spec: PlaybookSpec, args: Mapping[str, Any]) -> str:
    """The first user message of a run of ``spec`` with ``args`` (already bound as variables)."""
    lines = [f"Run the playbook {spec.name}.", "", f"## {spec.name}({', '.join(spec.params)})"]
    if spec.description:
        lines.append(spec.description)
    if spec.steps:
        lines += ["", "### Steps", *_step_lines(spec.steps)]
    if spec.notes:
        lines += ["", "### Notes"]
        lines += ["- " + note.replace("\n", "\n  ") for note in spec.notes]
    lines += [""]
    if args:
        lines.append("Arguments (already set as variables):")
        lines += [f"- {name} = {describe_value(value)}" for name, value in args.items()]
    else:
        lines.append("Arguments: none.")
    lines += ["", "Write the code for this playbook."]
    return "\n".join(lines) + "\n"


@dataclass
class ResponseReport:
    """What one response's code did, for the next message: counts, calls, output, step, variables."""

    statements: int = 0
    calls: list[str] = field(default_factory=list)
    printed: list[str] = field(default_factory=list)
    current_step: str | None = None
    variables: dict[str, str] = field(default_factory=dict)


def _report_lines(report: ResponseReport) -> list[str]:
    lines: list[str] = []
    if report.calls:
        lines += ["Calls and their results:", *(f"- {call}" for call in report.calls)]
    else:
        lines.append("Calls and their results: none.")
    if report.printed:
        lines += ["Printed:", *("  " + line for text in report.printed for line in text.splitlines() or [""])]
    lines.append(f"Current step: {report.current_step or 'none yet'}.")
    if report.variables:
        lines += ["Variables:", *(f"- {name} = {value}" for name, value in report.variables.items())]
    else:
        lines.append("Variables: none.")
    return lines


def continuation_prompt(spec: PlaybookSpec, report: ResponseReport) -> str:
    """The next message after code that ran to its end without ``Return``."""
    lines = [f"Your code ran ({report.statements} statements)."]
    if report.statements == 0:
        lines = ["Your response ran no code: answer with Python code in a ```python block."]
    lines += _report_lines(report)
    lines += ["", f"Continue the playbook {spec.name} from there; call await Return(value) when it is done."]
    return "\n".join(lines) + "\n"


def error_prompt(
    spec: PlaybookSpec, error: LLMCodeError, report: ResponseReport, retries_left: int, response: str = ""
) -> str:
    """The next message after a statement of the code failed: where, what, and the state it left.

    ``response`` (the failed response) lets the message quote the failing line itself.
    """
    lines_of_response = response.splitlines()
    statement = error.statement.strip("\n").splitlines()
    if error.lineno is not None and 1 <= error.lineno <= len(lines_of_response):
        lines = [f"Your code failed at line {error.lineno} of your response:"]
        failing = lines_of_response[error.lineno - 1].strip()
        lines.append("    " + failing)
        if len(statement) > 1 and statement[0].strip() != failing:
            lines.append(f"in the statement starting `{statement[0].strip()}`")
    else:
        where = f"line {error.lineno} of your response" if error.lineno is not None else "your response"
        lines = [f"Your code failed at {where}:"]
        lines += ["    " + line for line in statement[:10]]
    lines.append(error.message)
    plural = "" if retries_left == 1 else "s"
    before = "The statement" if report.statements == 1 else f"The {report.statements} statements"
    lines.append(
        f"{before} before it ran and their effects stay: do not repeat them. "
        f"Nothing after it ran. ({retries_left} more failure{plural} allowed.)"
    )
    lines += _report_lines(report)
    lines += ["", f"Write code that fixes this and continues the playbook {spec.name}."]
    return "\n".join(lines) + "\n"


def continuation_note(spec: PlaybookSpec, report: ResponseReport) -> str:
    """Asks the LLM to go on with a response that a crash cut off (its executed part is the message
    before): what that part did, and to write only the rest."""
    lines = [
        "Your previous response was cut off after the code above (the run was interrupted). Its complete "
        "statements have run; a statement that was cut off did not run.",
        *_report_lines(report),
        "",
        f"Continue the playbook {spec.name} exactly where that code stopped: answer with only the rest of the "
        "code in a ```python block, without repeating anything that already ran; call await Return(value) "
        "when it is done.",
    ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------
# What a response's code notes for the next message.

_TRACE = "__turn_calls__"
_PRINTED = "__turn_printed__"
_RETURNED = "__playbook_returned__"
_STEP = "__current_step__"
_NOTES = (_TRACE, _PRINTED, _RETURNED, _STEP)
"""The names a response's code keeps its notes under, in its own namespace (the worker's, when isolated)."""


def _call_text(name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    parts = [describe_value(arg, 100) for arg in args]
    parts += [f"{key}={describe_value(value, 100)}" for key, value in kwargs.items()]
    return f"{name}({', '.join(parts)})"


def note_call(namespace: dict[str, Any], call: Any, value: Any, error: BaseException | None) -> None:
    """Note a call of a response's code (live or replayed) for the next message to the LLM, in the
    namespace the code runs in: saved with its checkpoints, so a response resumed after a crash
    reports the calls of its statements that ran before it too. In an isolated run this runs in the
    worker (by name), where the arguments are the code's own objects."""
    if isinstance(error, PlaybookReturn):  # also when replayed: the turn returned
        namespace[_RETURNED] = error.value
        return
    if call.name == "Return":
        return
    if call.name == "Step" and call.args:
        namespace[_STEP] = call.args[0]
    if call.name == "print":
        if call.kwargs.get("file") is None:
            sep = call.kwargs.get("sep", " ")
            namespace.setdefault(_PRINTED, []).append((" " if sep is None else sep).join(str(v) for v in call.args))
        return
    text = _call_text(call.name, call.args, call.kwargs)
    if error is not None:
        text = f"{text} raised {type(error).__name__}: {error}"
    elif value is not None:
        text = f"{text} -> {describe_value(value)}"
    namespace.setdefault(_TRACE, []).append(text)
