"""A real Jupyter kernel for the notebook tests: started with jupyter_client, fed cells over ZeroMQ,
killed with SIGKILL. Not a mocked shell: the kernel is ipykernel in its own process, running cells in
its own event loop, exactly as a notebook server drives it."""

from __future__ import annotations

import os
import queue
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jupyter_client.manager import KernelManager


@dataclass
class CellRun:
    """What one executed cell sent back."""

    status: str = "pending"
    stdout: str = ""
    stderr: str = ""
    displays: list[str] = field(default_factory=list)
    error: dict[str, Any] | None = None

    @property
    def summary(self) -> str:
        return self.displays[-1] if self.displays else ""


class Kernel:
    """One ipykernel process in ``cwd`` with ``env`` added to its environment."""

    def __init__(self, cwd: Path, env: dict[str, str] | None = None) -> None:
        self.manager = KernelManager(kernel_name="python3")
        environment = dict(os.environ, **(env or {}))
        self.manager.start_kernel(cwd=str(cwd), env=environment)
        self.client = self.manager.blocking_client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    @property
    def pid(self) -> int:
        provisioner = self.manager.provisioner
        assert provisioner is not None
        process = getattr(provisioner, "process", None)
        assert process is not None
        return int(process.pid)

    def submit(self, code: str) -> str:
        return str(self.client.execute(code, store_history=True))

    def collect(self, msg_id: str, run: CellRun, *, until: float) -> bool:
        """Read the cell's output until it is idle (True), or the kernel died or ``until`` passed (False)."""
        while time.monotonic() < until:
            try:
                msg = self.client.get_iopub_msg(timeout=min(0.05, max(0.0, until - time.monotonic())))
            except queue.Empty:
                if not self.manager.is_alive():  # it died (killed itself, OOM): nothing more comes
                    return False
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                if content["name"] == "stdout":
                    run.stdout += content["text"]
                else:
                    run.stderr += content["text"]
            elif kind in ("display_data", "update_display_data"):
                text = content["data"].get("text/plain", "")
                if text:
                    run.displays.append(text)
            elif kind == "error":
                run.error = content
            elif kind == "status" and content["execution_state"] == "idle":
                run.status = "error" if run.error else "ok"
                return True
        return False

    def run(self, code: str, timeout: float = 120) -> CellRun:
        run = CellRun()
        if not self.collect(self.submit(code), run, until=time.monotonic() + timeout):
            raise TimeoutError(f"cell did not finish in {timeout} s: {code[:80]!r}\n{run}")
        return run

    def value(self, expression: str) -> Any:
        """Evaluate ``expression`` in the kernel (its repr, read back with ``eval``)."""
        reply = self.run(f"print(repr({expression}))")
        assert reply.status == "ok", reply
        return eval(reply.stdout.strip())  # noqa: S307  (the kernel's own repr of plain data)

    def kill(self) -> None:
        """SIGKILL the kernel process, as the OOM killer would."""
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.close()

    def close(self) -> None:
        try:
            self.client.stop_channels()
        finally:
            if self.manager.is_alive():
                self.manager.shutdown_kernel(now=True)
            else:
                self.manager.cleanup_resources()


def kernel_available() -> str | None:
    """Why a kernel cannot start here, or ``None``."""
    try:
        import ipykernel  # noqa: F401
        import jupyter_client  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (pip install -e '.[test]')"
    if sys.platform == "win32":
        return "the kill tests use SIGKILL"
    return None
