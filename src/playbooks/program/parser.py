"""The ``.pb`` program parser: Markdown agents and playbooks into :mod:`playbooks.program.model` records.

The format
----------
::

    # AgentName                       an agent; several per file are allowed
    What the agent is for.            its description (everything up to the first ``##``)

    ## Greet($name, $tone)            a markdown playbook; ``## Main`` (no parentheses) is fine too
    What this playbook does.          its description (everything up to the first ``###``)
    ### Triggers                      bullet list: when the playbook runs by itself
    - At the beginning
    ### Steps                         bullet or numbered list; nesting makes sub-steps
    - Ask the user for their name     -> step "01"
      - Retry if empty                -> step "01.01"
    ### Notes                         bullets and paragraphs, one note each
    - Be brief

A fenced ````` ```python ````` block defines python playbooks: every top-level ``async def`` decorated
with ``@playbook`` or ``@playbook(triggers=[...], public=True)``. Such blocks count where they stand
directly under the agent heading (before its first ``##``), or under a ``##`` heading that has no
``###`` sections, e.g. ``## Python playbooks`` or ``## GetWeather($city)`` naming the function it
holds. Inside a markdown playbook a fenced block is ordinary text (an example in a note, say), and one
that would define ``@playbook`` functions there is an error rather than a silently ignored definition.

Rules the parser keeps
----------------------
* Lines end in ``\\n``, ``\\r\\n`` or ``\\r``; line numbers are 1-based, columns 1-based characters.
* Fenced blocks (````` ``` ````` or ``~~~``, any indentation, closed by a fence of the same character at
  least as long) are opaque: a ``# comment`` inside one is never a heading. An unclosed fence is an error.
* Headings are ATX (``#`` to ``###`` followed by a space, at most three spaces of indentation);
  ``####`` and deeper are text. Setext (underlined) headings are not recognised.
* Agent and playbook names are Python identifiers, because LLM code calls playbooks by name.
* Step ids are positional: ``"01"``, ``"02"``, ... and ``"01.01"`` for sub-steps.

Every error is a :class:`~playbooks.program.model.ProgramParseError` giving the file, line and column,
and saying what was expected there.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import hashlib
import keyword
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from playbooks.program.model import (
    AgentSpec,
    CodeBlock,
    PlaybookSpec,
    Program,
    ProgramError,
    ProgramParseError,
    ProgramWarning,
    Step,
)

__all__ = ("load_program", "parse_program")

_NEWLINE = re.compile(r"\r\n|\r|\n")
_FENCE_OPEN = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})(?P<info>.*)$")
_FENCE_CLOSE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[ \t]*$")
_HEADING = re.compile(r"^ {0,3}(?P<hashes>#{1,6})(?:[ \t]+|$)(?P<title>.*?)(?:[ \t]+#+)?[ \t]*$")
_ALMOST_HEADING = re.compile(r"^ {0,3}#{1,3}[A-Za-z_]")
_ITEM = re.compile(r"^(?P<indent>[ \t]*)(?P<marker>[-*+]|\d{1,9}[.)])(?:[ \t]+(?P<text>.*?))?[ \t]*$")
_SIGNATURE = re.compile(r"^(?P<name>[^\s()]+)[ \t]*(?:\((?P<args>[^()]*)\))?$")
_DECORATOR_LINE = re.compile(r"^[ \t]*@[ \t]*(?:\w+[ \t]*\.[ \t]*)*playbook\b", re.MULTILINE)
_PYTHON_LANGUAGES = frozenset({"python", "py", "python3"})
_SECTIONS = {"triggers": "Triggers", "steps": "Steps", "notes": "Notes"}
_DECORATOR_OPTIONS = ("triggers", "public")


# --------------------------------------------------------------------------------------------------
# Pass 1: lines into text lines and opaque fenced blocks.


@dataclass
class _Text:
    """A line outside any fenced block."""

    line: int
    text: str


@dataclass
class _Fence:
    """A fenced block; ``body`` has the fence's indentation removed, ``raw`` is every line verbatim."""

    line: int
    indent: int
    language: str
    body: list[str]
    raw: list[str]

    @property
    def is_python(self) -> bool:
        """Whether the info string names Python (``python``, ``py`` or ``python3``)."""
        return self.language in _PYTHON_LANGUAGES

    @property
    def defines_playbooks(self) -> bool:
        """Whether the block looks like it decorates something with ``@playbook`` (a cheap text check)."""
        return _DECORATOR_LINE.search("\n".join(self.body)) is not None


