"""A real PostgreSQL server for the test suite, started by the tests themselves.

Why: Postgres-backed code must be tested against a real server (durability
across an immediate shutdown, real transactions), not a mock, and the tests
must not depend on a server someone happened to configure on the machine.

`PostgresServer` runs ``initdb`` into a temporary data directory and starts a
private ``postgres`` that listens only on a Unix socket in another temporary
directory (no TCP, so parallel runs cannot clash).  `postgres_or_skip` hands
out one such server per process; the ``postgres_server`` (session) and
``postgres_dsn`` (one fresh database per test) fixtures wrap it.  Test modules
use them with::

    from pg_server import postgres_dsn, postgres_server

Environment:

* ``PLAYBOOKS_TEST_POSTGRES_DSN`` -- use this existing server instead of
  starting one; the tests that stop/start the server then skip.
* ``PLAYBOOKS_REQUIRE_POSTGRES=1`` -- fail, rather than skip, when no server
  can be had (CI sets it so the Postgres tests can never silently vanish).
"""

from __future__ import annotations

import atexit
import ctypes
import grp
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

__all__ = [
    "PostgresServer",
    "PostgresUnavailable",
    "postgres_dsn",
    "postgres_or_skip",
    "postgres_server",
]

DSN_ENV = "PLAYBOOKS_TEST_POSTGRES_DSN"
REQUIRE_ENV = "PLAYBOOKS_REQUIRE_POSTGRES"
INSTALL_HINT = (
    "install PostgreSQL (Debian/Ubuntu: `apt-get install postgresql`), "
    f"or point {DSN_ENV} at a server you run"
)
START_TIMEOUT = 30.0


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says why and how to fix it."""


def _psycopg() -> Any:
    """Import psycopg lazily, so a missing driver is a skip reason, not a collection error."""
    try:
        import psycopg
    except ImportError as exc:
        raise PostgresUnavailable(
            f"the psycopg driver is not installed ({exc}); pip install 'psycopg[binary]'"
        ) from exc
    return psycopg


def find_bin_dir() -> Path:
    """The directory holding initdb, postgres and pg_ctl of one PostgreSQL version.

    ``initdb`` on PATH wins (resolved through symlinks, so its siblings are of
    the same version); else the newest Debian-style ``/usr/lib/postgresql/N/bin``,
    which is where ``apt-get install postgresql`` puts them (not on PATH).
    """
    candidates: list[Path] = []
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(os.path.realpath(on_path)).parent)

    def version(p: Path) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", p.parent.name))

    candidates += sorted(
        (p for p in Path("/usr/lib/postgresql").glob("*/bin") if (p / "initdb").exists()),
        key=version,
        reverse=True,
    )
    for d in candidates:
        if all(os.access(d / name, os.X_OK) for name in ("initdb", "postgres", "pg_ctl")):
            return d
    raise PostgresUnavailable(
        "no PostgreSQL server binaries (initdb, postgres, pg_ctl) on PATH or in "
        f"/usr/lib/postgresql/*/bin; {INSTALL_HINT}"
    )


@dataclass(frozen=True)
class _RunAs:
    """Credentials for the server processes: the `postgres` user when we are root."""

    uid: int
    gid: int
    groups: list[int]

    @staticmethod
    def for_current_process() -> _RunAs | None:
        """None when not root (run as ourselves); the postgres user when root.

        initdb and postgres refuse to run as root, so as root the server runs
        as the distribution's ``postgres`` system user (created by the package).
        """
        if os.geteuid() != 0:
            return None
        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            raise PostgresUnavailable(
                "running as root, and PostgreSQL refuses root, but there is no `postgres` "
                f"system user to run it as; {INSTALL_HINT} (the package creates that user) "
                "or run the tests as an ordinary user"
            ) from None
        return _RunAs(pw.pw_uid, pw.pw_gid, os.getgrouplist("postgres", pw.pw_gid))


def _die_with_parent() -> None:
    """preexec_fn: have the kernel send SIGQUIT (immediate shutdown) to the server if pytest dies.

    Without this a ``kill -9`` of pytest would leak a running postmaster.
    Runs after the setuid (CPython applies user= before preexec_fn), since a
    credential change would reset the setting.
    """
    pr_set_pdeathsig = 1
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGQUIT, 0, 0, 0)


def _free_port() -> int:
    """A port number no one listens on over TCP; with no TCP listener it only names the socket file."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class PostgresServer:
    """A private PostgreSQL server in temporary directories, Unix socket only.

    ``external_dsn`` wraps an existing server instead: then only
    `new_database` and `base_dsn` work, and stop/start/restart skip the test.
    """

    def __init__(self, external_dsn: str | None = None) -> None:
        self._external_dsn = external_dsn
        self._proc: subprocess.Popen[bytes] | None = None
        self._created: list[str] = []
        self._counter = 0
        self._closed = False
        self.init_seconds = 0.0  # how long initdb took (0 for an external server)
        self.start_seconds = 0.0  # how long the last start() took until connectable
        if external_dsn is not None:
            return
        self._bin = find_bin_dir()
        self._run_as = _RunAs.for_current_process()
        self._tmp = Path(tempfile.mkdtemp(prefix="playbooks-pg-", dir=self._tmp_base()))
        self.data_dir = self._tmp / "data"
        self.socket_dir = self._tmp / "sock"
        self.log_path = self._tmp / "server.log"
        self.port = _free_port()
        self.socket_dir.mkdir()
        if self._run_as is not None:
            for p in (self._tmp, self.socket_dir):
                os.chown(p, self._run_as.uid, self._run_as.gid)
        t0 = time.monotonic()
        try:
            self._run(
                "initdb", "-D", str(self.data_dir), "-A", "trust", "-U", "postgres",
                "--encoding=UTF8", "--locale=C", "--no-sync", timeout=120,
            )
        except BaseException:
            shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        self.init_seconds = time.monotonic() - t0

    # -- public API ---------------------------------------------------------

    @property
    def external(self) -> bool:
        """True when this wraps a server the tests did not start (``PLAYBOOKS_TEST_POSTGRES_DSN``)."""
        return self._external_dsn is not None

    @property
    def base_dsn(self) -> str:
        """libpq conninfo of the server's ``postgres`` maintenance database."""
        if self._external_dsn is not None:
            return self._external_dsn
        return f"host={self.socket_dir} port={self.port} user=postgres dbname=postgres"

    @property
    def running(self) -> bool:
        """Whether the postmaster is up (always True for an external server)."""
        if self.external:
            return True
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> None:
        """Start the server and return once a connection succeeds (at most 30 s)."""
        self._require_own("start")
        if self.running:
            return
        if self._closed:
            raise RuntimeError("this PostgresServer was closed")
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            self._proc = subprocess.Popen(
                [
                    str(self._bin / "postgres"), "-D", str(self.data_dir),
                    "-k", str(self.socket_dir), "-p", str(self.port),
                    "-c", "listen_addresses=", "-c", "fsync=on",
                    "-c", "max_connections=200", "-c", "shared_buffers=32MB",
                ],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # a terminal's Ctrl-C must not reach the server
                preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
                **self._popen_kwargs(),
            )
        psycopg = _psycopg()
        deadline = t0 + START_TIMEOUT
        while True:
            try:
                psycopg.connect(self.base_dsn, connect_timeout=2).close()
                break
            except psycopg.OperationalError as exc:
                if self._proc.poll() is not None:
                    raise PostgresUnavailable(
                        f"postgres exited with status {self._proc.returncode} while starting:\n"
                        f"{self._log_tail()}"
                    ) from exc
                if time.monotonic() > deadline:
                    self._kill()
                    raise PostgresUnavailable(
                        f"postgres did not accept connections within {START_TIMEOUT:.0f} s "
                        f"({exc}):\n{self._log_tail()}"
                    ) from exc
                time.sleep(0.02)
        self.start_seconds = time.monotonic() - t0

    def stop(self, mode: str = "fast") -> None:
        """Stop the server: ``fast`` (clean shutdown) or ``immediate`` (like a crash; WAL replay on start)."""
        self._require_own("stop")
        if mode not in ("fast", "immediate"):
            raise ValueError(f"stop mode must be 'fast' or 'immediate', not {mode!r}")
        if not self.running:
            return
        try:
            self._run("pg_ctl", "-D", str(self.data_dir), "-m", mode, "stop", "-w", "-t", "30", timeout=60)
            assert self._proc is not None
            self._proc.wait(timeout=30)
        except (subprocess.SubprocessError, PostgresUnavailable):
            self._kill()
            raise

    def restart(self) -> None:
        """A clean (fast) stop followed by `start`."""
        self.stop("fast")
        self.start()

    def new_database(self) -> str:
        """Create a fresh, uniquely named database and return its libpq conninfo."""
        psycopg = _psycopg()
        self._counter += 1
        name = f"pbtest_{os.getpid()}_{self._counter}_{secrets.token_hex(3)}"
        with psycopg.connect(self.base_dsn, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        self._created.append(name)
        dsn: str = psycopg.conninfo.make_conninfo(self.base_dsn, dbname=name)
        return dsn

    def close(self) -> None:
        """Stop the server and delete its directories; for an external server, drop the databases we made."""
        if self._closed:
            return
        self._closed = True
        if self.external:
            self._drop_created()
            return
        try:
            if self.running:
                self.stop("fast")
        except Exception:
            self._kill()
        finally:
            shutil.rmtree(self._tmp, ignore_errors=True)

    # -- internals ----------------------------------------------------------

    def _require_own(self, what: str) -> None:
        if self.external:
            pytest.skip(f"{what}() needs a server the tests started, not {DSN_ENV}")

    def _tmp_base(self) -> str | None:
        """Where to put the temp dirs: the postgres user must be able to reach them when we are root."""
        base = Path(tempfile.gettempdir()).resolve()
        if self._run_as is None:
            return None
        for p in (base, *base.parents):
            if not p.stat().st_mode & 0o001:  # not traversable by others, e.g. under /root
                return "/tmp"
        return str(base)

    def _popen_kwargs(self) -> dict[str, Any]:
        """Run as the postgres user when root; a clean PG* environment either way."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        kwargs: dict[str, Any] = {"env": env, "cwd": str(self._tmp)}
        if self._run_as is not None:
            env["HOME"] = str(self._tmp)
            env["USER"] = env["LOGNAME"] = "postgres"
            kwargs.update(user=self._run_as.uid, group=self._run_as.gid, extra_groups=self._run_as.groups)
        return kwargs

    def _run(self, program: str, *args: str, timeout: float) -> None:
        """Run one of the server's tools as the server's user; raise with its output if it fails."""
        cmd = [str(self._bin / program), *args]
        res = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, **self._popen_kwargs()
        )
        if res.returncode != 0:
            out = (res.stdout + res.stderr).decode(errors="replace").strip()
            raise PostgresUnavailable(f"{' '.join(cmd)} failed with status {res.returncode}:\n{out}")

    def _kill(self) -> None:
        """Last resort: SIGKILL the postmaster (its backends notice and exit)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait()

    def _log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no server log)"

    def _drop_created(self) -> None:
        """Best effort: remove the databases this process made on an external server."""
        try:
            psycopg = _psycopg()
            with psycopg.connect(self.base_dsn, autocommit=True) as conn:
                for name in self._created:
                    conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        except Exception:
            pass


