"""Exact resume for ordinary Python, on asyncio and trio, killed at every record it writes.

A kill is simulated exactly at a record boundary: the store refuses every write from the chosen one
on (as if the process had died before it), the abandoned run is stopped, and a new manager resumes from
what the store holds; every other trial is killed a second time, during its resume. For each program the kill points are every record of a reference run (a seeded
sample when there are many). The resumed run must end with the reference's namespace, compared with the
sharing between objects (``alias is shared``), and each completed tool call must have run once; only a
call that recovery reports in flight may run again, with the same idempotency key.

The real thing (subprocesses, SIGKILL at random instants, new hash seeds) is in test_crash_fuzz.py and
test_crash_recovery.py; this file gives each item of the exact-resume contract a focused case.
"""

from __future__ import annotations

import itertools
import random
import subprocess
import sys
import textwrap
import types
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from playbooks import Agent
from playbooks.checkpoints import CheckpointManager, MemoryCheckpointProvider, RecoveryCoordinator
from playbooks.checkpoints.namespace import ExitedTaskGroup, UnrestoredValue
from playbooks.errors import NonDeterminismError
from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
from playbooks.execution.tool_calls import current_tool_call

pytestmark = pytest.mark.anyio


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


class Killed(BaseException):
    """The simulated kill: raised by the store and the tools once the process is "dead"."""


_IDS = itertools.count()
_WRITES = ("save", "append", "delete", "drop", "write", "sync")


class KillableStore:
    """A process's view of a memory store that dies at its ``kill_at``-th write: that write and all
    later ones are lost, and so is everything this process does after (its tasks included)."""

    def __init__(self, store: MemoryCheckpointProvider, kill_at: int | None = None) -> None:
        self.store = store
        self.kill_at = kill_at
        self.writes = 0
        self.dead = False

    def __getattr__(self, name: str) -> Any:
        target = getattr(self.store, name)
        if name == "prepare_append":  # the manager's way to append a journal entry: the append is the write
            return self._prepare_append
        if not name.startswith(_WRITES) or not callable(target):
            return target

        async def write(*args: Any, **kwargs: Any) -> Any:
            self._write(counts=name.startswith(("save", "append")))
            return await target(*args, **kwargs)

        return write

    def _write(self, *, counts: bool) -> None:
        if self.dead:
            raise Killed()
        if counts:
            self.writes += 1
            if self.kill_at is not None and self.writes >= self.kill_at:
                self.dead = True
                raise Killed()

    def _prepare_append(self, execution_id: str, counter: int, data: bytes) -> Callable[[], None]:
        append = self.store.prepare_append(execution_id, counter, data)

        def write() -> None:
            self._write(counts=True)
            append()

        return write


async def _release_locks(store: MemoryCheckpointProvider) -> None:
    """What the kernel does for a killed process: its locks are released."""
    for lock in list(store._locks):
        await lock.release()


class OrderError(Exception):
    """A tool error whose __init__ does not take its args as given."""

    def __init__(self, order: str, reason: str) -> None:
        super().__init__(f"order {order}: {reason}")
        self.order = order
        self.reason = reason


@dataclass
class World:
    """The tools, their side-effect ledger, and the store of one process."""

    store: KillableStore
    ledger: list[tuple[str, str]] = field(default_factory=list)
    delays: dict[Any, float] = field(default_factory=dict)
    execution_id: str = field(default_factory=lambda: f"p{next(_IDS)}")
    reported: set[str] = field(default_factory=set)
    """Calls recovery reported in flight (they may run again)."""

    def _side_effect(self, name: str, *args: Any) -> str:
        if self.store.dead:
            raise Killed()
        call = current_tool_call()
        assert call is not None
        self.ledger.append((call.idempotency_key, f"{name}{args!r}"))
        return call.idempotency_key

    def tools(self) -> dict[str, Callable[..., Any]]:
        async def Work(x: Any) -> Any:
            await anyio.sleep(self.delays.get(x, 0.001))
            self._side_effect("Work", x)
            return x * 10 if isinstance(x, int) else f"w:{x}"

        async def Slow(x: Any) -> Any:
            await anyio.sleep(self.delays.get(("slow", x), 5))
            self._side_effect("Slow", x)
            return x

        async def Boom(order: str) -> None:
            self._side_effect("Boom", order)
            try:
                raise KeyError(order)
            except KeyError as exc:
                raise OrderError(order, "out of stock") from exc

        async def Append(items: list[Any], value: Any) -> int:
            self._side_effect("Append", value)
            items.append(value)
            return len(items)

        async def Tag(obj: Any, label: str) -> None:
            self._side_effect("Tag", label)
            obj.tags.append(label)

        async def Nested(code: str) -> Any:
            self._side_effect("Nested", code)
            child = StreamingPythonExecutor(Agent("child", {"Work": Work}))
            await child.add_chunk(code)
            result = await child.finalize()
            return result.namespace.get("out")

        return {"Work": Work, "Slow": Slow, "Boom": Boom, "Append": Append, "Tag": Tag, "Nested": Nested}