_Entry = _Text | _Fence


def _indent_width(text: str) -> int:
    """Indentation of ``text`` in columns, a tab counting up to the next multiple of four."""
    stripped = text.lstrip(" \t")
    return len(text[: len(text) - len(stripped)].expandtabs(4))


def _lex(lines: list[str], path: str) -> list[_Entry]:
    """Split the file into text lines and fenced blocks, so nothing inside a fence is read as Markdown."""
    entries: list[_Entry] = []
    index = 0
    while index < len(lines):
        text = lines[index]
        opening = _FENCE_OPEN.match(text)
        if opening is None or (opening["fence"][0] == "`" and "`" in opening["info"]):
            entries.append(_Text(index + 1, text))
            index += 1
            continue
        fence = opening["fence"]
        indent = len(opening["indent"])
        info = opening["info"].strip()
        language = info.split()[0].strip("{}.").lower() if info else ""
        start = index
        index += 1
        while index < len(lines):
            closing = _FENCE_CLOSE.match(lines[index])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence):
                break
            index += 1
        else:
            raise ProgramParseError(
                f"unterminated code fence — expected a closing '{fence}' for the block opened here",
                path=path,
                line=start + 1,
                column=indent + 1,
            )
        body = [_strip_indent(line, indent) for line in lines[start + 1 : index]]
        entries.append(_Fence(start + 1, indent, language, body, lines[start : index + 1]))
        index += 1
    return entries


def _strip_indent(line: str, count: int) -> str:
    """Remove up to ``count`` leading spaces, as Markdown does for the lines of an indented fence."""
    removable = len(line) - len(line.lstrip(" "))
    return line[min(count, removable) :]


# --------------------------------------------------------------------------------------------------
# Pass 2: headings into a tree of agents, playbook sections and sub-sections.


@dataclass
class _Heading:
    """A ``#``/``##``/``###`` heading and the entries under it up to the next heading."""

    title: str
    line: int
    column: int  # of the title text
    body: list[_Entry] = field(default_factory=list)


@dataclass
class _PlaybookSection(_Heading):
    """A ``##`` heading: ``body`` runs up to its first ``###``, then come the sub-sections."""

    subsections: list[_Heading] = field(default_factory=list)

    def entries(self) -> list[_Entry]:
        """Every entry of the section, sub-sections included, in file order."""
        return self.body + [entry for sub in self.subsections for entry in sub.body]


@dataclass
class _AgentSection(_Heading):
    """A ``#`` heading: ``body`` runs up to its first ``##``, then come the playbook sections."""

    sections: list[_PlaybookSection] = field(default_factory=list)


def _outline(entries: list[_Entry], path: str) -> list[_AgentSection]:
    """Group entries under their ``#``/``##``/``###`` headings; stray content before an agent is an error."""
    agents: list[_AgentSection] = []
    for entry in entries:
        heading = _HEADING.match(entry.text) if isinstance(entry, _Text) else None
        if heading is None or len(heading["hashes"]) > 3:
            if isinstance(entry, _Text) and _ALMOST_HEADING.match(entry.text):
                warnings.warn_explicit(
                    f"line {entry.text.strip()!r} is not a heading (no space after '#'); it is read as text",
                    ProgramWarning,
                    filename=path,
                    lineno=entry.line,
                )
            _place(entry, agents, path)
            continue
        level = len(heading["hashes"])
        title = heading["title"]
        column = heading.start("title") + 1
        shown = f"{heading['hashes']} {title}".rstrip()
        if level == 1:
            agents.append(_AgentSection(title, entry.line, column))
        elif not agents:
            what = "playbook heading" if level == 2 else "section heading"
            raise ProgramParseError(
                f"expected '# AgentName' before {what} '{shown}'", path=path, line=entry.line, column=1
            )
        elif level == 2:
            agents[-1].sections.append(_PlaybookSection(title, entry.line, column))
        elif not agents[-1].sections:
            raise ProgramParseError(
                f"expected '## PlaybookName' before section heading '{shown}' "
                f"(in agent {agents[-1].title!r})",
                path=path,
                line=entry.line,
                column=1,
            )
        else:
            agents[-1].sections[-1].subsections.append(_Heading(title, entry.line, column))
    return agents


