"""``playbooks run``: run a ``.pb`` program, showing its progress as it goes.

What the program says to the user (``Say("user", ...)``, ``AskUser`` questions) goes to standard output
as it happens; progress (which playbook and step is running, messages between agents, and with
``--verbose`` every LLM call and code statement) goes to standard error, one line per event.

The LLM comes from the ``[model]`` table of ``playbooks.toml``. With the default ``replay`` provider the
cassette is ``--cassette``, else ``model.cassette``, else ``<program>.cassette.json`` next to the
program (``orders.pb`` -> ``orders.cassette.json``), so the examples run without a network.

Exit codes: 0 the program finished; 1 the program failed (a ``.pb`` parse error, a playbook that
failed, an LLM or cassette error); 2 a usage error (bad arguments, unreadable program file, bad
configuration).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from collections.abc import Callable
from typing import Any, TextIO

import anyio

from playbooks.checkpoints import CheckpointManager, RecoveryCoordinator
from playbooks.checkpoints.provider import CheckpointProvider
from playbooks.checkpoints.secrets import Secret, secrets_from_env
from playbooks.cli.assignments import parse_assignments
from playbooks.cli.checkpoints_command import code_executions, delete_completed_runs, first_line
from playbooks.cli.run_store import RunRecord, RunStore, open_run_store, run_status
from playbooks.config import Config, ConfigError, load_config
from playbooks.errors import (
    CheckpointConfigError,
    CheckpointWarning,
    ExecutionLockedError,
    HostIOError,
    LeaseLostError,
    PlaybooksError,
)
from playbooks.execution.hash_seed import current_hash_seed, pin_hash_seed, resume_hash_seed
from playbooks.execution.retry import RetryPolicy
from playbooks.execution.sandbox import SandboxLimits
from playbooks.llm import CassetteError, LLMProvider, create_llm_provider
from playbooks.program import (
    AnswerNeeded,
    Program,
    ProgramError,
    ProgramIO,
    ProgramParseError,
    ProgramRuntime,
    RunEvent,
    RunResult,
    load_program,
)
from playbooks.program.prompt import describe_value
from playbooks.program.runtime import (
    CodeFailed,
    CodeStatement,
    LLMCallFinished,
    LLMCallStarted,
    MessageSent,
    PlaybookFinished,
    PlaybookStarted,
    Printed,
    StepStarted,
)

__all__ = ("cassette_for", "configure_run", "make_provider", "parse_headers")

EXIT_OK = 0
EXIT_PROGRAM_ERROR = 1
EXIT_USAGE = 2
EXIT_WAITING = 3
"""The run asked the user a question and suspended (``--suspend``): ``playbooks answer`` continues it."""
EXIT_LEASE_LOST = 4
"""The run's lease was taken over by another worker (this process was paused or cut off too long)."""
WORKER_ENV = "PLAYBOOKS_WORKER"
"""Set by ``playbooks worker`` for the runs it starts: the worker's name, shown by ``playbooks runs``."""


