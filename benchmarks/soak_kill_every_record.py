"""Soak: kill ``playbooks run`` before and after every record of each example, then ``--resume``.

    python benchmarks/soak_kill_every_record.py [isolated,in-process]

For each way of running the LLM's code (isolated by default, ``in-process``) and each example of
``tests/test_cli_kill_injection.py`` (orders, nested, two_agents, reporter), a fresh run is SIGKILLed
just before and just after its N-th record for every N until it completes unkilled, and resumed; each
trial gets that test's checks (output, return value, python playbook calls against an uninterrupted
run). CI runs every 17th record; this runs every one. Prints the trials and failures per program.
"""

from __future__ import annotations

import collections
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_cli_kill_injection as t  # noqa: E402


def main(ways: list[str]) -> int:
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    failures: list[str] = []
    for way in ways:
        extra = ("--in-process",) if way == "in-process" else ()
        for name in t.NAMES:
            root = Path(tempfile.mkdtemp(prefix=f"soak-{name}-"))
            t._copy(name, root / "reference")
            reference = t._run(root / "reference", name, *extra)
            assert reference.returncode == 0, reference.stderr
            for mode in ("after", "before"):
                n = 1
                while True:
                    verdict = t.kill_trial(name, root / f"{mode}-{n}", f"{mode}:{n}", reference, *extra)
                    if verdict is None:
                        break
                    counts[(way, name)] += 1
                    if verdict:
                        failures.append(verdict)
                        print("FAIL", verdict[:3000], flush=True)
                    n += 1
            print(f"{way} {name}: {counts[(way, name)]} trials, {len(failures)} failures so far", flush=True)
    print(f"total: {sum(counts.values())} trials, {len(failures)} failures")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1].split(",") if len(sys.argv) > 1 else ["isolated"]))