def _place(entry: _Entry, agents: list[_AgentSection], path: str) -> None:
    """Append a non-heading entry to the innermost open heading."""
    if not agents:
        if isinstance(entry, _Text) and not entry.text.strip():
            return
        found = "a code block" if isinstance(entry, _Fence) else "text"
        column = 1 if isinstance(entry, _Fence) else len(entry.text) - len(entry.text.lstrip()) + 1
        raise ProgramParseError(
            f"expected '# AgentName' as the first heading, found {found}",
            path=path,
            line=entry.line,
            column=column,
        )
    agent = agents[-1]
    if not agent.sections:
        agent.body.append(entry)
    elif agent.sections[-1].subsections:
        agent.sections[-1].subsections[-1].body.append(entry)
    else:
        agent.sections[-1].body.append(entry)


# --------------------------------------------------------------------------------------------------
# Text, signatures and lists.


def _render(entries: list[_Entry]) -> str:
    """Markdown text of ``entries``: outside fences, trailing spaces and extra blank lines removed."""
    lines: list[str] = []
    for entry in entries:
        if isinstance(entry, _Fence):
            lines.extend(entry.raw)  # code keeps its exact spacing
            continue
        line = entry.text.rstrip()
        if line or (lines and lines[-1]):
            lines.append(line)
    while lines and not lines[-1]:
        lines.pop()
    return "\n".join(lines)


def _check_name(name: str, what: str, path: str, line: int, column: int) -> None:
    """Require an identifier (LLM code calls agents and playbooks by name); suggest one if not."""
    if name.isidentifier() and not keyword.iskeyword(name):
        return
    words = re.findall(r"[A-Za-z0-9_]+", name)
    suggestion = "".join(word[:1].upper() + word[1:] for word in words)
    if not suggestion.isidentifier() or keyword.iskeyword(suggestion):
        suggestion = "MyAgent" if what == "agent" else "MyPlaybook"
    raise ProgramParseError(
        f"invalid {what} name {name!r} — expected an identifier such as {suggestion!r}",
        path=path,
        line=line,
        column=column,
    )


@dataclass
class _Signature:
    """A parsed ``## Name($a, $b)`` title; ``has_parens`` tells ``## Name()`` from ``## Name``."""

    name: str
    params: list[str]
    has_parens: bool


def _signature(section: _PlaybookSection, path: str) -> _Signature:
    """Parse ``Name`` or ``Name($a, $b)`` from a ``##`` title, or raise saying what was expected."""
    title, line, column = section.title, section.line, section.column
    if not title:
        raise ProgramParseError(
            "expected a playbook name after '##', like '## Name($arg, ...)'",
            path=path,
            line=line,
            column=column,
        )
    match = _SIGNATURE.match(title)
    if match is None:
        raise ProgramParseError(
            f"invalid playbook signature '## {title}' — expected '## Name($arg, ...)'",
            path=path,
            line=line,
            column=column,
        )
    name = match["name"]
    _check_name(name, "playbook", path, line, column)
    params: list[str] = []
    args = match["args"]
    if args is not None and args.strip():
        offset = column + match.start("args")
        for piece in args.split(","):
            arg = piece.strip()
            arg_column = offset + len(piece) - len(piece.lstrip())
            offset += len(piece) + 1
            if not arg:
                raise ProgramParseError(
                    f"expected an argument name in '## {title}' — arguments are '$name' separated by "
                    "commas",
                    path=path,
                    line=line,
                    column=arg_column,
                )
            if not arg.startswith("$"):
                raise ProgramParseError(
                    f"argument names must start with $: got {arg!r} in '## {title}', expected '${arg}'",
                    path=path,
                    line=line,
                    column=arg_column,
                )
            bare = arg[1:]
            if not bare.isidentifier() or keyword.iskeyword(bare):
                raise ProgramParseError(
                    f"invalid argument name {arg!r} in '## {title}' — expected '$' followed by an "
                    "identifier",
                    path=path,
                    line=line,
                    column=arg_column,
                )
            if bare in params:
                raise ProgramParseError(
                    f"duplicate argument {arg!r} in '## {title}'", path=path, line=line, column=arg_column
                )
            params.append(bare)
    return _Signature(name, params, args is not None)


