"""Programs: ``.pb`` files of agents and their playbooks, parsed into plain records.

``parse_program``/``load_program`` turn Markdown into a :class:`Program`; nothing here runs anything,
so importing this package stays cheap.
"""

from __future__ import annotations

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

__all__ = (
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
)