def configure_run(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks run``."""
    parser.add_argument("program", type=Path, help="the .pb file to run")
    parser.add_argument(
        "--verbose", "-v", action="store_true", help="also show each LLM call and each code statement as it runs"
    )
    parser.add_argument(
        "--stream",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run the LLM's code statement by statement while it streams (default); --no-stream waits "
        "for the whole response before running it",
    )
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    parser.add_argument(
        "--cassette",
        type=Path,
        help="cassette of recorded LLM responses for the replay provider (default: model.cassette, else "
        "<program>.cassette.json next to the program)",
    )
    parser.add_argument(
        "--arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="an argument of the first agent's Main (repeatable); VALUE is read as JSON when it parses, "
        "else as a string",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        default=None,
        metavar="RUN_ID",
        help="resume a killed or failed run from its checkpoints (the latest such run of the program if "
        "RUN_ID is omitted); with none, say why and stop",
    )
    parser.add_argument(
        "--resume-or-start",
        action="store_true",
        help="resume the latest killed or failed run of the program, or start a fresh run if there is none",
    )
    parser.add_argument(
        "--force", action="store_true", help="with --resume: resume even though the program changed"
    )
    parser.add_argument(
        "--suspend",
        action="store_true",
        help="when the program asks the user (AskUser), store the question and exit with status 3 instead "
        "of waiting; answer later, from any machine that sees the store, with playbooks answer RUN TEXT",
    )
    parser.add_argument(
        "--answer",
        action="append",
        default=[],
        metavar="TEXT",
        help="with --resume: the answer to the question the run is waiting for (repeatable: the next "
        "questions' answers); implies --suspend",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run the LLM's code in this process instead of isolated worker processes (trusted code only; "
        "faster); a resume runs a run the way it started",
    )
    parser.set_defaults(handler=_run)


def _error(message: str) -> None:
    print(f"playbooks run: {message}", file=sys.stderr, flush=True)


def cassette_for(config: Config, program_path: Path, cassette: Path | None = None) -> Path:
    """The cassette a replay (or record) run uses: ``cassette``, else ``model.cassette`` (relative to
    the configuration file), else ``<program>.cassette.json`` next to the program."""
    if cassette is not None:
        return cassette
    if config.model.cassette is not None:
        return config.resolve_path(config.model.cassette)
    return program_path.with_name(program_path.name.removesuffix(".pb") + ".cassette.json")


def make_provider(
    config: Config, program_path: Path, cassette: Path | None = None, *, append: bool = False
) -> LLMProvider:
    """Build the LLM provider the configuration names (``replay``, ``record`` or ``openai``); a
    recording ``append``s to its cassette (a resumed run) instead of starting it anew.

    Raises ``ValueError`` for an unknown provider and :class:`~playbooks.llm.CassetteError` for a
    missing or malformed cassette.
    """
    model = config.model
    remote: dict[str, Any] = {
        "base_url": model.base_url,
        "model": model.name,
        "api_key": os.environ.get(model.api_key_env),
        "timeout": model.timeout,
        "headers": parse_headers(model.headers),
        "usage": model.usage,
        "continuation": None if model.continuation == "message" else model.continuation,
    }
    if model.provider == "replay":
        # Matched by request, not by order: agents running concurrently, and a resumed run, may ask
        # in another order than the recording did.
        return create_llm_provider(
            "replay", cassette_path=cassette_for(config, program_path, cassette), match="request"
        )
    if model.provider == "record":
        path = cassette_for(config, program_path, cassette)
        return create_llm_provider(
            "record", cassette_path=path, inner="openai", append=append, secrets=_secrets(config), **remote
        )
    if model.provider == "openai":
        return create_llm_provider("openai", **remote)
    raise ValueError(f"unknown model provider {model.provider!r} in [model] (expected replay, record or openai)")


def parse_headers(text: str | None) -> dict[str, str]:
    """``model.headers`` (``"Name: value; Name2: value2"``) as a mapping; ``ValueError`` when malformed."""
    headers: dict[str, str] = {}
    for pair in (text or "").split(";"):
        if not pair.strip():
            continue
        name, sep, value = pair.partition(":")
        if not sep or not name.strip():
            raise ValueError(f"model.headers: expected \"Name: value\" pairs separated by \";\", got {pair.strip()!r}")
        headers[name.strip()] = value.strip()
    return headers


def _parse_args(pairs: list[str]) -> dict[str, Any] | None:
    try:
        return parse_assignments(pairs, "--arg")
    except ValueError as exc:
        _error(str(exc))
        return None


class Progress:
    """Line-based progress on standard error, one line per event.

    Shown always: markdown playbooks starting and finishing, steps, messages between agents, failed
    code. With ``verbose``: also python playbook calls, LLM calls, each code statement and what the
    code prints. With ``agents`` (several agents) every line starts with ``[Agent]``.
    """

    def __init__(self, *, verbose: bool = False, agents: bool = False, stream: TextIO | None = None) -> None:
        self.verbose = verbose
        self.agents = agents
        self.stream = stream
        self._python: set[tuple[str, str]] = set()
        self._last_error: str | None = None
        self._lock = threading.Lock()
        self._running: dict[tuple[str, str, int], tuple[float, float]] = {}  # call -> (started, next report)
        self._ticker: threading.Event | None = None
        target = stream if stream is not None else sys.stderr
        # On a terminal, progress is dim so the program's own text (standard output) stands apart.
        self._dim = not os.environ.get("NO_COLOR") and bool(getattr(target, "isatty", lambda: False)())

    def start_ticker(self, first: float = 5.0) -> None:
        """Report a playbook or LLM call still running after ``first`` seconds, then after twice as long
        each time (``... Agent.Playbook running for 10 s``), from a background thread."""
        if self._ticker is not None:
            return
        stop = self._ticker = threading.Event()
        self._first = first

        def tick() -> None:
            while not stop.wait(min(1.0, first / 4)):
                now = time.monotonic()
                with self._lock:
                    due = [(key, start) for key, (start, at) in self._running.items() if now >= at]
                    for key, start in due:
                        self._running[key] = (start, now + (now - start))
                for (agent, what, depth), start in due:
                    self._line(agent, depth + 1, f"... {what} running for {now - start:.0f} s")

        threading.Thread(target=tick, name="playbooks-progress", daemon=True).start()

    def stop_ticker(self) -> None:
        if self._ticker is not None:
            self._ticker.set()
            self._ticker = None

    def _started(self, agent: str, what: str, depth: int) -> None:
        now = time.monotonic()
        with self._lock:
            self._running[(agent, what, depth)] = (now, now + getattr(self, "_first", 5.0))

    def _ended(self, agent: str, what: str, depth: int) -> None:
        with self._lock:
            self._running.pop((agent, what, depth), None)

    def _line(self, agent: str, depth: int, text: str) -> None:
        stream = self.stream if self.stream is not None else sys.stderr
        prefix = f"[{agent}] " if self.agents and agent else ""
        line = prefix + "  " * depth + text
        if self._dim:
            line = f"\033[2m{line}\033[0m"
        try:
            with self._lock:
                stream.write(line + "\n")
                stream.flush()
        except OSError:
            pass  # progress is for the eyes only: a closed standard error must not fail the program

    def __call__(self, event: RunEvent) -> None:
        if isinstance(event, PlaybookStarted):
            self._started(event.agent, f"{event.agent}.{event.playbook}", event.depth)
        elif isinstance(event, PlaybookFinished):
            self._ended(event.agent, f"{event.agent}.{event.playbook}", event.depth)
        elif isinstance(event, LLMCallStarted):
            self._started(event.agent, f"LLM call {event.number} of {event.agent}.{event.playbook}", event.depth)
        elif isinstance(event, LLMCallFinished):
            self._ended(event.agent, f"LLM call {event.number} of {event.agent}.{event.playbook}", event.depth)
        self._show(event)

    def _show(self, event: RunEvent) -> None:
        if isinstance(event, PlaybookStarted):
            if event.kind == "python":
                self._python.add((event.agent, event.playbook))
            if event.kind == "markdown" or self.verbose or event.depth == 0:
                args = ", ".join(f"{name}={describe_value(value, 60)}" for name, value in event.args.items())
                self._line(event.agent, event.depth, f"> {event.agent}.{event.playbook}({args})")
        elif isinstance(event, PlaybookFinished):
            name = f"{event.agent}.{event.playbook}"
            if event.error is not None:  # one line: the whole error is printed once, at the end
                if event.error == self._last_error:  # the callers of a failed playbook fail with it
                    self._line(event.agent, event.depth, f"x {name} failed (the same error)")
                else:
                    self._line(event.agent, event.depth, f"x {name} failed: {first_line(event.error, 120)}")
                self._last_error = event.error
            elif (event.agent, event.playbook) not in self._python or self.verbose or event.depth == 0:
                self._line(event.agent, event.depth, f"< {name} returned {describe_value(event.value, 120)}")
        elif isinstance(event, StepStarted):
            text = event.text.splitlines()[0] if event.text else ""
            if len(text) > 80:
                text = text[:77] + "..."
            self._line(event.agent, event.depth + 1, f"- step {event.step_id}" + (f": {text}" if text else ""))
        elif isinstance(event, MessageSent):
            self._line("", 0, f"@ {event.sender} -> {event.recipient}: {describe_value(event.message, 120)}")
        elif isinstance(event, CodeFailed):
            where = f"line {event.lineno}: " if event.lineno is not None else ""
            then = "sent back to the LLM" if event.retries_left >= 0 else "no retries left"
            self._line(event.agent, event.depth + 1, f"! code failed ({where}{event.message}); {then}")
        elif not self.verbose:
            return
        elif isinstance(event, LLMCallStarted):
            self._line(event.agent, event.depth + 1, f"~ LLM call {event.number} ({event.agent}.{event.playbook})")
        elif isinstance(event, LLMCallFinished):
            if event.prompt_tokens or event.completion_tokens:
                self._line(event.agent, event.depth + 1, f"~ LLM call {event.number}: {event.prompt_tokens:,} "
                           f"tokens in, {event.completion_tokens:,} out")
        elif isinstance(event, CodeStatement):
            lines = event.source.splitlines() or [""]
            more = " ..." if len(lines) > 1 else ""
            self._line(event.agent, event.depth + 1, f"| {event.lineno:>3}: {lines[0]}{more}")
        elif isinstance(event, Printed):
            self._line(event.agent, event.depth + 1, f"| print: {event.text}")


def _load(path: Path) -> Program | int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            program = load_program(path)
        except ProgramParseError as exc:
            _error(str(exc))
            return EXIT_PROGRAM_ERROR
        except ProgramError as exc:
            _error(str(exc))
            return EXIT_USAGE
    for warning in caught:
        where = f"{warning.filename}:{warning.lineno}: " if warning.filename else ""
        print(f"playbooks run: warning: {where}{warning.message}", file=sys.stderr)
    return program


def _run(args: argparse.Namespace) -> int:
    path: Path = args.program
    if not path.is_file():
        _error(f"cannot read program {str(path)!r}: " + ("it is a directory" if path.is_dir() else "no such file"))
        return EXIT_USAGE
    main_args = _parse_args(args.arg)
    if main_args is None:
        return EXIT_USAGE
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        _error(f"configuration error: {exc}")
        return EXIT_USAGE
    resuming = args.resume is not None or args.resume_or_start
    if config.durability.enabled and not resuming and getattr(args, "reexec", False):
        pin_hash_seed()  # a new run records its seed; without PYTHONHASHSEED this re-executes with one
    loaded = _load(path)
    if isinstance(loaded, int):
        return loaded
    program = loaded
    try:
        llm = make_provider(config, path, args.cassette, append=resuming)
    except ValueError as exc:
        _error(str(exc))
        return EXIT_USAGE
    except CassetteError as exc:  # a missing or malformed cassette: an input of the command
        _error(f"{exc}\nTo record a cassette with playbooks run, set provider = \"record\" in the [model] table of "
               "playbooks.toml (it needs an OpenAI-compatible endpoint).")
        return EXIT_USAGE
    except PlaybooksError as exc:
        _error(str(exc))
        return EXIT_PROGRAM_ERROR
    try:
        limits = SandboxLimits.from_config(config.sandbox)
    except ConfigError as exc:
        _error(f"configuration error: {exc}")
        return EXIT_USAGE
    progress = Progress(verbose=args.verbose, agents=len(program.agents) > 1)
    try:
        suspend = args.suspend or bool(args.answer)
        runtime = ProgramRuntime(
            program, llm=llm, on_event=progress, temperature=config.model.temperature,
            max_tokens=config.model.max_tokens, continuation=config.model.continuation, stream=args.stream,
            tool_retry=_retry_policy(config),
            io=ProgramIO(input=list(args.answer), suspend=True) if suspend else None,
            isolation=None if args.in_process else limits,
        )
        progress.start_ticker()
        code: int = anyio.run(_session, args, config, program, runtime, main_args)
    except KeyboardInterrupt:
        _error("interrupted")
        return 130
    except CheckpointConfigError as exc:
        _error(f"configuration error: {exc}")
        return EXIT_USAGE
    except PlaybooksError as exc:
        _error(f"error: {exc}")
        return EXIT_PROGRAM_ERROR
    finally:
        progress.stop_ticker()
    return code


async def _session(
    args: argparse.Namespace, config: Config, program: Program, runtime: ProgramRuntime, kwargs: dict[str, Any]
) -> int:
    """Choose the run (new, or the one to resume), hold its checkpoint lock, run, and record how it ended."""
    resuming = args.resume is not None or args.resume_or_start
    if not config.durability.enabled:
        if resuming and not args.resume_or_start:
            _error("--resume needs checkpoints, and durability is off: set durability.enabled = true in "
                   "playbooks.toml (or PLAYBOOKS_DURABILITY_ENABLED=true), or pass --resume-or-start to run "
                   "afresh without them")
            return EXIT_USAGE
        if resuming:
            _warn("durability is off: nothing to resume; starting a fresh run without checkpoints")
        return _finished(await runtime.run(**kwargs), None)
    store = open_run_store(config)
    try:
        return await _durable_session(args, config, program, runtime, kwargs, store)
    except BaseException as exc:
        lost = _lease_lost(exc)
        if lost is None:
            raise
        _error(f"error: {lost}")
        return EXIT_LEASE_LOST
    finally:
        store.close()


def _lease_lost(exc: BaseException) -> LeaseLostError | None:
    """The :class:`LeaseLostError` behind ``exc`` (itself, a cause, or in an exception group)."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        current = todo.pop()
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, LeaseLostError):
            return current
        if isinstance(current, BaseExceptionGroup):
            todo.extend(current.exceptions)
        todo.extend(e for e in (current.__cause__, current.__context__) if e is not None)
    return None


