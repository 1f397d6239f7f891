"""Programs: ``.pb`` files of agents and their playbooks, and the runtime that runs them.

``parse_program``/``load_program`` turn Markdown into a :class:`Program` (plain records);
:class:`ProgramRuntime` runs one, with an LLM writing the code of its natural-language playbooks.
"""

from __future__ import annotations

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

__all__ = (
    "AgentMessage",
    "AnswerNeeded",
    "AgentSpec",
    "CodeBlock",
    "DeadlockError",
    "PlaybookRunError",
    "PlaybookSpec",
    "Program",
    "ProgramError",
    "ProgramIO",
    "ProgramInputError",
    "ProgramParseError",
    "ProgramRuntime",
    "ProgramWarning",
    "RunEvent",
    "RunResult",
    "Step",
    "load_program",
    "parse_program",
    "playbook",
)