# --- comparing namespaces with their sharing ------------------------------------------------------


def canonical(namespace: dict[str, Any], skip: set[str]) -> Any:
    """Values of the namespace with every mutable object numbered by first visit, so that two
    namespaces compare equal only if the same variables share the same objects."""
    ids: dict[int, int] = {}
    keep: list[Any] = []

    def walk(v: Any, depth: int = 0) -> Any:
        if depth > 30:
            return "..."
        if v is None or isinstance(v, (bool, int, float, str, bytes)):
            return v
        if isinstance(v, tuple):
            return ("tuple", [walk(x, depth + 1) for x in v])
        if isinstance(v, (types.ModuleType, type)):
            return ("ref", getattr(v, "__qualname__", getattr(v, "__name__", "?")))
        if id(v) in ids:
            return ("same", ids[id(v)])
        ids[id(v)] = len(ids)
        keep.append(v)
        me = ids[id(v)]
        if isinstance(v, list):
            return ("list", me, [walk(x, depth + 1) for x in v])
        if isinstance(v, dict):
            return ("dict", me, sorted((repr(k), walk(x, depth + 1)) for k, x in v.items()))
        if isinstance(v, (set, frozenset)):
            return ("set", me, sorted(repr(x) for x in v))
        if isinstance(v, types.FunctionType):
            cells = [walk(c, depth + 1) for c in (v.__closure__ or ())]
            return ("fn", me, v.__qualname__, cells)
        if isinstance(v, types.CellType):
            try:
                return ("cell", me, walk(v.cell_contents, depth + 1))
            except ValueError:
                return ("cell", me, "<empty>")
        if isinstance(v, BaseException):
            return ("exc", me, type(v).__name__, walk(v.args, depth + 1), walk(v.__cause__, depth + 1))
        if isinstance(v, UnrestoredValue):  # what cannot be saved is named only
            return ("ref", object.__getattribute__(v, "_type_name").rsplit(".", 1)[-1])
        if isinstance(v, ExitedTaskGroup):
            return ("ref", v.type_name.rsplit(".", 1)[-1])
        module = type(v).__module__.split(".")[0]
        if hasattr(v, "result") and hasattr(v, "done") and hasattr(v, "cancelled") and v.done():
            return ("task", "cancelled") if v.cancelled() else ("task", walk(v.result(), depth + 1))
        if module in ("asyncio", "_asyncio", "anyio", "trio", "builtins") and not hasattr(v, "__dict__"):
            return ("ref", type(v).__qualname__)
        if module in ("asyncio", "_asyncio", "anyio", "trio"):
            return ("ref", type(v).__qualname__)
        if hasattr(v, "__dict__"):
            return ("obj", me, type(v).__qualname__, walk(dict(vars(v)), depth + 1))
        return ("repr", me, repr(v))

    # In the namespace's own order: a resumed namespace iterates like the one before the crash.
    return [(name, walk(namespace[name])) for name in namespace if name not in skip and not name.startswith("__")]


# --- the harness ----------------------------------------------------------------------------------


@dataclass
class Outcome:
    namespace: Any
    ledger: list[tuple[str, str]]
    in_flight: set[str]
    writes: int