async def _durable_session(
    args: argparse.Namespace, config: Config, program: Program, runtime: ProgramRuntime, kwargs: dict[str, Any],
    store: RunStore,
) -> int:
    """The run of :func:`_session` with checkpoints, its records in ``store``."""
    provider = _manager(config, "_").provider
    try:
        chosen = await _choose_run(args, program, store, provider)
    finally:
        await provider.close()
    if isinstance(chosen, int):
        return chosen
    run, resume = chosen
    if resume:  # the LLM's code runs where it ran: its checkpoints are where that way keeps them
        if run.isolated and runtime.isolation is None:
            _warn(f"run {run.run_id} started with its LLM code isolated; it resumes isolated (--in-process "
                  "is for new runs)")
            runtime.isolation = SandboxLimits.from_config(config.sandbox)
        elif not run.isolated and runtime.isolation is not None:
            runtime.isolation = None
    else:
        run.isolated = runtime.isolation is not None
    manager = _manager(config, run.run_id)
    if resume and getattr(args, "reexec", False):
        await _resume_hash_seed(manager, run)  # before the lock is taken: re-executing gives it up
    try:
        await manager.open()  # the run's lock, held to the end: it is how `playbooks runs` tells it is alive
        if resume:
            await _prepare_resume(manager, run)
            if kwargs:  # --resume --arg NAME=VALUE: set at the resume point, kept in the run's history
                await manager.save_overrides(kwargs)
                print(f"resuming with {', '.join(f'{k}={v!r}' for k, v in kwargs.items())}", file=sys.stderr,
                      flush=True)
                # Only the start playbook's own parameters are also its arguments; the rest are variables.
                params = {p.lstrip("*") for p in runtime.agents[runtime.entry.name].spec.main_playbook().params}
                kwargs = {k: v for k, v in kwargs.items() if k in params}
    except ExecutionLockedError:
        await manager.close()
        _error(f"run {run.run_id} was taken by another process a moment ago (its checkpoint lock is held)")
        return EXIT_USAGE
    if run.queued:  # a submitted run: its Main's arguments are in its record, given as when it started
        kwargs = {**run.args, **kwargs}
    lock = manager.held_lock
    if lock is not None:
        store.fence(run.run_id, lock.generation)  # a worker whose lease is taken over cannot write it
    run.status, run.pid, run.error, run.hash_seed = "running", os.getpid(), "", current_hash_seed()
    run.question = ""
    run.worker = os.environ.get(WORKER_ENV, run.worker)
    store.save(run)
    _arm_kill_switch(manager)
    runtime.run_id = run.run_id
    runtime.manager = manager
    runtime.on_event = _counting(runtime.on_event, run, store)
    try:
        with warnings.catch_warnings():
            # Reported above, in this command's words; other checkpoint warnings (a variable that
            # cannot be saved) are shown as they happen.
            warnings.filterwarnings("ignore", message=".*may have run", category=CheckpointWarning)
            warnings.filterwarnings("ignore", message=".*is unreadable and was skipped", category=CheckpointWarning)
            warnings.showwarning = _show_warning
            result = await runtime.run(**kwargs)
    except PlaybooksError as exc:
        run.status, run.error = "failed", str(exc)
        run.failed_call = await _failed_call(config, run.run_id, manager)
        store.save(run)
        if isinstance(exc, HostIOError):
            _error(f"{exc}; the run stopped. Resume it with: playbooks run {program.path} --resume {run.run_id}")
        else:
            _error(f"error: {exc}")
            if run.failed_call:
                _error(f"once the cause is fixed, `playbooks run {program.path} --resume {run.run_id}` calls "
                       f"{run.failed_call} again; nothing before it runs twice")
        return EXIT_PROGRAM_ERROR
    except BaseException as exc:
        needed = _answer_needed(exc)
        if needed is None:
            raise
        await manager.flush()
        run.status, run.question = "waiting", needed.question
        store.save(run)  # while the run's lock is held: nobody may take it for a crashed run meanwhile
        await manager.close()
        _error(f"run {run.run_id} is waiting for an answer to: {needed.question}\nAnswer it (from any machine "
               f"that sees this store) with: playbooks answer {run.run_id} \"...\"")
        return EXIT_WAITING
    else:
        await manager.flush()
        run.status, run.result = "completed", _as_json(result.value)
        store.save(run)  # while the run's lock is held, as above
    finally:
        await manager.close()
    days = config.durability.delete_completed_after_days
    if days is not None:  # retention: completed runs older than that go (this one stays)
        for gone in await delete_completed_runs(config, older_than=days * 86400, keep=run.run_id):
            print(f"playbooks run: deleted the completed run {gone} (durability.delete_completed_after_days = "
                  f"{days:g})", file=sys.stderr, flush=True)
    return _finished(result, run)


