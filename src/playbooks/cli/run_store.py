"""The runs of ``playbooks run``: one small JSON record per run, in the checkpoint store.

With a local store (filesystem, SQLite) the records are files beside the checkpoints; with PostgreSQL
they are rows of the same database (:mod:`playbooks.cli.postgres_runs`), which is also the queue that
``playbooks submit`` fills and ``playbooks worker`` empties. :func:`open_run_store` picks.

A run id scopes a run's checkpoints (it is their execution id), so two programs, or two runs of one
program, never share checkpoints. The record says which program (path and source hash) the run
belongs to, so ``--resume`` finds the latest unfinished run of a program and refuses one whose program
changed; and how it ended, so ``playbooks runs`` can tell running, crashed, failed and completed apart
(a run recorded as running whose checkpoint lock is free crashed: the lock dies with its process).
"""

from __future__ import annotations

import abc
import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from playbooks.checkpoints.provider import CheckpointProvider
from playbooks.config import Config, ConfigError, load_config
from playbooks.errors import CheckpointConfigError, ExecutionLockedError

__all__ = (
    "FolderRunStore", "RunRecord", "RunStore", "find_run", "open_run_store", "record_from_json", "run_status",
    "runs_folder",
)

Status = Literal["running", "crashed", "failed", "completed", "forked", "waiting", "queued"]


def runs_folder(config: Config) -> Path:
    """Where run records live: ``.runs`` in the checkpoint storage folder."""
    storage = Path(config.resolve_path(config.durability.storage_path))
    if storage.suffix in (".sqlite3", ".sqlite", ".db"):
        storage = storage.parent
    return storage / ".runs"


@dataclass
class RunRecord:
    """One run of a program. ``pid`` is informative only: whether a run is alive is decided by its
    checkpoint lock (:func:`run_status`), which dies with its process, also in a container."""

    run_id: str
    program: str
    source_hash: str
    status: Status
    pid: int
    started: float
    updated: float
    llm_calls: int = 0
    error: str = ""
    hash_seed: str = ""
    """The ``PYTHONHASHSEED`` the run started under; a resume runs under the same one."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    """Tokens the endpoint reported, over all the run's processes (``llm_calls`` too)."""
    question: str = ""
    """For a run waiting for a person (``--suspend``): the question ``AskUser`` asked."""
    forked_from: str = ""
    """For a run made by ``playbooks fork``: the run and checkpoint it started from."""
    failed_call: str = ""
    """For a failed run: the durable call whose exception ended it (``Charge(20)``), which a resume
    calls again; ``error`` says what it raised."""
    isolated: bool = False
    """Whether the LLM's code runs in isolated worker processes (its checkpoints then live in
    executions of their own, ``RUN~FRAME``); a resume runs it the same way."""
    args: dict[str, Any] = field(default_factory=dict)
    """The arguments of the first agent's Main, for a run submitted to the queue (``playbooks submit``)."""
    queued: bool = False
    """Whether the run was submitted to the queue: workers start it, and take it over when the worker
    running it dies (its lease expires). Runs started with ``playbooks run`` are not taken over."""
    worker: str = ""
    """The worker that runs (or last ran) it, for a queued run."""
    attempts: int = 0
    """How many worker processes ended without the run recording an end (each a crash of its process)."""
    result: str = ""
    """For a completed run: what its first agent's Main returned, as JSON (``repr`` if it is not JSON)."""


async def run_status(record: RunRecord, provider: CheckpointProvider) -> Status:
    """The run's status: one recorded as ``running`` is running while its checkpoint lock is held (by
    its process, wherever it runs), else it crashed. The check takes the lock and gives it back."""
    if record.status != "running":
        return record.status
    try:
        lock = await provider.acquire_lock(record.run_id)
    except ExecutionLockedError:
        return "running"
    except CheckpointConfigError:
        return "crashed"
    await lock.release()
    return "crashed"


def _valid_run_id(run_id: str) -> bool:
    """Whether ``run_id`` can name a record file in the folder (no path, no hidden file, no control
    characters)."""
    return bool(run_id) and not run_id.startswith(".") and run_id.isprintable() and not any(
        sep in run_id for sep in ("/", "\\", os.sep)
    )


