"""Workers sharing a real PostgreSQL store, with real processes: killed, paused, the database restarted.

``playbooks submit`` queues runs; ``playbooks worker`` processes (each running its runs as child
processes) take them. The programs: ``examples/orders.pb`` (the LLM's code, from its cassette, run
isolated) and ``tests/programs/ledger.pb``, whose durable ``Charge`` calls write ``start`` and ``done``
lines with their idempotency key to a ledger file: a completed charge that ran again would write a
second ``done`` line for its key.

What every test checks at the end: each run completed with the value an uninterrupted run returns, and
for each ledger run, every charge was made under one key and none completed twice, except the one
charge a kill caught in flight (it runs again under the same key, as docs/durability.md says).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pg_server import PostgresServer, postgres_dsn, postgres_server  # noqa: F401  (fixtures)
from playbooks.cli.postgres_runs import PostgresRunStore
from playbooks.cli.run_store import RunRecord

pytestmark = [pytest.mark.integration]

ROOT = Path(__file__).resolve().parent.parent
LEASE = 2.0
LEDGER_COUNT = 8


@dataclass
class Farm:
    """A folder with the programs and a playbooks.toml naming the database, and the workers started."""

    folder: Path
    dsn: str
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def ledger_path(self) -> Path:
        return self.folder / "ledger.txt"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}
        env["PLAYBOOKS_TEST_LEDGER"] = str(self.ledger_path)
        env["PYTHONHASHSEED"] = "1234"  # no re-execution to pin a seed: faster, same checks
        return env

    def submit(self, program: str, count: int, *args: str) -> list[str]:
        extra = [a for arg in args for a in ("--arg", arg)]
        done = subprocess.run(
            [sys.executable, "-m", "playbooks", "submit", program, "--count", str(count), *extra],
            cwd=self.folder, env=self.env(), capture_output=True, text=True, timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    def start_worker(self, name: str, concurrency: int = 2, *extra: str) -> subprocess.Popen[bytes]:
        log = open(self.folder / f"{name}.log", "wb")  # noqa: SIM115 - the worker owns it
        process = subprocess.Popen(
            [sys.executable, "-m", "playbooks", "worker", "--name", name, "--concurrency", str(concurrency),
             "--poll", "0.1", *extra],
            cwd=self.folder, env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.workers[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")

    def records(self) -> dict[str, RunRecord]:
        store = PostgresRunStore(self.dsn)
        try:
            return {r.run_id: r for r in store.all()}
        finally:
            store.close()

    def wait(self, run_ids: list[str], timeout: float = 90.0) -> dict[str, RunRecord]:
        """Wait until every run recorded an end; return the records."""
        deadline = time.monotonic() + timeout
        while True:
            records = self.records()
            if all(records[r].status in ("completed", "failed", "waiting") for r in run_ids):
                return records
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n}\n{self.log(n)[-3000:]}" for n in self.workers)
                pending = {r: records[r].status for r in run_ids if records[r].status not in ("completed",)}
                raise AssertionError(f"runs not ended after {timeout} s: {pending}\n{logs}")
            time.sleep(0.2)

    def wait_for_ledger(self, lines: int, timeout: float = 30.0) -> None:
        """Wait until the runs wrote ``lines`` ledger lines (they are under way)."""
        deadline = time.monotonic() + timeout
        while len(self.ledger()) < lines:
            assert time.monotonic() < deadline, "\n".join(self.log(n) for n in self.workers)
            time.sleep(0.02)

    def ledger(self) -> list[tuple[str, str, int]]:
        if not self.ledger_path.exists():
            return []
        lines = self.ledger_path.read_text().splitlines()
        return [(kind, key, int(n)) for kind, key, n in (line.split("\t") for line in lines)]

    def stop(self) -> None:
        for process in self.workers.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture
def farm(tmp_path: Path, postgres_dsn: str) -> Iterator[Farm]:  # noqa: F811
    for source in (ROOT / "examples" / "orders.pb", ROOT / "examples" / "orders.cassette.json",
                   ROOT / "tests" / "programs" / "ledger.pb", ROOT / "tests" / "programs" / "ledger.cassette.json"):
        shutil.copy(source, tmp_path)
    (tmp_path / "playbooks.toml").write_text(
        f"[durability]\nprovider = \"postgres\"\ndsn = {json.dumps(postgres_dsn)}\nlease_seconds = {LEASE}\n"
    )
    f = Farm(tmp_path, postgres_dsn)
    yield f
    f.stop()


def check_ledger(farm: Farm, records: dict[str, RunRecord], ledger_runs: list[str], killed: set[str],
                 count: int = LEDGER_COUNT) -> None:
    """Each ledger run charged 0..count-1 once each (one key per charge); a key completed twice only
    for a charge in flight at a kill of that run, at most one per run."""
    lines = farm.ledger()
    for run_id in ledger_runs:
        record = records[run_id]
        assert record.status == "completed", (run_id, record.status, record.error)
        assert json.loads(record.result) == 10 * sum(range(count))
        mine = [(kind, key, n) for kind, key, n in lines if key.startswith(f"{run_id}:")]
        keys_of = {n: {key for _, key, m in mine if m == n} for n in range(count)}
        assert all(len(keys) == 1 for keys in keys_of.values()), (run_id, keys_of)
        done = Counter(key for kind, key, _ in mine if kind == "done")
        assert set(done) == {next(iter(k)) for k in keys_of.values()}
        twice = [key for key, times in done.items() if times > 1]
        assert len(twice) <= (1 if run_id in killed else 0), (run_id, twice)


def _holding(farm: Farm, name: str) -> list[str]:
    return [r.run_id for r in farm.records().values() if r.worker == name and r.status == "running"]


def test_runs_of_a_killed_worker_finish_on_the_others(farm: Farm) -> None:
    """Three workers; one is SIGKILLed (with its run processes) at a random instant while it runs
    something: its runs are taken over within the lease time and finish exactly. One trial in CI;
    ``PLAYBOOKS_WORKER_TRIALS=N`` runs N (the soak behind docs/scale-out.md)."""
    seed = int(os.environ.get("PLAYBOOKS_WORKER_SEED", random.randrange(2**32)))
    trials = int(os.environ.get("PLAYBOOKS_WORKER_TRIALS", "1"))
    for trial in range(trials):
        try:
            _kill_trial(farm, random.Random(seed + trial), trial)
        except AssertionError as exc:
            raise AssertionError(f"trial {trial} (PLAYBOOKS_WORKER_SEED={seed + trial}, one trial): {exc}") from exc
        farm.stop()


def _kill_trial(farm: Farm, rng: random.Random, trial: int) -> None:
    ledger_runs = farm.submit("ledger.pb", 6, f"count={LEDGER_COUNT}", "pause=0.08")
    orders_runs = farm.submit("orders.pb", 2)
    names = [f"w{i}-{trial}" for i in (1, 2, 3)]
    for name in names:
        farm.start_worker(name)
    victim = rng.choice(names)
    deadline = time.monotonic() + 30
    while not _holding(farm, victim):
        assert time.monotonic() < deadline, farm.log(victim)
        time.sleep(0.05)
    time.sleep(rng.uniform(0.0, 0.6))
    taken = _holding(farm, victim)
    os.killpg(farm.workers[victim].pid, signal.SIGKILL)
    killed_at = time.monotonic()
    moved: dict[str, float] = {}
    while len(moved) < len(taken) and time.monotonic() - killed_at < LEASE + 10:
        for run_id, record in farm.records().items():
            if run_id in taken and run_id not in moved and record.worker != victim:
                moved[run_id] = time.monotonic() - killed_at
        time.sleep(0.05)
    records = farm.wait(ledger_runs + orders_runs)
    unfinished_at_kill = [r for r in taken if r not in moved and records[r].worker == victim]
    assert not unfinished_at_kill, f"runs of the killed worker not taken over: {unfinished_at_kill}"
    assert all(seconds <= LEASE + 3 for seconds in moved.values()), moved
    for run_id in orders_runs:
        assert records[run_id].status == "completed", records[run_id].error
        assert json.loads(records[run_id].result) == 3
    check_ledger(farm, records, ledger_runs, killed=set(taken))
    print(f"trial {trial}: killed {victim} holding {len(taken)} runs; taken over after "
          f"{', '.join(f'{s:.2f}' for s in sorted(moved.values())) or '-'} s")


def _table_rows(dsn: str) -> list[tuple[object, ...]]:
    import psycopg

    with psycopg.connect(dsn) as conn:
        rows: list[tuple[object, ...]] = []
        for table in ("playbooks_checkpoints", "playbooks_journal", "playbooks_heads"):
            rows += conn.execute(f"SELECT '{table}', * FROM {table} ORDER BY 2, 3").fetchall()  # noqa: S608
        rows += conn.execute("SELECT run_id, status, record->>'result' FROM playbooks_runs ORDER BY 1").fetchall()
        return rows


def test_a_paused_worker_whose_lease_was_taken_writes_nothing(farm: Farm) -> None:
    """SIGSTOP a worker and its run past the lease; another worker takes the run over and finishes it;
    SIGCONT: the old run process is refused every write (fencing) and stops, changing nothing."""
    count = 30
    [run_id] = farm.submit("ledger.pb", 1, f"count={count}", "pause=0.1")
    paused = farm.start_worker("paused", concurrency=1)
    farm.wait_for_ledger(6)
    os.killpg(paused.pid, signal.SIGSTOP)
    time.sleep(LEASE + 0.5)
    farm.start_worker("other", concurrency=1)
    records = farm.wait([run_id])
    assert records[run_id].worker == "other"
    before = _table_rows(farm.dsn)
    os.killpg(paused.pid, signal.SIGCONT)
    deadline = time.monotonic() + 20
    while f"{run_id} completed" not in farm.log("paused"):  # its run process ended (the record says how)
        assert time.monotonic() < deadline, farm.log("paused")
        time.sleep(0.1)
    log = farm.log("paused")
    # The refusal comes from whichever write came first: a checkpoint record or the run's record.
    assert "LeaseLostError" in log and "another worker" in log and "must stop" in log, log
    assert _table_rows(farm.dsn) == before
    check_ledger(farm, farm.records(), [run_id], killed={run_id}, count=count)


def test_runs_wait_for_a_restarted_database_and_go_on(farm: Farm, postgres_server: PostgresServer) -> None:  # noqa: F811
    """The database stops (fast shutdown: connections cut) during runs and comes back 1.5 s later:
    the runs wait, then finish exactly."""
    if postgres_server.external:
        pytest.skip("restarting the database needs a server the tests started")
    ledger_runs = farm.submit("ledger.pb", 4, "count=20", "pause=0.05")
    for name in ("w1", "w2"):
        farm.start_worker(name)
    farm.wait_for_ledger(10)
    postgres_server.stop("fast")
    time.sleep(1.5)
    postgres_server.start()
    records = farm.wait(ledger_runs)
    check_ledger(farm, records, ledger_runs, killed=set(ledger_runs), count=20)


def test_sigterm_hands_runs_back_at_once(farm: Farm) -> None:
    """A worker told to stop with a short grace hands its run back; another worker resumes it well
    before a lease would have expired, and it finishes exactly."""
    [run_id] = farm.submit("ledger.pb", 1, "count=30", "pause=0.1")
    first = farm.start_worker("first", 1, "--grace", "0.2")
    farm.wait_for_ledger(4)
    pid = re.search(rf"runs {run_id} \(pid (\d+)\)", farm.log("first"))
    assert pid is not None, farm.log("first")
    holder = f"{socket.gethostname()}:{pid[1]}"
    for command in (["runs"], ["checkpoints", "list"]):  # both name the worker process holding the run
        shown = subprocess.run([sys.executable, "-m", "playbooks", *command], cwd=farm.folder, env=farm.env(),
                               capture_output=True, text=True, timeout=60)
        line = next(line for line in shown.stdout.splitlines() if line.startswith(run_id))
        assert holder in line, (command, shown.stdout, shown.stderr)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=20) == 0
    assert f"handed back {run_id}" in farm.log("first")
    farm.start_worker("second", 1)
    records = farm.wait([run_id])
    assert records[run_id].worker == "second"
    check_ledger(farm, records, [run_id], killed={run_id}, count=30)


def test_sigterm_to_the_process_group_lets_the_runs_finish(farm: Farm) -> None:
    """systemd and Kubernetes signal every process of the worker: its runs ignore it and finish
    within the grace, then the worker exits."""
    [run_id] = farm.submit("ledger.pb", 1, "count=20", "pause=0.1")
    worker = farm.start_worker("graceful", 1, "--grace", "60")
    farm.wait_for_ledger(4)
    os.killpg(worker.pid, signal.SIGTERM)
    assert worker.wait(timeout=60) == 0, farm.log("graceful")
    record = farm.records()[run_id]
    assert record.status == "completed" and record.worker == "graceful", farm.log("graceful")
    check_ledger(farm, farm.records(), [run_id], killed=set(), count=20)


def test_a_run_records_its_end_while_it_still_holds_its_lease(
    farm: Farm, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The end of a run (completed, here) is saved before its lease is released: released first, a
    worker could claim the finished run in between and resume it as a crashed one (found by
    benchmarks/load_workers.py: 15 of 1,000 runs were started twice)."""
    import psycopg

    from playbooks.cli import main

    [run_id] = farm.submit("ledger.pb", 1, "count=2", "pause=0")
    seen: list[tuple[str, int]] = []
    save = PostgresRunStore.save

    def watching(store: PostgresRunStore, record: RunRecord) -> None:
        with psycopg.connect(farm.dsn) as conn:
            held = conn.execute(
                "SELECT count(*) FROM playbooks_leases WHERE execution_id = %s AND owner IS NOT NULL",
                (record.run_id,),
            ).fetchone()
        seen.append((record.status, held[0] if held else 0))
        save(store, record)

    monkeypatch.setattr(PostgresRunStore, "save", watching)
    monkeypatch.chdir(farm.folder)
    for name, value in farm.env().items():
        if name.startswith("PLAYBOOKS_"):
            monkeypatch.setenv(name, value)
    assert main(["run", "ledger.pb", "--resume", run_id, "--in-process"]) == 0
    assert ("completed", 1) in seen, seen
    assert all(held == 1 for _, held in seen), seen


