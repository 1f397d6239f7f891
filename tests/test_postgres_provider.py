"""The PostgreSQL provider beyond the conformance suite: leases, fencing, schema, errors, and exact
resume of durable executors killed with SIGKILL, all against a real server (tests/pg_server.py)."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import anyio
import pytest

from pg_server import PostgresServer, postgres_dsn, postgres_server  # noqa: F401  (fixtures)
from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.providers import postgres
from playbooks.checkpoints.providers.postgres import (
    SCHEMA_VERSION,
    PostgresCheckpointProvider,
    ensure_schema,
    redact_dsn,
)
from playbooks.config import DurabilityConfig
from playbooks.errors import (
    CheckpointError,
    ExecutionLockedError,
    LeaseLostError,
    StoragePathError,
)

pytestmark = pytest.mark.anyio

WORKER = str(Path(__file__).with_name("durable_worker.py"))
sys.path.insert(0, str(Path(__file__).parent))
from durable_worker import SCENARIOS  # noqa: E402


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def make(postgres_dsn: str, anyio_backend: str) -> AsyncIterator[Callable[..., PostgresCheckpointProvider]]:  # noqa: F811
    made: list[PostgresCheckpointProvider] = []

    def factory(lease_seconds: float = 30.0, worker: str | None = None) -> PostgresCheckpointProvider:
        provider = PostgresCheckpointProvider(postgres_dsn, lease_seconds=lease_seconds, worker=worker)
        made.append(provider)
        return provider

    yield factory
    for provider in made:
        await provider.close()


def _pause(provider: PostgresCheckpointProvider) -> None:
    """Stop the provider renewing its leases, as a paused or cut-off process stops."""
    provider._stop_renewing.set()
    if provider._renewer is not None:
        provider._renewer.join()


async def test_a_taken_lease_fences_every_write_of_its_old_holder(
    make: Callable[..., PostgresCheckpointProvider],
) -> None:
    old, new = make(lease_seconds=0.5, worker="old:1"), make(lease_seconds=0.5, worker="new:2")
    lease = await old.acquire_lock("run")
    await old.save_checkpoint("run_ckpt_1", b"one")
    await old.append_journal("run", 2, b"intent")
    _pause(old)
    with pytest.raises(ExecutionLockedError, match="worker old:1 holds its lease"):
        await new.acquire_lock("run")
    await anyio.sleep(0.7)
    taken = await new.acquire_lock("run")
    assert taken.generation == lease.generation + 1
    writes = [
        old.save_checkpoint("run_ckpt_3", b"late"),
        old.save_checkpoint("run_ckpt_1", b"overwrite", sync=False),
        old.append_journal("run", 4, b"late"),
        old.delete_checkpoint("run_ckpt_1"),
        old.drop_journal("run", [2]),
    ]
    for write in writes:
        with pytest.raises(LeaseLostError, match="another worker took the run over"):
            await write
    await old.write_head("run", b"late head")  # kept for the next statement, which is refused
    with pytest.raises(LeaseLostError):
        await old.sync("run")
    assert await new.load_checkpoint("run_ckpt_1") == b"one"
    assert await new.list_checkpoints("run") == ["run_ckpt_1"]
    assert await new.read_journal("run") == [(2, b"intent")]
    assert await new.read_head("run") is None
    await new.save_checkpoint("run_ckpt_3", b"new owner")
    await old.close()  # releasing a lost lease leaves the new holder's alone
    with pytest.raises(ExecutionLockedError):
        await make().acquire_lock("run")
    await taken.release()


async def test_a_head_goes_with_the_next_statement(make: Callable[..., PostgresCheckpointProvider]) -> None:
    """Heads ride on the execution's next write or sync, and read back at once in the meantime."""
    import psycopg

    writer = make()
    await writer.acquire_lock("run")
    await writer.write_head("run", b"head 1")
    assert await writer.read_head("run") == b"head 1"
    reader = make()
    assert await reader.read_head("run") is None
    await writer.append_journal("run", 1, b"entry")  # carries head 1
    await writer.write_head("run", b"head 2")
    assert await reader.read_head("run") == b"head 1"
    await writer.sync("run")  # the synchronous commit carries head 2
    assert await reader.read_head("run") == b"head 2"
    await writer.write_head("run", b"head 3")
    await writer.close()  # a head still pending is written before the lease goes
    assert await reader.read_head("run") == b"head 3"
    with psycopg.connect(writer.dsn) as conn:
        assert conn.execute("SELECT count(*) FROM playbooks_heads").fetchone() == (1,)


