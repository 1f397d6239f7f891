"""What durability costs, measured beside its floor in one run on one disk.

    python benchmarks/bench_checkpoint.py [--awaits 200] [--dir PATH] [--quick] [--history 20,200,2000]

Prints, all from this run:

* the floor: one 100-byte append with fsync to a file in the same folder as the checkpoints (the
  median of samples taken before the run and before every repeat, interleaved with the runs);
* the per-await overhead of a durable executor (FilesystemCheckpointProvider) over the same code run
  without checkpoints, for a small namespace and for a namespace holding an untouched 1 MB of data
  (a str and a list of dicts, so the mutable part is re-pickled and hashed but not rewritten), with
  ratios against the floor (issue 15's target: <= 1.5x) and against the small-namespace overhead
  (target: <= 3x);
* bytes written per await;
* the same small-namespace overhead with the SQLite provider, as a ratio to the filesystem's;
* cold resume: a new process that recovers an execution and reaches its first remaining statement
  (target: under 300 ms), and the time ``import playbooks`` adds to a bare interpreter;
* cold resume after 20, 200 and 2,000 awaits (``--history``), as ratios to the first: a resume should
  not cost more the longer the history before the kill.

The package's bytecode is compiled first (see ``_bytecode.py``): the resume rows start new
interpreters, and an installed package has its ``__pycache__``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from typing import Any

from _bytecode import ensure_bytecode
from playbooks import Agent
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider
from playbooks.checkpoints.providers.sqlite import SQLiteCheckpointProvider
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor


async def _work(x: int) -> int:
    return x


class _Counting(FilesystemCheckpointProvider):
    written = 0

    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        type(self).written += len(data)
        await super().save_checkpoint(checkpoint_id, data, sync=sync)

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        type(self).written += len(data)
        await super().append_journal(execution_id, counter, data)

    def prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        type(self).written += len(data)  # the manager writes most journal entries this way
        return super().prepare_append(execution_id, counter, data)


class _CountingSQLite(SQLiteCheckpointProvider):
    async def save_checkpoint(self, checkpoint_id: str, data: bytes, *, sync: bool = True) -> None:
        _Counting.written += len(data)
        await super().save_checkpoint(checkpoint_id, data, sync=sync)

    async def append_journal(self, execution_id: str, counter: int, data: bytes) -> None:
        _Counting.written += len(data)  # journal entries are rows too, written without save_checkpoint
        await super().append_journal(execution_id, counter, data)

    def prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        _Counting.written += len(data)
        return super().prepare_append(execution_id, counter, data)


def floor_samples(folder: str, n: int) -> list[float]:
    """``n`` timings of one small append + fsync, in microseconds."""
    path = os.path.join(folder, "floor.log")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    samples = []
    try:
        for _ in range(n):
            start = time.perf_counter()
            os.write(fd, b"x" * 100)
            os.fsync(fd)
            samples.append(time.perf_counter() - start)
    finally:
        os.close(fd)
        os.unlink(path)
    return [x * 1e6 for x in samples]


def _code(n: int) -> str:
    """``n`` top-level awaits that keep the namespace the same size (one result, one running total)."""
    return "".join(f"x = await Work({i})\ntotal += x\n" for i in range(n))


async def _run(
    folder: str | None, n: int, prelude: dict[str, Any], execution_id: str, provider: str = "filesystem"
) -> tuple[float, int]:
    agent = Agent(execution_id, tools={"Work": _work})
    namespace = dict(prelude)
    manager = None
    if folder is not None:
        store: FilesystemCheckpointProvider | SQLiteCheckpointProvider = (
            _CountingSQLite(os.path.join(folder, f"{execution_id}.sqlite3")) if provider == "sqlite" else _Counting(folder)
        )
        manager = CheckpointManager(execution_id, store, keep_last_n=10)
    ex = StreamingPythonExecutor(agent, namespace=namespace, checkpoint_manager=manager)
    await ex.add_chunk("total = 0\nwarm = await Work(-1)\n")
    _Counting.written = 0
    code = _code(n)
    start = time.perf_counter()
    await ex.add_chunk(code)
    elapsed = time.perf_counter() - start
    written = _Counting.written
    if manager is not None:
        await manager.close()
        await manager.provider.close()
    return elapsed, written


def _big_namespace() -> dict[str, Any]:
    return {
        "text": "y" * 500_000,
        "rows": [{"id": i, "name": f"row-{i}"} for i in range(12_000)],
    }


async def overhead(
    folder: str, n: int, prelude: dict[str, Any], label: str, repeats: int, floor: list[float],
    provider: str = "filesystem",
) -> tuple[float, float]:
    """Median per-await overhead (µs) and bytes written per await; the floor is sampled again before
    every repeat (into ``floor``), since a shared disk's fsync latency drifts within seconds."""
    overheads, sizes = [], []
    for r in range(repeats):
        floor.extend(floor_samples(folder, 60))
        plain, _ = await _run(None, n, prelude, f"{label}-plain-{r}")
        durable, written = await _run(folder, n, prelude, f"{label}-{r}", provider)
        overheads.append((durable - plain) / n * 1e6)
        sizes.append(written / n)
    return statistics.median(overheads), statistics.median(sizes)


