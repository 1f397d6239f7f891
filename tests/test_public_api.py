"""Every public module's ``__all__`` names exactly what it defines, once."""

from __future__ import annotations

import importlib

import pytest

MODULES = ["playbooks", "playbooks.checkpoints", "playbooks.execution", "playbooks.llm", "playbooks.program"]


@pytest.mark.parametrize("name", MODULES)
def test_all_is_a_tuple_of_unique_existing_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = module.__all__
    assert isinstance(exported, tuple)
    assert len(exported) == len(set(exported)), "a name is exported twice"
    for item in exported:
        assert hasattr(module, item), f"{name}.__all__ names {item!r}, which it does not define"


def test_contract_import_paths() -> None:
    from playbooks import Agent
    from playbooks.execution.streaming_python_executor import StreamingPythonExecutor

    assert Agent("a").id == "a"
    assert StreamingPythonExecutor.__name__ == "StreamingPythonExecutor"


def test_import_playbooks_stays_light() -> None:
    import subprocess
    import sys

    code = "import sys, playbooks; print(sorted(m for m in ('sqlite3', 'cloudpickle', 'hypothesis') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_facade_resolves_names_and_subpackages_on_first_use() -> None:
    """``import playbooks`` loads nothing else; every public name and subpackage is there when asked."""
    import subprocess
    import sys

    code = (
        "import sys, playbooks\n"
        "assert not [m for m in sys.modules if m.startswith('playbooks.')], sys.modules\n"
        "for name in playbooks.__all__:\n    getattr(playbooks, name)\n"
        "assert playbooks.checkpoints.CheckpointManager is playbooks.CheckpointManager\n"
        "assert 'StreamingPythonExecutor' in dir(playbooks)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