async def test_a_renewed_lease_is_never_taken(make: Callable[..., PostgresCheckpointProvider]) -> None:
    holder, other = make(lease_seconds=0.4), make(lease_seconds=0.4)
    lease = await holder.acquire_lock("run")
    for _ in range(6):  # 1.5 s: almost four lease times
        await anyio.sleep(0.25)
        with pytest.raises(ExecutionLockedError):
            await other.acquire_lock("run")
    await holder.save_checkpoint("run_ckpt_1", b"still mine")
    await lease.renew()
    await lease.release()
    again = await other.acquire_lock("run")  # released: free at once
    assert again.generation == lease.generation + 1
    await anyio.sleep(0.3)  # holding nothing, the holder's renewing thread ends
    assert holder._renewer is None


async def test_renew_says_when_the_lease_was_lost(make: Callable[..., PostgresCheckpointProvider]) -> None:
    old, new = make(lease_seconds=0.3), make(lease_seconds=0.3)
    lease = await old.acquire_lock("run")
    _pause(old)
    await anyio.sleep(0.5)
    await new.acquire_lock("run")
    with pytest.raises(LeaseLostError):
        await lease.renew()
    assert lease.lost


async def test_generations_only_grow(make: Callable[..., PostgresCheckpointProvider]) -> None:
    """Deleting an execution keeps its lease row: a holder of an earlier generation stays fenced."""
    provider = make()
    first = await provider.acquire_lock("run")
    await first.release()
    await provider.save_checkpoint("run_ckpt_1", b"x")
    assert await provider.delete_execution("run") == 1
    second = await provider.acquire_lock("run")
    assert second.generation > first.generation + 1  # delete_execution took one in between
    await second.release()


async def test_a_paused_holder_whose_lease_nobody_took_goes_on(
    make: Callable[..., PostgresCheckpointProvider],
) -> None:
    """An expired lease that nobody took is still its holder's: fencing is by generation, not time."""
    provider = make(lease_seconds=0.3)
    lease = await provider.acquire_lock("run")
    _pause(provider)
    await anyio.sleep(0.5)
    await provider.save_checkpoint("run_ckpt_1", b"late but alone")
    await lease.renew()
    assert await provider.load_checkpoint("run_ckpt_1") == b"late but alone"


async def test_unreachable_server_is_a_clear_error_without_the_password(anyio_backend: str) -> None:
    provider = PostgresCheckpointProvider(
        "host=/nonexistent/socket port=5999 user=app password=hunter2 dbname=runs", wait_seconds=1
    )
    with pytest.raises(StoragePathError) as caught:
        await provider.save_checkpoint("run_ckpt_1", b"x")
    message = str(caught.value)
    assert "hunter2" not in message and "durability.dsn" in message and "user=app" in message
    await provider.close()
    assert "hunter2" not in repr(provider)
    assert "hunter2" not in redact_dsn("postgresql://app:hunter2@db/runs")


async def test_a_newer_schema_is_refused(postgres_dsn: str, anyio_backend: str) -> None:  # noqa: F811
    import psycopg

    ensure_schema(postgres_dsn)
    with psycopg.connect(postgres_dsn, autocommit=True) as conn:
        conn.execute("INSERT INTO playbooks_schema (version) VALUES (%s)", (SCHEMA_VERSION + 1,))
    postgres._ENSURED.clear()  # as in a process that did not check this database yet
    provider = PostgresCheckpointProvider(postgres_dsn)
    with pytest.raises(CheckpointError, match="upgrade playbooks"):
        await provider.check_writable()
    await provider.close()


def test_workers_starting_together_migrate_once(postgres_dsn: str) -> None:  # noqa: F811
    import psycopg

    errors: list[BaseException] = []

    def migrate() -> None:
        try:
            ensure_schema(postgres_dsn)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with psycopg.connect(postgres_dsn) as conn:
        assert conn.execute("SELECT version FROM playbooks_schema").fetchall() == [(SCHEMA_VERSION,)]


