"""Configuration: ``playbooks.toml``, ``PLAYBOOKS_*`` environment variables and command-line overrides.

Theory of operation
-------------------
The configuration is two tables, ``[durability]`` and ``[model]``, each mirrored by a frozen dataclass
(:class:`DurabilityConfig`, :class:`ModelConfig`). The dataclass fields are the schema: their type hints
say what a value must be, and their ``metadata`` holds the range rule and the comment written into the
default file. Nothing else lists the keys, so adding a field adds its TOML key, its environment variable
and its documentation at once.

A value is looked up in four layers, the first that has it wins:

1. command-line overrides, dotted keys such as ``"durability.enabled"``;
2. the environment, ``PLAYBOOKS_<TABLE>_<KEY>`` (for example ``PLAYBOOKS_DURABILITY_KEEP_LAST_N``);
3. the file (``playbooks.toml`` in the current directory unless a path is given);
4. the dataclass defaults.

Every value is checked where it comes from, so a :class:`ConfigError` names the file (with line and
column when they are known), the environment variable or the override that is wrong, and says what was
expected. Unknown tables and keys are errors with a close-match suggestion: a misspelt key silently
falling back to its default is exactly the kind of silent loss the project forbids.

Values from the environment and string values of overrides are text and are parsed (``"true"``,
``"10"``); values from the file and typed overrides must already have the right type. An empty text
value of an optional string (``PLAYBOOKS_MODEL_BASE_URL=``) means "unset".
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import textwrap
import tomllib
import types
import typing
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from playbooks.errors import PlaybooksError

__all__ = (
    "CONFIG_FILENAME",
    "ENV_PREFIX",
    "Config",
    "ConfigError",
    "ConfigWarning",
    "DurabilityConfig",
    "ModelConfig",
    "SandboxConfig",
    "env_var_name",
    "load_config",
    "write_default_config",
)

CONFIG_FILENAME = "playbooks.toml"
"""The file :func:`load_config` looks for in the current directory when no path is given."""

ENV_PREFIX = "PLAYBOOKS_"
"""Prefix of the environment variables that override file values: ``PLAYBOOKS_<TABLE>_<KEY>``."""


class ConfigError(PlaybooksError):
    """Raised when the configuration cannot be read or a value is unknown, mistyped or out of range.

    ``file`` is the configuration file concerned (``None`` for environment variables and overrides),
    ``key`` the dotted key or environment variable name, ``expected`` what a valid value looks like, and
    ``line``/``column`` (1-based) the position in the file when it is known.
    """

    def __init__(
        self,
        message: str,
        *,
        file: str | None = None,
        key: str | None = None,
        expected: str | None = None,
        line: int | None = None,
        column: int | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.file = file
        self.key = key
        self.expected = expected
        self.line = line
        self.column = column

    def __str__(self) -> str:
        if self.file is None:
            return self.message
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
            if self.column is not None:
                where += f":{self.column}"
        return f"{where}: {self.message}"


class ConfigWarning(UserWarning):
    """Issued for a ``PLAYBOOKS_<TABLE>_*`` environment variable that matches no key (likely a typo)."""


# --------------------------------------------------------------------------------------------------
# Schema: the dataclasses, with their rules and help text in field metadata.


def _meta(
    help: str,
    *,
    minimum: float | None = None,
    above: float | None = None,
    non_empty: bool = False,
    example: object = None,
) -> dict[str, object]:
    """Field metadata: the comment for the default file and the value's range rule.

    ``minimum`` is inclusive, ``above`` exclusive; ``example`` is shown (commented out) in the default
    file for keys whose default is ``None``, which TOML cannot write.
    """
    return {"help": help, "minimum": minimum, "above": above, "non_empty": non_empty, "example": example}


class _Validated:
    """Mixin of the config dataclasses: check every field against its type and rule on construction."""

    def __post_init__(self) -> None:
        owner = type(self).__name__
        for spec in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, spec.name)
            try:
                _check(_hints(type(self))[spec.name], spec.metadata, value, from_text=False)
            except _Invalid as invalid:
                raise ConfigError(
                    f"{owner}.{spec.name}: expected {invalid.expected}, got {_describe(value)}",
                    key=spec.name,
                    expected=invalid.expected,
                ) from None


@dataclass(frozen=True)
class DurabilityConfig(_Validated):
    """The ``[durability]`` table: whether and where checkpoints are written, and how many are kept."""

    enabled: bool = field(
        default=True,
        metadata=_meta(
            "Checkpoint every completed await so that a killed run can resume where it stopped "
            "(playbooks run agent.pb --resume). Set to false to run without checkpoints."
        ),
    )
    storage_path: str = field(
        default=".checkpoints",
        metadata=_meta(
            "Where the checkpoints live. For the filesystem provider this is a folder; a relative path "
            "is relative to the folder of this file.",
            non_empty=True,
        ),
    )
    max_checkpoint_size_mb: float = field(
        default=100.0,
        metadata=_meta(
            "Largest checkpoint allowed, in megabytes. A bigger one is refused with an error naming "
            "the largest variables.",
            above=0,
        ),
    )
    keep_last_n: int = field(
        default=10,
        metadata=_meta(
            "How many snapshots to keep per execution; older ones are deleted once a newer one is "
            "safely written.",
            minimum=1,
        ),
    )
    provider: str = field(
        default="filesystem",
        metadata=_meta(
            "Checkpoint storage provider: filesystem, memory, sqlite, postgres (runs shared by workers on "
            "many machines: see dsn), or any provider registered in the playbooks.checkpoint_providers "
            "entry-point group.",
            non_empty=True,
        ),
    )
    unpicklable: Literal["skip", "strict"] = field(
        default="skip",
        metadata=_meta(
            'What to do with a variable that cannot be pickled: "skip" leaves it out with a warning '
            '(using it after a resume raises a clear error), "strict" fails the checkpoint.'
        ),
    )
    hmac_key_env: str = field(
        default="PLAYBOOKS_CHECKPOINT_KEY",
        metadata=_meta(
            "Name of the environment variable holding the key that signs checkpoints (HMAC). When it "
            "is set, a checkpoint whose signature does not match is never unpickled. The key itself "
            "never goes in this file.",
            non_empty=True,
        ),
    )
    secret_env: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Names of environment variables whose values are secrets: a checkpoint record, a recorded "
            "cassette or a value sent to an isolated worker that would hold one is refused (the run stops "
            "with an error naming the variable). model.api_key_env and hmac_key_env always are."
        ),
    )
    delete_completed_after_days: float | None = field(
        default=None,
        metadata=_meta(
            "Delete the checkpoints and record of a completed run this many days after it finished "
            "(checked when a run completes, and by playbooks checkpoints prune --older-than). Failed and "
            "crashed runs are kept: they may still resume. Unset keeps every run.",
            above=0,
            example=30,
        ),
    )
    keep_history: bool = field(
        default=False,
        metadata=_meta(
            "Keep every record of a run instead of pruning what later snapshots supersede, so that any "
            "of its checkpoints can be forked exactly (playbooks fork RUN --at N); a run's storage then "
            "grows with its length. keep_last_n is ignored.",
        ),
    )
    journal_sync_every: int = field(
        default=1,
        metadata=_meta(
            "Fsync the journal before every n-th durable call (1: before every one). Records survive a "
            "killed process either way; after a power loss, up to n-1 finished calls whose results were "
            "not fsynced run again.",
            minimum=1,
        ),
    )
    journal_sync_interval: float | None = field(
        default=None,
        metadata=_meta(
            "With journal_sync_every above 1: also fsync when this many seconds passed since the last "
            "fsync, which bounds the work a power loss can undo. Unset: by count only.",
            above=0,
            example=1.0,
        ),
    )
    compress_snapshots: bool = field(
        default=True,
        metadata=_meta(
            "Store snapshots of 64 KiB or more zlib-compressed (level 1) when that saves a tenth or more; "
            "the record is signed as stored, so it is verified before it is inflated.",
        ),
    )
    retry_max_attempts: int = field(
        default=1,
        metadata=_meta(
            "Attempts of a tool call that raises ConnectionError or TimeoutError (or a subclass), in all "
            "(1: no retry); other errors reach the code at once. Every attempt is journaled under the "
            "call's one idempotency key, so a crash between attempts does not reset the count. A tool "
            "with its own policy (@retry) uses that instead.",
            minimum=1,
        ),
    )
    retry_initial_delay: float = field(
        default=0.5,
        metadata=_meta(
            "Seconds before the second attempt; each later wait doubles, up to retry_max_delay, less up "
            "to half of it at random (jitter).",
            minimum=0,
        ),
    )
    retry_max_delay: float = field(
        default=30.0,
        metadata=_meta("Longest wait between two attempts, in seconds.", minimum=0),
    )
    dsn: str = field(
        default="",
        metadata=_meta(
            'With provider = "postgres": the PostgreSQL database, as a libpq connection string or URI '
            '("postgresql://playbooks@db.internal/runs"). Empty uses the PG* environment variables '
            "(PGHOST, PGDATABASE...). Keep the password in PGPASSWORD or ~/.pgpass, not here.",
            example="postgresql://playbooks@localhost/playbooks",
        ),
    )
    lease_seconds: float = field(
        default=30.0,
        metadata=_meta(
            'With provider = "postgres": how long a worker owns a run after its last renewal (renewed '
            "every third of it while the run goes on). A worker that dies, hangs or loses the database "
            "for longer loses its runs to other workers, and its later writes are refused.",
            above=0,
        ),
    )


@dataclass(frozen=True)
class ModelConfig(_Validated):
    """The ``[model]`` table: which LLM answers, and how to reach it."""

    provider: str = field(
        default="replay",
        metadata=_meta(
            'LLM provider: "replay" plays back recorded responses from a cassette (no network), '
            '"openai" talks to any OpenAI-compatible endpoint.',
            non_empty=True,
        ),
    )
    name: str = field(
        default="gpt-4o-mini",
        metadata=_meta("Model name sent to the provider.", non_empty=True),
    )
    base_url: str | None = field(
        default=None,
        metadata=_meta(
            "Base URL of an OpenAI-compatible API; unset means the provider's default.",
            non_empty=True,
            example="http://localhost:8000/v1",
        ),
    )
    api_key_env: str = field(
        default="OPENAI_API_KEY",
        metadata=_meta(
            "Name of the environment variable holding the API key. The key itself never goes in "
            "this file.",
            non_empty=True,
        ),
    )
    cassette: str | None = field(
        default=None,
        metadata=_meta(
            "Recorded responses for the replay provider; a relative path is relative to the folder "
            "of this file.",
            non_empty=True,
            example="cassettes/agent.json",
        ),
    )
    temperature: float = field(
        default=0.0,
        metadata=_meta("Sampling temperature; 0 makes answers as repeatable as the model allows.", minimum=0),
    )
    max_tokens: int | None = field(
        default=None,
        metadata=_meta(
            "Most tokens one response may have (max_tokens of the request); unset means the endpoint's "
            "default.",
            minimum=1,
            example=4096,
        ),
    )
    timeout: float = field(
        default=60.0,
        metadata=_meta(
            "Seconds to wait for the endpoint: to connect, to send, and for each piece of the streamed "
            "response (not for the whole response).",
            above=0,
        ),
    )
    headers: str | None = field(
        default=None,
        metadata=_meta(
            "Extra HTTP headers sent with every request, as \"Name: value\" pairs separated by \";\".",
            non_empty=True,
            example="X-Org: acme; X-Team: data",
        ),
    )
    continuation: Literal["message", "vllm", "prefix"] = field(
        default="message",
        metadata=_meta(
            "How a live model continues a response that a crash cut off: \"message\" shows it what ran and "
            "asks for the rest (any endpoint); \"vllm\" (continue_final_message) or \"prefix\" (Mistral, "
            "DeepSeek) let it continue its own partial message.",
        ),
    )
    usage: bool = field(
        default=True,
        metadata=_meta(
            "Ask the endpoint to report token usage (stream_options.include_usage); turn it off for an "
            "endpoint that refuses the option.",
        ),
    )


@dataclass(frozen=True)
class SandboxConfig(_Validated):
    """The ``[sandbox]`` table: the limits of the worker process that runs LLM code in isolation
    (:class:`~playbooks.execution.sandbox.SandboxLimits`; docs/isolation.md)."""

    statement_timeout: float = field(
        default=30.0,
        metadata=_meta(
            "Seconds one top-level statement of LLM code may run in its worker (time spent waiting for "
            "tools, LLM calls and nested playbooks does not count); 0: no limit.",
            minimum=0,
        ),
    )
    response_timeout: float = field(
        default=300.0,
        metadata=_meta("The same for all the statements of one LLM response; 0: no limit.", minimum=0),
    )
    cpu_seconds: int = field(
        default=600, metadata=_meta("CPU seconds one worker process may use; 0: no limit.", minimum=0)
    )
    memory_mb: int = field(
        default=4096,
        metadata=_meta("Address space of a worker process, in MB (RLIMIT_AS); 0: no limit.", minimum=0),
    )
    recursion_limit: int = field(
        default=1000, metadata=_meta("Python's recursion limit in the worker.", minimum=50)
    )
    max_output_bytes: int = field(
        default=1_000_000,
        metadata=_meta("Bytes one response's code may print; 0: no limit.", minimum=0),
    )
    import_allow: tuple[str, ...] | None = field(
        default=None,
        metadata=_meta(
            "Only these top-level modules may be imported by LLM code (a guard against mistakes, not a "
            "security boundary: the process and Landlock are); unset: any.",
            example=["math", "json", "re", "datetime", "collections", "itertools", "statistics"],
        ),
    )
    import_deny: tuple[str, ...] = field(
        default=(), metadata=_meta("Top-level modules LLM code may not import.")
    )
    network: bool = field(
        default=False,
        metadata=_meta("Let the worker make TCP connections (blocked by Landlock where the kernel can)."),
    )
    read_paths: tuple[str, ...] = field(
        default=(),
        metadata=_meta("Folders the worker may read besides Python's own files (Landlock)."),
    )
    write_paths: tuple[str, ...] = field(
        default=(),
        metadata=_meta("Folders the worker may write besides its scratch folder (Landlock)."),
    )
    env: tuple[str, ...] = field(
        default=(),
        metadata=_meta(
            "Names of environment variables passed to the worker; it gets no other (API keys stay in "
            "the host)."
        ),
    )
    max_restarts: int = field(
        default=3,
        metadata=_meta(
            "How many times one response's worker is restarted after the LLM's code ended it, before "
            "the run fails.",
            minimum=0,
        ),
    )


@dataclass(frozen=True)
class Config:
    """The whole configuration, and the file it was read from (``None`` when only defaults applied)."""

    durability: DurabilityConfig = field(default_factory=DurabilityConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)
    source: Path | None = None

    def resolve_path(self, value: str) -> Path:
        """Return ``value`` as a path, a relative one taken relative to the configuration file's folder.

        Relative paths in ``playbooks.toml`` (``storage_path``, ``cassette``) mean the same thing
        wherever the command is started from; without a file they are relative to the working directory.
        """
        path = Path(value).expanduser()
        if path.is_absolute() or self.source is None:
            return path
        return self.source.parent / path


_TABLES: dict[str, type[DurabilityConfig] | type[ModelConfig] | type[SandboxConfig]] = {
    "durability": DurabilityConfig,
    "model": ModelConfig,
    "sandbox": SandboxConfig,
}


def env_var_name(table: str, key: str) -> str:
    """Return the environment variable that sets ``key`` of ``table``: ``PLAYBOOKS_<TABLE>_<KEY>``."""
    return f"{ENV_PREFIX}{table.upper()}_{key.upper()}"


_HINT_CACHE: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """Resolved type hints of a config dataclass (annotations are strings under ``__future__``)."""
    hints = _HINT_CACHE.get(cls)
    if hints is None:
        hints = _HINT_CACHE[cls] = typing.get_type_hints(cls)
    return hints


def _fields(table: str) -> dict[str, dataclasses.Field[Any]]:
    return {spec.name: spec for spec in dataclasses.fields(_TABLES[table])}


# --------------------------------------------------------------------------------------------------
# Checking one value.


class _Invalid(Exception):
    """Internal: a value does not fit its field; ``expected`` says what would."""

    def __init__(self, expected: str) -> None:
        super().__init__(expected)
        self.expected = expected


_TRUE = frozenset({"true", "1", "yes", "on"})
_FALSE = frozenset({"false", "0", "no", "off"})
_TYPE_NAMES: dict[type, str] = {
    bool: "boolean",
    int: "integer",
    float: "float",
    str: "string",
    dict: "table",
    list: "array",
}


def _describe(value: object) -> str:
    """Describe a bad value for a message: its TOML-ish type name and its repr."""
    kind = _TYPE_NAMES.get(type(value), type(value).__name__)
    return f"{kind} {value!r}"


def _check(hint: Any, metadata: Mapping[str, Any], value: object, *, from_text: bool) -> Any:
    """Return ``value`` converted to the field's type, or raise :class:`_Invalid`.

    ``from_text`` says the value is text from the environment or the command line and may be parsed.
    """
    origin = typing.get_origin(hint)
    if origin is types.UnionType or origin is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        if value is None or (from_text and isinstance(value, str) and not value.strip()):
            return None
        (hint,) = args
    if typing.get_origin(hint) is Literal:
        choices = typing.get_args(hint)
        expected = "one of " + ", ".join(repr(choice) for choice in choices)
        candidate = value.strip() if from_text and isinstance(value, str) else value
        if candidate not in choices:
            raise _Invalid(expected)
        return candidate
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_text and isinstance(value, str):
            word = value.strip().lower()
            if word in _TRUE:
                return True
            if word in _FALSE:
                return False
            raise _Invalid("a boolean (true/false, 1/0, yes/no, on/off)")
        raise _Invalid("a boolean (true or false)")
    if hint is int:
        number: int | float
        if isinstance(value, int) and not isinstance(value, bool):
            number = value
        elif from_text and isinstance(value, str) and re.fullmatch(r"\s*[+-]?\d+\s*", value):
            number = int(value)
        else:
            raise _Invalid(_with_range("an integer", metadata))
        _check_range(number, "an integer", metadata)
        return number
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif from_text and isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                raise _Invalid(_with_range("a number", metadata)) from None
        else:
            raise _Invalid(_with_range("a number", metadata))
        if not math.isfinite(number):
            raise _Invalid(_with_range("a finite number", metadata))
        _check_range(number, "a number", metadata)
        return number
    if typing.get_origin(hint) is tuple:
        if from_text and isinstance(value, str):
            items: list[object] = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise _Invalid("a list of strings")
        if not all(isinstance(item, str) and item for item in items):
            raise _Invalid("a list of non-empty strings")
        return tuple(items)
    if hint is str:
        if not isinstance(value, str):
            raise _Invalid("a non-empty string" if metadata.get("non_empty") else "a string")
        if metadata.get("non_empty") and not value.strip():
            raise _Invalid("a non-empty string")
        return value
    raise TypeError(f"unsupported configuration field type: {hint!r}")  # a schema bug, not user error


def _with_range(kind: str, metadata: Mapping[str, Any]) -> str:
    if metadata.get("minimum") is not None:
        return f"{kind} >= {metadata['minimum']}"
    if metadata.get("above") is not None:
        return f"{kind} > {metadata['above']}"
    return kind


def _check_range(number: float, kind: str, metadata: Mapping[str, Any]) -> None:
    minimum = metadata.get("minimum")
    above = metadata.get("above")
    if (minimum is not None and number < minimum) or (above is not None and number <= above):
        raise _Invalid(_with_range(kind, metadata))


def _suggest(word: str, choices: list[str]) -> str:
    """Return ``" — did you mean 'x'?"`` for the closest choice, or ``""`` when nothing is close."""
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" — did you mean {close[0]!r}?" if close else ""


# --------------------------------------------------------------------------------------------------
# The file layer.

_TOML_POSITION = re.compile(r"\s*\(at line (\d+), column (\d+)\)$")
_TOML_AT_END = re.compile(r"\s*\(at end of document\)$")


def _read_file(path: Path) -> tuple[str, dict[str, Any]]:
    """Read and parse ``path``; every failure is a :class:`ConfigError` naming the file."""
    file = str(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read configuration file: {exc.strerror or exc}", file=file) from exc
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad_line = data.count(b"\n", 0, exc.start) + 1
        raise ConfigError("not valid UTF-8 (TOML files must be UTF-8)", file=file, line=bad_line) from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        message = str(exc)
        line: int | None = None
        column: int | None = None
        if match := _TOML_POSITION.search(message):
            line, column = int(match[1]), int(match[2])
            message = message[: match.start()]
        elif match := _TOML_AT_END.search(message):
            message = message[: match.start()] + " at end of file"
            line = max(len(text.splitlines()), 1)
        raise ConfigError(
            f"invalid TOML: {message}", file=file, line=line, column=column, expected="valid TOML"
        ) from None


def _locate(text: str, table: str | None, key: str | None) -> tuple[int | None, int | None]:
    """Best-effort 1-based (line, column) of ``[table]`` or of ``key`` inside it.

    tomllib does not report positions of values, so this scans for the usual spellings (``[table]``,
    ``key = ``, ``table.key = `` at top level); when it finds nothing the error simply has no position.
    """
    current: str | None = None
    header = re.compile(r"^\s*\[\s*([^\[\]]+?)\s*\]\s*(?:#.*)?$")
    for number, line in enumerate(text.splitlines(), start=1):
        if match := header.match(line):
            current = match[1].replace('"', "").replace("'", "").replace(" ", "")
            if key is None and current == table:
                return number, match.start(1) + 1
            continue
        if key is None:
            continue
        if current == table:
            pattern = rf"^(\s*)[\"']?{re.escape(key)}[\"']?\s*="
        elif current is None and table is not None:
            pattern = rf"^(\s*){re.escape(table)}\s*\.\s*{re.escape(key)}\s*="
        else:
            continue
        if match := re.match(pattern, line):
            return number, len(match[1]) + 1
    return None, None


def _apply_file(path: Path, values: dict[str, dict[str, Any]]) -> None:
    text, document = _read_file(path)
    file = str(path)
    tables = list(_TABLES)
    for table, body in document.items():
        if table not in _TABLES:
            if not isinstance(body, dict):
                owners = [name for name in tables if table in _fields(name)]
                hint = f" — did you mean '{owners[0]}.{table}'?" if owners else ""
                line, column = _locate(text, None, table)
                raise ConfigError(
                    f"unknown top-level key {table!r}{hint} (expected a table: "
                    + ", ".join(f"[{name}]" for name in tables)
                    + ")",
                    file=file,
                    key=table,
                    expected="one of the tables " + ", ".join(tables),
                    line=line,
                    column=column,
                )
            line, column = _locate(text, table, None)
            raise ConfigError(
                f"unknown table [{table}]{_suggest(table, tables)} (expected one of: "
                + ", ".join(f"[{name}]" for name in tables)
                + ")",
                file=file,
                key=table,
                expected="one of the tables " + ", ".join(tables),
                line=line,
                column=column,
            )
        if not isinstance(body, dict):
            line, column = _locate(text, None, table)
            raise ConfigError(
                f"{table}: expected a table [{table}], got {_describe(body)}",
                file=file,
                key=table,
                expected="a table",
                line=line,
                column=column,
            )
        fields = _fields(table)
        hints = _hints(_TABLES[table])
        for key, value in body.items():
            line, column = _locate(text, table, key)
            if key not in fields:
                raise ConfigError(
                    f"unknown key {key!r} in table [{table}]{_suggest(key, list(fields))} "
                    f"(expected one of: {', '.join(fields)})",
                    file=file,
                    key=f"{table}.{key}",
                    expected="one of " + ", ".join(fields),
                    line=line,
                    column=column,
                )
            try:
                values[table][key] = _check(hints[key], fields[key].metadata, value, from_text=False)
            except _Invalid as invalid:
                raise ConfigError(
                    f"{table}.{key}: expected {invalid.expected}, got {_describe(value)}",
                    file=file,
                    key=f"{table}.{key}",
                    expected=invalid.expected,
                    line=line,
                    column=column,
                ) from None


# --------------------------------------------------------------------------------------------------
# The environment and override layers.


def _apply_env(env: Mapping[str, str], values: dict[str, dict[str, Any]]) -> None:
    for table, cls in _TABLES.items():
        hints = _hints(cls)
        for key, spec in _fields(table).items():
            name = env_var_name(table, key)
            if name not in env:
                continue
            raw = env[name]
            try:
                values[table][key] = _check(hints[key], spec.metadata, raw, from_text=True)
            except _Invalid as invalid:
                raise ConfigError(
                    f"environment variable {name}={raw!r}: expected {invalid.expected}",
                    key=name,
                    expected=invalid.expected,
                ) from None


def _warn_unknown_env(env: Mapping[str, str], config: Config) -> None:
    """Warn about ``PLAYBOOKS_<TABLE>_*`` variables that set nothing: most likely misspelt keys."""
    known = {env_var_name(table, key) for table in _TABLES for key in _fields(table)}
    # The configuration names some variables (holding keys) itself; those are not typos.
    known |= {config.durability.hmac_key_env, config.model.api_key_env}
    prefixes = tuple(f"{ENV_PREFIX}{table.upper()}_" for table in _TABLES)
    for name in sorted(env):
        if name.startswith(prefixes) and name not in known:
            warnings.warn(
                f"environment variable {name} sets no configuration key{_suggest(name, sorted(known))}",
                ConfigWarning,
                stacklevel=3,
            )


def _apply_overrides(overrides: Mapping[str, Any], values: dict[str, dict[str, Any]]) -> None:
    every_key = [f"{table}.{key}" for table in _TABLES for key in _fields(table)]
    for dotted, value in overrides.items():
        table, _, key = dotted.partition(".")
        if table not in _TABLES or key not in _fields(table):
            raise ConfigError(
                f"unknown configuration key {dotted!r} on the command line{_suggest(dotted, every_key)} "
                f"(expected one of: {', '.join(every_key)})",
                key=dotted,
                expected="one of " + ", ".join(every_key),
            )
        spec = _fields(table)[key]
        try:
            values[table][key] = _check(
                _hints(_TABLES[table])[key], spec.metadata, value, from_text=isinstance(value, str)
            )
        except _Invalid as invalid:
            raise ConfigError(
                f"command-line override {dotted}={value!r}: expected {invalid.expected}",
                key=dotted,
                expected=invalid.expected,
            ) from None


# --------------------------------------------------------------------------------------------------
# Public entry points.


def load_config(
    path: Path | None = None,
    *,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Return the configuration: overrides > ``PLAYBOOKS_<TABLE>_<KEY>`` environment > file > defaults.

    With ``path`` ``None``, ``playbooks.toml`` in the current directory is read if it exists (no file is
    not an error); an explicit ``path`` must exist. ``env`` defaults to ``os.environ``; ``overrides``
    maps dotted keys (``"durability.keep_last_n"``) to typed values or to text parsed like the
    environment's. Raises :class:`ConfigError` for any unreadable, unknown, mistyped or out-of-range
    value, and warns (:class:`ConfigWarning`) about ``PLAYBOOKS_<TABLE>_*`` variables that set nothing.
    """
    values: dict[str, dict[str, Any]] = {table: {} for table in _TABLES}
    source: Path | None
    if path is None:
        candidate = Path.cwd() / CONFIG_FILENAME
        source = candidate if candidate.is_file() else None
    else:
        source = Path(path)
        if not source.is_file():
            reason = "is a directory, not a file" if source.is_dir() else "does not exist"
            raise ConfigError(f"configuration file {reason}", file=str(source))
    if source is not None:
        _apply_file(source, values)
    environment = os.environ if env is None else env
    _apply_env(environment, values)
    _apply_overrides(overrides or {}, values)
    config = Config(
        durability=DurabilityConfig(**values["durability"]),
        model=ModelConfig(**values["model"]),
        sandbox=SandboxConfig(**values["sandbox"]),
        source=source,
    )
    _warn_unknown_env(environment, config)
    return config


