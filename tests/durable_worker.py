"""A durable run in its own process, for the crash tests: it can kill itself with SIGKILL mid-call.

    python durable_worker.py SCENARIO STORE LEDGER OUT [--kill before:K|in:K] [--resume] [--delay S] [--sync-every N]

STORE is a folder (filesystem provider) or ``postgres:DSN`` (the PostgreSQL provider, 0.6 s leases).

Runs the scenario's LLM response through a durable StreamingPythonExecutor fed in 5-character chunks
(so the stream is cut mid-statement whenever a call runs), exactly as the documented contract does.
Every live call of ``Work`` appends ``key<TAB>arg`` to LEDGER (the side effect whose repetition the tests
look for); ``--kill before:K`` kills the process as the K-th live call starts, ``in:K`` after its side
effect but before it returns. ``--resume`` recovers with RecoveryCoordinator first. OUT receives the
final namespace (reprs), the calls recovery reported as in flight, and whether it resumed, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import warnings
from typing import Any

from playbooks import Agent
from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
from playbooks.checkpoints.provider import CheckpointProvider
from playbooks.checkpoints.providers.postgres import PostgresCheckpointProvider
from playbooks.errors import ExecutionLockedError
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import cheap, current_tool_call

SCENARIOS: dict[str, str] = {
    "flat": (
        "a = await Work(1)\n"
        "b = await Work(2)\n"
        "print('a+b =', a + b)\n"
        "c = await Work(a + b)\n"
        "print('c =', c)\n"
    ),
    "augassign": (
        "total = 0\n"
        "total += await Work(1)\n"
        "print('after 1:', total)\n"
        "total += await Work(2)\n"
        "total += await Work(3)\n"
        "print('total:', total)\n"
    ),
    "loop": (
        "results = []\n"
        "for i in range(4):\n"
        "    r = await Work(i)\n"
        "    print('got', i, r)\n"
        "    results.append(r)\n"
        "last, *rest = results\n"
        "print('sum', sum(results))\n"
    ),
    "helper": (
        "async def double(x):\n"
        "    y = await Work(x)\n"
        "    return y * 2\n"
        "\n"
        "vals = [await double(i) for i in range(3)]\n"
        "print('vals', vals)\n"
        "try:\n"
        "    if (w := await Work(100)) > 0:\n"
        "        print('walrus', w)\n"
        "except ValueError:\n"
        "    pass\n"
        "scale = lambda v: v * 3\n"
        "print('scaled', scale(await double(7)))\n"
    ),
    "gather": (
        "import asyncio\n"
        "first = await Work(0)\n"
        "rs = await asyncio.gather(Work(1), Work(2), Work(3))\n"
        "print('gathered', rs)\n"
        "done = await Work(sum(rs))\n"
    ),
    "nested": (
        "x = await Work(1)\n"
        "print('x', x)\n"
        "y = await RunChild('p = await Work(10)\\nprint(\"child p\", p)\\nq = await Work(20)\\nout = p + q\\n')\n"
        "print('y', y)\n"
        "z = await Work(y)\n"
        "print('z', z)\n"
    ),
    "bigvar": (
        "rows = [{'id': i, 'name': 'customer %d' % i} for i in range(8000)]\n"
        "pause = __import__('time').sleep(0.05)  # a slow step: the next await is snapshotted\n"
        "first = await Work(len(rows))\n"
        "rows.append({'id': -1, 'name': 'after ' + str(first)})\n"
        "second = await Work(len(rows))\n"
        "print('rows', len(rows), first, second)\n"
    ),
    "cheap": (
        "total = 0\n"
        "for i in range(4):\n"
        "    total += await Rate(i) + await Work(i)\n"
        "print('total', total)\n"
    ),
    "cut": (
        "message = 'a long string literal that the stream cuts in the middle of, again and again'\n"
        "value = await Work(len(message))\n"
        "record = {'message': message, 'value': value, 'items': [value, value + 1, value + 2]}\n"
        "value2 = await Work(record['items'][2])\n"
        "print('record', sorted(record), value2)\n"
    ),
}

CHUNK = 5


class _Kill:
    def __init__(self, spec: str | None) -> None:
        self.phase, self.k = (spec.split(":")[0], int(spec.split(":")[1])) if spec else ("", 0)
        self.live_calls = 0

    def check(self, phase: str) -> None:
        if phase == self.phase and self.live_calls == self.k:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario")
    parser.add_argument("store")
    parser.add_argument("ledger")
    parser.add_argument("out")
    parser.add_argument("--kill")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--sync-every", type=int, default=1, help="fsync the journal every n-th durable call")
    options = parser.parse_args()
    kill = _Kill(options.kill)
    ledger = os.open(options.ledger, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    async def Work(arg: int) -> int:
        kill.live_calls += 1
        kill.check("before")
        call = current_tool_call()
        assert call is not None
        os.write(ledger, f"{call.idempotency_key}\t{arg}\n".encode())
        kill.check("in")
        await asyncio.sleep(options.delay)
        return arg * 10 + 1

    child_agent = Agent("child", tools={"Work": Work})

    async def RunChild(code: str) -> Any:
        child = StreamingPythonExecutor(child_agent)  # a child frame of this durable call
        for i in range(0, len(code), CHUNK):
            await child.add_chunk(code[i : i + CHUNK])
        result = await child.finalize()
        assert result.success, result.error
        return result.namespace["out"]

    @cheap
    async def Rate(arg: int) -> int:  # cheap: not journaled, called again after a resume
        return arg * 2

    agent = Agent("agent_1", tools={"Work": Work, "RunChild": RunChild, "Rate": Rate})
    provider: CheckpointProvider
    if options.store.startswith("postgres:"):  # a PostgreSQL database (its DSN follows), short leases
        provider = PostgresCheckpointProvider(options.store.removeprefix("postgres:"), lease_seconds=0.6)
        while True:  # a killed holder's lease ends 0.6 s after its last renewal: wait for it, as a worker does
            try:
                await (await provider.acquire_lock(agent.id)).release()
                break
            except ExecutionLockedError:
                await asyncio.sleep(0.05)
    else:
        provider = FilesystemCheckpointProvider(options.store)
    manager = CheckpointManager(execution_id=agent.id, provider=provider)
    manager.journal_sync_every = options.sync_every
    stream = SCENARIOS[options.scenario]
    in_flight: list[str] = []
    executor = None
    executor_resumed = False
    if options.resume:
        coordinator = RecoveryCoordinator(manager)
        if await coordinator.can_recover():
            checkpoint = await manager.get_latest_checkpoint()
            assert checkpoint is not None
            report = await coordinator.recover_execution_state(agent)
            in_flight = [c.idempotency_key for c in report.in_flight]
            print(report, file=sys.stderr)
            executor = await StreamingPythonExecutor.resume_from_checkpoint(
                agent, checkpoint, checkpoint_manager=manager
            )
            executor_resumed = True
    if executor is None:
        executor = StreamingPythonExecutor(agent, checkpoint_manager=manager)
    rest = stream[len(executor.response) :]
    for i in range(0, len(rest), CHUNK):
        await executor.add_chunk(rest[i : i + CHUNK])
    result = await executor.finalize()
    if not result.success:
        raise SystemExit(f"LLM code failed: {result.error}")
    names = {
        k: repr(v)
        for k, v in result.namespace.items()
        if not k.startswith("__") and not callable(v) and not hasattr(v, "__spec__")
    }
    with open(options.out, "w") as f:
        json.dump({"namespace": names, "in_flight": in_flight, "recovered": options.resume and executor_resumed}, f)


if __name__ == "__main__":
    warnings.simplefilter("ignore")
    asyncio.run(main())