async def test_from_config_builds_a_postgres_manager(postgres_dsn: str, anyio_backend: str) -> None:  # noqa: F811
    config = DurabilityConfig(provider="postgres", dsn=postgres_dsn, lease_seconds=7)
    manager = CheckpointManager.from_config(config, "run")
    assert isinstance(manager.provider, PostgresCheckpointProvider)
    assert manager.provider.lease_seconds == 7
    await manager.open()
    assert manager.held_lock is not None and manager.held_lock.generation == 1
    await manager.close()
    await manager.provider.close()


# ------------------------------------------------------------------ SIGKILL, then resume


def _run(dsn: str, tmp: Path, scenario: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], dict | None]:
    out = tmp / "out.json"
    out.unlink(missing_ok=True)
    done = subprocess.run(
        [sys.executable, WORKER, scenario, f"postgres:{dsn}", str(tmp / "ledger"), str(out), *extra],
        capture_output=True, text=True, timeout=60,
    )
    return done, json.loads(out.read_text()) if out.exists() else None


@pytest.mark.integration
@pytest.mark.parametrize("scenario", ["flat", "loop"])
def test_kill_at_every_await_then_resume_on_postgres(
    scenario: str, postgres_server: PostgresServer, tmp_path: Path,  # noqa: F811
) -> None:
    """The crash test of test_crash_recovery.py with the PostgreSQL provider: killed as each live
    call starts and inside it, then resumed in a new process: the same namespace and output, and no
    completed call runs again."""
    ref_dir = tmp_path / "ref"
    ref_dir.mkdir()
    reference, ref_out = _run(postgres_server.new_database(), ref_dir, scenario)
    assert reference.returncode == 0, reference.stderr
    assert ref_out is not None
    calls = len((ref_dir / "ledger").read_text().splitlines())
    for point in [f"{phase}:{k}" for k in range(1, calls + 1) for phase in ("before", "in")]:
        dsn = postgres_server.new_database()
        tmp = tmp_path / point.replace(":", "-")
        tmp.mkdir()
        killed, _ = _run(dsn, tmp, scenario, "--kill", point)
        assert killed.returncode == -signal.SIGKILL, (point, killed.stderr)
        resumed, out = _run(dsn, tmp, scenario, "--resume")
        assert resumed.returncode == 0, (point, resumed.stderr)
        assert out is not None and out["namespace"] == ref_out["namespace"], point
        assert killed.stdout + resumed.stdout == reference.stdout, point
        keys = Counter(line.split("\t")[0] for line in (tmp / "ledger").read_text().splitlines())
        repeated = {key for key, n in keys.items() if n > 1}
        assert repeated <= set(out["in_flight"]), (point, repeated)


@pytest.mark.integration
def test_kill_at_random_instants_on_postgres(postgres_server: PostgresServer, tmp_path: Path) -> None:  # noqa: F811
    seed = int(os.environ.get("PLAYBOOKS_CRASH_SEED", random.randrange(2**32)))
    rng = random.Random(seed)
    for trial in range(int(os.environ.get("PLAYBOOKS_PG_CRASH_TRIALS", "4"))):
        scenario = rng.choice(sorted(SCENARIOS))
        dsn = postgres_server.new_database()
        ref_dir = tmp_path / f"ref-{trial}"
        ref_dir.mkdir()
        reference, ref_out = _run(postgres_server.new_database(), ref_dir, scenario)
        assert reference.returncode == 0 and ref_out is not None, reference.stderr
        tmp = tmp_path / f"trial-{trial}"
        tmp.mkdir()
        out_path = tmp / "out.json"
        process = subprocess.Popen(
            [sys.executable, WORKER, scenario, f"postgres:{dsn}", str(tmp / "ledger"), str(out_path),
             "--delay", "0.01"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        time.sleep(rng.uniform(0.1, 0.8))
        process.send_signal(signal.SIGKILL)
        killed_stdout, killed_stderr = process.communicate(timeout=60)
        resumed, out = _run(dsn, tmp, scenario, "--resume")
        where = f"PLAYBOOKS_CRASH_SEED={seed} trial {trial} {scenario}:\n{killed_stderr}\n--- resumed:\n{resumed.stderr}"
        assert resumed.returncode == 0, where
        assert out is not None and out["namespace"] == ref_out["namespace"], (out, ref_out, where)
        if out.get("recovered"):
            assert killed_stdout + resumed.stdout == reference.stdout, (killed_stdout, resumed.stdout, where)
