"""``%load_ext playbooks``, ``%%durable`` and ``%durable`` in an IPython shell in this process (the
kernel tests, test_notebook_kernel.py, kill a real one). A kernel restart is played by a new
``SESSION`` and a cleared namespace; a crash inside a cell by a call that raises KeyboardInterrupt
(what the kernel's interrupt button does), which leaves the cell unfinished. Where that call stops is
read from the environment: a variable would be restored from the checkpoint with the rest."""

from __future__ import annotations

import os
import socket
import string
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

pytest.importorskip("IPython")

from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from playbooks.checkpoints.provider import validate_execution_id  # noqa: E402
from playbooks.notebook import cell as cell_module  # noqa: E402
from playbooks.notebook import magics  # noqa: E402

SETUP = """\
import os
from playbooks import durable_call
calls = []

@durable_call
async def fetch(i):
    calls.append(i)
    if str(i) == os.environ.get("STOP_AT"):
        raise KeyboardInterrupt  # the interrupt button, in the middle of the loop
    return i * 2
"""

CELL = """\
%%durable --id fetcher
found = []
for i in range(6):
    found.append(await fetch(i))
    print("got", i)
done = sum(found)
"""


@pytest.fixture(scope="module")
def shell(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InteractiveShell]:
    os.environ.setdefault("IPYTHONDIR", str(tmp_path_factory.mktemp("ipython")))
    ip = InteractiveShell.instance()
    ip.run_cell("%load_ext playbooks")
    yield ip
    ip.run_cell("%unload_ext playbooks")


@pytest.fixture
def nb(shell: InteractiveShell, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Notebook]:
    monkeypatch.chdir(tmp_path)
    shell.reset(new_session=False)
    monkeypatch.setattr(magics, "SESSION", "kernel-1")
    monkeypatch.delenv("STOP_AT", raising=False)
    yield Notebook(shell)
    shell.reset(new_session=False)


class Notebook:
    def __init__(self, shell: InteractiveShell) -> None:
        self.shell = shell
        self.ns = shell.user_ns

    def run(self, code: str, *, ok: bool = True) -> Any:
        result = self.shell.run_cell(code)
        error = result.error_before_exec or result.error_in_exec
        if ok and error is not None:
            raise AssertionError(f"cell failed: {error!r}")
        return error

    def setup(self, stop_at: int | None) -> None:
        """The notebook's setup cell; ``fetch(stop_at)`` is interrupted."""
        if stop_at is None:
            os.environ.pop("STOP_AT", None)
        else:
            os.environ["STOP_AT"] = str(stop_at)
        self.run(SETUP)

    def restart(self, monkeypatch: pytest.MonkeyPatch, session: str = "kernel-2") -> None:
        """A new kernel: an empty namespace, another session."""
        self.shell.reset(new_session=False)
        monkeypatch.setattr(magics, "SESSION", session)


def test_a_cell_runs_in_the_notebook_namespace_and_leaves_it_clean(nb: Notebook, capsys: Any) -> None:
    nb.setup(None)
    nb.run(CELL)
    assert nb.ns["found"] == [0, 2, 4, 6, 8, 10] and nb.ns["done"] == 30
    assert nb.ns["calls"] == [0, 1, 2, 3, 4, 5]
    assert "print" not in nb.ns  # the durable print was the cell's only
    out = capsys.readouterr().out
    assert out.count("got") == 6 and "durable cell 'fetcher' ran" in out


def test_an_interrupted_cell_resumes_without_calling_finished_calls_again(
    nb: Notebook, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    nb.setup(3)
    error = nb.run(CELL, ok=False)
    assert isinstance(error, KeyboardInterrupt)
    assert nb.ns["calls"] == [0, 1, 2, 3]
    assert "print" not in nb.ns  # the durable print of the interrupted cell is gone with it
    capsys.readouterr()
    nb.restart(monkeypatch)
    nb.setup(None)  # the notebook's setup cell, run again after the restart
    nb.run(CELL)
    assert nb.ns["found"] == [0, 2, 4, 6, 8, 10] and nb.ns["done"] == 30
    # fetch(3) was in flight; 0-2 came from the journal, so their effect on ``calls`` (host state a
    # durable function changed, not the cell's code) is not made again: docs/notebooks.md
    assert nb.ns["calls"] == [3, 4, 5]
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("got")] == ["got 3", "got 4", "got 5"]
    assert "resumed from checkpoint" in out and "replayed 3 calls and 3 printed lines" in out
    assert "ran again with the same idempotency key: fetch(3)" in out


