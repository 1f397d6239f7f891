"""The progress view of ``playbooks run``: long-running calls are reported while they run."""

from __future__ import annotations

import io
import time

from playbooks.cli.run_command import Progress
from playbooks.program.runtime import LLMCallFinished, LLMCallStarted, PlaybookFinished, PlaybookStarted


def test_a_long_call_is_reported_while_it_runs() -> None:
    out = io.StringIO()
    progress = Progress(stream=out)
    progress.start_ticker(first=0.2)
    try:
        progress(PlaybookStarted("Shop", "Main", "markdown", {}, 0))
        progress(LLMCallStarted("Shop", "Main", 1, 0))
        progress(LLMCallFinished("Shop", "Main", 1, 0, 0, 0))
        progress(PlaybookStarted("Shop", "Slow", "python", {}, 1))
        time.sleep(0.75)
        progress(PlaybookFinished("Shop", "Slow", 1, value=1))
        reported = out.getvalue().count("Shop.Slow running for")
        time.sleep(0.6)
    finally:
        progress.stop_ticker()
    lines = out.getvalue().splitlines()
    slow = [line for line in lines if "Shop.Slow running for" in line]
    assert slow and slow[0].startswith("    ... Shop.Slow running for"), lines  # at 0.2 s, then 0.4 s, ...
    assert len(slow) == reported, lines  # nothing after it finished
    assert not any("LLM call 1" in line for line in lines), lines  # it ended at once
    assert "\033[" not in out.getvalue()  # not a terminal: no colours
