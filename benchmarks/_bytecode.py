"""Bytecode caches for the benchmarks that start new interpreters.

An installed package has its ``__pycache__`` (pip compiles it on install), so a user's process loads
bytecode. A checkout run with ``PYTHONDONTWRITEBYTECODE`` set (some CI images and sandboxes set it)
never writes one, and every new interpreter would compile the whole package from source: 50 to
150 ms that no user pays, larger than what the start-up rows measure. The benchmarks compile it
first and say so in their output.
"""

from __future__ import annotations

import compileall
import os

import playbooks


def ensure_bytecode() -> str:
    """Compile the ``playbooks`` package's bytecode where it is missing or stale; describe what was
    done, for the benchmark's output."""
    package = os.path.dirname(playbooks.__file__)
    compileall.compile_dir(package, quiet=1)
    note = f"bytecode of {package} compiled (as an install has it)"
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        note += "; PYTHONDONTWRITEBYTECODE is set here, so without this every process compiled it from source"
    return note
