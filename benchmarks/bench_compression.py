"""What compressing large snapshots costs and saves, measured beside not compressing, in one run.

    python benchmarks/bench_compression.py [--dir PATH] [--repeats 5]

For each kind of big variable (a list of dicts, text, floats, random bytes) a durable executor runs
``v = <value>`` then one durable call, so the final snapshot holds the value inline; the same run is
made with compression off (``CheckpointManager.compress_over = None``). Printed per kind: the bytes of
the snapshot files, the time of the durable run (what the writer pays), and the time of a cold load of
the latest checkpoint's namespace (what a resume pays), with compressed/plain ratios. zlib level 1.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

import anyio

from playbooks import Agent
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

VALUES = {
    "list of 20,000 dicts": "[{'id': i, 'name': f'customer {i}', 'tags': ['a', 'b']} for i in range(20000)]",
    "1.4 MB of text": "' '.join(f'word{i % 977} sentence {i}' for i in range(60000))",
    "120,000 floats": "[i * 0.37 for i in range(120000)]",
    "1 MB of random bytes": "__import__('os').urandom(1 << 20)",
}


async def _work(x: int) -> int:
    return x


async def _once(folder: str, expression: str, compress: bool) -> tuple[int, float, float]:
    shutil.rmtree(folder, ignore_errors=True)
    provider = FilesystemCheckpointProvider(folder)
    manager = CheckpointManager("bench", provider, keep_last_n=None)
    if not compress:
        manager.compress_over = None
    executor = StreamingPythonExecutor(Agent("bench", tools={"Work": _work}), checkpoint_manager=manager)
    await executor.add_chunk(f"v = {expression}\n")  # built before the clock starts
    began = time.perf_counter()
    await executor.add_chunk("n = await Work(1)\n")
    await executor.finalize()
    await manager.close()
    wrote = time.perf_counter() - began
    size = sum(os.path.getsize(os.path.join(folder, "bench", f)) for f in os.listdir(os.path.join(folder, "bench")))
    began = time.perf_counter()
    reader = CheckpointManager("bench", FilesystemCheckpointProvider(folder))
    checkpoint = await reader.get_latest_checkpoint()
    assert checkpoint is not None
    _ = checkpoint["namespace"]["v"]
    loaded = time.perf_counter() - began
    return size, wrote, loaded


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: a temp folder)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    base = tempfile.mkdtemp(prefix="bench-compress-", dir=args.dir)
    print(f"zlib level 1, median of {args.repeats} runs, folder {base}")
    print(f"{'value':24} {'stored (plain -> zlib)':>26} {'write ms (plain -> zlib)':>26} {'load ms (plain -> zlib)':>25}")
    try:
        for name, expression in VALUES.items():
            results: dict[bool, list[tuple[int, float, float]]] = {True: [], False: []}
            for _ in range(args.repeats):
                for compress in (False, True):
                    results[compress].append(anyio.run(_once, os.path.join(base, "s"), expression, compress))
            med: dict[bool, Any] = {
                c: [statistics.median(r[i] for r in results[c]) for i in range(3)] for c in (False, True)
            }
            (ps, pw, pl), (zs, zw, zl) = med[False], med[True]
            print(f"{name:24} {ps / 1e6:8.2f} MB -> {zs / 1e6:5.2f} MB ({zs / ps:4.2f}x) "
                  f"{pw * 1e3:8.1f} -> {zw * 1e3:6.1f} ({zw / pw:4.2f}x) "
                  f"{pl * 1e3:8.1f} -> {zl * 1e3:6.1f} ({zl / pl:4.2f}x)")
    finally:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
