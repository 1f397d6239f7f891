"""Run control with real ``playbooks run`` processes: a run that failed resumes once the cause is
fixed, calling the failing call again and nothing before it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

SHOP = """\
# Shop
```python
import os

def _log(line):
    with open("ledger.txt", "a") as f:
        f.write(line + "\\n")

@playbook
async def Reserve(amount: int) -> str:
    \"\"\"Hold the stock.\"\"\"
    _log(f"reserved {amount}")
    return f"hold {amount}"

@playbook
async def Charge(amount: int) -> str:
    \"\"\"Reserve, then charge the customer.\"\"\"
    hold = await Reserve(amount)
    if os.environ.get("GATEWAY_DOWN") == str(amount):
        raise ConnectionError("the payment gateway is down")
    _log(f"charged {amount}")
    return f"receipt for {amount} ({hold})"
```

## Main
```python
@playbook
async def Main() -> str:
    first = await Charge(10)
    second = await Charge(20)
    third = await Charge(30)
    return "; ".join([first, second, third])
```
"""


def _playbooks(*args: str, cwd: Path, down: str = "") -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("PLAYBOOKS_")}
    env["GATEWAY_DOWN"] = down
    return subprocess.run(
        [sys.executable, "-m", "playbooks.cli", *args], capture_output=True, text=True, timeout=60, cwd=cwd,
        env=env, input="",
    )


@pytest.mark.parametrize("down", ["10", "20", "30"])
def test_a_failed_run_resumes_calling_the_failed_call_again(tmp_path: Path, down: str) -> None:
    (tmp_path / "shop.pb").write_text(SHOP)
    (tmp_path / "shop.cassette.json").write_text(json.dumps({"version": 1, "interactions": []}))
    failed = _playbooks("run", "shop.pb", cwd=tmp_path, down=down)
    assert failed.returncode != 0
    assert f"calls Charge({down}) again; nothing before it runs twice" in failed.stderr, failed.stderr
    runs = _playbooks("runs", "--json", cwd=tmp_path)
    (record,) = json.loads(runs.stdout)
    assert record["status"] == "failed" and record["failed_call"] == f"Charge({down})"
    assert "ConnectionError: the payment gateway is down" in record["error"]
    table = _playbooks("runs", cwd=tmp_path).stdout
    assert f"failed in Charge({down}): " in table

    again = _playbooks("run", "shop.pb", "--resume", cwd=tmp_path, down=down)  # not fixed yet
    assert again.returncode != 0 and f"failed in Charge({down}); resuming calls it again" in again.stderr
    fixed = _playbooks("run", "shop.pb", "--resume", cwd=tmp_path)
    assert fixed.returncode == 0, fixed.stderr
    assert "Shop.Main returned 'receipt for 10 (hold 10); receipt for 20 (hold 20); receipt for 30 (hold 30)'" in (
        fixed.stderr + fixed.stdout
    )
    ledger = (tmp_path / "ledger.txt").read_text().splitlines()
    # Before the failing call: each once. The failing call's own completed durable call (Reserve) is
    # replayed, not repeated, on every resume; only the part that failed runs again.
    expected = [f"{what} {a * 10}" for a in range(1, 4) for what in ("reserved", "charged")]
    assert ledger == expected, ledger
    (done,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    assert done["status"] == "completed"


def test_resume_of_a_crashed_run_is_unchanged_by_the_failure_rewind(tmp_path: Path) -> None:
    """A run that did not fail (killed, or one that completed) has nothing rewound: --resume of a
    completed run is refused as before."""
    (tmp_path / "shop.pb").write_text(SHOP)
    (tmp_path / "shop.cassette.json").write_text(json.dumps({"version": 1, "interactions": []}))
    ok = _playbooks("run", "shop.pb", cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    (record,) = json.loads(_playbooks("runs", "--json", cwd=tmp_path).stdout)
    again = _playbooks("run", "shop.pb", "--resume", record["run_id"], cwd=tmp_path)
    assert again.returncode != 0 and "completed; there is nothing to resume" in again.stderr