def test_submit_refuses_a_local_store(tmp_path: Path) -> None:
    shutil.copy(ROOT / "tests" / "programs" / "ledger.pb", tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "playbooks", "submit", "ledger.pb"], cwd=tmp_path, capture_output=True, text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")}, timeout=60,
    )
    assert done.returncode == 2
    assert "durability.provider = \"postgres\"" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "command", [["runs"], ["checkpoints", "list"], ["submit", "ledger.pb"], ["worker"], ["run", "ledger.pb"]]
)
def test_an_unreachable_database_is_one_clear_line_for_every_command(tmp_path: Path, command: list[str]) -> None:
    shutil.copy(ROOT / "tests" / "programs" / "ledger.pb", tmp_path)
    shutil.copy(ROOT / "tests" / "programs" / "ledger.cassette.json", tmp_path)
    (tmp_path / "playbooks.toml").write_text(
        '[durability]\nprovider = "postgres"\ndsn = "host=/nonexistent port=5999 user=app password=hunter2"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "playbooks", *command], cwd=tmp_path, capture_output=True, text=True, timeout=60,
        env={k: v for k, v in os.environ.items() if not k.startswith("PLAYBOOKS_")},
    )
    assert done.returncode in (1, 2), done
    assert "Traceback" not in done.stderr and "hunter2" not in done.stderr + done.stdout
    assert "cannot reach PostgreSQL" in done.stderr and "durability.dsn" in done.stderr, done.stderr
