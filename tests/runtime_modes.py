"""Run a test module's runtime tests in both modes: the LLM's code in this process, and isolated in
worker processes (``ProgramRuntime(isolation=...)``), so every behaviour the runtime tests pin down
holds for both. Import the fixture into the module: ``from runtime_modes import runtime_mode``."""

from __future__ import annotations

from typing import Any

import pytest

from playbooks.execution.sandbox import SandboxLimits
from playbooks.program.runtime import ProgramRuntime

__all__ = ("runtime_mode",)


@pytest.fixture(params=["in-process", "isolated"], autouse=True)
def runtime_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """``"in-process"`` or ``"isolated"``: a runtime built without ``isolation=`` runs that way."""
    if request.param == "isolated":
        original = ProgramRuntime.__init__

        def isolated(self: ProgramRuntime, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("isolation", SandboxLimits())
            original(self, *args, **kwargs)

        monkeypatch.setattr(ProgramRuntime, "__init__", isolated)
    return str(request.param)