@dataclass
class _Item:
    """A list item: marker indentation, text pieces (joined later) and nested items."""

    indent: int
    line: int
    column: int
    pieces: list[str]
    children: list[_Item] = field(default_factory=list)

    @property
    def text(self) -> str:
        """The item's text: first line plus continuations, stripped."""
        return "".join(self.pieces).strip()


@dataclass
class _Paragraph:
    """Consecutive non-list lines of a ``###`` section."""

    line: int
    column: int
    lines: list[str]


_Block = _Item | _Paragraph | _Fence


def _fence_text(fence: _Fence) -> str:
    """The fence verbatim, its own indentation removed, for inclusion in a step or note."""
    return "\n".join(_strip_indent(line, fence.indent) for line in fence.raw)


def _parse_list(entries: list[_Entry]) -> list[_Block]:
    """Parse Markdown list items (nested by indentation), paragraphs and fences of a ``###`` section.

    A line right after an item continues it (lazy continuation); after a blank line, a line or fence
    indented deeper than an open item belongs to that item, anything else closes the list.
    """
    roots: list[_Block] = []
    stack: list[_Item] = []
    paragraph: _Paragraph | None = None
    after_blank = False
    for entry in entries:
        if isinstance(entry, _Fence):
            paragraph = None
            owner = _owner(stack, entry.indent, after_blank)
            if owner is None:
                roots.append(entry)
            else:
                owner.pieces.append("\n" + _fence_text(entry) + "\n")
            after_blank = False
            continue
        if not entry.text.strip():
            after_blank = True
            paragraph = None
            continue
        indent = _indent_width(entry.text)
        stripped = entry.text.strip()
        item = _ITEM.match(entry.text)
        if item is not None:
            paragraph = None
            while stack and stack[-1].indent >= indent:
                stack.pop()
            text = item["text"] or ""
            column = (item.start("text") if item["text"] else item.end("marker")) + 1
            new = _Item(indent, entry.line, column, [text])
            (stack[-1].children if stack else roots).append(new)
            stack.append(new)
        elif stack and not after_blank:
            stack[-1].pieces.append(" " + stripped)
        elif (owner := _owner(stack, indent, after_blank)) is not None:
            owner.pieces.append("\n" + stripped)
        elif paragraph is not None:
            paragraph.lines.append(stripped)
        else:
            paragraph = _Paragraph(entry.line, len(entry.text) - len(entry.text.lstrip()) + 1, [stripped])
            roots.append(paragraph)
        after_blank = False
    return roots


def _owner(stack: list[_Item], indent: int, after_blank: bool) -> _Item | None:
    """The open item a continuation at ``indent`` belongs to (closing deeper ones), or ``None``."""
    if not stack:
        return None
    if not after_blank:
        return stack[-1]  # directly below the item, whatever its indentation
    while stack and stack[-1].indent >= indent:
        stack.pop()
    return stack[-1] if stack else None


def _steps(items: list[_Item], prefix: str) -> list[Step]:
    """Number ``items`` and their children: ``01``, ``02``, ``01.01`` ..."""
    return [
        Step(f"{prefix}{number:02d}", item.text, item.line, _steps(item.children, f"{prefix}{number:02d}."))
        for number, item in enumerate(items, start=1)
    ]


def _note_text(item: _Item, depth: int = 0) -> str:
    """A note item with its nested items kept as an indented Markdown list."""
    text = item.text
    for child in item.children:
        text += "\n" + "  " * (depth + 1) + "- " + _note_text(child, depth + 1)
    return text


# --------------------------------------------------------------------------------------------------
# Pass 3: sections into specs.


