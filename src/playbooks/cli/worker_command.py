"""``playbooks submit`` and ``playbooks worker``: runs queued in a shared store, run by any number of
workers on any machines, and taken over when the worker running one dies.

``submit`` records a run of a program with its arguments as ``queued`` in the PostgreSQL store. A
worker claims runs (``FOR UPDATE SKIP LOCKED``: see :mod:`playbooks.cli.postgres_runs`) up to its
concurrency and runs each as its own ``playbooks run PROGRAM --resume RUN`` process, which takes the
run's lease, renews it while it runs, and fences its writes with it. When a worker dies (SIGKILL, its
machine gone), its run processes die with it (Linux: a parent-death signal), their leases expire after
``durability.lease_seconds``, and other workers claim the runs and resume them from their checkpoints.
A run process that exits without recording an end (a crash) has its lease ended at once by its worker,
so the run is claimed again without waiting; after ``--max-attempts`` such exits the run is recorded
as failed.

SIGTERM (or SIGINT) stops a worker gracefully: it claims nothing more, lets its runs finish for
``--grace`` seconds, then stops the rest and hands them back (their leases ended, claimable at once:
another worker resumes them exactly, as after a crash). A second signal hands back at once.

Workers need the program at the same path as the submitter saw it (deploy the code with the workers),
and the same ``playbooks.toml`` settings (store, model).
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from playbooks.config import Config, ConfigError, load_config
from playbooks.errors import CheckpointError, PlaybooksError

if TYPE_CHECKING:
    from playbooks.cli.postgres_runs import PostgresRunStore
    from playbooks.cli.run_store import RunRecord

__all__ = ("configure_submit", "configure_worker")

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
_ENDED = ("completed", "failed", "waiting", "forked")


def _error(command: str, message: str) -> None:
    print(f"playbooks {command}: {message}", file=sys.stderr, flush=True)


def _shared_store(command: str, config_path: Path | None) -> tuple[Config, PostgresRunStore] | None:
    """The configuration and the PostgreSQL run store, or ``None`` after saying why there is none."""
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        _error(command, f"configuration error: {exc}")
        return None
    if config.durability.provider != "postgres" or not config.durability.enabled:
        _error(command, "runs are queued in a store every worker sees: set durability.provider = \"postgres\" "
               "and durability.dsn in playbooks.toml (or PLAYBOOKS_DURABILITY_PROVIDER=postgres and "
               "PLAYBOOKS_DURABILITY_DSN)")
        return None
    from playbooks.cli.postgres_runs import PostgresRunStore

    return config, PostgresRunStore(config.durability.dsn)


# ----------------------------------------------------------------------- submit


def configure_submit(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks submit``."""
    parser.add_argument("program", type=Path, help="the .pb file to run (workers read it at the same path)")
    parser.add_argument(
        "--arg", action="append", default=[], metavar="NAME=VALUE",
        help="an argument of the first agent's Main (repeatable); VALUE is read as JSON when it parses",
    )
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    parser.add_argument("--count", type=int, default=1, help="submit this many runs of it (default 1)")
    parser.set_defaults(handler=_submit)


def _submit(args: argparse.Namespace) -> int:
    from playbooks.cli.run_command import _parse_args
    from playbooks.program import ProgramError, load_program

    if args.count < 1:
        _error("submit", "--count must be at least 1")
        return EXIT_USAGE
    main_args = _parse_args(args.arg)
    if main_args is None:
        return EXIT_USAGE
    try:
        program = load_program(args.program)
    except (ProgramError, OSError) as exc:
        _error("submit", str(exc))
        return EXIT_USAGE
    opened = _shared_store("submit", args.config)
    if opened is None:
        return EXIT_USAGE
    _, store = opened
    try:
        for _ in range(args.count):
            record = store.new_run(program.path, program.source_hash, tag_bytes=6)
            record.args = main_args
            store.submit(record)
            print(record.run_id, flush=True)
    except PlaybooksError as exc:
        _error("submit", str(exc))
        return EXIT_ERROR
    finally:
        store.close()
    return EXIT_OK


# ----------------------------------------------------------------------- worker


