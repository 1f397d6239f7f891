"""Helpers for the storage tests: the globals real checkpoints name, and running the examples.

``globals_in_store(path)`` opens every execution of a filesystem store through a
:class:`~playbooks.checkpoints.CheckpointManager` (so only verified records are read) and lists the
``module:qualname`` of every global that the pickles inside its records reference, found with
:mod:`pickletools` (nothing is unpickled), including pickles nested in pickles.
"""

from __future__ import annotations

import os
import pickletools
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import anyio

from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider
from playbooks.checkpoints.wire import record_to_fields

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
WORKER = ROOT / "tests" / "durable_worker.py"

_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "STRING", "BINSTRING", "SHORT_BINSTRING"}
_BYTES_OPS = {"SHORT_BINBYTES", "BINBYTES", "BINBYTES8", "BYTEARRAY8"}
_GET_OPS = {"GET", "BINGET", "LONG_BINGET"}
_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def pickle_globals(data: bytes, found: set[str]) -> None:
    """Add to ``found`` the globals ``data`` (a pickle) names; nested pickles (bytes) are scanned too."""
    memo: dict[int, Any] = {}
    recent: list[Any] = []
    try:
        for op, arg, _ in pickletools.genops(data):
            name = op.name
            if name in _STRING_OPS:
                recent.append(arg)
            elif name in _GET_OPS:
                recent.append(memo.get(int(arg or 0)))
            elif name == "MEMOIZE":
                memo[len(memo)] = recent[-1] if recent else None
                continue
            elif name in _PUT_OPS:
                memo[int(arg or 0)] = recent[-1] if recent else None
                continue
            elif name in ("GLOBAL", "INST"):
                module, qualname = str(arg).split(" ", 1)
                found.add(f"{module}:{qualname}")
                recent.append(None)
            elif name == "STACK_GLOBAL":
                if len(recent) >= 2 and isinstance(recent[-2], str) and isinstance(recent[-1], str):
                    found.add(f"{recent[-2]}:{recent[-1]}")
                recent.append(None)
            elif name in _BYTES_OPS:
                if isinstance(arg, (bytes, bytearray)) and arg[:1] == b"\x80":
                    pickle_globals(bytes(arg), found)
                recent.append(None)
            else:
                recent.append(None)
    except Exception:
        pass  # not a pickle (raw bytes that happen to start with 0x80)


def _blobs(value: Any, out: list[bytes]) -> None:
    if isinstance(value, bytes):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for v in value:
            _blobs(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _blobs(v, out)


async def _store_globals(path: Path, found: set[str]) -> None:
    probe = FilesystemCheckpointProvider(path)
    for execution_id in await probe.list_executions():
        manager = CheckpointManager(execution_id, FilesystemCheckpointProvider(path))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            records = await manager.load_records()
        for record in records.values():
            blobs: list[bytes] = []
            _blobs(record_to_fields(record), blobs)
            for blob in blobs:
                pickle_globals(blob, found)


def globals_in_store(path: Path) -> set[str]:
    """``module:qualname`` of every global named by the records of the filesystem store at ``path``."""
    found: set[str] = set()
    anyio.run(_store_globals, path, found)
    return found


def run_examples(scratch: Path, env: dict[str, str]) -> list[Path]:
    """Run every ``examples/*.pb`` with its cassette in its own folder under ``scratch``; return the
    checkpoint stores they left (checkpoints kept: no pruning, no clean-up)."""
    stores = []
    for program in sorted(EXAMPLES.glob("*.pb")):
        folder = scratch / program.stem
        folder.mkdir()
        for item in EXAMPLES.iterdir():
            if item.is_file():
                shutil.copy(item, folder / item.name)
        subprocess.run(
            [sys.executable, "-m", "playbooks.cli", "run", program.name],
            cwd=folder, env=env, capture_output=True, text=True, timeout=120,
        )
        stores.append(folder / ".checkpoints")
    return stores


def run_worker_scenarios(scratch: Path, env: dict[str, str]) -> list[Path]:
    """Run every scenario of ``tests/durable_worker.py`` (killed at its second live call, then
    resumed); return their stores."""
    sys.path.insert(0, str(WORKER.parent))
    try:
        from durable_worker import SCENARIOS
    finally:
        sys.path.pop(0)
    stores = []
    for name in sorted(SCENARIOS):
        store = scratch / f"worker-{name}"
        args = [sys.executable, str(WORKER), name, str(store), str(scratch / f"{name}.ledger"), str(scratch / f"{name}.json")]
        subprocess.run([*args, "--kill", "in:2"], env=env, capture_output=True, timeout=120)
        subprocess.run([*args, "--resume"], env=env, capture_output=True, timeout=120)
        stores.append(store)
    return stores


def example_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PLAYBOOKS_DURABILITY_KEEP_LAST_N"] = "100000"
    env.update(extra)
    return env
