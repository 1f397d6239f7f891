"""Run a resume under the hash seed its execution started with.

Python gives every process its own seed for hashing ``str`` and ``bytes`` (unless ``PYTHONHASHSEED``
is set), so ``for name in {"alice", "bob", "carol"}`` iterates in another order in another process. A
resumed execution re-runs the code after its last snapshot, and if that code iterates over a set of
strings, it makes its durable calls in another order than before the crash. The seed cannot be changed
inside a running interpreter, so the remedy is to start the process with it:

* :func:`current_hash_seed` is this process's seed (``"random"`` when it is not known);
* the first durable frame of an execution records it (a ``state`` record named ``hash_seed``);
* :func:`pin_hash_seed` re-executes the current program with ``PYTHONHASHSEED`` set, unless it is set
  already: call it first thing in a program that runs durable executions (``playbooks run`` does);
* :func:`resume_hash_seed` re-executes the current program under the seed an execution recorded, if
  this process has another one: call it before resuming;
* a :class:`~playbooks.errors.NonDeterminismError` that another seed could explain says so.
"""

from __future__ import annotations

import os
import secrets
import sys
import weakref
from collections.abc import Sequence
from typing import TYPE_CHECKING, NoReturn

if TYPE_CHECKING:
    from playbooks.checkpoints.manager import CheckpointManager

__all__ = ("current_hash_seed", "pin_hash_seed", "recorded_hash_seed", "resume_hash_seed", "seed_mismatch")

STATE_NAME = "hash_seed"
_RECORDED: weakref.WeakSet[CheckpointManager] = weakref.WeakSet()


def current_hash_seed() -> str:
    """This process's hash seed as ``PYTHONHASHSEED`` spells it, or ``"random"`` if it was not set."""
    if not sys.flags.hash_randomization:
        return "0"
    value = os.environ.get("PYTHONHASHSEED", "")
    return value if value.isdigit() else "random"


def _reexec(seed: str, argv: Sequence[str] | None) -> NoReturn:
    env = dict(os.environ, PYTHONHASHSEED=seed)
    args = list(argv) if argv is not None else _original_argv()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *args], env)


def _original_argv() -> list[str]:
    """The arguments this interpreter was started with (``-m module`` included)."""
    orig = getattr(sys, "orig_argv", None)
    if orig:
        return list(orig[1:])
    return list(sys.argv)


def pin_hash_seed(seed: int | str | None = None, *, argv: Sequence[str] | None = None) -> str:
    """Make sure this process runs under a known hash seed, and return it.

    If ``PYTHONHASHSEED`` is already set (to ``seed``, when one is given), nothing happens. Otherwise
    the current program is executed again (``os.execve``, same arguments unless ``argv`` is given)
    with ``PYTHONHASHSEED`` set to ``seed`` or a fresh random one; this call then does not return.
    """
    current = current_hash_seed()
    wanted = str(seed) if seed is not None else None
    if current != "random" and (wanted is None or wanted == current):
        return current
    _reexec(wanted if wanted is not None else str(secrets.randbelow(2**32 - 1) + 1), argv)


def recorded_hash_seed(manager: CheckpointManager) -> str | None:
    """The seed the execution recorded (among the manager's loaded records), if any."""
    value = manager.loaded_state(STATE_NAME)
    return value if isinstance(value, str) else None


async def resume_hash_seed(manager: CheckpointManager, *, argv: Sequence[str] | None = None) -> str | None:
    """Before a resume: re-execute the current program under the execution's recorded seed if this
    process has another one (then this call does not return). Returns the recorded seed, if any."""
    await manager.load_records()
    recorded = recorded_hash_seed(manager)
    if recorded is not None and recorded != "random" and recorded != current_hash_seed():
        await manager.close()
        _reexec(recorded, argv)
    return recorded


async def record_hash_seed(manager: CheckpointManager) -> None:
    """Record this process's seed for the execution, unless it has one (called by durable frames)."""
    if manager in _RECORDED:
        return
    _RECORDED.add(manager)
    if recorded_hash_seed(manager) is None:
        await manager.save_state(STATE_NAME, current_hash_seed())


def seed_mismatch(manager: CheckpointManager) -> str:
    """A note for a replay divergence when the execution started under another or unknown seed."""
    recorded = recorded_hash_seed(manager)
    current = current_hash_seed()
    if recorded is None or (recorded == current and recorded != "random"):
        return ""
    if recorded == "random":
        return (
            "The execution started with a random hash seed, so sets and dicts of strings may iterate in "
            "another order in this process: start executions under a fixed PYTHONHASHSEED "
            "(playbooks.execution.hash_seed.pin_hash_seed(), as `playbooks run` does) so a resume can "
            "use the same."
        )
    return (
        f"The execution started under PYTHONHASHSEED={recorded} but this process runs under "
        f"{'a random seed' if current == 'random' else current}, so sets and dicts of strings may "
        f"iterate in another order: resume under PYTHONHASHSEED={recorded} "
        f"(playbooks.execution.hash_seed.resume_hash_seed(manager) does that)."
    )