class _AgentBuilder:
    """Collects one agent's playbooks and code blocks, rejecting duplicate playbook names."""

    def __init__(self, section: _AgentSection, path: str) -> None:
        self.section = section
        self.path = path
        self.playbooks: dict[str, PlaybookSpec] = {}
        self.code_blocks: list[CodeBlock] = []

    def add(self, spec: PlaybookSpec, column: int) -> None:
        """Add ``spec``; a second playbook of the same name in this agent is an error."""
        first = self.playbooks.get(spec.name)
        if first is not None:
            raise ProgramParseError(
                f"duplicate playbook {spec.name!r} in agent {self.section.title!r} "
                f"(first at line {first.line})",
                path=self.path,
                line=spec.line,
                column=column,
            )
        self.playbooks[spec.name] = spec

    def build(self) -> AgentSpec:
        """Build the agent: its description, python blocks, then each ``##`` section in order."""
        agent = self.section
        _check_name(agent.title, "agent", self.path, agent.line, agent.column)
        description_entries: list[_Entry] = []
        for entry in agent.body:
            if isinstance(entry, _Fence) and entry.is_python:
                specs = self.python_block(entry)
                if not specs:
                    warnings.warn_explicit(
                        f"python block in agent {agent.title!r} defines no @playbook function; "
                        "it is kept as agent code (imports, helpers)",
                        ProgramWarning,
                        filename=self.path,
                        lineno=entry.line,
                    )
            else:
                self.warn_untagged(entry)
                description_entries.append(entry)
        for section in agent.sections:
            self.playbook_section(section)
        if not self.playbooks:
            raise ProgramParseError(
                f"agent {agent.title!r} has no playbooks — expected '## PlaybookName' or a ```python "
                "block with an @playbook async function",
                path=self.path,
                line=agent.line,
                column=1,
            )
        description = _render(description_entries)
        return AgentSpec(agent.title, description, self.playbooks, agent.line, self.code_blocks)

    def warn_untagged(self, entry: _Entry) -> None:
        """Warn about a fence with no language that looks like it meant to define playbooks."""
        if isinstance(entry, _Fence) and not entry.language and entry.defines_playbooks:
            warnings.warn_explicit(
                "code block without a language mentions @playbook; tag it ```python to define playbooks",
                ProgramWarning,
                filename=self.path,
                lineno=entry.line,
            )

    def playbook_section(self, section: _PlaybookSection) -> None:
        """Dispatch a ``##`` section: python playbooks if it holds ``@playbook`` code, else markdown."""
        definitions = [
            entry
            for entry in section.entries()
            if isinstance(entry, _Fence) and entry.is_python and entry.defines_playbooks
        ]
        if definitions and section.subsections:
            raise ProgramParseError(
                f"@playbook functions cannot be defined inside markdown playbook '## {section.title}' "
                "— expected them directly under the agent heading or under a '##' heading of their own "
                "(with no '###' sections)",
                path=self.path,
                line=definitions[0].line,
                column=definitions[0].indent + 1,
            )
        if definitions:
            self.python_section(section)
        else:
            self.markdown_playbook(section)

    def python_section(self, section: _PlaybookSection) -> None:
        """A ``##`` section holding python playbooks; its title may name the (single) function it holds."""
        match = _SIGNATURE.match(section.title)
        named = match["name"] if match else None
        specs: list[PlaybookSpec] = []
        for entry in section.body:
            if isinstance(entry, _Fence) and entry.is_python:
                specs.extend(self.python_block(entry, add=False))
        description = _render(
            [entry for entry in section.body if not (isinstance(entry, _Fence) and entry.is_python)]
        )
        for spec in specs:
            if spec.name == named:
                signature = _signature(section, self.path)
                plain = [param.lstrip("*") for param in spec.params]
                if signature.has_parens and signature.params != plain:
                    declared = ", ".join(f"${param}" for param in signature.params)
                    raise ProgramParseError(
                        f"'## {section.title}' declares ({declared}) but 'async def {spec.name}' takes "
                        f"({', '.join(spec.params)}) — expected the same parameters",
                        path=self.path,
                        line=section.line,
                        column=section.column,
                    )
                if not spec.description and description:
                    spec = dataclasses.replace(spec, description=description)
            self.add(spec, column=1)

    def markdown_playbook(self, section: _PlaybookSection) -> None:
        """A natural-language playbook: signature, description and its ``###`` sections."""
        signature = _signature(section, self.path)
        for entry in section.body:
            self.warn_untagged(entry)
        found: dict[str, _Heading] = {}
        triggers: list[str] = []
        steps: list[Step] = []
        notes: list[str] = []
        for sub in section.subsections:
            kind = _section_kind(sub, section, self.path)
            if kind in found:
                raise ProgramParseError(
                    f"duplicate '### {_SECTIONS[kind]}' in playbook {signature.name!r} "
                    f"(first at line {found[kind].line})",
                    path=self.path,
                    line=sub.line,
                    column=1,
                )
            found[kind] = sub
            blocks = _parse_list(sub.body)
            if kind == "triggers":
                triggers = self.triggers(sub, blocks, signature.name)
            elif kind == "steps":
                steps = self.steps(sub, blocks, signature.name)
            else:
                notes = self.notes(blocks)
        description = _render(section.body)
        if not (description or found):
            raise ProgramParseError(
                f"playbook {signature.name!r} is empty — expected a description, '### Steps' or a "
                "```python block after its heading",
                path=self.path,
                line=section.line,
                column=section.column,
            )
        spec = PlaybookSpec(
            name=signature.name,
            params=signature.params,
            description=description,
            triggers=triggers,
            steps=steps,
            notes=notes,
            kind="markdown",
            python_source=None,
            line=section.line,
        )
        self.add(spec, column=section.column)

    def _empty(self, sub: _Heading, playbook: str, expected: str) -> ProgramParseError:
        return ProgramParseError(
            f"'### {sub.title}' of playbook {playbook!r} is empty — expected {expected}",
            path=self.path,
            line=sub.line,
            column=1,
        )

    def triggers(self, sub: _Heading, blocks: list[_Block], playbook: str) -> list[str]:
        """``### Triggers``: one flat bullet item per trigger."""
        if not blocks:
            raise self._empty(sub, playbook, "bullet items such as '- At the beginning'")
        triggers: list[str] = []
        for block in blocks:
            if isinstance(block, _Item) and block.children:
                child = block.children[0]
                raise ProgramParseError(
                    f"nested list item in '### Triggers' of playbook {playbook!r} — expected one "
                    "trigger per top-level '- ' item",
                    path=self.path,
                    line=child.line,
                    column=child.column,
                )
            if not isinstance(block, _Item):
                raise ProgramParseError(
                    "expected a bullet item such as '- At the beginning' in '### Triggers' of "
                    f"playbook {playbook!r}",
                    path=self.path,
                    line=block.line,
                    column=block.indent + 1 if isinstance(block, _Fence) else block.column,
                )
            if not block.text:
                raise ProgramParseError(
                    f"empty trigger in playbook {playbook!r} — expected text after the bullet",
                    path=self.path,
                    line=block.line,
                    column=block.column,
                )
            triggers.append(block.text)
        return triggers

    def steps(self, sub: _Heading, blocks: list[_Block], playbook: str) -> list[Step]:
        """``### Steps``: a (nested) list; a fence right after a step belongs to that step."""
        if not blocks:
            raise self._empty(sub, playbook, "a list of steps ('- ...' or '1. ...')")
        items: list[_Item] = []
        for block in blocks:
            if isinstance(block, _Fence) and items:
                items[-1].pieces.append("\n" + _fence_text(block) + "\n")
                continue
            if not isinstance(block, _Item):
                raise ProgramParseError(
                    f"expected a list item ('- ...' or '1. ...') in '### Steps' of playbook {playbook!r}",
                    path=self.path,
                    line=block.line,
                    column=block.indent + 1 if isinstance(block, _Fence) else block.column,
                )
            items.append(block)
        for item in _walk_items(items):
            if not item.text:
                raise ProgramParseError(
                    f"empty step in playbook {playbook!r} — expected text after the list marker",
                    path=self.path,
                    line=item.line,
                    column=item.column,
                )
        return _steps(items, "")

    def notes(self, blocks: list[_Block]) -> list[str]:
        """``### Notes``: each top-level item, paragraph or fence is one note."""
        notes: list[str] = []
        for block in blocks:
            if isinstance(block, _Item):
                text = _note_text(block)
            elif isinstance(block, _Paragraph):
                text = " ".join(block.lines)
            else:
                text = _fence_text(block)
            if text.strip():
                notes.append(text)
        return notes

    def python_block(self, fence: _Fence, *, add: bool = True) -> list[PlaybookSpec]:
        """Record ``fence`` as agent code and return (and by default add) its ``@playbook`` functions."""
        source = "\n".join(fence.body) + "\n"
        first_line = fence.line + 1
        try:
            tree = ast.parse(source, filename=self.path)
        except SyntaxError as exc:
            raise ProgramParseError(
                f"python syntax error in code block: {exc.msg}",
                path=self.path,
                line=first_line + (exc.lineno or 1) - 1,
                column=(exc.offset or 1) + fence.indent,
            ) from None
        except ValueError as exc:  # e.g. a NUL character
            raise ProgramParseError(
                f"invalid python code block: {exc}", path=self.path, line=fence.line, column=1
            ) from None
        self.code_blocks.append(CodeBlock(source, first_line))
        block = _PythonBlock(fence, self.path)
        top_level = {id(node) for node in tree.body}
        for node in ast.walk(tree):
            if (
                isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                and id(node) not in top_level
                and _playbook_decorator(node) is not None
            ):
                raise block.error(
                    node,
                    f"@playbook function {node.name!r} must be defined at the top level of the code "
                    "block, not inside another definition",
                )
        specs: list[PlaybookSpec] = []
        for node in tree.body:
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            decorator = _playbook_decorator(node)
            if decorator is None:
                continue
            if isinstance(node, ast.FunctionDef):
                raise block.error(node, f"@playbook function {node.name!r} must be 'async def'")
            triggers, public = block.options(decorator)
            start = min(dec.lineno for dec in node.decorator_list)
            end = node.end_lineno or node.lineno
            spec = PlaybookSpec(
                name=node.name,
                params=_params(node.args),
                description=ast.get_docstring(node) or "",
                triggers=triggers,
                steps=[],
                notes=[],
                kind="python",
                python_source="\n".join(fence.body[start - 1 : end]) + "\n",
                line=first_line + start - 1,
                public=public,
            )
            specs.append(spec)
            if add:
                self.add(spec, column=fence.indent + 1)
        return specs