def _answer_needed(exc: BaseException) -> AnswerNeeded | None:
    """The :class:`AnswerNeeded` that ended the run, alone or in the exception group of a task group
    (``None``: the run ended otherwise)."""
    if isinstance(exc, AnswerNeeded):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            found = _answer_needed(inner)
            if found is not None:
                return found
    cause = exc.__cause__ or exc.__context__
    return _answer_needed(cause) if isinstance(cause, (AnswerNeeded, BaseExceptionGroup)) else None


def _counting(
    on_event: Callable[[RunEvent], None] | None, run: RunRecord, store: RunStore
) -> Callable[[RunEvent], None]:
    """``on_event`` that also counts the run's LLM calls and tokens in its record, saved as they happen
    (so the counts add up over a run's killed and resumed processes)."""

    def count(event: RunEvent) -> None:
        if isinstance(event, LLMCallStarted):
            run.llm_calls += 1
            store.save(run)
        elif isinstance(event, LLMCallFinished) and (event.prompt_tokens or event.completion_tokens):
            run.prompt_tokens += event.prompt_tokens
            run.completion_tokens += event.completion_tokens
            store.save(run)
        if on_event is not None:
            on_event(event)

    return count


def _as_json(value: Any) -> str:
    """``value`` as JSON for the run record, or its ``repr`` when JSON cannot hold it."""
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _finished(result: RunResult, run: RunRecord | None) -> int:
    calls = run.llm_calls if run is not None else result.llm_calls
    tokens = (run.prompt_tokens, run.completion_tokens) if run is not None else (
        result.usage.prompt_tokens, result.usage.completion_tokens)
    spent = f" ({tokens[0]:,} tokens in, {tokens[1]:,} out)" if any(tokens) else ""
    print(f"done: {result.agent}.{result.playbook} finished after {_plural(calls, 'LLM call')}{spent}",
          file=sys.stderr)
    return EXIT_OK


