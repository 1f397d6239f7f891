"""What isolation costs: worker start, a statement, a tool round trip, against in-process execution.

    python benchmarks/bench_isolation.py [--statements 2000] [--calls 500] [--repeats 5]

Measured in one run, each figure the median of ``--repeats``:

* **worker start**: a new ``IsolatedPythonExecutor`` until its worker has confined itself and built
  its executor (``await executor.start()``), and the same for a warm start from the pre-started pool;
* **per statement**: ``--statements`` simple statements fed as one response, isolated vs in-process
  (both durable, with a memory store: an isolated executor always journals, to survive its worker);
* **round trip**: ``--calls`` awaited calls of a ``@cheap`` tool (not journaled: the channel alone);
* **per tool call**: ``--calls`` awaited calls of a trivial async tool in a ``for`` loop, isolated vs
  in-process (durable, memory store), and the isolated executor's durable call over a filesystem
  store (one fsync per await, as in production) next to the in-process one;
* **per LLM response of a program**: ``examples/orders.pb`` run by ``ProgramRuntime`` from its
  cassette (no network: the model's time is left out) with a filesystem store, isolated (a worker per
  response, as ``playbooks run``) vs ``isolation=None``; the run's time divided by its responses.

Targets (issue 11): a tool round trip well under a millisecond, a worker start under 100 ms.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio

from playbooks import Agent, cheap
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.execution.isolated_executor import IsolatedPythonExecutor
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor


async def _work(x: int) -> int:
    return x


@cheap
async def _echo(x: int) -> int:
    return x


def _agent() -> Agent:
    return Agent("bench", tools={"Work": _work, "Echo": _echo})


_IDS = itertools.count()


def _manager(store: str | None, name: str) -> CheckpointManager:
    provider: Any = MemoryCheckpointProvider() if store is None else FilesystemCheckpointProvider(store)
    return CheckpointManager(f"{name}-{next(_IDS)}", provider, key=b"bench-key", keep_last_n=None)


async def _timed(step: Callable[[], Awaitable[Any]]) -> float:
    began = time.perf_counter()
    await step()
    return time.perf_counter() - began


async def _start(pooled: bool) -> float:
    manager = _manager(None, "start")
    executor = IsolatedPythonExecutor(_agent(), checkpoint_manager=manager, prestart=pooled)
    seconds = await _timed(executor.start)
    await executor.aclose()
    await manager.close()
    return seconds


async def _statements(isolated: bool, n: int) -> float:
    code = "".join(f"x{i % 50} = {i} + 1\n" for i in range(n))
    cls: Any = IsolatedPythonExecutor if isolated else StreamingPythonExecutor
    manager = _manager(None, "statements")
    executor = cls(_agent(), checkpoint_manager=manager)
    await executor.start()

    async def run() -> None:
        await executor.add_chunk(code)
        await executor.finalize()

    seconds = await _timed(run)
    if isolated:
        await executor.aclose()
    await manager.close()
    return seconds / n


async def _calls(isolated: bool, n: int, store: str | None, tool: str = "Work") -> float:
    cls: Any = IsolatedPythonExecutor if isolated else StreamingPythonExecutor
    manager = _manager(store, "calls")
    executor = cls(_agent(), checkpoint_manager=manager)
    await executor.start()

    async def run() -> None:
        await executor.add_chunk(f"t = 0\nfor i in range({n}):\n    t += await {tool}(i)\n\n")
        await executor.finalize()

    seconds = await _timed(run)
    if isolated:
        await executor.aclose()
    await manager.close()
    return seconds / n


async def _program(isolated: bool, folder: str) -> float:
    from playbooks.execution.sandbox import SandboxLimits
    from playbooks.llm import ReplayProvider
    from playbooks.program import ProgramIO, ProgramRuntime, load_program

    examples = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "examples")
    program = load_program(os.path.join(examples, "orders.pb"))
    manager = _manager(folder, "orders")
    runtime = ProgramRuntime(
        program, llm=ReplayProvider(os.path.join(examples, "orders.cassette.json")),
        io=ProgramIO(output=lambda text: None), checkpoint_manager=manager,
        isolation=SandboxLimits() if isolated else None,
    )
    began = time.perf_counter()
    result = await runtime.run()
    seconds = time.perf_counter() - began
    await manager.close()
    return seconds / result.llm_calls


async def main(options: argparse.Namespace) -> None:
    repeats = options.repeats
    folder = tempfile.mkdtemp(prefix="bench-iso-", dir=options.dir)
    rows: list[tuple[str, float, float | None]] = []

    async def median(make: Callable[[], Awaitable[float]]) -> float:
        return statistics.median([await make() for _ in range(repeats)])

    cold = await median(lambda: _start(False))
    warm_runs = []
    for _ in range(repeats):
        await anyio.sleep(0.3)  # let the pool replace the worker taken
        warm_runs.append(await _start(True))
    warm = statistics.median(warm_runs)
    rows.append(("worker start, cold (ms)", cold * 1e3, None))
    rows.append(("worker start, from the pool (ms)", warm * 1e3, None))
    inproc = await median(lambda: _statements(False, options.statements))
    iso = await median(lambda: _statements(True, options.statements))
    rows.append(("per statement, in-process (us)", inproc * 1e6, None))
    rows.append(("per statement, isolated (us)", iso * 1e6, iso / inproc))
    inproc = await median(lambda: _calls(False, options.calls, None, "Echo"))
    iso = await median(lambda: _calls(True, options.calls, None, "Echo"))
    rows.append(("round trip of a @cheap tool (not journaled), in-process (us)", inproc * 1e6, None))
    rows.append(("round trip of a @cheap tool (not journaled), isolated (us)", iso * 1e6, iso / inproc))
    inproc = await median(lambda: _calls(False, options.calls, None))
    iso = await median(lambda: _calls(True, options.calls, None))
    rows.append(("per tool call, memory store, in-process (us)", inproc * 1e6, None))
    rows.append(("per tool call, memory store, isolated (us)", iso * 1e6, iso / inproc))
    counter = iter(range(10**6))
    inproc = await median(lambda: _calls(False, options.calls, os.path.join(folder, f"f{next(counter)}")))
    iso = await median(lambda: _calls(True, options.calls, os.path.join(folder, f"f{next(counter)}")))
    rows.append(("per tool call, filesystem store, in-process (us)", inproc * 1e6, None))
    rows.append(("per tool call, filesystem store, isolated (us)", iso * 1e6, iso / inproc))
    inproc = await median(lambda: _program(False, os.path.join(folder, f"p{next(counter)}")))
    iso = await median(lambda: _program(True, os.path.join(folder, f"p{next(counter)}")))
    rows.append(("per LLM response of orders.pb, filesystem store, in-process (ms)", inproc * 1e3, None))
    rows.append(("per LLM response of orders.pb, filesystem store, isolated (ms)", iso * 1e3, iso / inproc))
    print(f"bench_isolation: python {sys.version.split()[0]}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}, "
          f"store {folder}, median of {repeats}")
    for name, value, ratio in rows:
        print(f"  {name:62} {value:10.1f}" + (f"   {ratio:5.2f}x in-process" if ratio is not None else ""))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--statements", type=int, default=2000)
    parser.add_argument("--calls", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="folder for the filesystem store (default: the temp dir)")
    anyio.run(main, parser.parse_args())
