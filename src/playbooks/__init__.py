"""playbooks: a durable async interpreter for LLM-generated Python."""

from __future__ import annotations

from playbooks.agent import Agent as Agent

__version__ = "0.1.0"
__all__ = ("Agent", "__version__")