def _chunks(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(text):
        n = rng.randint(1, 40)
        out.append(text[i : i + n])
        i += n
    return out


async def _run(code: str, store: KillableStore, world: World, prelude: dict[str, Any], seed: int) -> StreamingPythonExecutor:
    agent = Agent("p", world.tools())
    manager = CheckpointManager(execution_id=world.execution_id, provider=store)  # type: ignore[arg-type]
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager, namespace=dict(prelude), frame_id="root")
    for chunk in _chunks(code, seed):
        await executor.add_chunk(chunk)
        await anyio.sleep(0.002)  # the model streams: tasks the code started run meanwhile
    result = await executor.finalize()
    assert result.success, result.error
    await manager.close()
    return executor


async def _resume(store: KillableStore, world: World, prelude: dict[str, Any], code: str) -> tuple[StreamingPythonExecutor, set[str]]:
    agent = Agent("p", world.tools())
    manager = CheckpointManager(execution_id=world.execution_id, provider=store)  # type: ignore[arg-type]
    coordinator = RecoveryCoordinator(manager)
    unfinished = await coordinator.can_recover()
    checkpoint = await manager.get_latest_checkpoint()
    if checkpoint is None:  # killed before its first record: start again
        await manager.close()
        return await _run(code, store, world, prelude, 0), set()
    in_flight: set[str] = set()
    if unfinished:  # else it had finished: the resume gives back its final state
        report = await coordinator.recover_execution_state(agent)
        in_flight = {c.idempotency_key for c in report.in_flight}
        world.reported |= in_flight  # kept if this resume is killed too
    executor = await StreamingPythonExecutor.resume_from_checkpoint(
        agent, checkpoint, checkpoint_manager=manager, namespace=dict(prelude)
    )
    rest = code[len(executor.response) :]
    if rest:
        await executor.add_chunk(rest)
    result = await executor.finalize()
    assert result.success, result.error
    await manager.close()
    return executor, in_flight


def _on_asyncio() -> bool:
    import sniffio

    return sniffio.current_async_library() == "asyncio"


def _prelude() -> dict[str, Any]:
    import asyncio

    return {"asyncio": asyncio, "anyio": anyio}


async def reference(code: str, delays: dict[Any, float] | None = None) -> Outcome:
    store = KillableStore(MemoryCheckpointProvider())
    world = World(store, delays=dict(delays or {}))
    prelude = _prelude()
    executor = await _run(code, store, world, prelude, 1)
    return Outcome(canonical(executor.namespace, set(prelude) | set(world.tools()) | {"print", "__builtins__", "__name__"}),
                   world.ledger, set(), store.writes)


async def killed_at(
    code: str, kill_at: int, delays: dict[Any, float] | None = None, second: int | None = None
) -> Outcome | None:
    memory = MemoryCheckpointProvider()
    store = KillableStore(memory, kill_at)
    world = World(store, delays=dict(delays or {}))
    prelude = _prelude()
    if _on_asyncio():
        # The dead run's tasks end with Killed and nobody retrieves it: do not log each one.
        import asyncio

        asyncio.get_running_loop().set_exception_handler(lambda loop, context: None)
    try:
        await _run(code, store, world, prelude, kill_at)
    except BaseException as exc:  # the abandoned run stops however the kill reached it
        if not store.dead:
            raise AssertionError(f"the run failed before the kill at write {kill_at}: {exc!r}") from exc
    else:
        if not store.dead:  # this run wrote fewer records than the reference (timing decides some)
            return None
    await _release_locks(memory)
    # A new process: the dead one's tasks may still wake up here, but its store and tools stay dead.
    in_flight: set[str] = set()
    if second is not None:  # killed again during the resume
        dying = World(KillableStore(memory, second), world.ledger, world.delays, world.execution_id)
        try:
            await _resume(dying.store, dying, prelude, code)
        except BaseException as exc:
            if not dying.store.dead:
                raise AssertionError(f"the resume failed before its kill at write {second}: {exc!r}") from exc
        in_flight |= dying.reported
        await _release_locks(memory)
    again = World(KillableStore(memory), world.ledger, world.delays, world.execution_id)
    executor, reported = await _resume(again.store, again, prelude, code)
    in_flight |= reported
    skip = set(prelude) | set(world.tools()) | {"print", "__builtins__", "__name__"}
    return Outcome(canonical(executor.namespace, skip), world.ledger, in_flight, again.store.writes)


