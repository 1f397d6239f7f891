"""How long the command line and the library take to start, beside a bare interpreter.

    python benchmarks/bench_startup.py [--repeats 15]

Prints the median wall time (ms, from spawn to exit) of a bare interpreter (``python -c pass``),
``python -c "import playbooks"`` and ``playbooks --help`` (run as ``python -m playbooks.cli``, so the
venv's console script is not needed), each as a difference over the bare interpreter and as a ratio
to it, all measured in this run and interleaved so that a change of machine load hits all three alike.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

from _bytecode import ensure_bytecode

COMMANDS = {
    "bare interpreter (python -c pass)": [sys.executable, "-c", "pass"],
    "import playbooks": [sys.executable, "-c", "import playbooks"],
    "playbooks --help": [sys.executable, "-m", "playbooks.cli", "--help"],
}


def _wall_ms(args: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True)
    return (time.perf_counter() - start) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=15)
    options = parser.parse_args()
    note = ensure_bytecode()
    times: dict[str, list[float]] = {label: [] for label in COMMANDS}
    for label, args in COMMANDS.items():  # warm the file cache first
        _wall_ms(args)
    for _ in range(options.repeats):
        for label, args in COMMANDS.items():
            times[label].append(_wall_ms(args))
    bare = statistics.median(next(iter(times.values())))
    print(f"python {sys.version.split()[0]}, {options.repeats} runs each, interleaved; {note}")
    for label, samples in times.items():
        median = statistics.median(samples)
        print(f"{label:36s} {median:7.1f} ms wall  {median - bare:+7.1f} ms over bare  {median / bare:5.2f}x bare")


if __name__ == "__main__":
    main()