def configure_worker(parser: argparse.ArgumentParser) -> None:
    """The arguments of ``playbooks worker``."""
    parser.add_argument("--config", type=Path, help="configuration file (default: ./playbooks.toml if present)")
    parser.add_argument("--concurrency", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--name", help="this worker's name in playbooks runs (default host:pid)")
    parser.add_argument("--poll", type=float, default=0.5, help="seconds between looks at the queue (default 0.5)")
    parser.add_argument(
        "--grace", type=float, default=30.0,
        help="after SIGTERM, seconds the running runs get to finish before they are handed back (default 30)",
    )
    parser.add_argument(
        "--max-attempts", type=int, default=3,
        help="a run whose process exits this many times without recording an end is recorded failed (default 3)",
    )
    parser.add_argument(
        "--exit-when-idle", action="store_true",
        help="exit once no submitted run is queued or running anywhere (for batch jobs and tests)",
    )
    parser.set_defaults(handler=_worker)


@dataclass
class _Child:
    """A run's process, and the last lines of its standard error (passed on, prefixed with its run)."""

    run_id: str
    process: subprocess.Popen[bytes]
    started: float
    tail: deque[str] = field(default_factory=lambda: deque(maxlen=5))
    reader: threading.Thread | None = None

    def forward_stderr(self) -> None:
        """Copy the process's standard error to this worker's, each line prefixed with the run."""
        assert self.process.stderr is not None
        for raw in self.process.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.tail.append(line)
            sys.stderr.write(f"[{self.run_id}] {line}\n")
            sys.stderr.flush()


class _Worker:
    """One worker process: claims runs, runs each in a child process, reaps them, hands back on stop."""

    def __init__(self, args: argparse.Namespace, config: Config, store: PostgresRunStore) -> None:
        self.args = args
        self.config = config
        self.store = store
        self.host = socket.gethostname()
        self.name = args.name or f"{self.host}:{os.getpid()}"
        self.children: dict[int, _Child] = {}
        self.stopping = 0.0  # when a stop was asked (monotonic), 0 while running
        self.hand_back_now = False
        self.ran_any = False

    def log(self, message: str) -> None:
        print(f"worker {self.name}: {message}", file=sys.stderr, flush=True)

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self.stopping:
            self.hand_back_now = True
        else:
            self.stopping = time.monotonic()

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.store.unfinished()  # the database reached (or a clear error) before saying "started"
        self.log(f"started (concurrency {self.args.concurrency}, lease {self.config.durability.lease_seconds:g} s)")
        while True:
            self.reap()
            if self.stopping:
                if not self.children:
                    break
                if self.hand_back_now or time.monotonic() - self.stopping >= self.args.grace:
                    self.hand_back()
                    break
            else:
                while len(self.children) < self.args.concurrency:
                    # Held for a lease time: if this worker dies before its child takes the lease, the
                    # run waits no longer than a leased run would. A child slower than that to start
                    # may meet a second one for the same run: the lease lets one of them run it.
                    record = self.store.claim(self.name, hold_seconds=self.config.durability.lease_seconds)
                    if record is None:
                        break
                    self.start(record)
                    self.ran_any = True
                if self.args.exit_when_idle and not self.children and not self.store.unfinished():
                    break
            time.sleep(self.args.poll)
        self.log("stopped")
        return EXIT_OK

    def start(self, record: RunRecord) -> None:
        run_id = record.run_id
        command = [sys.executable, "-m", "playbooks", "run", record.program, "--resume", run_id]
        if self.args.config is not None:
            command += ["--config", str(self.args.config)]
        env = {**os.environ, "PLAYBOOKS_WORKER": self.name}
        # The hash seed a run started under goes with it to every worker that resumes it (set and
        # dict-of-str orders replay the same); a queued run gets a fresh one, recorded when it starts.
        seed = record.hash_seed if record.hash_seed.isdigit() else str(secrets.randbelow(2**32 - 1) + 1)
        env["PYTHONHASHSEED"] = seed
        process = subprocess.Popen(
            command, env=env, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=_child_setup
        )
        child = _Child(run_id, process, time.monotonic())
        child.reader = threading.Thread(target=child.forward_stderr, name=f"stderr-{run_id}", daemon=True)
        child.reader.start()
        self.children[process.pid] = child
        self.log(f"runs {run_id} (pid {process.pid})")

    def reap(self) -> None:
        for pid, child in list(self.children.items()):
            code = child.process.poll()
            if code is None:
                continue
            del self.children[pid]
            if child.reader is not None:
                child.reader.join(timeout=5)  # the last lines, which may say why it stopped
            self.ended(child, code)

    def ended(self, child: _Child, code: int) -> None:
        """A run's process exited: end its leases, and count a crash if the run recorded no end."""
        self.store.expire_leases(f"{self.host}:{child.process.pid}:")
        record = self.store.get(child.run_id)
        if record is None:
            return
        if record.status in _ENDED:
            self.log(f"{child.run_id} {record.status}")
            return
        if child.run_id in self.store.lease_holders():
            # Another worker's process runs it: it took the run over (this one had lost its lease, or
            # was refused the lease). The record is that process's now.
            self.log(f"{child.run_id}: its process exited with status {code}; another worker runs it now")
            return
        record.attempts += 1
        if record.attempts >= self.args.max_attempts:
            record.status = "failed"
            last = " / ".join(line.strip() for line in child.tail if line.strip()) or "nothing on stderr"
            record.error = (f"its process exited with status {code} {record.attempts} times without finishing "
                            f"it; the last time it said: {last}")
            self.log(f"{child.run_id} failed: {record.error}")
        else:
            self.log(f"{child.run_id}: its process exited with status {code}; it will be resumed")
        self.store.save(record)
        self.store.unclaim(child.run_id)

    def hand_back(self) -> None:
        """Stop the runs still going and let other workers resume them at once."""
        for child in self.children.values():
            child.process.kill()
        for pid, child in list(self.children.items()):
            child.process.wait()
            del self.children[pid]
            self.store.expire_leases(f"{self.host}:{pid}:")
            self.store.unclaim(child.run_id)
            self.log(f"handed back {child.run_id}")


def _child_setup() -> None:
    """In a run's process, before it starts: leave stopping to the worker (a SIGTERM or Ctrl-C sent to
    the whole process group, as systemd, Kubernetes and terminals do, must not cut the grace short),
    and die when the worker dies, as the worker's machine would take it along."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # not Linux: the run goes on alone; its lease keeps it from running twice


def _worker(args: argparse.Namespace) -> int:
    if args.concurrency < 1 or args.max_attempts < 1:
        _error("worker", "--concurrency and --max-attempts must be at least 1")
        return EXIT_USAGE
    opened = _shared_store("worker", args.config)
    if opened is None:
        return EXIT_USAGE
    config, store = opened
    worker = _Worker(args, config, store)
    try:
        return worker.run()
    except CheckpointError as exc:
        after = "; the runs it was running resume on other workers once their leases expire" if worker.ran_any else ""
        _error("worker", f"{exc}{after}")
        return EXIT_ERROR
    finally:
        store.close()
