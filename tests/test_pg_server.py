"""The test suite's own PostgreSQL server (tests/pg_server.py) works, and is durable.

Why: the Postgres-backed tests trust this harness to hand them a real server
with fresh databases that survives a crash-like shutdown; if the harness is
wrong, every test built on it is wrong too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from pg_server import PostgresServer, postgres_dsn, postgres_server

if TYPE_CHECKING:
    import psycopg

__all__ = ["postgres_dsn", "postgres_server"]  # fixtures, imported for pytest


def connect(dsn: str) -> psycopg.Connection[tuple[object, ...]]:
    """Connect lazily: without psycopg the fixtures skip (or fail in CI) instead of collection erroring."""
    import psycopg

    return psycopg.connect(dsn)


def test_dsn_connects_and_selects(postgres_dsn: str) -> None:
    """The fixture's DSN reaches a live server."""
    with connect(postgres_dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_new_database_gives_distinct_databases(postgres_server: PostgresServer) -> None:
    """Two new_database() calls are two databases: a table in one is absent in the other."""
    first, second = postgres_server.new_database(), postgres_server.new_database()
    with connect(first) as a, connect(second) as b:
        name_a = a.execute("SELECT current_database()").fetchone()
        name_b = b.execute("SELECT current_database()").fetchone()
        assert name_a != name_b
        a.execute("CREATE TABLE only_in_first (x int)")
        a.commit()
        assert b.execute("SELECT to_regclass('only_in_first')").fetchone() == (None,)


@pytest.mark.integration
def test_committed_row_survives_immediate_shutdown(
    postgres_server: PostgresServer, postgres_dsn: str
) -> None:
    """A row committed before a crash-like (immediate) shutdown is there after start(): WAL + fsync."""
    with connect(postgres_dsn) as conn:
        conn.execute("CREATE TABLE kept (id int PRIMARY KEY, note text)")
        conn.execute("INSERT INTO kept VALUES (1, 'committed before the crash')")
        conn.commit()

    postgres_server.stop("immediate")
    assert not postgres_server.running
    postgres_server.start()
    assert postgres_server.running

    with connect(postgres_dsn) as conn:
        assert conn.execute("SELECT note FROM kept WHERE id = 1").fetchone() == (
            "committed before the crash",
        )


def test_fixture_restarts_a_stopped_server(
    postgres_server: PostgresServer, request: pytest.FixtureRequest
) -> None:
    """After a test stops the server, the next postgres_dsn fixture use starts it again."""
    postgres_server.stop("fast")
    assert not postgres_server.running
    dsn = request.getfixturevalue("postgres_dsn")
    with connect(dsn) as conn:
        assert conn.execute("SELECT 1").fetchone() == (1,)
