"""The limits an isolated worker runs LLM code under (the ``[sandbox]`` table of ``playbooks.toml``).

Each limit is enforced twice where the code could dodge the first: a statement's wall time by a timer
in the worker (an exception in the LLM's frame, or a cancelled ``await``) and by the host, which kills a
worker that overstays by ``kill_grace`` seconds (a C loop, code that catches the exception); memory
and CPU by the kernel (``RLIMIT_AS``, ``RLIMIT_CPU``); files, TCP and signals by Landlock; output by the
worker's writer and by the host. What each one reports: docs/isolation.md.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from playbooks.config import SandboxConfig

__all__ = ("SandboxLimits",)


@dataclass(frozen=True, slots=True)
class SandboxLimits:
    """Limits of an isolated worker; ``None`` turns a limit off.

    ``statement_timeout``: seconds one top-level statement may run in the worker (time spent waiting
    for the host's tools, LLM calls and nested playbooks does not count); ``response_timeout``: the same
    for all the statements of one response. ``cpu_seconds``: CPU time of the worker process.
    ``memory_mb``: its address space. ``recursion_limit``: Python's recursion limit in the worker.
    ``max_output_bytes``: what one response may print. ``import_allow`` (only these top-level modules,
    plus what the standard library needs) or ``import_deny`` (never these): an import policy for the
    LLM's ``import`` statements, a guard against mistakes rather than a security boundary (the process
    and Landlock are). ``network``: allow TCP. ``read_paths``/``write_paths``: folders the worker may
    read / write besides the interpreter's own files and its scratch folder. ``env``: names of the
    host's environment variables the worker gets (it gets none else). ``max_restarts``: how many times
    one executor restarts a worker the LLM's code ended, before it gives up with a
    :class:`~playbooks.errors.SandboxError`.
    """

    statement_timeout: float | None = 30.0
    response_timeout: float | None = 300.0
    cpu_seconds: int | None = 600
    memory_mb: int | None = 4096
    recursion_limit: int = 1000
    max_output_bytes: int | None = 1_000_000
    import_allow: tuple[str, ...] | None = None
    import_deny: tuple[str, ...] = ()
    network: bool = False
    read_paths: tuple[str, ...] = ()
    write_paths: tuple[str, ...] = ()
    env: tuple[str, ...] = ()
    max_restarts: int = 3
    kill_grace: float = 2.0

    def __post_init__(self) -> None:
        for name in ("statement_timeout", "response_timeout", "kill_grace"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"SandboxLimits.{name} must be positive (or None for no limit)")
        for name in ("cpu_seconds", "memory_mb", "max_output_bytes"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"SandboxLimits.{name} must be at least 1 (or None for no limit)")
        if self.recursion_limit < 50:
            raise ValueError("SandboxLimits.recursion_limit must be at least 50")
        if self.max_restarts < 0:
            raise ValueError("SandboxLimits.max_restarts must be at least 0")

    @classmethod
    def from_config(cls, table: SandboxConfig) -> SandboxLimits:
        """The limits of a ``[sandbox]`` table (``0`` means no limit there: TOML has no null)."""

        def limit(value: float) -> float | None:
            return value if value > 0 else None

        return cls(
            statement_timeout=limit(table.statement_timeout),
            response_timeout=limit(table.response_timeout),
            cpu_seconds=int(table.cpu_seconds) or None,
            memory_mb=int(table.memory_mb) or None,
            recursion_limit=table.recursion_limit,
            max_output_bytes=int(table.max_output_bytes) or None,
            import_allow=tuple(table.import_allow) if table.import_allow is not None else None,
            import_deny=tuple(table.import_deny),
            network=table.network,
            read_paths=tuple(table.read_paths),
            write_paths=tuple(table.write_paths),
            env=tuple(table.env),
            max_restarts=table.max_restarts,
        )

    def replace(self, **changes: object) -> SandboxLimits:
        """A copy with ``changes``."""
        return dataclasses.replace(self, **changes)  # type: ignore[arg-type]