def _retry_policy(config: Config) -> RetryPolicy | None:
    """The retry policy of the program's tool calls, from ``[durability]`` (``None``: one attempt)."""
    durability = config.durability
    if durability.retry_max_attempts <= 1:
        return None
    return RetryPolicy(
        max_attempts=durability.retry_max_attempts,
        initial_delay=durability.retry_initial_delay,
        max_delay=durability.retry_max_delay,
        retry_on=(ConnectionError, TimeoutError),  # transient; a KeyError would fail every attempt alike
    )


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _manager(config: Config, run_id: str) -> CheckpointManager:
    manager = CheckpointManager.from_config(
        config.durability, run_id, storage_path=config.resolve_path(config.durability.storage_path)
    )
    manager.secrets = _secrets(config)
    return manager


def _secrets(config: Config) -> tuple[Secret, ...]:
    """The values no checkpoint or cassette of a run may hold: the model's key, the checkpoint key,
    and those ``durability.secret_env`` names."""
    return secrets_from_env((config.model.api_key_env, config.durability.hmac_key_env, *config.durability.secret_env))


async def _choose_run(
    args: argparse.Namespace, program: Program, store: RunStore, provider: CheckpointProvider
) -> tuple[RunRecord, bool] | int:
    """The run to record checkpoints in and whether it is resumed; an exit code when ``--resume``
    cannot go on. Nothing is resumed whose checkpoint lock is held (its process still runs), and with
    nothing to resume ``--resume`` says why and stops; only ``--resume-or-start`` starts afresh."""
    resuming = args.resume is not None or args.resume_or_start
    if not resuming:
        return store.new_run(program.path, program.source_hash), False
    path = os.path.abspath(program.path)
    if args.resume not in (None, "latest"):
        run = store.get(args.resume)
        if run is None:
            _error(f"no run {args.resume!r} in {store.where} (see: playbooks runs)")
            return EXIT_USAGE
        if run.program != path:
            _error(f"run {run.run_id} is a run of {run.program}, not of {program.path}")
            return EXIT_USAGE
        status = await run_status(run, provider)
        if status == "queued":  # submitted, never started: start it under its id
            return run, False
        if status == "running":
            _error(f"run {run.run_id} is running: its checkpoint lock is held by a live process "
                   f"(pid {run.pid} when it started); it cannot be resumed twice")
            return EXIT_USAGE
        if status == "completed":
            _error(f"run {run.run_id} completed; there is nothing to resume (run the program afresh)")
            return EXIT_USAGE
    else:
        runs = [(r, await run_status(r, provider)) for r in store.all() if r.program == path]
        resumable = [r for r, status in runs if status in ("crashed", "failed", "waiting")]
        if not resumable:
            found = ", ".join(f"{r.run_id} ({status})" for r, status in runs[-5:]) or "none"
            why = f"no crashed or failed run of {program.path} to resume in {store.where} (runs found: {found})"
            if not args.resume_or_start:
                _error(f"{why}. Run it without --resume to start afresh, or pass --resume-or-start.")
                return EXIT_USAGE
            _warn(f"{why}; starting a fresh run (--resume-or-start)")
            return store.new_run(program.path, program.source_hash), False
        run = resumable[-1]
    if run.source_hash != program.source_hash and not args.force:
        _error(f"{program.path} changed since run {run.run_id} was checkpointed; resuming it could replay "
               "the old run into the new program. Run it afresh, or pass --force to resume anyway.")
        return EXIT_USAGE
    return run, True


