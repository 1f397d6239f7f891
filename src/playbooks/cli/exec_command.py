"""``playbooks exec``: stream a recorded LLM response through the executor and show what runs.

The response is fed in small chunks, as an LLM would stream it; each statement is printed when it
starts running, so one can watch code run while the rest of the response is still "arriving".
Tools come from a Python file that defines a ``TOOLS`` mapping of name to callable. The code runs in an
isolated worker process under the ``[sandbox]`` limits of ``playbooks.toml`` (docs/isolation.md);
``--in-process`` runs it in this process instead, for trusted code.
"""

from __future__ import annotations

import argparse
import random
import runpy
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import anyio

from playbooks.agent import Agent
from playbooks.errors import InterpreterError, LLMCodeError
from playbooks.execution.statement_splitter import Statement
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

__all__ = ("configure_exec",)


def configure_exec(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks exec``."""
    parser.add_argument("response", type=Path, help="a text/Markdown file holding the LLM response")
    parser.add_argument("--tools", type=Path, help="a Python file defining TOOLS = {name: callable}")
    parser.add_argument("--agent-id", default="demo", help="agent id (default: demo)")
    parser.add_argument("--chunk-size", type=int, default=6, help="largest chunk, in characters")
    parser.add_argument("--delay", type=float, default=0.0, help="seconds to wait between chunks")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random chunking")
    parser.add_argument(
        "--in-process", action="store_true",
        help="run the code in this process, without the isolated worker (trusted code only)",
    )
    parser.set_defaults(handler=_run)


def _load_tools(path: Path | None) -> Mapping[str, Callable[..., Any]] | str:
    """The ``TOOLS`` of ``path``, or what is wrong with it."""
    if path is None:
        return {}
    try:
        tools = runpy.run_path(str(path)).get("TOOLS")
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    except Exception as exc:
        return f"{path} failed when it was loaded: {type(exc).__name__}: {exc}"
    if not isinstance(tools, Mapping):
        return f"{path} must define TOOLS = {{name: callable}}"
    return tools


def _run(args: argparse.Namespace) -> int:
    try:
        text = args.response.read_text(encoding="utf-8")
    except OSError as exc:
        print(f"playbooks exec: cannot read {args.response}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"playbooks exec: {args.response} is not UTF-8 text (byte {exc.start}); expected an LLM response",
              file=sys.stderr)
        return 2
    if args.chunk_size < 1:
        print("playbooks exec: --chunk-size must be at least 1", file=sys.stderr)
        return 2
    tools = _load_tools(args.tools)
    if isinstance(tools, str):
        print(f"playbooks exec: {tools}", file=sys.stderr)
        return 2
    limits = None
    if not args.in_process:
        from playbooks.config import ConfigError, load_config
        from playbooks.execution.sandbox import SandboxLimits

        try:
            limits = SandboxLimits.from_config(load_config(getattr(args, "config", None)).sandbox)
        except ConfigError as exc:
            print(f"playbooks exec: {exc}", file=sys.stderr)
            return 2
    return anyio.run(_stream, Agent(args.agent_id, tools=tools), text, args, limits)


def _show(statement: Statement) -> None:
    first = statement.source.splitlines()[0] if statement.source else ""
    more = " ..." if "\n" in statement.source else ""
    print(f"  \u25b6 line {statement.lineno:>3}: {first}{more}", flush=True)


async def _stream(agent: Agent, text: str, args: argparse.Namespace, limits: Any) -> int:
    if limits is None:
        executor: Any = StreamingPythonExecutor(agent, on_statement=_show)
    else:
        from playbooks.execution.isolated_executor import IsolatedPythonExecutor

        executor = IsolatedPythonExecutor(agent, on_statement=_show, limits=limits, prestart=False)
    try:
        return await _feed(executor, text, args)
    except InterpreterError as exc:  # the executor failed, not the LLM's code: no traceback
        print(f"playbooks exec: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if limits is not None:
            await executor.aclose()


async def _feed(executor: Any, text: str, args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    position = 0
    try:
        while position < len(text):
            size = rng.randint(1, args.chunk_size)
            await executor.add_chunk(text[position : position + size])
            position += size
            if args.delay:
                await anyio.sleep(args.delay)
    except LLMCodeError:
        pass  # reported from the result below
    result = await executor.finalize()
    print(f"ran {result.statements_executed} statements from {len(text)} characters")
    if result.error is not None:
        print(f"error: {result.error}", file=sys.stderr)
        if result.error.traceback_text:
            print(result.error.traceback_text, file=sys.stderr, end="")
        return 1
    return 0