async def check_every_kill(code: str, *, delays: dict[Any, float] | None = None, sample: int = 14) -> None:
    """Kill ``code`` at every record (or a seeded sample) and require the reference's outcome."""
    code = textwrap.dedent(code)
    ref = await reference(code, delays)
    points = list(range(1, ref.writes + 1))
    if len(points) > sample:
        points = sorted(random.Random(len(code)).sample(points, sample))
    killed = 0
    rng = random.Random(ref.writes)
    for kill_at in points:
        # Every other kill point is followed by a second kill, during the resume.
        second = rng.randint(1, 12) if kill_at % 2 else None
        got = await killed_at(code, kill_at, delays, second)
        if got is None:
            continue
        killed += 1
        assert got.namespace == ref.namespace, f"namespace differs after a kill at write {kill_at} (then {second})"
        keys = [k for k, _ in got.ledger]
        repeated = {k for k in keys if keys.count(k) > 1}
        assert repeated <= got.in_flight, f"kill at write {kill_at}: completed calls ran twice: {repeated}"
        calls = sorted({(k.split(":", 1)[1], c) for k, c in got.ledger})
        assert calls == sorted({(k.split(":", 1)[1], c) for k, c in ref.ledger}), f"kill at write {kill_at}: other calls ran"
    assert killed >= len(points) // 2, f"only {killed} of {len(points)} runs reached their kill point"


# --- the cases --------------------------------------------------------------------------------------


async def test_shared_objects_and_closure_cells_stay_shared() -> None:
    await check_every_kill(
        """
        shared = [1]
        alias = shared
        registry = {"main": shared, "again": shared}
        def make():
            count = 0
            def inc():
                nonlocal count
                count += 1
                return count
            def get():
                return count
            return inc, get
        inc, get = make()
        for i in range(3):
            shared.append(await Work(i))
            inc()
        class Account:
            def __init__(self):
                self.balance = 0
        acct = Account()
        accounts = {"main": acct}
        acct.balance += await Work(7)
        same = alias is shared and registry["again"] is shared and accounts["main"] is acct
        n = get()
        """
    )


async def test_concurrent_llm_coroutines_replay_exactly(anyio_backend: str) -> None:
    # The second worker's calls finish first: the interleaving is not the creation order.
    delays = {3: 0.005, 13: 0.005, 2: 0.001, 12: 0.25, 1: 0.45, 11: 0.001}  # far apart: no race live, even on a loaded machine
    if anyio_backend == "asyncio":
        code = """
        order = []
        async def worker(i):
            a = await Work(i)
            order.append(("a", i))
            b = await Work(i + 10)
            order.append(("b", i))
            return a + b
        results = await asyncio.gather(worker(1), worker(2))
        t = asyncio.create_task(worker(3))
        x = await Work(100)
        r = await t
        async with asyncio.TaskGroup() as tg:
            t1 = tg.create_task(worker(1))
            t2 = tg.create_task(worker(2))
        both = t1.result() + t2.result()
        got = []
        for fut in asyncio.as_completed([worker(3), worker(2), worker(1)]):
            got.append(await fut)
        """
    else:
        code = """
        order = []
        async def worker(i, out):
            a = await Work(i)
            order.append(("a", i))
            b = await Work(i + 10)
            order.append(("b", i))
            out.append(a + b)
        results = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(worker, 1, results)
            tg.start_soon(worker, 2, results)
        x = await Work(100)
        """
    await check_every_kill(code, delays=delays, sample=10)


async def test_timeouts_replay_as_the_same_cancellation(anyio_backend: str) -> None:
    if anyio_backend == "asyncio":
        code = """
        try:
            v = await asyncio.wait_for(Slow(1), 0.05)
        except TimeoutError:
            v = "timeout"
        try:
            async with asyncio.timeout(0.05):
                u = await Slow(2)
        except TimeoutError:
            u = "timeout"
        w = await asyncio.wait_for(Work(5), 2)
        """
    else:
        code = """
        v = "timeout"
        with anyio.move_on_after(0.05):
            v = await Slow(1)
        try:
            with anyio.fail_after(0.05):
                u = await Slow(2)
        except TimeoutError:
            u = "timeout"
        w = await Work(5)
        """
    await check_every_kill(code)


async def test_tool_exceptions_replay_with_class_args_attributes_and_cause() -> None:
    await check_every_kill(
        """
        try:
            await Boom("A-1")
        except Exception as e:
            err = e
            caught = (type(e).__name__, e.args, e.order, e.reason, type(e.__cause__).__name__, e.__cause__.args)
        after = await Work(1)
        """
    )