class RunStore(abc.ABC):
    """Where the run records of one checkpoint store live."""

    @property
    @abc.abstractmethod
    def where(self) -> str:
        """Where the records are, for messages."""

    def new_run(self, program: str, source_hash: str, *, tag_bytes: int = 2) -> RunRecord:
        """A new run of ``program`` (not saved yet); its id is the program's name, the time and a
        random tag of ``tag_bytes`` bytes (more for runs submitted by the thousand)."""
        stem = Path(program).name.removesuffix(".pb") or "run"
        run_id = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(tag_bytes)}"
        now = time.time()
        return RunRecord(run_id, os.path.abspath(program), source_hash, "running", os.getpid(), now, now)

    @abc.abstractmethod
    def save(self, record: RunRecord) -> None:
        """Write ``record`` (replacing the run's previous one) atomically."""

    @abc.abstractmethod
    def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or ``None`` when there is none (or ``run_id`` cannot name one)."""

    @abc.abstractmethod
    def all(self) -> list[RunRecord]:
        """Every readable run record, oldest first."""

    @abc.abstractmethod
    def delete(self, run_id: str) -> bool:
        """Delete the run's record; return whether there was one."""

    def fence(self, run_id: str, generation: int) -> None:
        """Refuse later saves of ``run_id`` (:class:`~playbooks.errors.LeaseLostError`) once the lease
        of ``generation`` on it is lost. Local stores have no leases (their locks die with their
        process): nothing to do."""

    def lease_holders(self) -> dict[str, str]:
        """Run id -> the process (``host:pid``) holding its live lease, where locks are leases; a
        local store's locks name no holder here ({})."""
        return {}

    def close(self) -> None:
        """Release what the store holds (nothing for a folder)."""


class FolderRunStore(RunStore):
    """Run records in one folder (``<storage>/.runs/<run_id>.json``), written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    @property
    def where(self) -> str:
        return str(self.folder)

    def save(self, record: RunRecord) -> None:
        """Write ``record`` (replacing the run's previous one) atomically."""
        record.updated = time.time()
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd, tmp = tempfile.mkstemp(dir=self.folder, prefix=".run-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(asdict(record), f, indent=1)
            os.replace(tmp, self.folder / f"{record.run_id}.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get(self, run_id: str) -> RunRecord | None:
        """The run's record, or ``None`` when there is none (or ``run_id`` cannot name one)."""
        if not _valid_run_id(run_id):
            return None
        path = self.folder / f"{run_id}.json"
        try:
            return record_from_json(path.read_text())
        except (OSError, ValueError, TypeError):
            return None

    def all(self) -> list[RunRecord]:
        """Every readable run record, oldest first."""
        if not self.folder.is_dir():
            return []
        records = [self.get(p.stem) for p in self.folder.glob("*.json")]
        return sorted((r for r in records if r is not None), key=lambda r: r.started)

    def delete(self, run_id: str) -> bool:
        if not _valid_run_id(run_id):
            return False
        try:
            (self.folder / f"{run_id}.json").unlink()
        except FileNotFoundError:
            return False
        return True


def record_from_json(text: str | bytes | dict[str, Any]) -> RunRecord:
    """A record from its JSON (fields a newer playbooks added are ignored); ``ValueError`` if it is
    not one."""
    data = json.loads(text) if isinstance(text, (str, bytes)) else text
    if not isinstance(data, dict):
        raise ValueError("a run record is a JSON object")
    known = RunRecord.__dataclass_fields__
    return RunRecord(**{k: v for k, v in data.items() if k in known})


def open_run_store(config: Config) -> RunStore:
    """The run records of ``config``'s checkpoint store: rows of the PostgreSQL database with
    ``durability.provider = "postgres"``, else a folder beside the checkpoints."""
    if config.durability.provider == "postgres":
        from playbooks.cli.postgres_runs import PostgresRunStore

        return PostgresRunStore(config.durability.dsn)
    return FolderRunStore(runs_folder(config))


def find_run(config_path: Path | None, run_id: str) -> tuple[Config, RunStore, RunRecord] | str:
    """The configuration, run store and record of ``run_id`` for a command that acts on a recorded
    run, or a message saying why there is none (an unreadable configuration, an unknown run)."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        return f"configuration error: {exc}"
    store = open_run_store(config)
    record = store.get(run_id)
    if record is None:
        return f"no run {run_id!r} in {store.where} (see: playbooks runs)"
    return config, store, record