class _PythonBlock:
    """Maps positions in a python block to the file, and reads ``@playbook(...)`` options."""

    def __init__(self, fence: _Fence, path: str) -> None:
        self.fence = fence
        self.path = path

    def error(self, node: ast.expr | ast.stmt, message: str) -> ProgramParseError:
        """An error at ``node``, with its position translated to a file line and column."""
        return ProgramParseError(
            message,
            path=self.path,
            line=self.fence.line + node.lineno,
            column=node.col_offset + 1 + self.fence.indent,
        )

    def options(self, decorator: ast.expr) -> tuple[list[str], bool]:
        """The ``triggers`` and ``public`` literals of ``@playbook(...)``, checked."""
        triggers: list[str] = []
        public = False
        if not isinstance(decorator, ast.Call):
            return triggers, public
        if decorator.args:
            raise self.error(
                decorator.args[0], "@playbook(...) takes keyword arguments only: triggers=[...], public=True"
            )
        for option in decorator.keywords:
            if option.arg is None:
                raise self.error(
                    option.value, "@playbook(**...) is not supported — expected triggers=[...], public=True"
                )
            if option.arg not in _DECORATOR_OPTIONS:
                close = difflib.get_close_matches(option.arg, _DECORATOR_OPTIONS, n=1)
                hint = f" — did you mean {close[0]!r}?" if close else ""
                raise self.error(
                    option.value,
                    f"unknown @playbook option {option.arg!r}{hint} (expected triggers or public)",
                )
            try:
                value = ast.literal_eval(option.value)
            except ValueError:
                raise self.error(
                    option.value, f"@playbook option {option.arg}= must be a literal value"
                ) from None
            if option.arg == "public":
                if not isinstance(value, bool):
                    raise self.error(option.value, "@playbook option public= expected True or False")
                public = value
                continue
            if isinstance(value, str):
                value = [value]
            if not isinstance(value, (list, tuple)) or not all(isinstance(item, str) for item in value):
                raise self.error(option.value, "@playbook option triggers= expected a list of strings")
            triggers = list(value)
        return triggers, public


