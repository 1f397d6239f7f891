"""A corruption and transplant fuzzer: damaged, truncated, rolled-back, swapped and planted files.

A run leaves a store (and older copies of its folder taken as it went); a second run of the same id
in another store and another run in the same store give foreign files. Each trial copies the store,
applies one to three mutations, loads it the documented way, and sorts the outcome:

* ``same``: the state equals the untouched store's (warnings allowed);
* ``refused``: a typed error (wrong key, unknown format, nothing readable);
* ``reported``: another state, with a ``CheckpointWarning`` that names what was lost or refused;
* ``silent``: another state, no warning: an older or foreign state passed for the real one.

The test requires 0 ``silent`` and 0 planted payloads unpickled (a planted pickle creates a marker
folder when unpickled; the loaded namespace is unpickled in every trial). Trials: 300 by default,
``PLAYBOOKS_STORAGE_FUZZ_TRIALS`` for more; ``PLAYBOOKS_STORAGE_FUZZ_SEED`` picks the seed.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
import warnings
import zlib
from collections import Counter
from pathlib import Path
from typing import Any

import anyio
import pytest

from playbooks import Agent
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
from playbooks.checkpoints.codec import Place, RecordKey, encode_record
from playbooks.errors import CheckpointWarning, PlaybooksError
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

TRIALS = int(os.environ.get("PLAYBOOKS_STORAGE_FUZZ_TRIALS", "300"))
SEED = int(os.environ.get("PLAYBOOKS_STORAGE_FUZZ_SEED", "9"))
KEY = "fuzz key"
RUN = "fz"

STAGES = (
    "data = {'k': list(range(40))}\ntotal = 0\na = await Work(1)\n",
    "for i in range(3):\n    total += await Work(10 + i)\nb = await Work(2)\n",
    "data['k'].append(await Work(3))\nfor i in range(4):\n    total += await Work(20 + i)\n",
    "c = await Work(4)\nd = await Work(5)\nfor i in range(2):\n    total += await Work(30 + i)\n",
    "e = await Work(6)\nf = await Work(7)\n",
)


class Plant:
    """A payload that leaves a marker if anything ever unpickles it."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.makedirs, (self.marker, 0o700, True))


async def _work(x: int) -> int:
    return x * 10


async def _make_store(store: Path, run: str, stages: int, copies: Path | None) -> None:
    agent = Agent(run, tools={"Work": _work})
    manager = CheckpointManager(
        run, FilesystemCheckpointProvider(store), key=KEY, keep_last_n=2, snapshot_sync_every=2
    )
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    for n, stage in enumerate(STAGES[:stages]):
        await executor.add_chunk(stage)
        await manager.prune(force=True)
        if copies is not None:
            shutil.copytree(store / run, copies / f"old{n}")
    assert manager._lock is not None
    await manager._lock.release()  # what kill -9 leaves
    manager._lock = None


