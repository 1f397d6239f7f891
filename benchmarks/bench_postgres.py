"""What a durable await costs with each checkpoint provider, side by side in one run on one disk.

    python benchmarks/bench_postgres.py [--awaits 500] [--repeats 11] [--dir PATH] [--quick]

The method of ``bench_checkpoint.py``'s ``overhead``: ``--awaits`` top-level awaits of a tool in a
``StreamingPythonExecutor``, the durable run minus the same code run without checkpoints, divided by
the awaits; the median over ``--repeats``. The three providers are measured in the same run with
their repeats interleaved (filesystem, SQLite, PostgreSQL, then again, the order rotated each round),
so a drift of the disk's fsync latency shows in all of them alike:

* filesystem (``FilesystemCheckpointProvider``) and SQLite, in a temporary folder under ``--dir``
  (default: the current folder);
* PostgreSQL: a private server started for the run (``tests/pg_server.py``: ``initdb``, Unix socket
  only, ``fsync=on``) whose data directory is under ``--dir`` too, so its WAL flushes hit the same
  disk as the other providers' fsyncs; or the server of ``PLAYBOOKS_BENCH_POSTGRES_DSN`` (a fresh
  database in it if the user may create one), whose disk is its own.

Prints the file system (type and device) of each folder, the server's version and its durability
settings, the fsync floor (one fsynced 100-byte append in the providers' folder: the median of
samples taken before every repeat), the per-await overhead of each provider in µs, and its ratios to
the filesystem provider and to the floor, and how many statements the PostgreSQL provider sent per
await (synchronous commits, and writes with ``synchronous_commit=off``). Timings are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests")]

from bench_checkpoint import _code, _work, floor_samples  # noqa: E402

from playbooks import Agent  # noqa: E402
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider  # noqa: E402
from playbooks.checkpoints.provider import CheckpointProvider  # noqa: E402
from playbooks.checkpoints.providers.sqlite import SQLiteCheckpointProvider  # noqa: E402
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor  # noqa: E402

DSN_ENV = "PLAYBOOKS_BENCH_POSTGRES_DSN"
PROVIDERS = ("filesystem", "sqlite", "postgres")


def file_system(path: str) -> str:
    """``ext4 on /dev/vda (mounted at /, st_dev 0xfd00)``: the mount holding ``path``."""
    real = os.path.realpath(path)
    best = ("?", "?", "?")
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                device, mount, fstype = line.split()[:3]
                mount = mount.replace("\\040", " ")
                inside = real == mount or real.startswith(mount.rstrip("/") + "/")
                if inside and len(mount) >= len(best[1]):
                    best = (device, mount, fstype)
    except OSError:
        pass
    return f"{best[2]} on {best[0]} (mounted at {best[1]}, st_dev {os.stat(real).st_dev:#x})"


async def _run(make: Callable[[str], CheckpointProvider] | None, n: int, execution_id: str) -> float:
    """Seconds for ``n`` awaits after a warm-up await (``bench_checkpoint._run`` with any provider)."""
    agent = Agent(execution_id, tools={"Work": _work})
    manager = CheckpointManager(execution_id, make(execution_id), keep_last_n=10) if make else None
    ex = StreamingPythonExecutor(agent, namespace={"x": 1, "name": "small"}, checkpoint_manager=manager)
    await ex.add_chunk("total = 0\nwarm = await Work(-1)\n")  # also opens the store (lock, connections)
    code = _code(n)
    start = time.perf_counter()
    await ex.add_chunk(code)
    elapsed = time.perf_counter() - start
    if manager is not None:
        await manager.close()
        await manager.provider.close()
    return elapsed


def _counting_postgres(dsn: str) -> Callable[[str], CheckpointProvider]:
    """A factory of PostgreSQL providers that count their statements (each ``_run`` is one statement
    on a pooled connection, from a worker thread) into ``_COUNTS``."""
    from playbooks.checkpoints.providers.postgres import PostgresCheckpointProvider

    class Counting(PostgresCheckpointProvider):
        def _run(self, work: Any, *, synchronous: bool = True) -> Any:
            _COUNTS["synchronous" if synchronous else "asynchronous"] += 1
            return super()._run(work, synchronous=synchronous)

    return lambda eid: Counting(dsn, lease_seconds=30)


_COUNTS: dict[str, int] = {"synchronous": 0, "asynchronous": 0}


def _factories(folder: str, dsn: str) -> dict[str, Callable[[str], CheckpointProvider]]:
    return {
        "filesystem": lambda eid: FilesystemCheckpointProvider(os.path.join(folder, "fs")),
        "sqlite": lambda eid: SQLiteCheckpointProvider(os.path.join(folder, f"{eid}.sqlite3")),
        "postgres": _counting_postgres(dsn),
    }


async def measure(folder: str, dsn: str, n: int, repeats: int) -> tuple[dict[str, list[float]], list[float]]:
    """Per-await overheads (µs) of each provider, one per repeat, and the floor samples (µs)."""
    factories = _factories(folder, dsn)
    overheads: dict[str, list[float]] = {p: [] for p in PROVIDERS}
    floor: list[float] = []
    tag = f"{os.getpid()}-{int(time.time())}"
    # one unmeasured round: imports, the PostgreSQL schema, the first files
    for p in PROVIDERS:
        await _run(factories[p], 5, f"{p}-warmup-{tag}")
    _COUNTS.update(synchronous=0, asynchronous=0)
    for r in range(repeats):
        order = PROVIDERS[r % 3:] + PROVIDERS[:r % 3]
        for p in order:
            floor.extend(floor_samples(folder, 40))
            plain = await _run(None, n, f"{p}-plain-{r}")
            durable = await _run(factories[p], n, f"{p}-{r}-{tag}")
            overheads[p].append((durable - plain) / n * 1e6)
    return overheads, floor


def server_facts(dsn: str) -> list[tuple[str, str]]:
    import psycopg

    names = ("server_version", "fsync", "synchronous_commit", "wal_sync_method", "full_page_writes",
             "commit_delay", "data_directory")
    facts = []
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name in names:
            try:
                row = conn.execute(f"SHOW {name}").fetchone()  # noqa: S608 - fixed names
                facts.append((name, str(row[0]) if row else "?"))
            except psycopg.Error:  # data_directory needs a privileged role
                conn.rollback()
    return facts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--awaits", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--dir", default=None, help="folder on the disk to measure (default: the current folder)")
    parser.add_argument("--quick", action="store_true", help="40 awaits, 3 repeats (noisier)")
    options = parser.parse_args()
    n, repeats = (40, 3) if options.quick else (options.awaits, options.repeats)
    base = os.path.abspath(options.dir or os.getcwd())

    from pg_server import PostgresServer  # type: ignore[import-not-found]  # tests/, on sys.path above

    external = os.environ.get(DSN_ENV) or None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(dir=base, prefix=".bench-pg-") as folder:
        os.mkdir(os.path.join(folder, "fs"))
        # The private server's data directory goes under tempfile's folder: make that ``folder``, open
        # to traversal (as root, the server runs as the postgres user, who must reach it).
        os.chmod(folder, 0o711)
        saved, tempfile.tempdir = tempfile.tempdir, folder
        try:
            server = PostgresServer(external_dsn=external)
        finally:
            tempfile.tempdir = saved
        try:
            if not server.external:
                server.start()
            try:
                dsn = server.new_database()
            except Exception as exc:  # noqa: BLE001 - an external server where we may not create one
                assert external is not None
                print(f"(cannot create a database on the external server: {exc}; using its own)")
                dsn = external
            facts = server_facts(dsn)
            overheads, floor = asyncio.run(measure(folder, dsn, n, repeats))
        finally:
            pg_dir = None if server.external else str(server.data_dir)
            pg_fs = None if pg_dir is None else file_system(pg_dir)
            same = pg_dir is not None and os.stat(pg_dir).st_dev == os.stat(folder).st_dev
            server.close()
        provider_fs = file_system(folder)
    total = time.perf_counter() - started

    fl = statistics.median(floor)
    med = {p: statistics.median(v) for p, v in overheads.items()}
    print(f"python {sys.version.split()[0]}, {n} awaits x {repeats} repeats (interleaved), {os.cpu_count()} cores, "
          f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}, {total:.0f} s in all")
    print(f"filesystem and SQLite folder  {folder}")
    print(f"  file system                 {provider_fs}")
    if pg_dir is not None:
        print(f"PostgreSQL data directory     {pg_dir} (a private server; fsync=on)")
        print(f"  file system                 {pg_fs}")
        print(f"  same device as the others   {'yes' if same else 'NO: the comparison is not on one disk'}")
    else:
        print(f"PostgreSQL                    the external server of {DSN_ENV} (its disk is its own)")
    for name, value in facts:
        print(f"  {name:<27} {value}")
    print(f"floor: one fsynced 100-byte append            {fl:9.1f} us   ({len(floor)} samples)")
    print("per-await overhead (median; min..max over repeats)")
    for p in PROVIDERS:
        values = overheads[p]
        print(f"  {p:<11} {med[p]:9.1f} us   {med[p] / med['filesystem']:5.2f}x filesystem   "
              f"{med[p] / fl:5.2f}x floor   ({min(values):.1f}..{max(values):.1f})")
    awaits = n * repeats
    print(f"PostgreSQL statements per await: {_COUNTS['synchronous'] / awaits:.2f} synchronous commit(s), "
          f"{_COUNTS['asynchronous'] / awaits:.2f} with synchronous_commit=off (setup and close included)")


if __name__ == "__main__":
    main()
