"""Durable notebook cells: ``%load_ext playbooks``, then ``%%durable`` cells survive a kernel crash.

A ``%%durable`` cell runs through the streaming executor in the notebook's own namespace, with a
checkpoint at every durable call; after the kernel dies, running the same cell again restores the
notebook's variables, skips the statements that had finished, hands back the outcome of every
completed durable call, and continues from the last one. Durable calls are functions marked with
:func:`durable_call`, functions named with ``%%durable --tools``, and ``print``. See
docs/notebooks.md.

The IPython side lives in :mod:`playbooks.notebook.magics` (imported when the extension loads); the
cell logic, which needs no IPython, in :mod:`playbooks.notebook.cell`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from playbooks.execution.tool_calls import durable_call as durable_call
from playbooks.notebook.cell import CellChangedError as CellChangedError
from playbooks.notebook.cell import CellReport as CellReport
from playbooks.notebook.cell import run_durable_cell as run_durable_cell

if TYPE_CHECKING:
    from IPython.core.interactiveshell import InteractiveShell

__all__ = (
    "CellChangedError",
    "CellReport",
    "durable_call",
    "load_ipython_extension",
    "run_durable_cell",
    "unload_ipython_extension",
)


def load_ipython_extension(ip: InteractiveShell) -> None:
    """Register ``%%durable`` and ``%durable`` (``%load_ext playbooks`` or ``%load_ext playbooks.notebook``)."""
    from playbooks.notebook.magics import load_ipython_extension as load

    load(ip)


def unload_ipython_extension(ip: InteractiveShell) -> None:
    """``%unload_ext playbooks``."""
    from playbooks.notebook.magics import unload_ipython_extension as unload

    unload(ip)
