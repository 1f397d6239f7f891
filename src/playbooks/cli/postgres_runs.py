"""Run records as rows of the PostgreSQL checkpoint database, and the queue of submitted runs.

``playbooks_runs`` holds one row per run: the record as JSON plus the columns the queue needs
(``status``, ``queued``, ``worker``, ``claimed_until``). The CLI, every worker and an embedding host
that points at the same database see the same runs.

*The queue.* ``playbooks submit`` inserts a run with status ``queued``. A worker claims a row with
``FOR UPDATE SKIP LOCKED`` (two workers never claim the same row, and neither waits for the other)
when the run is queued, or when it is a submitted run recorded as running whose checkpoint lease
(``playbooks_leases``) is no longer held: its worker died. The claim holds the row for a short while
(``claimed_until``), long enough for the run's process to start and take the run's lease; its first
save of the record ends the claim, and from then on the lease says who runs it.

*Fencing.* A run's process calls :meth:`PostgresRunStore.fence` once it holds the lease: every later
save of that record checks the lease's generation in the same statement, so a process whose lease was
taken over cannot overwrite the new owner's record (:class:`~playbooks.errors.LeaseLostError`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any, TypeVar

from playbooks.checkpoints.providers.postgres import ensure_schema, redact_dsn
from playbooks.cli.run_store import RunRecord, RunStore, record_from_json
from playbooks.errors import CheckpointError, LeaseLostError

if TYPE_CHECKING:
    import psycopg

__all__ = ("PostgresRunStore",)

_log = logging.getLogger(__name__)
_T = TypeVar("_T")


class PostgresRunStore(RunStore):
    """Run records and the run queue in a PostgreSQL database (one connection, autocommit).

    A call that cannot reach the server retries with backoff for up to ``wait_seconds``, then raises
    :class:`~playbooks.errors.CheckpointError`; every statement is safe to run twice.
    """

    def __init__(self, dsn: str, *, wait_seconds: float = 120.0) -> None:
        self.dsn = dsn
        self.wait_seconds = wait_seconds
        self._conn: psycopg.Connection[Any] | None = None
        self._fence: tuple[str, int] | None = None
        self._reached = False

    @property
    def where(self) -> str:
        return f"PostgreSQL ({redact_dsn(self.dsn)})"

    def _run(self, work: Callable[[psycopg.Connection[Any]], _T]) -> _T:
        import psycopg

        if not self._reached:  # a first connection that fails is a wrong DSN: say so at once
            ensure_schema(self.dsn)
            self._reached = True
        deadline = time.monotonic() + self.wait_seconds
        delay = 0.05
        while True:
            try:
                if self._conn is None or self._conn.closed:
                    self._conn = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5,
                                                 application_name="playbooks")
                return work(self._conn)
            except psycopg.OperationalError as exc:  # the connection lost (a restart): reconnect
                if self._conn is not None:
                    self._conn.close()
                self._conn = None
                if time.monotonic() + delay > deadline:
                    raise CheckpointError(
                        f"cannot reach PostgreSQL ({redact_dsn(self.dsn)}) for {self.wait_seconds:g} s: "
                        f"{str(exc).strip().splitlines()[0] if str(exc).strip() else exc!r}"
                    ) from exc
                _log.warning("PostgreSQL unreachable; retrying in %.2f s", delay)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    # ----------------------------------------------------------------- records

    def fence(self, run_id: str, generation: int) -> None:
        self._fence = (run_id, generation)

    def save(self, record: RunRecord) -> None:
        from psycopg.types.json import Jsonb

        record.updated = time.time()
        params: dict[str, Any] = {
            "id": record.run_id, "rec": Jsonb(asdict(record)), "status": record.status,
            "queued": record.queued, "worker": record.worker,
        }
        sql = (
            "INSERT INTO playbooks_runs AS r (run_id, record, status, queued, worker) "
            "VALUES (%(id)s, %(rec)s, %(status)s, %(queued)s, %(worker)s) "
            "ON CONFLICT (run_id) DO UPDATE SET record = EXCLUDED.record, status = EXCLUDED.status, "
            "queued = EXCLUDED.queued, worker = EXCLUDED.worker"
        )
        fenced = self._fence is not None and self._fence[0] == record.run_id
        if fenced:  # the run's process, holding its lease: the lease says who runs it from now on
            assert self._fence is not None
            params["gen"] = self._fence[1]
            sql += ", claimed_until = NULL"
            sql += (
                " WHERE EXISTS (SELECT 1 FROM playbooks_leases l WHERE l.execution_id = r.run_id "
                "AND l.generation = %(gen)s)"
            )
        changed = self._run(lambda conn: conn.execute(sql, params).rowcount)
        if fenced and not changed:
            raise LeaseLostError(
                f"run {record.run_id}: this process's lease was taken over by another worker; its record "
                "is the new owner's now and this process must stop"
            )

    def get(self, run_id: str) -> RunRecord | None:
        row = self._run(
            lambda conn: conn.execute("SELECT record FROM playbooks_runs WHERE run_id = %s", (run_id,)).fetchone()
        )
        return None if row is None else _record(row[0])

    def all(self) -> list[RunRecord]:
        rows = self._run(lambda conn: conn.execute("SELECT record FROM playbooks_runs").fetchall())
        records = [r for r in (_record(row[0]) for row in rows) if r is not None]
        return sorted(records, key=lambda r: r.started)

    def delete(self, run_id: str) -> bool:
        return bool(self._run(
            lambda conn: conn.execute("DELETE FROM playbooks_runs WHERE run_id = %s", (run_id,)).rowcount
        ))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # ----------------------------------------------------------------- queue

    def submit(self, record: RunRecord) -> None:
        """Put a new run in the queue (status ``queued``); an id already taken raises ``ValueError``."""
        from psycopg.types.json import Jsonb

        record.status, record.queued, record.worker = "queued", True, ""
        record.updated = time.time()
        added = self._run(lambda conn: conn.execute(
            "INSERT INTO playbooks_runs (run_id, record, status, queued) VALUES (%s, %s, 'queued', true) "
            "ON CONFLICT (run_id) DO NOTHING",
            (record.run_id, Jsonb(asdict(record))),
        ).rowcount)
        if not added:
            raise ValueError(f"run id {record.run_id!r} is taken")

    def claim(self, worker: str, hold_seconds: float) -> RunRecord | None:
        """Take the oldest run a worker may start or take over, for ``worker``; ``None`` when none.

        Claimable: a queued run, or a submitted run recorded as running (or crashed before its
        process took the lease) whose lease nobody holds. The claim keeps other workers off it for
        ``hold_seconds``, the time its process has to take the run's lease.
        """
        from psycopg.types.json import Jsonb

        sql = """
            WITH next AS (
                SELECT c.run_id FROM playbooks_runs c
                WHERE c.queued AND c.status IN ('queued', 'running')
                  AND (c.claimed_until IS NULL OR c.claimed_until <= now())
                  AND NOT EXISTS (
                      SELECT 1 FROM playbooks_leases l
                      WHERE l.execution_id = c.run_id AND l.owner IS NOT NULL AND l.expires_at > now())
                ORDER BY c.submitted_at
                LIMIT 1
                FOR UPDATE SKIP LOCKED)
            UPDATE playbooks_runs r
            SET worker = %(w)s, claimed_until = now() + make_interval(secs => %(hold)s),
                record = r.record || %(patch)s
            FROM next WHERE r.run_id = next.run_id
            RETURNING r.record"""
        params = {"w": worker, "hold": hold_seconds, "patch": Jsonb({"worker": worker})}
        row = self._run(lambda conn: conn.execute(sql, params).fetchone())
        return None if row is None else _record(row[0])

    def unclaim(self, run_id: str) -> None:
        """Let any worker claim the run at once (its process ended or was handed back)."""
        self._run(lambda conn: conn.execute(
            "UPDATE playbooks_runs SET claimed_until = NULL WHERE run_id = %s", (run_id,)
        ))

    def expire_leases(self, owner_prefix: str) -> list[str]:
        """End at once the leases whose owner starts with ``owner_prefix`` (``host:pid:``): for a
        worker that reaped the process holding them, so its runs need not wait for them to expire."""
        pattern = owner_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        rows = self._run(lambda conn: conn.execute(
            "UPDATE playbooks_leases SET owner = NULL, expires_at = now() WHERE owner LIKE %s "
            "RETURNING execution_id",
            (pattern,),
        ).fetchall())
        return [row[0] for row in rows]

    def lease_holders(self) -> dict[str, str]:
        """Execution id -> the worker process (``host:pid``) holding its live lease."""
        rows = self._run(lambda conn: conn.execute(
            "SELECT execution_id, owner FROM playbooks_leases WHERE owner IS NOT NULL AND expires_at > now()"
        ).fetchall())
        return {execution_id: owner.rsplit(":", 1)[0] for execution_id, owner in rows}

    def unfinished(self) -> int:
        """How many submitted runs are queued or running (not yet completed, failed or waiting)."""
        row = self._run(lambda conn: conn.execute(
            "SELECT count(*) FROM playbooks_runs WHERE queued AND status IN ('queued', 'running')"
        ).fetchone())
        return int(row[0]) if row else 0


def _record(data: Any) -> RunRecord | None:
    try:
        return record_from_json(data)
    except (TypeError, ValueError):
        return None
