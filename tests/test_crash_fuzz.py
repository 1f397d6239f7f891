"""The crash-trial fuzzer (issue 8): generated LLM-style programs, killed with SIGKILL and resumed.

Each program (``fuzz_programs.generate``) runs once uninterrupted in a subprocess (the reference), then
from scratch in new interpreters, each with its own random ``PYTHONHASHSEED``, killed from outside at a
random instant, sometimes killed again during the resume, and resumed to the end
(``fuzz_worker.run_trial``). The trial must end with the reference's namespace (values and sharing),
its output (nothing twice, nothing lost) and its calls (each completed call once; a repeat only for
the call recovery reported in flight).

Knobs: ``PLAYBOOKS_FUZZ_TRIALS`` (trials per backend, default 40), ``PLAYBOOKS_FUZZ_SEED`` (the first
program seed). A failure prints, per kind, the seeds, the program and what differed, and the command
that runs the same trial again. ``benchmarks/soak_crash_fuzz.py`` runs the long soak.
"""

from __future__ import annotations

import ast
import os
import sys
from collections import Counter
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fuzz_programs  # noqa: E402
import fuzz_worker  # noqa: E402
from fuzz_programs import BACKENDS, FEATURES, features_for, generate, parse_program  # noqa: E402

TRIALS = int(os.environ.get("PLAYBOOKS_FUZZ_TRIALS", "40"))
SEED = int(os.environ.get("PLAYBOOKS_FUZZ_SEED", "20261130"))
TRIALS_PER_PROGRAM = 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_covers_every_feature(backend: str) -> None:
    seen: Counter[str] = Counter()
    for seed in range(150):
        program = generate(seed, backend)
        seen.update(program.features)
        text = program.text
        assert generate(seed, backend).text == text, "the same seed gives the same program"
        assert parse_program(text, backend).text == text, "a printed program parses back into its items"
        compile(text, f"<fuzz {backend} {seed}>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        if backend == "trio":
            assert "asyncio" not in text, "trio programs use anyio, not asyncio"
    missing = set(features_for(backend)) - set(seen)
    assert not missing, f"features never generated on {backend}: {sorted(missing)}"
    assert set(seen) <= set(FEATURES)
    if backend == "trio":
        assert not set(seen) & fuzz_programs.ASYNCIO_ONLY


@pytest.mark.parametrize("backend", BACKENDS)
def test_generator_restricted_to_features(backend: str) -> None:
    for feature in features_for(backend):
        program = generate(1, backend, features=(feature,), min_features=1, max_features=1)
        assert feature in program.features


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_uninterrupted_runs_agree(backend: str) -> None:
    """The harness's premise: a run that never dies gives one namespace, output and call multiset,
    whatever the hash seed and the chunking (otherwise a trial's divergence would mean nothing)."""
    for seed in range(SEED, SEED + 2):
        program = generate(seed, backend, min_features=5, max_features=6)
        first = fuzz_worker.run_reference(program, seed=1)
        second = fuzz_worker.run_reference(program, seed=2)
        assert first.error is None, f"{first.error}\n{program.text}"
        assert second.error is None, f"{second.error}\n{program.text}"
        assert first.stdout == second.stdout, program.text
        assert first.calls == second.calls, program.text
        assert first.namespace == second.namespace, "\n".join(
            fuzz_worker._diff_namespace(first.namespace, second.namespace)
        )


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_trials(backend: str, tmp_path: Path) -> None:
    outcomes: Counter[str] = Counter()
    examples: dict[str, str] = {}
    trial = 0
    program_seed = SEED
    while trial < TRIALS:
        program = generate(program_seed, backend)
        reference = fuzz_worker.run_reference(program, seed=program_seed, workdir=tmp_path)
        for _ in range(TRIALS_PER_PROGRAM):
            if trial >= TRIALS:
                break
            result = fuzz_worker.run_trial(reference, SEED * 1000 + trial, workdir=tmp_path)
            outcomes[result.signature] += 1
            if result.outcome in fuzz_worker.FAILING and result.signature not in examples:
                examples[result.signature] = fuzz_worker.describe(result, program, reference)
            trial += 1
        program_seed += 1
    summary = ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items()))
    print(f"{backend}: {trial} trials: {summary}")
    if examples:
        text = "\n\n".join(f"=== {kind} ===\n{example}" for kind, example in sorted(examples.items()))
        pytest.fail(f"{backend}: {trial} trials: {summary}\n\n{text}", pytrace=False)


def test_hypothesis_strategy_makes_programs() -> None:
    from hypothesis import given, settings

    @settings(max_examples=25, deadline=None)
    @given(fuzz_programs.program_strategy("trio"))
    def check(program: fuzz_programs.Program) -> None:
        compile(program.text, "<fuzz>", "exec", flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT)
        assert program.features <= set(features_for("trio"))

    check()


ISOLATED_TRIALS = int(os.environ.get("PLAYBOOKS_FUZZ_ISOLATED_TRIALS", "12"))
ISOLATED_FEATURES = ("nested_executor",)
"""Left out of isolated trials: a tool that runs a child executor in the host is not a child frame of
the worker's call (docs/isolation.md, "What isolation does not cover")."""


@pytest.mark.integration
@pytest.mark.parametrize("backend", BACKENDS)
def test_crash_trials_isolated(backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same trials with ``IsolatedPythonExecutor``: each kill hits the host (its worker dies
    with it), the isolated worker alone (the host resumes the frame in a new worker) or both."""
    monkeypatch.setenv(fuzz_worker.ISOLATED_ENV, "1")
    features = tuple(f for f in features_for(backend) if f not in ISOLATED_FEATURES)
    outcomes: Counter[str] = Counter()
    targets: Counter[str] = Counter()
    examples: dict[str, str] = {}
    trial = 0
    program_seed = SEED
    # First one program per feature (a fixed sample of mixed programs once missed every program
    # with a tool's exception, which all diverged), then mixed programs.
    per_feature = list(features)
    while trial < ISOLATED_TRIALS + len(per_feature) or per_feature:
        single = (per_feature.pop(0),) if per_feature else None
        program = generate(program_seed, backend, features=single or features, min_features=1 if single else 2)
        reference = fuzz_worker.run_reference(program, seed=program_seed, workdir=tmp_path)
        for _ in range(1 if single else TRIALS_PER_PROGRAM):
            if not single and trial >= ISOLATED_TRIALS + len(features):
                break
            result = fuzz_worker.run_trial(reference, SEED * 1000 + trial, workdir=tmp_path)
            outcomes[result.signature] += 1
            targets.update(result.targets)
            if result.outcome in fuzz_worker.FAILING and result.signature not in examples:
                examples[result.signature] = fuzz_worker.describe(result, program, reference)
            trial += 1
        program_seed += 1
    summary = ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items()))
    print(f"{backend} isolated: {trial} trials: {summary}; kills: {dict(targets)}")
    if examples:
        text = "\n\n".join(f"=== {kind} ===\n{example}" for kind, example in sorted(examples.items()))
        pytest.fail(f"{backend} isolated: {trial} trials: {summary}\n\n{text}", pytrace=False)
