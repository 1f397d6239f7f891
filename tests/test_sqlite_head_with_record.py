"""The SQLite provider writes a record and the head that names it in one transaction (stage_head),
and drops journal entries in one transaction; providers that do not take staged heads are unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest

from playbooks.checkpoints import CheckpointManager
from playbooks.checkpoints.codec import decode_head
from playbooks.checkpoints.provider import checkpoint_id
from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
from playbooks.checkpoints.providers.sqlite import SQLiteCheckpointProvider
from playbooks.errors import CheckpointWriteError

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _trace(provider: SQLiteCheckpointProvider) -> list[str]:
    statements: list[str] = []
    provider._connection().set_trace_callback(statements.append)
    return statements


async def test_manager_writes_record_and_head_in_one_commit(tmp_path: Path) -> None:
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    manager = CheckpointManager("run", provider, key=b"k" * 32)
    await manager.open()
    statements = _trace(provider)
    await manager.save_state("answer", 42)  # a journal record, written through prepare_append
    writes = [s.split()[0] for s in statements]
    assert writes == ["BEGIN", "INSERT", "UPDATE", "COMMIT"] or writes == [
        "BEGIN", "INSERT", "UPDATE", "INSERT", "COMMIT"  # the first head of the execution
    ], statements
    head = await provider.read_head("run")
    assert head is not None
    newest = max(int(cid.rsplit("_", 1)[1]) for cid in await provider.list_checkpoints("run"))
    assert decode_head(head)[1] == newest

    statements.clear()
    await manager.save_state("answer", 43)
    assert [s.split()[0] for s in statements] == ["BEGIN", "INSERT", "UPDATE", "COMMIT"], statements
    await manager.close()
    await provider.close()

    # A new process reads the records back without a fallback or a missing record.
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    manager = CheckpointManager("run", provider, key=b"k" * 32)
    await manager.open()
    assert manager.loaded_state("answer") == 43
    assert manager.fallbacks == []
    await manager.close()
    await provider.close()


async def test_staged_head_goes_with_a_save_and_an_append(tmp_path: Path) -> None:
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    assert provider.stage_head("run", b"head-1")
    await provider.save_checkpoint(checkpoint_id("run", 1), b"one", sync=True)
    assert await provider.read_head("run") == b"head-1"
    assert provider.stage_head("run", b"head-2")
    await provider.append_journal("run", 2, b"two")
    assert await provider.read_head("run") == b"head-2"
    await provider.append_journal("run", 3, b"three")  # nothing staged: the head stays
    assert await provider.read_head("run") == b"head-2"
    assert await provider.load_checkpoint(checkpoint_id("run", 3)) == b"three"
    await provider.close()


async def test_a_failed_write_stores_neither_and_consumes_the_staged_head(tmp_path: Path) -> None:
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    await provider.write_head("run", b"old")
    provider.stage_head("run", b"new")
    with pytest.raises(CheckpointWriteError):
        await provider.append_journal("run", 1, None)  # type: ignore[arg-type]  # NOT NULL fails
    assert await provider.read_head("run") == b"old"
    assert await provider.list_checkpoints("run") == []
    assert not provider._connection().in_transaction
    await provider.append_journal("run", 2, b"two")  # the failed write's head is not reused
    assert await provider.read_head("run") == b"old"

    provider.stage_head("run", b"newer")
    with pytest.raises(ValueError):
        await provider.save_checkpoint("run_ckpt_01", b"x")  # not a canonical id
    await provider.append_journal("run", 3, b"three")
    assert await provider.read_head("run") == b"old"
    await provider.close()


async def test_prepared_append_takes_the_head_at_prepare_time(tmp_path: Path) -> None:
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    provider.stage_head("run", b"with-1")
    land = provider.prepare_append("run", 1, b"one")
    await provider.append_journal("run", 2, b"two")  # staged head already taken by the prepare
    assert await provider.read_head("run") is None
    land()
    assert await provider.read_head("run") == b"with-1"

    provider.stage_head("run", b"discarded")
    provider.prepare_append("run", 3, b"three")  # never called: a discarded record
    await provider.append_journal("run", 4, b"four")
    assert await provider.read_head("run") == b"with-1"
    assert await provider.load_checkpoint(checkpoint_id("run", 3)) is None
    await provider.close()


async def test_a_head_staged_for_another_execution_is_not_written(tmp_path: Path) -> None:
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    provider.stage_head("other", b"theirs")
    await provider.append_journal("run", 1, b"one")
    assert await provider.read_head("other") is None
    assert await provider.read_head("run") is None
    await provider.close()


async def test_drop_journal_is_one_transaction(tmp_path: Path) -> None:
    provider = SQLiteCheckpointProvider(tmp_path / "c.sqlite3")
    for counter in range(1, 6):
        await provider.append_journal("run", counter, b"x")
    statements = _trace(provider)
    await provider.drop_journal("run", [1, 2, 4])
    assert [s.split()[0] for s in statements] == ["BEGIN", "DELETE", "DELETE", "DELETE", "COMMIT"]
    assert await provider.list_checkpoints("run") == [checkpoint_id("run", 3), checkpoint_id("run", 5)]
    await provider.drop_journal("run", [])
    await provider.close()


async def test_providers_that_take_no_staged_head_get_write_head(tmp_path: Path) -> None:
    calls: list[str] = []

    class Recording(MemoryCheckpointProvider):
        async def write_head(self, execution_id: str, data: bytes) -> None:
            calls.append("write_head")
            await super().write_head(execution_id, data)

    provider = Recording()
    assert provider.stage_head("run", b"x") is False
    manager = CheckpointManager("run", provider, key=b"k" * 32)
    await manager.open()
    await manager.save_state("answer", 42)
    assert calls == ["write_head"]
    await manager.close()


async def test_new_database_has_small_pages_and_an_old_one_keeps_its_own(tmp_path: Path) -> None:
    import sqlite3

    provider = SQLiteCheckpointProvider(tmp_path / "new.sqlite3")
    await provider.save_checkpoint(checkpoint_id("run", 1), b"x" * 5000)
    await provider.close()
    with sqlite3.connect(tmp_path / "new.sqlite3") as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (2048,)

    old = tmp_path / "old.sqlite3"
    with sqlite3.connect(old) as conn:  # a database made with SQLite's default pages
        conn.execute("PRAGMA journal_mode=WAL")
    provider = SQLiteCheckpointProvider(old)
    await provider.save_checkpoint(checkpoint_id("run", 1), b"y" * 5000)
    assert await provider.load_checkpoint(checkpoint_id("run", 1)) == b"y" * 5000
    await provider.close()
    with sqlite3.connect(old) as conn:
        assert conn.execute("PRAGMA page_size").fetchone() == (4096,)
