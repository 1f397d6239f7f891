"""Checkpoint providers by name: built-ins imported on demand, third parties through entry points.

A provider is looked up in the ``playbooks.checkpoint_providers`` entry-point group first, so a package
can add one (``redis = "mypkg.store:RedisCheckpointProvider"``) with no change here; the built-ins
(``memory``, ``filesystem``, ``sqlite``, ``postgres``) are also registered there by playbooks itself and fall back to a
direct import when package metadata is unavailable (for example in a vendored copy). Importing this
package imports no provider module, so ``sqlite3`` and friends load only when asked for.
"""

from __future__ import annotations

import functools
import importlib
from typing import TYPE_CHECKING, Any

from playbooks.checkpoints.provider import CheckpointProvider

if TYPE_CHECKING:
    from importlib.metadata import EntryPoint

    from playbooks.checkpoints.providers.filesystem import (
        FilesystemCheckpointProvider as FilesystemCheckpointProvider,
    )
    from playbooks.checkpoints.providers.memory import (
        MemoryCheckpointProvider as MemoryCheckpointProvider,
    )
    from playbooks.checkpoints.providers.postgres import (
        PostgresCheckpointProvider as PostgresCheckpointProvider,
    )
    from playbooks.checkpoints.providers.sqlite import (
        SQLiteCheckpointProvider as SQLiteCheckpointProvider,
    )

__all__ = (
    "ENTRY_POINT_GROUP",
    "FilesystemCheckpointProvider",
    "MemoryCheckpointProvider",
    "PostgresCheckpointProvider",
    "SQLiteCheckpointProvider",
    "available_providers",
    "create_provider",
    "get_provider_class",
)

ENTRY_POINT_GROUP = "playbooks.checkpoint_providers"
"""The entry-point group in which packages register ``CheckpointProvider`` classes."""

# name -> (module, class) of the providers shipped with playbooks.
_BUILTINS: dict[str, tuple[str, str]] = {
    "memory": ("playbooks.checkpoints.providers.memory", "MemoryCheckpointProvider"),
    "filesystem": ("playbooks.checkpoints.providers.filesystem", "FilesystemCheckpointProvider"),
    "sqlite": ("playbooks.checkpoints.providers.sqlite", "SQLiteCheckpointProvider"),
    "postgres": ("playbooks.checkpoints.providers.postgres", "PostgresCheckpointProvider"),
}
_BUILTIN_BY_CLASS = {cls: module for module, cls in _BUILTINS.values()}


@functools.cache
def _entry_points() -> dict[str, tuple[EntryPoint, ...]]:
    """Entry points of the group by name, read once per process (scanning metadata takes a while)."""
    from importlib.metadata import entry_points

    found: dict[str, dict[str, EntryPoint]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        # The same target registered twice (say an editable and a stale install) is one provider.
        found.setdefault(ep.name, {}).setdefault(ep.value, ep)
    return {name: tuple(by_value.values()) for name, by_value in found.items()}


def available_providers() -> list[str]:
    """Return the sorted names that :func:`get_provider_class` accepts."""
    return sorted(set(_BUILTINS) | set(_entry_points()))


def get_provider_class(name: str) -> type[CheckpointProvider]:
    """Return the provider class registered as ``name``.

    Raises ``LookupError`` (listing the available names) for an unknown name or a name that two
    packages register with different targets, and ``TypeError`` if the registered object is not a
    :class:`~playbooks.checkpoints.provider.CheckpointProvider` subclass.
    """
    candidates = _entry_points().get(name, ())
    if len(candidates) > 1:
        targets = ", ".join(sorted(ep.value for ep in candidates))
        raise LookupError(
            f"checkpoint provider {name!r} is registered more than once ({targets}); "
            "uninstall one of the packages that provide it"
        )
    if candidates:
        obj: object = candidates[0].load()
        origin = f"entry point {candidates[0].value!r}"
    elif name in _BUILTINS:
        module, attr = _BUILTINS[name]
        obj = getattr(importlib.import_module(module), attr)
        origin = f"{module}.{attr}"
    else:
        raise LookupError(
            f"unknown checkpoint provider {name!r}; available: {', '.join(available_providers())}"
        )
    if not (isinstance(obj, type) and issubclass(obj, CheckpointProvider)):
        raise TypeError(f"checkpoint provider {name!r} ({origin}) is not a CheckpointProvider subclass")
    return obj


def create_provider(name: str, **kwargs: Any) -> CheckpointProvider:
    """Instantiate the provider registered as ``name`` with ``kwargs`` (for example ``base_path=``)."""
    return get_provider_class(name)(**kwargs)


def __getattr__(attr: str) -> Any:
    """Import a built-in provider class on first access (``providers.SQLiteCheckpointProvider``)."""
    module = _BUILTIN_BY_CLASS.get(attr)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {attr!r}")
    return getattr(importlib.import_module(module), attr)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_BUILTIN_BY_CLASS))
