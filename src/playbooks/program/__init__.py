"""Programs: ``.pb`` files of agents and their playbooks, and the runtime that runs them.

``parse_program``/``load_program`` turn Markdown into a :class:`Program` (plain records);
:class:`ProgramRuntime` runs one, with an LLM writing the code of its natural-language playbooks.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from playbooks.program.builtins import AgentMessage as AgentMessage
    from playbooks.program.builtins import playbook as playbook
    from playbooks.program.model import AgentSpec as AgentSpec
    from playbooks.program.model import CodeBlock as CodeBlock
    from playbooks.program.model import PlaybookSpec as PlaybookSpec
    from playbooks.program.model import Program as Program
    from playbooks.program.model import ProgramError as ProgramError
    from playbooks.program.model import ProgramParseError as ProgramParseError
    from playbooks.program.model import ProgramWarning as ProgramWarning
    from playbooks.program.model import Step as Step
    from playbooks.program.parser import load_program as load_program
    from playbooks.program.parser import parse_program as parse_program
    from playbooks.program.runtime import AnswerNeeded as AnswerNeeded
    from playbooks.program.runtime import DeadlockError as DeadlockError
    from playbooks.program.runtime import PlaybookRunError as PlaybookRunError
    from playbooks.program.runtime import ProgramInputError as ProgramInputError
    from playbooks.program.runtime import ProgramIO as ProgramIO
    from playbooks.program.runtime import ProgramRuntime as ProgramRuntime
    from playbooks.program.runtime import RunEvent as RunEvent
    from playbooks.program.runtime import RunResult as RunResult

_WHERE = {
    "AgentMessage": "playbooks.program.builtins",
    "AgentSpec": "playbooks.program.model",
    "AnswerNeeded": "playbooks.program.runtime",
    "CodeBlock": "playbooks.program.model",
    "DeadlockError": "playbooks.program.runtime",
    "PlaybookRunError": "playbooks.program.runtime",
    "PlaybookSpec": "playbooks.program.model",
    "Program": "playbooks.program.model",
    "ProgramError": "playbooks.program.model",
    "ProgramIO": "playbooks.program.runtime",
    "ProgramInputError": "playbooks.program.runtime",
    "ProgramParseError": "playbooks.program.model",
    "ProgramRuntime": "playbooks.program.runtime",
    "ProgramWarning": "playbooks.program.model",
    "RunEvent": "playbooks.program.runtime",
    "RunResult": "playbooks.program.runtime",
    "Step": "playbooks.program.model",
    "load_program": "playbooks.program.parser",
    "parse_program": "playbooks.program.parser",
    "playbook": "playbooks.program.builtins",
}
__all__ = tuple(sorted(_WHERE))


def __getattr__(attr: str) -> Any:
    """Import a public name's module on first access: a worker that unpickles an ``AgentMessage``
    (``playbooks.program.builtins``) loads neither the parser nor the runtime and its LLM client."""
    where = _WHERE.get(attr)
    if where is None:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    value = getattr(importlib.import_module(where), attr)
    globals()[attr] = value  # the next access is a plain lookup
    return value
