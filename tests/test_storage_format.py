"""The stable on-disk format: frozen global names, golden stores of this version, refused future
versions, and clear typed errors for storage settings that cannot work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import anyio
import pytest

from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
from playbooks.checkpoints.codec import FORMAT_VERSION, KEY_ENV_VAR
from playbooks.checkpoints.frozen import FROZEN_GLOBALS, is_allowed, resolve
from playbooks.checkpoints.provider import validate_execution_id
from playbooks.checkpoints.providers import create_provider
from playbooks.config import DurabilityConfig
from playbooks.errors import (
    CheckpointConfigError,
    CheckpointFormatError,
    CheckpointKeyError,
    InvalidExecutionIdError,
    StoragePathError,
    UnknownProviderError,
)

sys.path.insert(0, str(Path(__file__).parent))
from storage_tools import example_env, globals_in_store, run_examples, run_worker_scenarios  # noqa: E402

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_KEY = "golden-store-key: not a secret"
WORKER = Path(__file__).parent / "durable_worker.py"


@pytest.mark.integration
def test_every_global_named_by_real_checkpoints_is_frozen(tmp_path: Path) -> None:
    env = example_env()
    stores = run_examples(tmp_path, env) + run_worker_scenarios(tmp_path, env)
    found: set[str] = set()
    for store in stores:
        found |= globals_in_store(store)
    assert any(name.startswith("playbooks.") for name in found), "no checkpoint was collected"
    outside = sorted(name for name in found if not is_allowed(name))
    if outside:
        print("globals named by checkpoints but not frozen (add them to playbooks.checkpoints.frozen):")
        for name in outside:
            print(f'        "{name}",')
    assert not outside


@pytest.mark.parametrize("name", sorted(FROZEN_GLOBALS))
def test_every_frozen_global_still_imports(name: str) -> None:
    resolve(name)  # a rename must keep the old path as an alias


def _golden_versions() -> list[Path]:
    return sorted(p for p in GOLDEN.glob("v*") if p.is_dir())


def test_golden_store_of_this_version_exists() -> None:
    assert (GOLDEN / f"v{FORMAT_VERSION}" / "expected.json").exists(), "run tests/golden/make_golden.py"


@pytest.mark.integration
@pytest.mark.parametrize("version", _golden_versions(), ids=lambda p: p.name)
def test_golden_stores_resume_to_the_uninterrupted_result(version: Path, tmp_path: Path) -> None:
    expected = json.loads((version / "expected.json").read_text())
    env = {**os.environ, KEY_ENV_VAR: GOLDEN_KEY}
    for scenario, namespace in expected.items():
        store = tmp_path / scenario
        shutil.copytree(version / scenario, store)
        out = tmp_path / f"{scenario}.json"
        done = subprocess.run(
            [sys.executable, str(WORKER), scenario, str(store), str(tmp_path / "ledger"), str(out), "--resume"],
            env=env, capture_output=True, text=True, timeout=120,
        )
        assert done.returncode == 0, done.stderr
        result = json.loads(out.read_text())
        assert result["recovered"], scenario
        assert result["namespace"] == namespace, scenario


def _load(store: Path, execution_id: str = "agent_1", key: str | None = GOLDEN_KEY) -> None:
    async def main() -> None:
        manager = CheckpointManager(execution_id, FilesystemCheckpointProvider(store), key=key)
        await RecoveryCoordinator(manager).can_recover()

    anyio.run(main)


def test_a_future_format_is_refused_naming_both_versions(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(GOLDEN / f"v{FORMAT_VERSION}" / "loop", store)
    journal = store / "agent_1" / "agent_1.journal"
    data = bytearray(journal.read_bytes())
    first = data.index(b"PBCK")
    data[first + 4] = FORMAT_VERSION + 1  # one record of a newer playbooks is enough to refuse
    journal.write_bytes(bytes(data))
    with pytest.raises(CheckpointFormatError, match=f"version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION}"):
        _load(store)


def test_golden_store_with_another_key_is_a_key_error(tmp_path: Path) -> None:
    store = tmp_path / "store"
    shutil.copytree(GOLDEN / f"v{FORMAT_VERSION}" / "loop", store)
    with pytest.raises(CheckpointKeyError, match="another key"):
        _load(store, key="not the golden key")


@pytest.mark.parametrize("bad", ["", "../x", ".hidden", "a/b", "a\\b", "nul\0byte", "line\nbreak"])
def test_bad_execution_ids_are_typed_errors(bad: str) -> None:
    with pytest.raises(InvalidExecutionIdError) as info:
        validate_execution_id(bad)
    assert isinstance(info.value, (CheckpointConfigError, ValueError))
    with pytest.raises(InvalidExecutionIdError):
        CheckpointManager(bad, FilesystemCheckpointProvider("/nonexistent"))


def test_nul_byte_in_storage_path() -> None:
    with pytest.raises(StoragePathError, match="NUL"):
        CheckpointManager.from_config(DurabilityConfig(storage_path="a\0b"), "run")
    with pytest.raises(StoragePathError, match="NUL"):
        create_provider("sqlite", path="a\0b.sqlite3")


def test_unknown_provider_is_a_typed_error() -> None:
    with pytest.raises(UnknownProviderError, match="available: .*filesystem"):
        CheckpointManager.from_config(DurabilityConfig(provider="nosuch"), "run")


@pytest.mark.parametrize("provider", ["filesystem", "sqlite"])
def test_uncreatable_storage_path(provider: str, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    manager = CheckpointManager.from_config(
        DurabilityConfig(provider=provider), "run", storage_path=blocker / "store"
    )

    async def main() -> None:
        await manager.provider.check_writable()

    with pytest.raises(StoragePathError, match=str(blocker)):
        anyio.run(main)
    with pytest.raises(StoragePathError):
        anyio.run(manager.open)


def test_listing_runs_and_checkpoints_unpickles_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import pickle

    stores = []
    for version in _golden_versions():  # every version's stores, compressed records included
        for scenario in ("nested", "bigvar"):
            if (version / scenario).is_dir():
                stores.append(tmp_path / f"{version.name}-{scenario}")
                shutil.copytree(version / scenario, stores[-1])

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("listing unpickled something")

    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    statements = []

    async def main() -> None:
        for store in stores:
            provider = FilesystemCheckpointProvider(store)
            assert await provider.list_executions() == ["agent_1"]
            manager = CheckpointManager("agent_1", provider, key=GOLDEN_KEY)
            records = await manager.load_records()  # what `playbooks runs` and `checkpoints list` read
            statements.append(manager.last_statement())
            assert {r.kind for r in records.values()} >= {"snapshot", "intent"}
            assert await manager.list_checkpoints()

    anyio.run(main)
    assert any(statements)