_RESUME = textwrap.dedent(
    """
    import asyncio, sys, time
    t0 = time.perf_counter()
    from playbooks import Agent
    from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
    from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

    async def Work(x):
        return x

    def first(statement):
        print(f"{(time.perf_counter() - t0) * 1000:.1f}", flush=True)
        raise SystemExit(0)

    async def main():
        agent = Agent("resume", tools={"Work": Work})
        manager = CheckpointManager(execution_id=agent.id, provider=FilesystemCheckpointProvider(sys.argv[1]))
        coordinator = RecoveryCoordinator(manager)
        assert await coordinator.can_recover()
        checkpoint = await manager.get_latest_checkpoint()
        await coordinator.recover_execution_state(agent)
        executor = await StreamingPythonExecutor.resume_from_checkpoint(
            agent, checkpoint, checkpoint_manager=manager, on_statement=first)
        await executor.add_chunk("1)\\n")  # the rest of the cut statement arrives: it is the first to run

    asyncio.run(main())
    """
)


async def _prepare_resume(folder: str, awaits: int = 20, big: bool = True) -> None:
    agent = Agent("resume", tools={"Work": _work})
    manager = CheckpointManager("resume", FilesystemCheckpointProvider(folder))
    namespace = _big_namespace() if big else {"x": 1}
    ex = StreamingPythonExecutor(agent, namespace=namespace, checkpoint_manager=manager)
    await ex.add_chunk("total = 0\n" + _code(awaits) + "after = await Work(")  # stops mid-statement, as a crash would
    await manager.close()


def _wall_ms(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return (time.perf_counter() - start) * 1000


def _resume_ms(folder: str, repeats: int) -> tuple[float, float]:
    """Median ms of a new process resuming the execution in ``folder`` up to its first remaining
    statement: wall time from spawn, and the same from inside the process."""
    script = os.path.join(folder, "resume.py")
    with open(script, "w") as f:
        f.write(_RESUME)
    walls, insides = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, script, folder], capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"the resume process failed:\n{proc.stderr}")
        walls.append((time.perf_counter() - start) * 1000)
        insides.append(float(proc.stdout.strip()))
    return statistics.median(walls), statistics.median(insides)


def cold_resume(folder: str, repeats: int) -> tuple[float, float, float]:
    """Median ms: process start to first remaining statement (wall), the same inside the process,
    and ``import playbooks`` over a bare interpreter."""
    asyncio.run(_prepare_resume(folder))
    wall, inside = _resume_ms(folder, repeats)
    bare = statistics.median(_wall_ms([sys.executable, "-c", "pass"]) for _ in range(repeats))
    imported = statistics.median(_wall_ms([sys.executable, "-c", "import playbooks"]) for _ in range(repeats))
    return wall, inside, imported - bare


def resume_by_history(base: str, lengths: list[int], repeats: int) -> list[tuple[int, float, float]]:
    """Cold resume (wall ms, ms after interpreter start) of an execution killed after each number of
    awaits in ``lengths`` (small namespace): a resume should not cost more the longer the history."""
    rows = []
    for n in lengths:
        folder = os.path.join(base, f"history-{n}")
        os.mkdir(folder)
        asyncio.run(_prepare_resume(folder, awaits=n, big=False))
        rows.append((n, *_resume_ms(folder, repeats)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--awaits", type=int, default=200)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder here)")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (noisier)")
    parser.add_argument(
        "--history", default="20,200,2000", help="awaits before the kill for the resume-by-history rows ('' for none)"
    )
    options = parser.parse_args()
    repeats = 2 if options.quick else 5
    n = 40 if options.quick else options.awaits
    lengths = [int(x) for x in options.history.split(",") if x]
    note = ensure_bytecode()  # the resume rows start new interpreters
    with tempfile.TemporaryDirectory(dir=options.dir or os.getcwd(), prefix=".bench-ckpt-") as folder:
        samples = floor_samples(folder, 50 if options.quick else 120)
        small, small_bytes = asyncio.run(overhead(folder, n, {"x": 1, "name": "small"}, "small", repeats, samples))
        big, big_bytes = asyncio.run(overhead(folder, n, _big_namespace(), "big", repeats, samples))
        sqlite, sqlite_bytes = asyncio.run(
            overhead(folder, n, {"x": 1, "name": "small"}, "sqlite", repeats, samples, provider="sqlite")
        )
        floor = statistics.median(samples)
        wall, inside, import_ms = cold_resume(folder, repeats)
        history = resume_by_history(folder, lengths, repeats)
    print(f"python {sys.version.split()[0]}, {n} awaits x {repeats} repeats, folder on {options.dir or os.getcwd()}")
    print(note)
    print(f"floor: one fsynced 100-byte append          {floor:9.1f} us")
    print(f"per-await overhead, small namespace          {small:9.1f} us   {small / floor:5.2f}x floor (target <= 1.5)")
    print(f"per-await overhead, untouched 1 MB namespace {big:9.1f} us   {big / small:5.2f}x small (target <= 3)")
    print(f"bytes written per await, small namespace     {small_bytes:9.0f} B")
    print(f"bytes written per await, 1 MB namespace      {big_bytes:9.0f} B")
    print(f"per-await overhead, SQLite provider          {sqlite:9.1f} us   {sqlite / small:5.2f}x filesystem (small namespace; target <= 1.2)")
    print(f"bytes written per await, SQLite provider     {sqlite_bytes:9.0f} B (records handed to the provider)")
    print(f"cold resume to first remaining statement     {wall:9.1f} ms wall ({inside:.1f} ms after interpreter start; target < 300)")
    print(f"import playbooks                              {import_ms:9.1f} ms over a bare interpreter")
    for awaits, h_wall, h_inside in history:
        print(f"cold resume after {awaits:5d} awaits              {h_wall:9.1f} ms wall ({h_inside:.1f} ms after "
              f"interpreter start; {h_wall / history[0][1]:.2f}x the first; target: flat)")


if __name__ == "__main__":
    main()