async def _load(store: Path, touch: Any = None) -> tuple[str, Any]:
    """Load the run the documented way; return (outcome, fingerprint of the state)."""
    manager = CheckpointManager(RUN, FilesystemCheckpointProvider(store), key=KEY)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            if not await RecoveryCoordinator(manager).can_recover():
                return ("empty" if not manager.fallbacks else "reported"), None
            latest = await manager.get_latest_checkpoint()
            assert latest is not None
            state = manager.frame_state(latest.root_frame_id)
            assert state is not None
            namespace = {k: v for k, v in latest["namespace"].items() if not k.startswith("__")}
            fingerprint = (
                state.snapshot_counter,
                state.executed_offset,
                state.response,
                sorted((k, e.outcome, e.value) for k, e in state.journal.items()),
                repr(sorted(namespace.items())),
            )
        except PlaybooksError as exc:
            return f"refused:{type(exc).__name__}", None
    warned = bool(manager.fallbacks) or any(issubclass(w.category, CheckpointWarning) for w in caught)
    return ("warned" if warned else "clean"), fingerprint


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def _mutate(rng: random.Random, run: Path, world: dict[str, Path], marker: str) -> str:
    """Apply one mutation to the files of ``run`` (the run's folder); return its name."""
    files = _files(run)
    target = rng.choice(files)
    kind = rng.choice(
        ["truncate", "rollback", "other-run", "other-store", "bitflip", "plant", "plant-framed",
         "plant-signed", "delete", "journal-cut"]
    )
    data = target.read_bytes()
    if kind == "truncate":
        target.write_bytes(data[: rng.randrange(len(data) + 1)])
    elif kind == "journal-cut":
        journal = run / f"{RUN}.journal"
        if journal.exists():
            raw = journal.read_bytes()
            cuts = [i for i in range(len(raw)) if raw.startswith(b"PBJE", i)]  # at entry boundaries
            journal.write_bytes(raw[: rng.choice(cuts)] if cuts else b"")
    elif kind == "rollback":
        old = world[rng.choice([k for k in world if k.startswith("old")])] / target.name
        if old.exists():
            shutil.copy(old, target)
        else:
            target.unlink()
    elif kind in ("other-run", "other-store"):
        source = world["other-run"] if kind == "other-run" else world["other-store"]
        donor = rng.choice(_files(source))
        name = donor.name.replace("other_", f"{RUN}_").replace("other.", f"{RUN}.")
        shutil.copy(donor, run / (name if rng.random() < 0.7 else target.name))
    elif kind == "bitflip":
        if data:
            i = rng.randrange(len(data))
            target.write_bytes(data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1 :])
    elif kind == "plant":
        target.write_bytes(pickle.dumps(Plant(marker)))
    elif kind == "plant-framed":  # a well-framed journal entry holding a raw pickle
        payload = pickle.dumps(Plant(marker))
        entry = struct.pack(">4sQII", b"PBJE", 10_000, len(payload), zlib.crc32(payload)) + payload
        with open(run / f"{RUN}.journal", "ab") as f:
            f.write(entry)
    elif kind == "plant-signed":  # a record signed with the attacker's own key
        record, _ = encode_record(
            pickle.dumps(Plant(marker)), key=RecordKey(b"attacker", "test"),
            place=Place(RUN, 10_000, bytes(16)),
        )
        (run / f"{RUN}_ckpt_10000.pkl").write_bytes(record)
    else:
        if target.name != ".lock":
            target.unlink()
    return kind


@pytest.mark.integration
def test_corruption_and_transplant_fuzzer(tmp_path: Path) -> None:
    world: dict[str, Path] = {}
    copies = tmp_path / "copies"
    copies.mkdir()

    async def build() -> None:
        await _make_store(tmp_path / "a", RUN, len(STAGES), copies)
        await _make_store(tmp_path / "a", "other", 3, None)
        await _make_store(tmp_path / "b", RUN, 4, None)

    anyio.run(build)
    world.update({p.name: p for p in copies.iterdir()})
    world["other-run"] = tmp_path / "a" / "other"
    world["other-store"] = tmp_path / "b" / RUN
    reference = anyio.run(_load, tmp_path / "a")
    assert reference[0] == "clean", reference
    rng = random.Random(SEED)
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    silent: list[str] = []
    marker = str(tmp_path / "UNPICKLED")
    for trial in range(TRIALS):
        store = tmp_path / f"trial{trial}"
        shutil.copytree(tmp_path / "a", store, ignore=shutil.ignore_patterns("other"))
        applied = [_mutate(rng, store / RUN, world, marker) for _ in range(rng.choice((1, 1, 2, 3)))]
        kinds.update(applied)
        outcome, fingerprint = anyio.run(_load, store)
        if outcome.startswith("refused") or outcome in ("empty", "reported"):
            outcomes[outcome.split(":")[0] if outcome != "empty" else "reported"] += 1
        elif fingerprint == reference[1]:
            outcomes["same"] += 1
        elif outcome == "warned":
            outcomes["reported"] += 1
        else:
            outcomes["silent"] += 1
            silent.append(f"trial {trial}: {applied}")
        shutil.rmtree(store)
    unpickled = os.path.exists(marker)
    print(f"\n{TRIALS} trials (seed {SEED}): {dict(outcomes)}; mutations {dict(kinds)}; "
          f"planted payloads unpickled: {int(unpickled)}")
    assert not silent, silent[:10]
    assert not unpickled
    assert outcomes["same"] and outcomes["reported"] and outcomes["refused"], outcomes

