"""What a ``.pb`` program is once parsed: agents, their playbooks, and the steps of each playbook.

These are plain, immutable records with no behaviour beyond lookups; the parser
(:mod:`playbooks.program.parser`) builds them and the runtime reads them. Line numbers are 1-based lines
of the ``.pb`` file, so every message about a playbook or a step can point at the source the user wrote.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

from playbooks.errors import PlaybooksError

__all__ = (
    "AgentSpec",
    "CodeBlock",
    "PlaybookSpec",
    "Program",
    "ProgramError",
    "ProgramParseError",
    "ProgramWarning",
    "Step",
)


class ProgramError(PlaybooksError):
    """Raised when a program cannot be used: unreadable, or missing what the runtime needs (a Main)."""


class ProgramParseError(ProgramError):
    """Raised when a ``.pb`` file is malformed; says where (``path``, 1-based ``line`` and ``column``)
    and what was expected there. ``str(error)`` reads ``agent.pb:12:4: expected ...``.
    """

    def __init__(
        self, message: str, *, path: str, line: int | None = None, column: int | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.path = path
        self.line = line
        self.column = column

    def __str__(self) -> str:
        where = self.path
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"


class ProgramWarning(UserWarning):
    """Issued for a suspicious but valid program, e.g. a python block that defines no ``@playbook``."""


@dataclass(frozen=True)
class Step:
    """One natural-language step of a markdown playbook.

    ``id`` is positional and stable for a given file: ``"01"``, ``"02"`` for top-level steps and
    ``"01.01"`` for the first sub-step of step 01, so the LLM can say which step it is on.
    """

    id: str
    text: str
    line: int
    children: list[Step] = field(default_factory=list)

    def walk(self) -> Iterator[Step]:
        """Yield this step, then its sub-steps depth first, in file order."""
        yield self
        for child in self.children:
            yield from child.walk()


@dataclass(frozen=True)
class CodeBlock:
    """A fenced python block of an agent; ``line`` is the file line of the block's first code line.

    The runtime executes an agent's blocks as its module code (imports and helpers included), compiling
    each with its line offset so tracebacks point at the ``.pb`` file.
    """

    source: str
    line: int


@dataclass(frozen=True)
class PlaybookSpec:
    """A playbook: natural-language (``kind="markdown"``) or an ``@playbook`` python function.

    ``params`` are argument names without the ``$`` of the markdown heading (python: the function's
    parameters, ``*args``/``**kwargs`` with their stars). For a python playbook ``python_source`` is the
    function's source from its first decorator on, and ``line`` is the file line where that source
    starts; for a markdown playbook ``line`` is the line of its ``##`` heading.
    """

    name: str
    params: list[str]
    description: str
    triggers: list[str]
    steps: list[Step]
    notes: list[str]
    kind: Literal["markdown", "python"]
    python_source: str | None
    line: int
    public: bool = False

    def iter_steps(self) -> Iterator[Step]:
        """Yield every step and sub-step depth first, in file order."""
        for step in self.steps:
            yield from step.walk()

    def find_step(self, step_id: str) -> Step | None:
        """Return the step with id ``step_id`` (``"02.01"``), or ``None``."""
        return next((step for step in self.iter_steps() if step.id == step_id), None)


@dataclass(frozen=True)
class AgentSpec:
    """An agent (a ``# Name`` section): its description, playbooks in file order, and python code.

    ``line`` is the line of its ``#`` heading; ``code_blocks`` are its python blocks in file order.
    """

    name: str
    description: str
    playbooks: dict[str, PlaybookSpec]
    line: int
    code_blocks: list[CodeBlock] = field(default_factory=list)

    def main_playbook(self) -> PlaybookSpec:
        """Return the playbook a run starts with.

        That is the one named ``Main``, else the first (in file order) with a trigger mentioning
        "beginning" (``- At the beginning``); raise :class:`ProgramError` if there is neither.
        """
        main = self.playbooks.get("Main")
        if main is not None:
            return main
        for playbook in self.playbooks.values():
            if any("beginning" in trigger.lower() for trigger in playbook.triggers):
                return playbook
        raise ProgramError(
            f"agent {self.name!r} (line {self.line}) has no playbook to start with: expected "
            "'## Main' or a playbook with the trigger '- At the beginning'"
        )


@dataclass(frozen=True)
class Program:
    """A parsed ``.pb`` file: its agents in file order and the sha256 (hex) of its text.

    ``source_hash`` lets a resumed run check that the program did not change under its checkpoints.
    """

    path: str
    agents: list[AgentSpec]
    source_hash: str

    def agent(self, name: str) -> AgentSpec:
        """Return the agent called ``name``; raise :class:`ProgramError` naming the agents there are."""
        for agent in self.agents:
            if agent.name == name:
                return agent
        names = ", ".join(agent.name for agent in self.agents)
        raise ProgramError(f"no agent {name!r} in {self.path} (agents: {names})")
