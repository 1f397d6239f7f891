"""The checkpoint layer: what is stored, where, and how a crashed execution is recovered.

* :class:`CheckpointManager` writes and reads one execution's checkpoints (numbering, lock, integrity,
  pruning); :class:`RecoveryCoordinator` finds what to resume after a crash.
* :class:`CheckpointProvider` is the storage interface; the built-in providers are
  :class:`FilesystemCheckpointProvider`, :class:`MemoryCheckpointProvider` and
  :class:`SQLiteCheckpointProvider` (imported on first use), and third parties register more in the
  ``playbooks.checkpoint_providers`` entry-point group.
* :class:`Checkpoint` is a stored checkpoint as a mapping (``namespace``, ``execution_state``,
  ``metadata``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from playbooks.checkpoints.manager import CheckpointManager as CheckpointManager
from playbooks.checkpoints.model import Checkpoint as Checkpoint
from playbooks.checkpoints.provider import CheckpointProvider as CheckpointProvider
from playbooks.checkpoints.provider import ExecutionLock as ExecutionLock
from playbooks.checkpoints.recovery import InFlightCall as InFlightCall
from playbooks.checkpoints.recovery import RecoveryCoordinator as RecoveryCoordinator
from playbooks.checkpoints.recovery import RecoveryReport as RecoveryReport

if TYPE_CHECKING:
    from playbooks.checkpoints.providers.filesystem import (
        FilesystemCheckpointProvider as FilesystemCheckpointProvider,
    )
    from playbooks.checkpoints.providers.memory import (
        MemoryCheckpointProvider as MemoryCheckpointProvider,
    )
    from playbooks.checkpoints.providers.sqlite import (
        SQLiteCheckpointProvider as SQLiteCheckpointProvider,
    )

__all__ = (
    "Checkpoint",
    "CheckpointManager",
    "CheckpointProvider",
    "ExecutionLock",
    "FilesystemCheckpointProvider",
    "InFlightCall",
    "MemoryCheckpointProvider",
    "RecoveryCoordinator",
    "RecoveryReport",
    "SQLiteCheckpointProvider",
)


_PROVIDERS = ("FilesystemCheckpointProvider", "MemoryCheckpointProvider", "SQLiteCheckpointProvider")


def __getattr__(attr: str) -> Any:
    """Import a built-in provider on first access, so ``import playbooks`` loads no storage code."""
    if attr in _PROVIDERS:
        from playbooks.checkpoints import providers

        return getattr(providers, attr)
    raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