def _walk_items(items: list[_Item]) -> list[_Item]:
    """Every item and nested item, depth first."""
    found: list[_Item] = []
    for item in items:
        found.append(item)
        found.extend(_walk_items(item.children))
    return found


_SectionKind = Literal["triggers", "steps", "notes"]


def _section_kind(sub: _Heading, section: _PlaybookSection, path: str) -> _SectionKind:
    """Which of ``### Triggers``/``### Steps``/``### Notes`` a sub-section is (singular accepted)."""
    word = sub.title.strip().lower().removesuffix("s")
    if word == "trigger":
        return "triggers"
    if word == "step":
        return "steps"
    if word == "note":
        return "notes"
    close = difflib.get_close_matches(sub.title.strip().title(), list(_SECTIONS.values()), n=1)
    hint = f" — did you mean '### {close[0]}'?" if close else ""
    raise ProgramParseError(
        f"unknown section '### {sub.title}' in playbook '## {section.title}'{hint} "
        "(expected '### Triggers', '### Steps' or '### Notes')",
        path=path,
        line=sub.line,
        column=sub.column,
    )


def _playbook_decorator(node: ast.FunctionDef | ast.AsyncFunctionDef) -> ast.expr | None:
    """The ``@playbook`` / ``@playbook(...)`` / ``@x.playbook`` decorator of ``node``, if any."""
    for decorator in node.decorator_list:
        target = decorator.func if isinstance(decorator, ast.Call) else decorator
        if (isinstance(target, ast.Name) and target.id == "playbook") or (
            isinstance(target, ast.Attribute) and target.attr == "playbook"
        ):
            return decorator
    return None