async def test_tool_that_mutates_its_arguments_replays_the_change() -> None:
    await check_every_kill(
        """
        items = []
        box = {"items": items}
        for v in range(3):
            n = await Append(items, v)
        class Thing:
            def __init__(self):
                self.tags = []
        thing = Thing()
        await Tag(thing, "red")
        same = box["items"] is items
        """
    )


async def test_a_finished_child_frame_is_not_run_again() -> None:
    await check_every_kill(
        """
        a = await Work(1)
        out = await Nested("y = await Work(2)\\nout = y + 1\\n")
        b = await Work(3)
        """
    )


async def test_set_iteration_replays_in_the_same_process() -> None:
    await check_every_kill(
        """
        seen = []
        for name in {"alice", "bob", "carol", "dave"}:
            seen.append(await Work(name))
        """
    )


async def test_restored_finished_child_skips_its_code_and_returns_its_result() -> None:
    store = KillableStore(MemoryCheckpointProvider())
    world = World(store)
    manager = CheckpointManager(execution_id="c", provider=store)  # type: ignore[arg-type]
    agent = Agent("c", world.tools())
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager, frame_id="c")
    await executor.add_chunk("a = await Work(1)\n")
    await executor.finalize()
    await manager.close()
    manager2 = CheckpointManager(execution_id="c", provider=store)  # type: ignore[arg-type]
    await manager2.load_records()
    again = StreamingPythonExecutor(agent, checkpoint_manager=manager2, frame_id="c")
    assert again.restored and again.finished
    await again.add_chunk("a = await ")
    await again.add_chunk("Work(1)\n")
    result = await again.finalize()
    assert result.success and result.namespace["a"] == 10
    assert len(world.ledger) == 1
    with pytest.raises(NonDeterminismError, match="other code"):
        await again.add_chunk("b = 2\n")
    await manager2.close()


async def test_an_exception_that_cannot_be_pickled_replays_as_a_stand_in_of_its_class() -> None:
    from playbooks.checkpoints.outcome import dump_outcome, load_outcome
    from playbooks.errors import CheckpointWarning

    exc = OrderError("B-2", "late")
    exc.handle = open(__file__)  # noqa: SIM115 - an attribute that cannot be pickled
    try:
        with pytest.warns(CheckpointWarning, match="handle"):
            data = dump_outcome(exc)
    finally:
        exc.handle.close()
    assert data is not None
    back = load_outcome(data)
    assert type(back) is OrderError and back.order == "B-2" and back.args == exc.args
    assert "TextIOWrapper" in back.handle


def test_a_resume_under_another_hash_seed_is_explained_and_resume_hash_seed_fixes_it(tmp_path: Path) -> None:
    """Real processes: set iteration order changes with the seed; resume_hash_seed re-executes the
    resuming program under the recorded one, and the resumed run matches."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, json, os, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from playbooks import Agent
        from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
        from playbooks.execution.hash_seed import resume_hash_seed
        from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
        CODE = "seen = []\\nfor name in {{'alice', 'bob', 'carol', 'dave', 'eve'}}:\\n    seen.append(await Greet(name))\\n"
        calls = []
        async def Greet(name):
            calls.append(name)
            if os.environ.get("DIE") and len(calls) == 3:
                os._exit(9)
            return name
        async def main(mode):
            manager = CheckpointManager("h", FilesystemCheckpointProvider({str(tmp_path / "store")!r}))
            agent = Agent("h", {{"Greet": Greet}})
            if mode == "resume":
                if os.environ.get("FIX"):
                    await resume_hash_seed(manager)
                coordinator = RecoveryCoordinator(manager)
                ckpt = await manager.get_latest_checkpoint()
                try:
                    ex = await StreamingPythonExecutor.resume_from_checkpoint(agent, ckpt, checkpoint_manager=manager)
                    result = await ex.finalize()
                except Exception as exc:
                    print(json.dumps({{"error": str(exc)}}))
                    return
                print(json.dumps({{"seen": result.namespace["seen"], "calls": calls}}))
            else:
                ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
                await ex.add_chunk(CODE)
                await ex.finalize()
        asyncio.run(main(sys.argv[1]))
    """))
    import os

    def run(mode: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True,
                              env={**os.environ, **env}, timeout=60)

    import shutil

    first = run("start", PYTHONHASHSEED="1", DIE="1")
    assert first.returncode != 0
    shutil.copytree(tmp_path / "store", tmp_path / "kept")
    # Another seed, and no fix: a divergence that names the seed (or, by chance, the same order).
    diverged = 0
    for seed in ("2", "3", "4", "5", "6"):
        shutil.rmtree(tmp_path / "store")
        shutil.copytree(tmp_path / "kept", tmp_path / "store")
        other = run("resume", PYTHONHASHSEED=seed)
        if "error" in other.stdout:
            assert "PYTHONHASHSEED=1" in other.stdout, other.stdout
            diverged += 1
    assert diverged, "five other seeds all iterated five strings in the same order"
    shutil.rmtree(tmp_path / "store")
    shutil.copytree(tmp_path / "kept", tmp_path / "store")
    fixed = run("resume", PYTHONHASHSEED="7", FIX="1")
    assert fixed.returncode == 0, fixed.stderr
    import json

    data = json.loads(fixed.stdout.strip().splitlines()[-1])
    assert sorted(data["seen"]) == ["alice", "bob", "carol", "dave", "eve"]
    assert len(data["calls"]) == 3  # two replayed; the one in flight and the last two run live


