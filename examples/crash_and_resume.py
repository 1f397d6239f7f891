"""Run a playbook program, kill it with SIGKILL half-way, and finish it with ``--resume``.

    python examples/crash_and_resume.py [PROGRAM.pb] [--after N]

The program (default: examples/orders.pb, with its recorded cassette, so no network is needed) runs in
a scratch folder. The first run is killed with SIGKILL as soon as its progress output has N lines; then
``playbooks run PROGRAM --resume`` finishes it from its checkpoints. What the program said before the
kill is not said again, and finished tool and LLM calls are not made again.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _show(title: str, text: str, mark: str) -> None:
    print(f"--- {title}")
    for line in text.splitlines():
        print(f"{mark} {line}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("program", nargs="?", default=str(HERE / "orders.pb"))
    parser.add_argument("--after", type=int, default=12, help="kill after this many progress lines")
    options = parser.parse_args()
    program = Path(options.program).resolve()
    command = [sys.executable, "-m", "playbooks.cli", "run", program.name, "--verbose"]
    with tempfile.TemporaryDirectory(prefix="playbooks-demo-") as scratch:
        for suffix in (".pb", ".cassette.json"):
            shutil.copy(program.with_suffix(suffix) if suffix == ".pb" else
                        program.with_name(program.stem + suffix), scratch)
        print(f"$ playbooks run {program.name}   (in {scratch}; SIGKILL after {options.after} progress lines)")
        first = subprocess.Popen(command, cwd=scratch, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert first.stderr is not None
        progress = []
        for line in first.stderr:
            progress.append(line)
            if len(progress) == options.after:
                first.send_signal(signal.SIGKILL)
                break
        said, rest = first.communicate()
        _show("progress of the first run", "".join(progress) + rest, "  |")
        _show("what it said before it was killed", said, "  >")
        killed = " (killed by SIGKILL)" if first.returncode == -signal.SIGKILL else ""
        print(f"--- exit status {first.returncode}{killed}\n")
        print(f"$ playbooks run {program.name} --resume")
        second = subprocess.run([*command, "--resume"], cwd=scratch, text=True, capture_output=True)
        _show("progress of the resumed run", second.stderr, "  |")
        _show("what it said after the resume", second.stdout, "  >")
        print(f"--- exit status {second.returncode}\n")
        print("$ playbooks runs")
        runs = subprocess.run([sys.executable, "-m", "playbooks.cli", "runs"], cwd=scratch, text=True,
                              capture_output=True)
        print(runs.stdout, end="")
        return second.returncode


if __name__ == "__main__":
    raise SystemExit(main())