def _params(arguments: ast.arguments) -> list[str]:
    """Parameter names in order; ``*args``/``**kwargs`` keep their stars."""
    names = [arg.arg for arg in arguments.posonlyargs + arguments.args]
    if arguments.vararg is not None:
        names.append("*" + arguments.vararg.arg)
    names.extend(arg.arg for arg in arguments.kwonlyargs)
    if arguments.kwarg is not None:
        names.append("**" + arguments.kwarg.arg)
    return names


# --------------------------------------------------------------------------------------------------
# Public entry points.


def parse_program(text: str, *, path: str = "<string>") -> Program:
    """Parse the text of a ``.pb`` file; ``path`` is only used in messages and stored in the result.

    Raises :class:`~playbooks.program.model.ProgramParseError` at the first malformed construct, and
    warns (:class:`~playbooks.program.model.ProgramWarning`) about suspicious but valid ones.
    """
    source_hash = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    body = text[1:] if text.startswith("\ufeff") else text
    if not body.strip():
        raise ProgramParseError(
            "empty program — expected '# AgentName' followed by its playbooks", path=path, line=1, column=1
        )
    lines = _NEWLINE.split(body)
    sections = _outline(_lex(lines, path), path)
    agents: list[AgentSpec] = []
    seen: dict[str, int] = {}
    for section in sections:
        if not section.title:
            raise ProgramParseError(
                "expected an agent name after '#', like '# AgentName'", path=path, line=section.line, column=1
            )
        if section.title in seen:
            raise ProgramParseError(
                f"duplicate agent {section.title!r} (first at line {seen[section.title]})",
                path=path,
                line=section.line,
                column=section.column,
            )
        seen[section.title] = section.line
        agents.append(_AgentBuilder(section, path).build())
    return Program(path, agents, source_hash)


def load_program(path: str | os.PathLike[str]) -> Program:
    """Read and parse a ``.pb`` file (UTF-8); unreadable files raise :class:`ProgramError`."""
    name = os.fspath(path)
    try:
        data = Path(name).read_bytes()
    except OSError as exc:
        raise ProgramError(f"cannot read program {name}: {exc.strerror or exc}") from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProgramParseError(
            "not valid UTF-8 — expected a UTF-8 encoded .pb file",
            path=name,
            line=data.count(b"\n", 0, exc.start) + 1,
        ) from None
    return parse_program(text, path=name)
