"""A load test of the run queue: many short runs submitted at once, taken by a farm of workers.

    python benchmarks/load_workers.py [--runs 1000] [--workers 4] [--concurrency 2] [--orders 0.1]
                                      [--count 3] [--pause 0] [--lease 5] [--kill-one] [--dir PATH] [--keep]

A folder (under ``--dir``, default the current folder) gets ``tests/programs/ledger.pb``,
``examples/orders.pb`` with its cassette (the LLM's replies, replayed: no network; its code runs
isolated, the default) and a ``playbooks.toml`` naming a PostgreSQL database: of a private server
started for the test (``tests/pg_server.py``, its data directory in the same folder) or, with
``PLAYBOOKS_BENCH_POSTGRES_DSN``, a fresh database of that server. Then:

1. ``playbooks submit`` queues ``--runs`` runs, in ten interleaved batches: a share ``--orders`` of
   ``orders.pb`` runs, the rest ``ledger.pb --arg count=COUNT --arg pause=PAUSE`` (each of its
   ``count`` durable ``Charge`` calls writes a ``start`` and a ``done`` line with its idempotency key
   to the ledger file named by ``PLAYBOOKS_TEST_LEDGER``);
2. ``--workers`` ``playbooks worker --concurrency C --poll 0.1 --exit-when-idle`` processes start,
   and the test waits for all of them to exit; with ``--kill-one``, once half the runs completed, one
   worker that runs something is SIGKILLed with its process group (its run processes die with it),
   and its runs (those it claimed) must be taken over by the others once their leases (``--lease``
   s) expire, or their claims (one lease time) for a run whose process had not taken its lease yet;
3. it checks, and prints: every run completed, and exactly once (one "RUN completed" line in all the
   worker logs, none for a run the killed worker completed but could not reap; a run not
   interrupted was started by one process); the ``result`` of its record is
   what an uninterrupted run returns (``10 * sum(range(count))`` for a ledger run, 3 for orders); in
   the ledger each run has exactly ``count`` distinct keys, one per charge, each with a ``done``
   line, and no key has two ``done`` lines (except at most one per run the kill interrupted: the
   charge in flight runs again under the same key, as docs/durability.md says). It prints the wall
   time (workers' start to the last exit), the throughput, per-run latency percentiles (submit to
   completion, from the records' ``started`` and ``updated``; and claim to completion, the claim
   seen by polling the database every 0.2 s), and the machine (cores, load average).

Exits 1 if any check fails (the folder is then kept, with the worker logs), 0 otherwise. Timings
are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests")]

DSN_ENV = "PLAYBOOKS_BENCH_POSTGRES_DSN"
POLL = 0.2


def _percentiles(values: list[float]) -> str:
    if not values:
        return "(none)"
    ordered = sorted(values)

    def pct(p: float) -> float:
        return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]

    return (f"p50 {pct(50):7.2f} s   p90 {pct(90):7.2f} s   p99 {pct(99):7.2f} s   max {ordered[-1]:7.2f} s   "
            f"mean {statistics.fmean(ordered):7.2f} s")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


def _mem_gb() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GB"
    except OSError:
        pass
    return "?"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


class Farm:
    def __init__(self, folder: Path, dsn: str, options: argparse.Namespace) -> None:
        self.folder = folder
        self.dsn = dsn
        self.options = options
        self.ledger_path = folder / "ledger.txt"
        self.workers: dict[str, subprocess.Popen[bytes]] = {}
        for source in (ROOT / "tests" / "programs" / "ledger.pb", ROOT / "tests" / "programs" / "ledger.cassette.json",
                       ROOT / "examples" / "orders.pb", ROOT / "examples" / "orders.cassette.json"):
            shutil.copy(source, folder)
        (folder / "playbooks.toml").write_text(
            f"[durability]\nprovider = \"postgres\"\ndsn = {json.dumps(dsn)}\n"
            f"lease_seconds = {options.lease}\n"
        )

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
        env["PLAYBOOKS_TEST_LEDGER"] = str(self.ledger_path)
        env["PYTHONHASHSEED"] = "1234"
        return env

    def submit(self, program: str, count: int, *args: str) -> list[str]:
        if count <= 0:
            return []
        extra = [a for arg in args for a in ("--arg", arg)]
        done = subprocess.run(
            [sys.executable, "-m", "playbooks", "submit", program, "--count", str(count), *extra],
            cwd=self.folder, env=self.env(), capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0:
            raise SystemExit(f"playbooks submit failed with status {done.returncode}:\n{done.stderr}")
        ids = done.stdout.split()
        if len(ids) != count:
            raise SystemExit(f"playbooks submit printed {len(ids)} run ids for --count {count}:\n{done.stdout}")
        return ids

    def start_worker(self, name: str) -> None:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - the worker owns it
        self.workers[name] = subprocess.Popen(
            [sys.executable, "-m", "playbooks", "worker", "--name", name,
             "--concurrency", str(self.options.concurrency), "--poll", "0.1", "--exit-when-idle"],
            cwd=self.folder, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                try:
                    os.killpg(process.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            process.wait()


def _batches(total: int, parts: int) -> list[int]:
    """``total`` split in ``parts`` near-equal counts (some 0 when ``total < parts``)."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def run(options: argparse.Namespace, folder: Path, dsn: str, server_version: str) -> bool:
    import psycopg

    farm = Farm(folder, dsn, options)
    n_orders = round(options.runs * options.orders)
    n_ledger = options.runs - n_orders
    expected_ledger = 10 * sum(range(options.count))
    program_of: dict[str, str] = {}

    load_before = _load()
    t_submit = time.perf_counter()
    for ledger_batch, orders_batch in zip(_batches(n_ledger, 10), _batches(n_orders, 10), strict=True):
        for run_id in farm.submit("ledger.pb", ledger_batch, f"count={options.count}", f"pause={options.pause}"):
            program_of[run_id] = "ledger"
        for run_id in farm.submit("orders.pb", orders_batch):
            program_of[run_id] = "orders"
    submit_seconds = time.perf_counter() - t_submit
    if len(program_of) != options.runs:
        raise SystemExit(f"submitted {len(program_of)} runs, not {options.runs}")

    claimed_at: dict[str, float] = {}
    completed_seen: set[str] = set()
    victim: str | None = None
    taken: list[str] = []
    killed_at = 0.0
    moved: dict[str, float] = {}
    t0 = time.perf_counter()
    for i in range(options.workers):
        farm.start_worker(f"w{i + 1}")
    deadline = time.monotonic() + options.timeout
    timed_out = False
    with psycopg.connect(dsn, autocommit=True) as conn:
        while True:
            now = time.time()
            rows = conn.execute("SELECT run_id, worker, status FROM playbooks_runs").fetchall()
            running_by: dict[str, list[str]] = defaultdict(list)
            leased_by: Counter[str] = Counter()  # runs whose process took the lease (recorded running)
            for run_id, worker, status in rows:
                if worker and run_id not in claimed_at:
                    claimed_at[run_id] = now
                if status == "completed":
                    completed_seen.add(run_id)
                elif status in ("queued", "running") and worker:  # claimed (its process may not run yet)
                    running_by[worker].append(run_id)
                    leased_by[worker] += status == "running"
                if victim is not None and run_id in taken and run_id not in moved and worker != victim:
                    moved[run_id] = time.perf_counter() - killed_at
            if options.kill_one and victim is None and len(completed_seen) >= options.runs // 2:
                # Prefer a worker whose runs hold their leases: their takeover waits for the lease.
                busy = sorted((w for w in farm.workers if running_by.get(w) and farm.workers[w].poll() is None),
                              key=lambda w: -leased_by[w])
                if busy:
                    victim = busy[0]
                    taken = list(running_by[victim])
                    os.killpg(farm.workers[victim].pid, signal.SIGKILL)
                    killed_at = time.perf_counter()
                    print(f"killed worker {victim} (SIGKILL to its process group) {killed_at - t0:.1f} s in, "
                          f"with {len(completed_seen)} runs completed; it had claimed {', '.join(taken)}",
                          flush=True)
                    for run_id, status, claim_left, gen, owner, lease_left in conn.execute(
                        "SELECT r.run_id, r.status, extract(epoch FROM r.claimed_until - now()), l.generation, "
                        "l.owner, extract(epoch FROM l.expires_at - now()) FROM playbooks_runs r "
                        "LEFT JOIN playbooks_leases l ON l.execution_id = r.run_id WHERE r.run_id = ANY(%s)",
                        (taken,),
                    ).fetchall():
                        claim = "no claim" if claim_left is None else f"its claim ends in {float(claim_left):.1f} s"
                        lease = ("no lease taken" if gen is None else
                                 f"lease generation {gen} of {owner or 'nobody'}, ends in {float(lease_left):.1f} s")
                        print(f"  {run_id}: {status}, {claim}, {lease}", flush=True)
            if all(p.poll() is not None for p in farm.workers.values()):
                break
            if time.monotonic() > deadline:
                timed_out = True
                farm.stop()
                break
            time.sleep(POLL)
    wall = time.perf_counter() - t0
    load_after = _load()
    exit_codes = {name: p.returncode for name, p in farm.workers.items()}

    from playbooks.cli.postgres_runs import PostgresRunStore

    store = PostgresRunStore(dsn)
    try:
        records = {r.run_id: r for r in store.all()}
    finally:
        store.close()
    with psycopg.connect(dsn, autocommit=True) as conn:
        generations: dict[str, int] = dict(
            conn.execute("SELECT execution_id, generation FROM playbooks_leases").fetchall()
        )

    # --- checks
    failures: list[str] = []
    killed = set(taken)
    logs = {name: farm.log(name) for name in farm.workers}
    completed_lines: Counter[str] = Counter()
    starts: Counter[str] = Counter()
    for text in logs.values():
        for line in text.splitlines():
            if not line.startswith("worker "):
                continue
            words = line.split()
            if len(words) >= 4 and words[3] == "completed":
                completed_lines[words[2]] += 1
            if len(words) >= 4 and words[2] == "runs":
                starts[words[3]] += 1
    statuses = Counter(records[r].status if r in records else "missing" for r in program_of)
    completed = [r for r in program_of if r in records and records[r].status == "completed"]
    failed = [r for r in program_of if r in records and records[r].status == "failed"]
    if statuses["completed"] != options.runs:
        failures.append(f"runs not completed: {dict((k, v) for k, v in statuses.items() if k != 'completed')}")
        for r in [r for r in program_of if r not in completed][:5]:
            rec = records.get(r)
            failures.append(f"  {r}: {rec.status if rec else 'no record'} {rec.error[:300] if rec else ''}")
    wrong_result = []
    for r in completed:
        want = expected_ledger if program_of[r] == "ledger" else 3
        try:
            got = json.loads(records[r].result)
        except ValueError:
            got = records[r].result
        if got != want:
            wrong_result.append(f"{r}: result {records[r].result!r}, not {want}")
    if wrong_result:
        failures.append(f"{len(wrong_result)} runs with a wrong result, e.g. {wrong_result[:3]}")
    # A run the killed worker's process completed just before the kill may have no line (nobody reaped it).
    not_once = {r: completed_lines[r] for r in program_of if completed_lines[r] != 1
                and not (completed_lines[r] == 0 and victim is not None and r in records
                         and records[r].worker == victim)}
    if not_once:
        failures.append(f"{len(not_once)} runs logged as completed other than once: "
                        f"{dict(list(not_once.items())[:5])}")
    restarted = {r: starts[r] for r in program_of if starts[r] != 1 and r not in killed}
    if restarted:
        failures.append(f"{len(restarted)} runs nobody interrupted were started by more than one process "
                        f"(or none): {dict(list(restarted.items())[:5])}")

    lines = farm.ledger_path.read_text().splitlines() if farm.ledger_path.exists() else []
    by_run: dict[str, list[tuple[str, str, int]]] = defaultdict(list)
    for line in lines:
        kind, key, n = line.split("\t")
        by_run[key.split(":", 1)[0]].append((kind, key, int(n)))
    dup_keys_unexpected: list[str] = []
    dup_keys_allowed: list[str] = []
    bad_keys: list[str] = []
    for r in (r for r in program_of if program_of[r] == "ledger"):
        mine = by_run.get(r, [])
        keys_of = {n: {key for _, key, m in mine if m == n} for n in range(options.count)}
        all_keys = {key for _, key, _ in mine}
        done = Counter(key for kind, key, _ in mine if kind == "done")
        if any(len(k) != 1 for k in keys_of.values()) or len(all_keys) != options.count or set(done) != all_keys:
            bad_keys.append(f"{r}: keys per charge {({n: sorted(k) for n, k in keys_of.items()})}, "
                            f"done {dict(done)}")
        twice = [key for key, times in done.items() if times > 1]
        if r in killed and len(twice) <= 1:
            dup_keys_allowed += twice
        else:
            dup_keys_unexpected += twice
    if bad_keys:
        failures.append(f"{len(bad_keys)} ledger runs without exactly {options.count} distinct keys, one per "
                        f"charge, each done: {bad_keys[:3]}")
    if dup_keys_unexpected:
        failures.append(f"{len(dup_keys_unexpected)} idempotency keys with two done lines: {dup_keys_unexpected[:5]}")
    stray = set(by_run) - set(program_of)
    if stray:
        failures.append(f"ledger lines of runs never submitted: {sorted(stray)[:3]}")
    for name, code in exit_codes.items():
        if name != victim and code != 0:
            failures.append(f"worker {name} exited with status {code}")
    if timed_out:
        failures.append(f"the workers were still going after --timeout {options.timeout:g} s (killed)")
    if victim is not None:
        not_moved = [r for r in taken if r not in moved and records.get(r) is not None
                     and records[r].worker == victim]
        if not_moved:
            failures.append(f"runs of the killed worker never taken over: {not_moved}")
    elif options.kill_one:
        failures.append("--kill-one: no worker was found running something after half the runs (nothing killed)")

    # --- report
    e2e = [records[r].updated - records[r].started for r in completed]
    service = [records[r].updated - claimed_at[r] for r in completed if r in claimed_at]
    mix = (f"{n_ledger} x ledger.pb (count={options.count}, pause={options.pause})"
           + (f" + {n_orders} x orders.pb (LLM code from its cassette, isolated)" if n_orders else "")
           + ", interleaved in 10 submit batches")
    print(f"machine: {os.cpu_count()} cores ({_cpu_model()}), {_mem_gb()} RAM, python {sys.version.split()[0]}, "
          f"PostgreSQL {server_version}")
    print(f"load average (1/5/15 min): {load_before} before, {load_after} after")
    print(f"mix: {mix}")
    print(f"farm: {options.workers} workers x concurrency {options.concurrency}, lease {options.lease:g} s, "
          f"poll 0.1 s, --exit-when-idle" + (", --kill-one" if options.kill_one else ""))
    print(f"submit: {options.runs} runs in {submit_seconds:.1f} s (before the workers started)")
    print(f"runs completed: {statuses['completed']} / {options.runs}")
    print(f"runs failed: {len(failed)}" + (f" (other statuses: {dict(statuses)})" if len(statuses) > 1 else ""))
    print(f"results as an uninterrupted run: {len(completed) - len(wrong_result)} / {len(completed)}")
    print(f"runs completed other than exactly once (worker logs): {len(not_once)}")
    multi = sum(1 for r in program_of if starts[r] > 1)
    print(f"runs started by more than one process: {multi}"
          + (f" (killed worker's runs: {len(killed)})" if victim else ""))
    gens = Counter(generations.get(r, 0) for r in program_of)
    print(f"lease generations of the runs: {dict(sorted(gens.items()))} (runs per generation)")
    print(f"ledger: {len(lines)} lines; runs without exactly {options.count} distinct keys each done: {len(bad_keys)}; "
          f"keys with two done lines: {len(dup_keys_unexpected)} unexpected, {len(dup_keys_allowed)} allowed "
          f"(a charge in flight when its worker was killed)")
    if victim is not None:
        times = sorted(moved.values())
        print(f"killed {victim}: exit status {exit_codes[victim]}; its {len(taken)} runs taken over by "
              f"{', '.join(sorted({records[r].worker for r in taken if r in records}))} after "
              + (", ".join(f"{t:.1f}" for t in times) + " s" if times else "(none seen)")
              + f" (lease {options.lease:g} s; a claimed run whose process took no lease yet waits for "
              f"its claim, one lease time)")
    print(f"wall time: {wall:.1f} s (workers' start to the last exit)")
    print(f"throughput: {len(completed) / wall:.2f} runs/s ({wall / max(1, len(completed)) * 1000:.0f} ms a run; "
          f"{options.workers * options.concurrency} run slots, so about "
          f"{wall * options.workers * options.concurrency / max(1, len(completed)):.2f} s of slot time a run)")
    print(f"latency, submit to completion: {_percentiles(e2e)}")
    print(f"latency, claim to completion:  {_percentiles(service)} (claims seen every {POLL:g} s)")
    print(f"worker exit statuses: {exit_codes}")
    if failures:
        print("FAILED:")
        for f in failures:
            print(f"  {f}")
        for name, text in logs.items():
            print(f"--- last lines of {name}.log\n{text[-2000:]}")
        print(f"(the folder is kept: {folder})")
    else:
        print("all checks passed")
    return not failures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--orders", type=float, default=0.1, help="share of orders.pb runs (default 0.1; 0: none)")
    parser.add_argument("--count", type=int, default=3, help="charges per ledger run (default 3)")
    parser.add_argument("--pause", type=float, default=0.0, help="seconds each charge takes (default 0)")
    parser.add_argument("--lease", type=float, default=5.0, help="durability.lease_seconds (default 5)")
    parser.add_argument("--kill-one", action="store_true", help="SIGKILL one worker once half the runs completed")
    parser.add_argument("--timeout", type=float, default=3600.0, help="give up after this many seconds")
    parser.add_argument("--dir", default=None, help="where the folder goes (default: the current folder)")
    parser.add_argument("--keep", action="store_true", help="keep the folder (logs, ledger) even if all passed")
    options = parser.parse_args()
    if options.runs < 1 or options.workers < 1 or options.concurrency < 1 or not 0 <= options.orders <= 1:
        parser.error("--runs, --workers and --concurrency must be >= 1 and --orders in [0, 1]")
    if options.kill_one and options.workers < 2:
        parser.error("--kill-one needs at least 2 workers")

    from pg_server import PostgresServer  # type: ignore[import-not-found]  # tests/, on sys.path above

    folder = Path(tempfile.mkdtemp(prefix=".load-workers-", dir=os.path.abspath(options.dir or os.getcwd())))
    os.chmod(folder, 0o711)  # as root, the private server runs as the postgres user: it must reach its data
    ok = False
    saved, tempfile.tempdir = tempfile.tempdir, str(folder)
    try:
        server = PostgresServer(external_dsn=os.environ.get(DSN_ENV) or None)
    finally:
        tempfile.tempdir = saved
    try:
        if not server.external:
            server.start()
        dsn = server.new_database()
        import psycopg

        with psycopg.connect(dsn) as conn:
            row: Any = conn.execute("SHOW server_version").fetchone()
        ok = run(options, folder, dsn, row[0])
    finally:
        server.close()
        if ok and not options.keep:
            shutil.rmtree(folder, ignore_errors=True)
        elif ok:
            print(f"(the folder is kept: {folder})")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