async def _resume_hash_seed(manager: CheckpointManager, run: RunRecord) -> None:
    """Re-execute this command under the hash seed the run recorded, if this process has another one
    (then this does not return), so sets of strings iterate as they did before the crash."""
    seed = await resume_hash_seed(manager)
    if seed in (None, "random"):
        _warn(f"run {run.run_id} did not record a fixed hash seed: sets of strings may iterate in another "
              "order than before the crash")


async def _failed_call(config: Config, run_id: str, manager: CheckpointManager) -> str:
    """The call whose exception ended a failed run, as the journal shows it ("" if none did)."""
    await manager.close()  # its records on disk and its lock given up: a fresh manager reads them
    reader = _manager(config, run_id)
    try:
        await reader.load_records()
        failing = reader.failure()
    except PlaybooksError:
        return ""
    finally:
        await reader.provider.close()
    return failing.display if failing is not None and failing.display else ""


async def _prepare_resume(manager: CheckpointManager, run: RunRecord) -> None:
    """Load the run's checkpoints and say where it resumes from; a failed run first forgets how it
    failed, so the call that failed runs again."""
    failing = await manager.rewind_failure() if run.status == "failed" else None
    if failing is not None:
        print(f"run {run.run_id} failed in {failing.display}; resuming calls it again "
              f"(idempotency key {failing.key})", file=sys.stderr, flush=True)
    await manager.load_records()
    latest = await manager.get_latest_checkpoint()
    for message in manager.fallbacks:
        _warn(message)
    if latest is None:
        _warn(f"run {run.run_id} has no readable checkpoint; it starts from the beginning")
        return
    statement = manager.last_statement().strip().splitlines()
    shown = statement[0][:100] if statement else "(no statement had completed)"
    print(
        f"resuming run {run.run_id} from checkpoint {latest.checkpoint_id} "
        f"(frame {latest.frame_id}); last statement: {shown}",
        file=sys.stderr,
        flush=True,
    )
    if run.status == "waiting":
        print(f"run {run.run_id} was waiting for an answer to: {run.question}", file=sys.stderr, flush=True)
    in_flight = RecoveryCoordinator(manager).in_flight()
    if run.isolated:  # the calls of the LLM's code are in the executions its workers wrote
        for code in code_executions(await manager.provider.list_executions(), run.run_id):
            store = manager.for_execution(code)
            await store.load_records()
            for message in store.fallbacks:
                _warn(message)
            in_flight += RecoveryCoordinator(store).in_flight()
    for call in in_flight:
        if failing is not None and call.idempotency_key == failing.key:
            continue  # said above: it failed, and is called again
        if run.status == "waiting" and call.call.startswith("AskUser("):
            continue  # the question it stopped at: asked again now, with the answer
        if call.call.startswith("__llm_turn__("):
            number = call.call.removeprefix("__llm_turn__(").rstrip(")")
            _warn(f"LLM call {number} of frame {call.frame_id} was cut off; it goes on after the "
                  "code that already ran")
        else:
            _warn(f"{call.call} was running when the process stopped; it may have run and runs "
                  f"again (idempotency key {call.idempotency_key})")


def _warn(message: str) -> None:
    print(f"playbooks run: warning: {message}", file=sys.stderr, flush=True)


KILL_SWITCH_ENV = "PLAYBOOKS_TEST_KILL_AT_RECORD"
"""A test hook: ``after:N`` (or ``before:N``) makes the process SIGKILL itself just after (before) its
N-th durable record write (journal append or checkpoint file), so tests can kill a run exactly at
every record."""


def _arm_kill_switch(manager: CheckpointManager) -> None:
    spec = os.environ.get(KILL_SWITCH_ENV)
    if not spec:
        return
    when, _, number = spec.partition(":")
    if when not in ("after", "before") or not number.isdigit():
        _warn(f"{KILL_SWITCH_ENV}={spec!r} is not after:N or before:N; ignored")
        return
    target = int(number)
    provider = manager.provider
    writes = 0

    def wrap(method: Any) -> Any:
        async def write(*args: Any, **kwargs: Any) -> Any:
            nonlocal writes
            writes += 1
            if writes == target and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = await method(*args, **kwargs)
            if writes == target and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result

        return write

    for name in ("append_journal", "save_checkpoint"):
        setattr(provider, name, wrap(getattr(provider, name)))


def _show_warning(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any) -> None:
    _warn(str(message))