_server: PostgresServer | None = None
_failure: str | None = None


def _unavailable(reason: str) -> NoReturn:
    """Skip the test, or fail it when ``PLAYBOOKS_REQUIRE_POSTGRES=1`` (CI)."""
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"PostgreSQL required ({REQUIRE_ENV}=1) but unavailable: {reason}", pytrace=False)
    pytest.skip(f"PostgreSQL unavailable: {reason}")


def postgres_or_skip() -> PostgresServer:
    """The process-wide server: ``PLAYBOOKS_TEST_POSTGRES_DSN``'s, else a private one started once.

    Skips (or fails, under ``PLAYBOOKS_REQUIRE_POSTGRES=1``) when no server can
    be had; the reason is remembered so later callers skip/fail at once.
    """
    global _server, _failure
    if _server is not None:
        return _server
    if _failure is not None:
        _unavailable(_failure)
    try:
        _psycopg()
        external = os.environ.get(DSN_ENV) or None
        server = PostgresServer(external_dsn=external)
        atexit.register(server.close)
        if not server.external:
            server.start()
    except (PostgresUnavailable, OSError, subprocess.SubprocessError) as exc:
        _failure = str(exc)
        _unavailable(_failure)
    _server = server
    return server


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The process-wide PostgreSQL server (see `postgres_or_skip`)."""
    return postgres_or_skip()


@pytest.fixture
def postgres_dsn(postgres_server: PostgresServer) -> str:
    """Conninfo of a fresh database for this test; restarts the server if an earlier test stopped it."""
    if not postgres_server.running:
        postgres_server.start()
    return postgres_server.new_database()
