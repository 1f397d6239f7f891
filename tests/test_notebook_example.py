"""The example notebook and the README's notebook section, run as a user would: by nbclient and a
real kernel, twice (the second time in a new kernel, as after a restart)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from notebook_kernel import Kernel, kernel_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(kernel_available() is not None, reason=str(kernel_available())),
]

ROOT = Path(__file__).resolve().parent.parent


def _execute(path: Path) -> list[str]:
    """Run every cell of the notebook at ``path`` in a new kernel; return each code cell's text output."""
    import nbclient
    import nbformat

    notebook = nbformat.read(path, as_version=4)
    nbclient.NotebookClient(notebook, timeout=120, resources={"metadata": {"path": str(path.parent)}}).execute()
    texts = []
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        parts = []
        for output in cell.outputs:
            assert output.output_type != "error", output
            parts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
        texts.append("\n".join(parts) if len(parts) > 1 else "".join(parts))
    return texts


def test_the_example_notebook_runs_and_comes_back_after_a_restart(tmp_path: Path) -> None:
    shutil.copy(ROOT / "examples" / "durable_cells.ipynb", tmp_path)
    first = _execute(tmp_path / "durable_cells.ipynb")
    durable = next(text for text in first if "durable cell 'invoices'" in text)
    assert "durable cell 'invoices' ran" in durable and "price of plum is 5" in durable
    assert "{'apple': 3, 'pear': 4, 'plum': 5} 12 invoice to ada: 12\n" in first
    second = _execute(tmp_path / "durable_cells.ipynb")  # a new kernel, as after a restart
    durable = next(text for text in second if "durable cell 'invoices'" in text)
    assert "had finished; restored from checkpoint" in durable and "price of" not in durable
    assert "{'apple': 3, 'pear': 4, 'plum': 5} 12 invoice to ada: 12\n" in second
    assert len((tmp_path / "invoices.jsonl").read_text().splitlines()) == 1


def _readme_cells() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In a notebook", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


def test_the_readme_notebook_section_works_as_written(tmp_path: Path) -> None:
    cells = _readme_cells()
    assert len(cells) >= 2 and cells[1].startswith("%%durable")
    kernel = Kernel(tmp_path)
    try:
        outputs = []
        for cell in cells:
            run = kernel.run(cell)
            assert run.status == "ok", run
            outputs.append(run.stdout + "".join(run.displays))
        assert "durable cell 'totals' ran" in outputs[1]
        assert kernel.value("total") == 30
    finally:
        kernel.close()
    kernel = Kernel(tmp_path)  # after a restart: the setup cell, then the durable cell again
    try:
        assert kernel.run(cells[0]).status == "ok"
        run = kernel.run(cells[1])
        assert "had finished; restored" in run.summary and kernel.value("total") == 30
    finally:
        kernel.close()
