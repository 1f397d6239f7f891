"""Benchmarks of streaming execution: splitter cost per line and executor overhead per statement.

Run from the repository root::

    .venv/bin/python benchmarks/bench_streaming.py            # full run
    .venv/bin/python benchmarks/bench_streaming.py --quick    # fewer repeats, smaller executor run

Part 1 feeds three code shapes to :class:`~playbooks.execution.statement_splitter.StatementSplitter`
in small chunks (draining statements after each feed) at several sizes, and reports the growth ratio of
the total time between the largest and the smallest size (linear growth gives the size ratio, 8).

Part 2 compares the per-statement cost of :class:`~playbooks.StreamingPythonExecutor` with a plain
``exec`` of the same statements compiled one by one (the baseline) and with one ``exec`` of the whole code.

Times are the best of several repeats (``time.perf_counter``). Nothing is asserted about them.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import anyio  # noqa: E402

from playbooks import Agent, StreamingPythonExecutor  # noqa: E402
from playbooks.execution.statement_splitter import END, NEED_DATA, StatementSplitter  # noqa: E402

SIZES = (500, 1000, 2000, 4000)


# --------------------------------------------------------------------------- code shapes


def flat_code(n: int) -> str:
    """One simple assignment per line."""
    return "".join(f"x{i} = {i} * 2\n" for i in range(n))


def long_for_body(n: int) -> str:
    """A single ``for`` whose body has ``n`` indented lines (one pending compound statement)."""
    return "for i in range(n):\n" + "".join(f"    y{k} = i + {k}\n" for k in range(n))


def column0_list(n: int) -> str:
    """A multi-line list literal whose elements start at column 0 (continuation lines in brackets)."""
    return "x = [\n" + "".join(f"{k},\n" for k in range(n)) + "]\n"


SHAPES: dict[str, Callable[[int], str]] = {
    "flat": flat_code,
    "for-body": long_for_body,
    "list-col0": column0_list,
}


def chunks_of(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


# --------------------------------------------------------------------------- timing helpers


def best_of(repeats: int, fn: Callable[[], object]) -> float:
    """Best wall time of ``fn()`` over ``repeats`` runs, in seconds (GC disabled while timing)."""
    best = float("inf")
    for _ in range(repeats):
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - t0
        finally:
            gc.enable()
        best = min(best, elapsed)
    return best


# --------------------------------------------------------------------------- part 1: splitter


def split_all(chunks: list[str]) -> int:
    splitter = StatementSplitter()
    count = 0
    for chunk in chunks:
        splitter.feed(chunk)
        while (item := splitter.next_statement()) is not NEED_DATA:
            count += 1
    splitter.close()
    while (item := splitter.next_statement()) is not END:
        count += 1
    del item
    return count


def bench_splitter(repeats: int, chunk_size: int) -> dict[str, dict[int, float]]:
    results: dict[str, dict[int, float]] = {}
    print(f"Part 1: StatementSplitter, {chunk_size}-character chunks, best of {repeats}")
    print(f"{'shape':<10} {'lines':>6} {'chars':>7} {'stmts':>6} {'total ms':>10} {'us/line':>9}")
    for name, make in SHAPES.items():
        results[name] = {}
        for n in SIZES:
            text = make(n)
            chunks = chunks_of(text, chunk_size)
            statements = split_all(chunks)  # warm-up and sanity count
            elapsed = best_of(repeats, lambda: split_all(chunks))
            results[name][n] = elapsed
            lines = text.count("\n")
            print(
                f"{name:<10} {n:>6} {len(text):>7} {statements:>6} {elapsed * 1e3:>10.2f} "
                f"{elapsed * 1e6 / lines:>9.2f}"
            )
    print()
    lo, hi = SIZES[0], SIZES[-1]
    print(f"Growth of total time {hi}/{lo} lines (linear ~ {hi // lo}):")
    for name, by_size in results.items():
        print(f"  {name:<10} {by_size[hi] / by_size[lo]:.2f}")
    print()
    return results


# --------------------------------------------------------------------------- part 2: executor


def run_executor(chunks: list[str]) -> int:
    async def main() -> int:
        executor = StreamingPythonExecutor(Agent("bench"))
        for chunk in chunks:
            await executor.add_chunk(chunk)
        result = await executor.finalize()
        if not result.success:
            raise RuntimeError(f"benchmark code failed: {result.error}")
        return result.statements_executed

    return anyio.run(main)


def bench_executor(n: int, repeats: int, chunk_size: int) -> None:
    text = "".join(f"x{i} = {i} * 2\n" for i in range(n))
    chunks = chunks_of(text, chunk_size)
    lines = text.splitlines()

    def exec_one_by_one() -> None:
        namespace: dict[str, object] = {}
        for line in lines:
            exec(compile(line, "<bench>", "exec"), namespace)

    def exec_whole() -> None:
        exec(compile(text, "<bench>", "exec"), {})

    executed = run_executor(chunks)  # warm-up and sanity count
    assert executed == n, executed

    t_exec = best_of(repeats, lambda: run_executor(chunks))
    t_loop = best_of(repeats, exec_one_by_one)
    t_whole = best_of(repeats, exec_whole)

    print(
        f"Part 2: executor overhead, {n} statements 'x{{i}} = {{i}} * 2', "
        f"{chunk_size}-character chunks ({len(chunks)} chunks), best of {repeats}"
    )
    print(f"{'variant':<44} {'total ms':>9} {'us/stmt':>8} {'ratio':>7}")
    rows = (
        ("StreamingPythonExecutor (anyio.run, chunks)", t_exec),
        ("exec, compiled one by one (baseline)", t_loop),
        ("exec of the whole code, compiled once", t_whole),
    )
    for label, t in rows:
        print(f"{label:<44} {t * 1e3:>9.2f} {t * 1e6 / n:>8.2f} {t / t_loop:>6.2f}x")
    print(f"executor / one-by-one exec: {t_exec / t_loop:.2f}x; executor / whole exec: {t_exec / t_whole:.2f}x")
    print()


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and a smaller executor run")
    parser.add_argument("--chunk-size", type=int, default=4, help="characters per fed chunk (default 4)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per measurement (default 7, 2 with --quick)")
    args = parser.parse_args(argv)

    repeats = args.repeats or (2 if args.quick else 7)
    statements = 500 if args.quick else 2000

    print(f"python {platform.python_version()} ({platform.python_implementation()}), "
          f"{platform.system()} {platform.machine()}, nproc {os.cpu_count()}")
    print()
    bench_splitter(repeats, args.chunk_size)
    bench_executor(statements, repeats, args.chunk_size)
    command = " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv])
    print(f"command: {command}")


if __name__ == "__main__":
    main()