def test_a_changed_cell_is_refused_and_force_starts_it_over(nb: Notebook, capsys: Any) -> None:
    nb.setup(2)
    nb.run(CELL, ok=False)
    os.environ.pop("STOP_AT", None)
    error = nb.run(CELL.replace("range(6)", "range(7)"), ok=False)
    assert isinstance(error, magics.DurableCellError)
    assert "was changed since its stored run" in str(error) and "--force" in str(error)
    assert nb.ns["calls"] == [0, 1, 2]  # nothing ran
    nb.run(CELL.replace("--id fetcher", "--id fetcher --force").replace("range(6)", "range(7)"))
    assert nb.ns["calls"] == [0, 1, 2, 0, 1, 2, 3, 4, 5, 6] and nb.ns["done"] == 42
    assert "forgotten (--force)" in capsys.readouterr().out


def test_a_finished_cell_is_not_run_again_and_comes_back_after_a_restart(
    nb: Notebook, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    nb.setup(None)
    nb.run(CELL)
    nb.run("found.append('later')")  # a later cell changed a variable
    nb.run(CELL)  # same kernel: nothing happens
    assert nb.ns["found"][-1] == "later" and nb.ns["calls"] == [0, 1, 2, 3, 4, 5]
    assert "had finished in this kernel; not run again" in capsys.readouterr().out
    nb.restart(monkeypatch)
    nb.setup(None)
    nb.run(CELL)  # after a restart: the variables the cell ended with come back, nothing runs
    assert nb.ns["found"] == [0, 2, 4, 6, 8, 10] and nb.ns["done"] == 30
    assert nb.ns["calls"] == [0, 1, 2, 3, 4, 5]  # as the cell left it (the setup cell had emptied it)
    out = capsys.readouterr().out
    assert "had finished; restored from checkpoint" in out and "got" not in out


def test_ipython_names_are_not_saved_and_live_values_are_kept(
    nb: Notebook, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    nb.run("import socket\nconn = socket.socket()\n42")  # _, _3, Out[...] and an unpicklable value
    nb.setup(1)
    nb.run(CELL, ok=False)
    manager = magics._manager_factory(magics._config(magics._parse("", cell=True)), "fetcher")()
    import anyio

    checkpoint = anyio.run(manager.get_latest_checkpoint)
    assert checkpoint is not None
    stored = set(checkpoint.state.variables)
    assert not {name for name in stored if name.startswith(("_", "In", "Out"))} - {"__builtin__"}
    assert not {"In", "Out", "_", "_i", "get_ipython", "exit", "__name__"} & stored
    assert "conn" in {name for name, _, _ in checkpoint.state.skipped}
    nb.restart(monkeypatch)
    with socket.socket() as fresh:
        nb.ns["conn"] = fresh  # the setup cell made a new one
        nb.setup(None)
        nb.run(CELL)
        assert nb.ns["conn"] is fresh
    out = capsys.readouterr().out
    assert "not restored: conn" in out and "kept the value this kernel has" in out
    nb.ns["conn"] = None


def test_line_magics_list_show_resume_and_forget(
    nb: Notebook, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    nb.setup(4)
    nb.run(CELL, ok=False)
    capsys.readouterr()
    nb.run("%durable list")
    listing = capsys.readouterr().out
    assert "fetcher" in listing and "unfinished" in listing and "found = []" in listing
    nb.run("%durable show fetcher")
    shown = capsys.readouterr().out
    assert "unfinished" in shown and "     6  done = sum(found)" in shown
    assert "4 finished durable calls in the journal (a resume replays them), the last fetch(3)" in shown
    nb.restart(monkeypatch)
    nb.setup(None)
    nb.run("%durable resume fetcher")  # no need to find the cell: its code is in the store
    assert nb.ns["done"] == 30 and nb.ns["calls"] == [4, 5]
    nb.run("x = 1\n%durable list\ny = 2")  # not alone in its cell: the synchronous magic
    assert "finished" in capsys.readouterr().out
    nb.run("%durable forget fetcher")
    assert "forgot durable cell 'fetcher'" in capsys.readouterr().out
    nb.run("%durable list")
    assert "no durable cells stored" in capsys.readouterr().out
    error = nb.run("%durable resume fetcher", ok=False)
    assert "no stored durable cell 'fetcher'" in str(error)


def test_bad_input_is_a_clear_error(nb: Notebook) -> None:
    error = nb.run("%%durable --id\nx = 1", ok=False)
    assert "--id needs a value" in str(error)
    error = nb.run("%%durable --bogus\nx = 1", ok=False)
    assert "unknown option '--bogus'" in str(error)
    error = nb.run("%%durable --tools nothing_here\nx = 1", ok=False)
    assert "no function named 'nothing_here'" in str(error)
    error = nb.run("%durable frobnicate", ok=False)
    assert "unknown command 'frobnicate'" in str(error)
    error = nb.run("%%durable --id syntax\nx = (1,\n", ok=False)
    assert isinstance(error, magics.DurableCellError) and "line 2 of the cell" in str(error)
    error = nb.run("%%durable --id boom\nx = 1\ny = x / 0\n", ok=False)
    assert "ZeroDivisionError" in str(error) and "line 3 of the cell" in str(error)  # as the editor counts
    assert nb.ns["x"] == 1
    error = nb.run("%%durable --id bad/id\nx = 1", ok=False)
    assert "execution id" in str(error).lower() or "bad/id" in str(error)
    error = nb.run("%%durable --config missing.toml\nx = 1", ok=False)
    assert "does not exist" in str(error)


def test_tools_by_name_config_and_disabled_durability(nb: Notebook, tmp_path: Path, capsys: Any) -> None:
    nb.run("seen = []\nasync def plain(i):\n    seen.append(i)\n    return i + 1")
    nb.run("%%durable --id named --tools plain\nv = await plain(1)")
    assert nb.ns["v"] == 2 and nb.ns["plain"].__name__ == "plain" and not hasattr(nb.ns["plain"], "__playbooks_tool__")
    assert (tmp_path / ".checkpoints" / "named").is_dir()
    (tmp_path / "playbooks.toml").write_text("[durability]\nenabled = false\n")
    nb.run("%%durable --id off\nw = await plain(2)")
    assert nb.ns["w"] == 3 and not (tmp_path / ".checkpoints" / "off").exists()
    assert "without checkpoints" in capsys.readouterr().out
    nb.run("%%durable --id elsewhere --storage store2 --config playbooks.toml\nz = 1")
    assert not (tmp_path / "store2").exists()  # the file says durability is off
    (tmp_path / "playbooks.toml").write_text('[durability]\nstorage_path = "kept"\n')
    nb.run("%%durable --id here\nz = 1")
    assert (tmp_path / "kept" / "here").is_dir()
    nb.run("%%durable --id there --storage other --provider sqlite\nz = 2")
    assert (tmp_path / "other" / "checkpoints.sqlite3").is_file()


def test_help_and_magics_inside_cells_are_left_to_ipython() -> None:
    assert magics._transform(["%%durable?\n"]) == ["%%durable?\n"]
    assert magics._transform(["x = 1\n", "%%durable\n"]) == ["x = 1\n", "%%durable\n"]
    assert magics._transform(["%%durablex\n", "y\n"]) == ["%%durablex\n", "y\n"]
    (line,) = magics._transform(["%%durable --id a\n", "x = 'it''s'\n", "y = \"\"\"q\"\"\"\n"])
    assert "durable_cell_async('--id a', " in line and line.count("\n") == 1


@given(
    explicit=st.none() | st.text(string.ascii_letters + string.digits + "-_.", min_size=1, max_size=30),
    notebook=st.none() | st.text(max_size=60),
    cell_id=st.none() | st.text(max_size=60),
    source=st.text(max_size=200),
)
def test_derived_cell_ids_are_valid_and_stable(
    explicit: str | None, notebook: str | None, cell_id: str | None, source: str
) -> None:
    if explicit is not None and explicit in (".", ".."):
        return
    try:
        first = cell_module.derive_cell_id(explicit=explicit, notebook=notebook, cell_id=cell_id, source=source)
    except Exception:
        assert explicit is not None  # only an explicit id can be refused
        return
    assert validate_execution_id(first) == first
    again = cell_module.derive_cell_id(explicit=explicit, notebook=notebook, cell_id=cell_id, source=source)
    assert again == first
    if explicit is None and cell_id:
        edited = cell_module.derive_cell_id(explicit=None, notebook=notebook, cell_id=cell_id, source=source + "#")
        assert edited == first  # the front end's cell id survives an edit


def test_progress_names_the_line_and_the_call_and_quiet_hides_it(
    nb: Notebook, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    monkeypatch.setattr(magics, "_PROGRESS_EVERY", 0.0)
    nb.setup(None)
    capsys.readouterr()
    nb.run(CELL)
    out = capsys.readouterr().out
    assert "durable cell 'fetcher': line 3, 2 statements, 5 calls; last call: fetch(4)" in out
    nb.run(CELL.replace("--id fetcher", "--id hushed --quiet"))
    assert capsys.readouterr().out.count("durable cell") == 0
