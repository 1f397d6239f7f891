"""Cold resume after 20, 200 and 2,000 awaits, for several source trees side by side.

    python benchmarks/resume_history_trees.py before=/path/to/old/src after=src [--repeats 11]

``bench_checkpoint.py --history`` prints the same rows for one tree with 5 repeats; this prepares
each tree's runs with that tree's own code, then times ``bench_checkpoint.py``'s resume script on them,
alternating the trees in every repeat (the machine's speed drifts), and prints medians: wall time from
spawn, and time after interpreter start as a ratio to that tree's 20-await resume. Each tree's
bytecode is compiled first, as an install has it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

PREPARE = """
import asyncio, os, sys
sys.path.insert(0, {bench!r})
import bench_checkpoint as b
folder, n = sys.argv[1], int(sys.argv[2])
asyncio.run(b._prepare_resume(folder, awaits=n, big=False))
with open(os.path.join(folder, "resume.py"), "w") as f:
    f.write(b._RESUME)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", help="NAME=SRC: a name and a tree's src folder")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--history", default="20,200,2000")
    options = parser.parse_args()
    trees = dict(t.split("=", 1) for t in options.trees)
    lengths = [int(x) for x in options.history.split(",")]
    bench = os.path.dirname(os.path.abspath(__file__))
    with tempfile.TemporaryDirectory(prefix="resume-history-") as base:
        envs = {name: dict(os.environ, PYTHONPATH=os.path.abspath(src)) for name, src in trees.items()}
        for name, env in envs.items():
            subprocess.run(
                [sys.executable, "-c", "import compileall, os, playbooks; "
                 "compileall.compile_dir(os.path.dirname(playbooks.__file__), quiet=1)"], env=env, check=True,
            )
            for n in lengths:
                folder = os.path.join(base, f"{name}-{n}")
                os.mkdir(folder)
                subprocess.run([sys.executable, "-c", PREPARE.format(bench=bench), folder, str(n)], env=env, check=True)
        walls: dict[tuple[str, int], list[float]] = {(name, n): [] for name in trees for n in lengths}
        insides: dict[tuple[str, int], list[float]] = {(name, n): [] for name in trees for n in lengths}
        for _ in range(options.repeats):
            for name, env in envs.items():
                for n in lengths:
                    folder = os.path.join(base, f"{name}-{n}")
                    start = time.perf_counter()
                    proc = subprocess.run(
                        [sys.executable, os.path.join(folder, "resume.py"), folder], env=env, capture_output=True, text=True,
                    )
                    if proc.returncode != 0:
                        raise SystemExit(f"the resume of {name} after {n} awaits failed:\n{proc.stderr}")
                    walls[(name, n)].append((time.perf_counter() - start) * 1000)
                    insides[(name, n)].append(float(proc.stdout.strip()))
    print(f"python {sys.version.split()[0]}, {options.repeats} alternating repeats, load {os.getloadavg()[0]:.2f}")
    for name in trees:
        first = statistics.median(insides[(name, lengths[0])])
        for n in lengths:
            inside = statistics.median(insides[(name, n)])
            print(f"{name:8s} {n:5d} awaits: wall {statistics.median(walls[(name, n)]):6.1f} ms, after interpreter "
                  f"start {inside:6.1f} ms ({inside / first:.2f}x the {lengths[0]}-await resume)")


if __name__ == "__main__":
    main()