_HEADER = """\
# Configuration of playbooks, the durable interpreter for LLM-generated code.
#
# Every key is optional: delete one to get its default. A value set here is overridden by the
# environment variable PLAYBOOKS_<TABLE>_<KEY> (for example PLAYBOOKS_DURABILITY_KEEP_LAST_N=5),
# which is in turn overridden by the command line.
"""

_TABLE_HELP = {
    "durability": "Checkpoints: a killed run resumes from its last completed await.",
    "model": "The LLM that writes the code.",
    "sandbox": "Isolation: limits of the worker process that runs LLM code (docs/isolation.md).",
}


def _render_config(config: Config) -> str:
    """Render ``config`` as commented TOML: tomli-w writes each value, the comments come from the schema.

    tomli-w cannot write comments, so every ``key = value`` line is produced by ``tomli_w.dumps`` on a
    one-key table and the help text is interleaved above it. A ``None`` value (not expressible in TOML)
    is written as a commented-out example.
    """
    parts = [_HEADER]
    for table in _TABLES:
        section = getattr(config, table)
        parts.append(f"\n# {_TABLE_HELP[table]}\n[{table}]\n")
        for spec in dataclasses.fields(section):
            comment = textwrap.wrap(spec.metadata["help"], width=98)
            comment.append(f"Environment variable: {env_var_name(table, spec.name)}")
            parts.append("\n" + "".join(f"# {line}\n" for line in comment))
            value = getattr(section, spec.name)
            if value is None:
                example = tomli_w.dumps({spec.name: spec.metadata["example"]})
                parts.append("".join(f"# {line}\n" for line in example.splitlines()))
            else:
                parts.append(tomli_w.dumps({spec.name: value}))
    return "".join(parts)


def write_default_config(path: Path, *, overwrite: bool = False) -> None:
    """Write a commented ``playbooks.toml`` holding every default, which loads back to the defaults.

    Refuses (:class:`ConfigError`) to replace an existing file unless ``overwrite`` is true, so a
    ``playbooks init`` never destroys a user's settings.
    """
    text = _render_config(Config())
    try:
        with open(path, "w" if overwrite else "x", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
    except FileExistsError:
        raise ConfigError(
            "refusing to overwrite an existing configuration file (pass overwrite=True to replace it)",
            file=str(path),
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot write configuration file: {exc.strerror or exc}", file=str(path)) from exc
