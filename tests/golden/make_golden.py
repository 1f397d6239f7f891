"""Write the golden stores that tests/test_storage_format.py resumes (run it when FORMAT_VERSION or the
record fields change, and commit the result; never regenerate a committed version's stores to make a
test pass: they are what that version wrote).

    .venv/bin/python tests/golden/make_golden.py

For each scenario of tests/durable_worker.py listed below: a run killed by SIGKILL during its second
live call, its store copied to tests/golden/v{FORMAT_VERSION}/{scenario}/, and the namespace of an
uninterrupted run in expected.json. Records are signed with GOLDEN_KEY.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from playbooks.checkpoints.codec import FORMAT_VERSION, KEY_ENV_VAR

GOLDEN_KEY = "golden-store-key: not a secret"
SCENARIOS = ("loop", "helper", "nested", "gather", "bigvar")  # bigvar: compressed snapshots (version 3)
HERE = Path(__file__).resolve().parent
WORKER = HERE.parent / "durable_worker.py"


def main() -> None:
    env = {**os.environ, KEY_ENV_VAR: GOLDEN_KEY}
    target = HERE / f"v{FORMAT_VERSION}"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir()
    expected = {}
    with tempfile.TemporaryDirectory() as scratch:
        for name in SCENARIOS:
            work = Path(scratch) / name
            work.mkdir()
            store = work / "store"
            base = [sys.executable, str(WORKER), name]
            subprocess.run([*base, str(work / "full"), str(work / "l0"), str(work / "full.json")], env=env, check=True)
            expected[name] = json.loads((work / "full.json").read_text())["namespace"]
            subprocess.run([*base, str(store), str(work / "l1"), str(work / "o1"), "--kill", "in:2"], env=env)
            for lock in store.rglob(".lock"):
                with open(lock, "r+b") as f:  # blank the dead pid (bytes 0..31); the head follows
                    f.write(b" " * 31 + b"\n")
            shutil.copytree(store, target / name)
    (target / "expected.json").write_text(json.dumps(expected, indent=1, sort_keys=True) + "\n")
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
