"""Soak the crash-trial fuzzer: N kill-and-resume trials of generated programs, on asyncio and trio.

    .venv/bin/python benchmarks/soak_crash_fuzz.py 10000                  # the issue's soak
    .venv/bin/python benchmarks/soak_crash_fuzz.py 200 --per-feature      # one feature per program (twice)
    .venv/bin/python benchmarks/soak_crash_fuzz.py 200 --shrink 600       # + a shrunk example per failure
    .venv/bin/python benchmarks/soak_crash_fuzz.py 1000 --isolated        # IsolatedPythonExecutor (issue 11)

Each program (``tests/fuzz_programs.py``) runs once uninterrupted, then ``--trials-per-program`` times
killed with SIGKILL at a random instant (sometimes twice) and resumed (``tests/fuzz_worker.py``), on
a pool of ``--jobs`` processes. Every worker process is killed after a bounded time, so the soak runs
unattended. Prints outcome counts per backend and per feature, one failing example per (backend,
outcome) with the command that repeats it, and the command line of the soak itself; ``--jsonl``
keeps every trial (with the program text of the failing ones).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import sys
import time
from collections import Counter, defaultdict
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

TESTS = Path(__file__).resolve().parent.parent / "tests"
sys.path.insert(0, str(TESTS))

import fuzz_worker  # noqa: E402
from fuzz_programs import BACKENDS, features_for, generate, parse_program  # noqa: E402


def run_program(
    backend: str, program_seed: int, trials: int, per_feature: bool, pin_hash_seed: bool, hash_seed_api: bool
) -> list[dict[str, Any]]:
    """One program: its reference and ``trials`` crash trials, as JSON-able dicts (in a pool worker)."""
    isolated = bool(os.environ.get(fuzz_worker.ISOLATED_ENV))
    features = tuple(f for f in features_for(backend) if not (isolated and f == "nested_executor"))
    if per_feature:
        feature = features[program_seed % len(features)]
        program = generate(program_seed, backend, features=(feature,), min_features=2, max_features=2)
    else:
        program = generate(program_seed, backend, features=features)
    reference = fuzz_worker.run_reference(program, seed=program_seed)
    out = []
    for k in range(trials):
        result = fuzz_worker.run_trial(
            reference, program_seed * 100 + k, pin_hash_seed=pin_hash_seed, hash_seed_api=hash_seed_api
        )
        row = result.to_json()
        row["signature"] = result.signature
        row["per_feature"] = per_feature
        if result.outcome in fuzz_worker.FAILING:
            row["program"] = program.text
            row["description"] = fuzz_worker.describe(result, program, reference)
        out.append(row)
        if result.outcome == "reference-error":
            break
    return out


def _table(title: str, rows: dict[str, Counter[str]], columns: list[str]) -> str:
    width = max([len(title)] + [len(r) for r in rows]) + 2
    colw = [max(len(c), 5) + 2 for c in columns]
    lines = [title.ljust(width) + "".join(c.rjust(w) for c, w in zip(columns, colw)) + "   total"]
    for name in sorted(rows):
        counts = rows[name]
        cells = "".join(str(counts.get(c, 0) or ".").rjust(w) for c, w in zip(columns, colw))
        lines.append(name.ljust(width) + cells + str(sum(counts.values())).rjust(8))
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trials", type=int, help="total crash trials (split over the backends)")
    parser.add_argument("--seed", type=int, default=1, help="first program seed")
    parser.add_argument("--backends", default=",".join(BACKENDS))
    parser.add_argument("--jobs", type=int, default=2, help="trials running at once")
    parser.add_argument("--trials-per-program", type=int, default=2)
    parser.add_argument("--per-feature", action="store_true", help="each program: two instances of one feature")
    parser.add_argument("--pin-hash-seed", action="store_true", help="one PYTHONHASHSEED per trial")
    parser.add_argument("--no-hash-seed-api", action="store_true",
                        help="resume without playbooks.execution.hash_seed.resume_hash_seed")
    parser.add_argument("--isolated", action="store_true",
                        help="run the programs in IsolatedPythonExecutor; kills hit the host, its worker or both")
    parser.add_argument("--jsonl", help="append every trial to this file")
    parser.add_argument("--shrink", type=float, default=0.0, metavar="SECONDS",
                        help="then shrink one failing program per (backend, feature, outcome) within this budget")
    options = parser.parse_args()
    if options.isolated:
        os.environ[fuzz_worker.ISOLATED_ENV] = "1"  # inherited by the pool and its trial processes
    backends = [b for b in options.backends.split(",") if b]
    per_program = max(1, options.trials_per_program)
    programs_per_backend = -(-options.trials // (len(backends) * per_program))
    tasks = [(b, options.seed + i) for i in range(programs_per_backend) for b in backends]
    command = shlex.join([sys.executable, *sys.argv])
    print(f"soak: {command}", flush=True)

    results: list[dict[str, Any]] = []
    started = time.monotonic()
    jsonl = open(options.jsonl, "a") if options.jsonl else None
    target = options.trials
    pool = ProcessPoolExecutor(max_workers=options.jobs)
    pending: dict[Future[list[dict[str, Any]]], tuple[str, int]] = {}
    queue = list(reversed(tasks))
    try:
        while queue or pending:
            while queue and len(pending) < options.jobs * 2 and len(results) + len(pending) * per_program < target:
                task = queue.pop()
                fut = pool.submit(run_program, *task, per_program, options.per_feature,
                                  options.pin_hash_seed, not options.no_hash_seed_api)
                pending[fut] = task
            if not pending:
                break
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in done:
                task = pending.pop(fut)
                try:
                    rows = fut.result()
                except BrokenProcessPool:
                    # A pool process died (OOM killer, ...): start a new pool, run the task again.
                    print(f"pool process died running {task}; restarting the pool", flush=True)
                    for other in pending:
                        queue.append(pending[other])
                    pending.clear()
                    pool.shutdown(wait=False, cancel_futures=True)
                    pool = ProcessPoolExecutor(max_workers=options.jobs)
                    queue.append(task)
                    break
                except Exception as exc:  # a bug of the harness: say so and go on
                    print(f"harness error in {task}: {exc!r}", flush=True)
                    continue
                for row in rows:
                    results.append(row)
                    if jsonl:
                        jsonl.write(json.dumps(row) + "\n")
                        jsonl.flush()
            n = len(results)
            if n and (n % 50 < per_program * len(done) or not queue):
                failing = sum(r["outcome"] in fuzz_worker.FAILING for r in results)
                print(f"  {n} trials, {failing} failing, {time.monotonic() - started:.0f} s", flush=True)
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
    if jsonl:
        jsonl.close()

    outcomes = [o for o in fuzz_worker.OUTCOMES if any(r["outcome"] == o for r in results)]
    print()
    print(f"{len(results)} trials in {time.monotonic() - started:.0f} s")
    by_backend: dict[str, Counter[str]] = defaultdict(Counter)
    for r in results:
        by_backend[r["backend"]][r["outcome"]] += 1
    print(_table("backend", by_backend, outcomes))
    if options.isolated:
        by_target: dict[str, Counter[str]] = defaultdict(Counter)
        for r in results:
            by_target["+".join(r.get("targets") or []) or "(no kill)"][r["outcome"]] += 1
        print()
        print(_table("killed", by_target, outcomes))
    for backend in backends:
        by_feature: dict[str, Counter[str]] = defaultdict(Counter)
        for r in results:
            if r["backend"] == backend:
                for f in r["features"]:
                    by_feature[f][r["outcome"]] += 1
        print()
        print(_table(f"{backend}: feature", by_feature, outcomes))
    first: dict[tuple[str, str], dict[str, Any]] = {}
    for r in results:
        if r["outcome"] in fuzz_worker.FAILING:
            first.setdefault((r["backend"], r["signature"]), r)
    if first:
        print()
        print("failures (first of each kind):")
        counts = Counter((r["backend"], r["signature"]) for r in results if r["outcome"] in fuzz_worker.FAILING)
        for (backend, signature), r in sorted(first.items()):
            print(f"  {backend} {signature}: {counts[(backend, signature)]} trials; repeat with")
            print(f"    {fuzz_worker.repro_command(_result(r))}")
    if options.shrink > 0 and first:
        _shrink_examples(results, options.shrink, options.pin_hash_seed, not options.no_hash_seed_api)
    print()
    print(f"soak: {command}")
    failing = sum(r["outcome"] in fuzz_worker.FAILING for r in results)
    print(f"{failing} of {len(results)} trials diverged or failed")
    return 1 if failing else 0


def _result(row: dict[str, Any]) -> fuzz_worker.TrialResult:
    fields = {k: row[k] for k in fuzz_worker.TrialResult.__dataclass_fields__ if k in row}
    return fuzz_worker.TrialResult(**fields)


def _shrink_examples(results: list[dict[str, Any]], budget: float, pin_hash_seed: bool, hash_seed_api: bool) -> None:
    """Shrink one failing program per (backend, main feature, signature), sharing ``budget`` seconds."""
    chosen: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in sorted(results, key=lambda r: len(r.get("program", ""))):
        if r["outcome"] in fuzz_worker.FAILING and r["outcome"] != "reference-error":
            # One per kind: the signature and which variables differed (without their numbers).
            names = sorted({re.sub(r"_\d+$", "", n) for n in re.findall(r"^  (\w+): expected", r["detail"], re.M)})
            chosen.setdefault((r["backend"], ",".join(names), r["signature"]), r)
    # The smallest programs first: they shrink fastest.
    order = sorted(chosen.items(), key=lambda kv: len(kv[1]["program"]))
    deadline = time.monotonic() + budget
    print()
    print(f"shrinking {len(order)} failing programs ({budget:.0f} s):")
    for (backend, names, signature), r in order:
        main = ",".join(f for f in r["features"] if f != "print") or "print"
        left = deadline - time.monotonic()
        if left <= 5:
            print("  (shrink budget spent)")
            break
        program = parse_program(r["program"], backend)
        seeds = [r["trial_seed"]] + [r["trial_seed"] * 7 + i for i in range(7)]
        fractions = [k / r["reference_duration"] for k in r["kills"]] if r.get("reference_duration") else None
        small, result = fuzz_worker.shrink(
            program, signature, seeds, budget=min(left, max(30.0, budget / len(order) * 2)),
            pin_hash_seed=pin_hash_seed, hash_seed_api=hash_seed_api, kill_fractions=fractions,
        )
        print(f"\n=== {backend} [{main}] {signature}: {len(program.items)} -> {len(small.items)} items ===")
        print(small.text, end="")
        print("--- what differed ---")
        print((result.detail if result else r["detail"])[:3000])


if __name__ == "__main__":
    raise SystemExit(main())