async def test_finished_tasks_and_exited_task_groups_come_back_as_stand_ins(anyio_backend: str) -> None:
    """``async with TaskGroup() as tg`` and ``t = create_task(...)`` leave objects that cannot be
    pickled in the namespace; after a resume they are stand-ins that answer what they still can."""
    if anyio_backend == "asyncio":
        code = """
        async def two(i):
            return await Work(i) * 2
        t = asyncio.create_task(two(1))
        r = await t
        async with asyncio.TaskGroup() as tg:
            t2 = tg.create_task(two(2))
        after = await Work(3)
        """
    else:
        code = """
        async def two(i, out):
            out.append(await Work(i) * 2)
        out = []
        async with anyio.create_task_group() as tg:
            tg.start_soon(two, 2, out)
        after = await Work(3)
        """
    await check_every_kill(code)


async def test_a_set_restored_from_a_snapshot_iterates_as_the_live_one() -> None:
    names = ", ".join(repr(f"user{i * 7919 % 1000}") for i in range(40))
    await check_every_kill(
        f"""
        names = {{{names}}}
        first = await Work(0)
        seen = []
        for n in names:
            seen.append(await Work(n))
        """,
        sample=10,
    )


def test_set_layouts_survive_encoding_for_any_sets() -> None:
    """Property: after encode and decode, every set iterates in the live set's order (same seed)."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from playbooks.checkpoints.namespace import NamespaceEncoder, decode_namespace

    @settings(max_examples=300, deadline=None)
    @given(st.lists(st.text(max_size=6) | st.integers(), min_size=2, max_size=80), st.integers(0, 5))
    def check(items: list[Any], removed: int) -> None:
        live = set(items)
        for item in items[:removed]:
            live.discard(item)
        namespace = {"__name__": "__llm__", "s": live, "nested": {"k": [set(items[:9])]}}
        encoded = NamespaceEncoder().encode(namespace)
        back = decode_namespace({k: b.data for k, b in encoded.blobs.items()}, {})
        assert list(back["s"]) == list(live)
        assert list(back["nested"]["k"][0]) == list(namespace["nested"]["k"][0])

    check()


async def test_a_host_cancellation_is_not_replayed_as_the_code_s_own() -> None:
    """The host cancels the execution while a call runs: that call is journaled as cancelled, then
    marked interrupted when the cancellation leaves the statement, so a resume runs it again instead
    of waiting for a cancellation that the code itself never asked for."""
    memory = MemoryCheckpointProvider()
    world = World(KillableStore(memory), delays={("slow", 2): 0.6})
    agent = Agent("p", world.tools())
    manager = CheckpointManager(execution_id=world.execution_id, provider=world.store)  # type: ignore[arg-type]
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager, frame_id="root")
    with anyio.move_on_after(0.2):  # the host gives up: not the LLM code's timeout
        await executor.add_chunk("a = await Work(1)\nb = await Slow(2)\nc = await Work(3)\n")
    await manager.close()
    again = World(KillableStore(memory), world.ledger, world.delays, world.execution_id)
    with anyio.fail_after(20):  # a replayed cancellation would wait for ever
        executor2, _ = await _resume(again.store, again, {}, "a = await Work(1)\nb = await Slow(2)\nc = await Work(3)\n")
    assert executor2.namespace["b"] == 2 and executor2.namespace["c"] == 30
    assert [c for _, c in world.ledger] == ["Work(1,)", "Slow(2,)", "Work(3,)"]


async def test_set_orders_are_fixed_at_the_same_points_when_a_replay_defers_snapshots() -> None:
    """The soak's case: a set created, a kill before the snapshot that would fix its order, a resume
    that defers its snapshots while it replays, and a set iterated in between."""
    await check_every_kill(
        """
        names = {"alice", "carol", "erin", "bob", "dave", "frank", "grace", "heidi"}
        pair = await Work(1), await Work(2)
        names.add("ivan")
        more = await Work(3)
        seen = []
        for n in names:
            seen.append(await Work(n))
        """,
        sample=20,
    )


async def test_a_cancelled_task_in_a_variable_comes_back_cancelled(anyio_backend: str) -> None:
    if anyio_backend != "asyncio":
        pytest.skip("asyncio tasks")
    await check_every_kill(
        """
        slow = asyncio.create_task(Slow(1))
        first = await Work(1)
        slow.cancel()
        try:
            await slow
        except asyncio.CancelledError:
            state = "cancelled"
        after = await Work(2)
        flag = slow.cancelled()
        """
    )


async def test_a_task_cancelled_before_it_starts_in_the_replay_does_not_hold_up_later_calls(anyio_backend: str) -> None:
    """The soak's case (program 90041): the live ``Slow`` call had started and was cancelled; in the
    replay ``quick``'s call returns at once, so ``slow`` is cancelled before it starts and never makes
    its call again. The calls that finished after that cancellation must not wait for it (the replay
    hung). The snapshot after the gather is not a usable base (its calls are its tasks'), so the
    replay goes through the whole sequence."""
    if anyio_backend != "asyncio":
        pytest.skip("asyncio tasks")
    with anyio.fail_after(60):
        await check_every_kill(
            """
            mixed = await asyncio.gather(Work(1), Work(2))
            slow = asyncio.create_task(Slow(1))
            quick = await Work(31)
            slow.cancel()
            try:
                await slow
                cancelled = False
            except asyncio.CancelledError:
                cancelled = True
            async def worker(j):
                return await Work(j) + await Work(j + 10)
            done = sorted([await f for f in asyncio.as_completed([worker(19), worker(8), worker(3)])])
            """,
            sample=30,
        )


async def test_a_timeout_keeps_its_place_among_the_results_that_came_after_it(anyio_backend: str) -> None:
    """Live, the timeout of ``Slow`` came before ``Work(3)`` returned, and ``log`` says so; the replay
    must hand ``Work(3)`` back only after the same timeout (a first fix of the case above let it pass)."""
    if anyio_backend == "asyncio":
        code = """
        log = []
        async def a():
            try:
                await asyncio.wait_for(Slow(1), 0.05)
            except TimeoutError:
                log.append("timeout")
        async def b():
            log.append(("b", await Work(3)))
        first = await Work(1)
        both = await asyncio.gather(a(), b())
        last = await Work(2)
        """
    else:
        code = """
        log = []
        async def a():
            with anyio.move_on_after(0.05):
                await Slow(1)
            log.append("timeout")
        async def b():
            log.append(("b", await Work(3)))
        first = await Work(1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(a)
            tg.start_soon(b)
        last = await Work(2)
        """
    await check_every_kill(code, delays={3: 0.15}, sample=30)


def test_a_closed_stdout_ends_the_run_as_a_host_failure_and_the_line_is_shown_after_resume(tmp_path: Path) -> None:
    """``| head -1``: print fails with BrokenPipeError. That is the host's failure: the run stops with
    HostIOError, nothing is journaled as the code's error, and a resume prints the line again."""
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, sys
        from playbooks import Agent
        from playbooks.checkpoints import CheckpointManager, FilesystemCheckpointProvider, RecoveryCoordinator
        from playbooks.errors import HostIOError
        from playbooks.execution.streaming_python_executor import StreamingPythonExecutor
        async def Work(x):
            return x * 10
        CODE = "a = await Work(1)\\nprint('first', a)\\nprint('second', a)\\nb = await Work(2)\\nprint('third', b)\\n"
        async def main():
            manager = CheckpointManager("io", FilesystemCheckpointProvider({str(tmp_path / "store")!r}))
            agent = Agent("io", {{"Work": Work}})
            if sys.argv[1] == "resume":
                ckpt = await manager.get_latest_checkpoint()
                ex = await StreamingPythonExecutor.resume_from_checkpoint(agent, ckpt, checkpoint_manager=manager)
            else:
                ex = StreamingPythonExecutor(agent, checkpoint_manager=manager)
                try:
                    await ex.add_chunk(CODE)
                except HostIOError as exc:
                    sys.stderr.write("host failure: " + str(exc) + "\\n")
                    return
            result = await ex.finalize()
            sys.stderr.write(f"done {{result.success}} {{result.error}}\\n")
        asyncio.run(main())
    """))
    import os

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    # The reader goes away before the first line (as `| head -0` would): every print gets EPIPE.
    first = subprocess.Popen([sys.executable, str(script), "start"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
    assert first.stdout is not None and first.stderr is not None
    first.stdout.close()
    err = first.stderr.read()
    first.wait(timeout=60)
    assert "host failure: cannot write to standard output" in err, err
    second = subprocess.run([sys.executable, str(script), "resume"], capture_output=True, text=True, env=env, timeout=60)
    assert second.stderr.strip().endswith("done True None"), second.stderr
    assert second.stdout == "first 10\nsecond 10\nthird 20\n"  # the failed line is shown, once


def test_exceptions_inside_a_returned_value_keep_their_class_and_cause() -> None:
    from playbooks.checkpoints.outcome import dump_outcome, load_outcome

    try:
        try:
            raise KeyError("k")
        except KeyError as inner:
            raise OrderError("C-3", "gone") from inner
    except OrderError as exc:
        value = [1, exc]
    data = dump_outcome(value)
    assert data is not None
    back = load_outcome(data)
    assert back[0] == 1 and type(back[1]) is OrderError and back[1].reason == "gone"
    assert type(back[1].__cause__) is KeyError


async def test_pruning_keeps_a_finished_child_while_its_parent_runs() -> None:
    """keep_last_n = 1 and many snapshots after a child frame finished: the child's final snapshot
    stays (a resume of the parent re-attaches to it), and a resume still gets its result back."""
    memory = MemoryCheckpointProvider()
    world = World(KillableStore(memory))
    agent = Agent("p", world.tools())
    manager = CheckpointManager(execution_id=world.execution_id, provider=world.store, keep_last_n=1)  # type: ignore[arg-type]
    executor = StreamingPythonExecutor(agent, checkpoint_manager=manager, frame_id="root")
    code = 'out = await Nested("y = await Work(2)\\nout = y + 1\\n")\n' + "".join(
        f"v{i} = await Work({i})\n" for i in range(20)
    )
    await executor.add_chunk(code)
    await manager.prune(force=True)
    frames = {manager.frame_state(f) is not None for f in manager.loaded_frame_ids()}
    await manager.close()
    again = World(KillableStore(memory), world.ledger, execution_id=world.execution_id)
    manager2 = CheckpointManager(execution_id=world.execution_id, provider=again.store)  # type: ignore[arg-type]
    await manager2.load_records()
    children = [f for f in manager2.loaded_frame_ids() if f.startswith("root/")]
    assert children and all(manager2.frame_state(f).done for f in children), (frames, children)
    await manager2.close()


async def test_a_set_made_by_a_statement_without_awaits_iterates_alike_after_a_deferred_snapshot() -> None:
    """The soak's case: a set literal in a statement that does not await, right after a statement
    whose snapshot was deferred (tasks), then iterated; a resume may start before or after it."""
    await check_every_kill(
        """
        async with anyio.create_task_group() as tg:
            tg.start_soon(Work, 1)
        names = {"bob", "carol", "dave", "erin", "frank", "grace", "heidi", "ivan"}
        seen = []
        for n in names:
            seen.append(await Work(n))
        """,
        sample=20,
    )
