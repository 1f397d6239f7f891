"""The runs of ``playbooks run``: one small JSON record per run, beside the checkpoints.

A run id scopes a run's checkpoints (it is their execution id), so two programs, or two runs of one
program, never share checkpoints. The record says which program (path and source hash) the run
belongs to, so ``--resume`` finds the latest unfinished run of a program and refuses one whose program
changed; and how it ended, so ``playbooks runs`` can tell running, crashed, failed and completed apart
(a run recorded as running whose process is gone crashed).
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

from playbooks.config import Config

__all__ = ("RunRecord", "RunStore", "runs_folder")

Status = Literal["running", "crashed", "failed", "completed"]


def runs_folder(config: Config) -> Path:
    """Where run records live: ``.runs`` in the checkpoint storage folder."""
    storage = Path(config.resolve_path(config.durability.storage_path))
    if storage.suffix in (".sqlite3", ".sqlite", ".db"):
        storage = storage.parent
    return storage / ".runs"


@dataclass
class RunRecord:
    """One run of a program."""

    run_id: str
    program: str
    source_hash: str
    status: Status
    pid: int
    started: float
    updated: float
    llm_calls: int = 0
    error: str = ""

    @property
    def effective_status(self) -> Status:
        """``running`` only while its process lives; a run recorded as running whose process is gone crashed."""
        if self.status != "running":
            return self.status
        return "running" if _alive(self.pid) else "crashed"


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunStore:
    """Run records in one folder (``<storage>/.runs/<run_id>.json``), written atomically."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def new_run(self, program: str, source_hash: str) -> RunRecord:
        """Record a new run of ``program``; its id is the program's name, the time and a random tag."""
        stem = Path(program).name.removesuffix(".pb") or "run"
        run_id = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        now = time.time()
        record = RunRecord(run_id, os.path.abspath(program), source_hash, "running", os.getpid(), now, now)
        self.save(record)
        return record

    def save(self, record: RunRecord) -> None:
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
        path = self.folder / f"{run_id}.json"
        try:
            return RunRecord(**json.loads(path.read_text()))
        except (OSError, ValueError, TypeError):
            return None

    def all(self) -> list[RunRecord]:
        """Every readable run record, oldest first."""
        if not self.folder.is_dir():
            return []
        records = [self.get(p.stem) for p in self.folder.glob("*.json")]
        return sorted((r for r in records if r is not None), key=lambda r: r.started)

    def latest_unfinished(self, program: str) -> RunRecord | None:
        """The newest run of ``program`` that did not complete and is not running now."""
        path = os.path.abspath(program)
        candidates = [
            r for r in self.all() if r.program == path and r.effective_status in ("crashed", "failed")
        ]
        return candidates[-1] if candidates else None

    def delete(self, run_id: str) -> bool:
        try:
            (self.folder / f"{run_id}.json").unlink()
        except FileNotFoundError:
            return False
        return True
