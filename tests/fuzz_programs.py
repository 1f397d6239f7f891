"""A seeded generator of LLM-style Python programs for the crash-trial fuzzer (issue 8).

``generate(seed, backend)`` returns a :class:`Program`: top-level statements (top-level ``await``
allowed) drawn from a small grammar of what LLMs write: loops that await tools, ``async def`` helpers,
closures sharing a ``nonlocal`` counter, aliasing, classes, concurrent coroutines (``asyncio.gather``,
``create_task`` awaited in a later statement, ``TaskGroup``, ``as_completed``; anyio task groups under
trio), try/except around failing tools, timeouts, set and dict iteration, ``print``, tools that mutate
their arguments, and a tool that runs a nested durable executor.

Every program is deterministic apart from its tools, and its final namespace, its output and the
multiset of its tool calls are the same in every run that never dies, whatever the hash seed, the
chunking and the timing: results of concurrent tasks go to fixed slots, set iteration feeds only
order-free results, a tool that times out sleeps ten times its timeout and one that must not finishes
far within its own.

The program text is self-describing: every item starts with a ``# fuzz: FEATURES`` comment line, so a
program printed by a failing test can be saved and run again with ``fuzz_worker.py trial --program``.
An *item* is one or more top-level statements that must stay together (the shrinker removes whole
items).

The tools the programs call are served by ``fuzz_worker.py`` (``Work``, ``Greet``, ``Flaky``,
``Slow``, ``Tag``, ``Annotate``, ``RunChild``); the exception classes the tools raise live here so both
processes can import them.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = (
    "ASYNCIO_ONLY",
    "FEATURES",
    "Item",
    "Program",
    "ToolError",
    "features_for",
    "generate",
    "parse_program",
    "program_strategy",
)

BACKENDS = ("asyncio", "trio")

FEATURES: tuple[str, ...] = (
    "for_loop",
    "while_loop",
    "async_helper",
    "closure_nonlocal",
    "alias_list",
    "shared_in_two_dicts",
    "class_methods",
    "alias_registry",
    "gather",
    "create_task",
    "taskgroup",
    "as_completed",
    "exc_value",
    "exc_custom_init",
    "exc_chained",
    "exc_llm_class",
    "timeout_hit",
    "timeout_ok",
    "task_cancel",
    "exc_in_gather",
    "set_iter",
    "dict_iter",
    "print",
    "mutate_list_arg",
    "mutate_dict_arg",
    "nested_executor",
)
"""Every grammar feature; a program's items are tagged with the features they exercise."""

ASYNCIO_ONLY = frozenset({"create_task", "as_completed"})
"""Features with no anyio form (a task that outlives its statement; completion-order iteration)."""

# A tool that must time out sleeps TIMEOUT_SLEEP, ten times TIMEOUT; one that must not sleeps
# FAST_SLEEP under a limit of GENEROUS_LIMIT.
TIMEOUT = 0.05
TIMEOUT_SLEEP = 10 * TIMEOUT
FAST_SLEEP = 0.01
GENEROUS_LIMIT = 5.0


class ToolError(Exception):
    """What ``Flaky`` raises: an exception class whose ``__init__`` takes two arguments."""

    def __init__(self, code: str, detail: int) -> None:
        super().__init__(f"{code}: {detail}")
        self.code = code
        self.detail = detail


def features_for(backend: str) -> tuple[str, ...]:
    """The features a program for ``backend`` can use."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, not {backend!r}")
    return tuple(f for f in FEATURES if backend == "asyncio" or f not in ASYNCIO_ONLY)


@dataclass(frozen=True)
class Item:
    """One or more top-level statements (ending in a newline) and the features they exercise."""

    text: str
    features: tuple[str, ...]

    def render(self) -> str:
        return f"# fuzz: {' '.join(self.features) or '-'}\n{self.text}"


@dataclass
class Program:
    """A generated program: its items in order, and what it was generated from."""

    backend: str
    items: list[Item]
    seed: int | None = None
    origin: str = field(default="")
    recipe: str = ""
    """The ``fuzz_worker.py trial`` options that generate this program again (empty if not generated)."""

    @property
    def text(self) -> str:
        return "".join(item.render() for item in self.items)

    @property
    def features(self) -> set[str]:
        return {f for item in self.items for f in item.features}

    def without(self, index: int) -> Program:
        return Program(self.backend, self.items[:index] + self.items[index + 1 :], self.seed, "shrunk")


_MARK = re.compile(r"^# fuzz: (.*)$", re.MULTILINE)


def parse_program(text: str, backend: str) -> Program:
    """Split a rendered program back into its items (text before the first mark is one item)."""
    marks = list(_MARK.finditer(text))
    items: list[Item] = []
    head = text[: marks[0].start()] if marks else text
    if head.strip():
        items.append(Item(head, ()))
    for i, mark in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        tags = tuple(t for t in mark.group(1).split() if t != "-")
        items.append(Item(text[mark.end() + 1 : end], tags))
    return Program(backend, items, origin="parsed")


# ----------------------------------------------------------------------------- the grammar

Snippet = list[Item]


class _Gen:
    def __init__(self, rng: random.Random, backend: str) -> None:
        self.rng = rng
        self.backend = backend
        self.aio = backend == "asyncio"

    def c(self, lo: int = 1, hi: int = 60) -> int:
        return self.rng.randint(lo, hi)

    def maybe_print(self, text: str) -> tuple[str, tuple[str, ...]]:
        """An optional print line (indented as ``text``'s first line) and its feature tag."""
        if self.rng.random() < 0.5:
            return text, ("print",)
        return "", ()

    # Each feature returns its items in order; items of different features may interleave.

    def for_loop(self, g: int) -> Snippet:
        n, c = self.c(2, 4), self.c()
        line, tag = self.maybe_print(f"    print('loop {g}', i_{g}, acc_{g})\n")
        return [
            Item(f"acc_{g} = 0\n", ("for_loop",)),
            Item(
                f"for i_{g} in range({n}):\n    acc_{g} += await Work(i_{g} + {c})\n{line}",
                ("for_loop", *tag),
            ),
            Item(f"print('acc {g}', acc_{g})\n", ("for_loop", "print")),
        ]

    def while_loop(self, g: int) -> Snippet:
        n, c = self.c(2, 4), self.c()
        return [
            Item(f"w_{g} = []\n", ("while_loop",)),
            Item(
                f"while len(w_{g}) < {n}:\n    w_{g}.append(await Work(len(w_{g}) * 3 + {c}))\n",
                ("while_loop",),
            ),
        ]

    def async_helper(self, g: int) -> Snippet:
        c, n = self.c(), self.c(2, 3)
        items = [
            Item(
                f"async def helper_{g}(x):\n"
                f"    a = await Work(x)\n"
                f"    b = await Work(a % 97)\n"
                f"    return a + b\n",
                ("async_helper",),
            ),
            Item(f"h_{g} = await helper_{g}({c})\n", ("async_helper",)),
        ]
        if self.rng.random() < 0.5:
            items.append(Item(f"hs_{g} = [await helper_{g}(k) for k in range({n})]\n", ("async_helper",)))
        return items

    def closure_nonlocal(self, g: int) -> Snippet:
        start, x, y = self.c(0, 9), self.c(), self.c()
        return [
            Item(
                f"def make_counter_{g}(start):\n"
                f"    count = start\n"
                f"    async def bump(step):\n"
                f"        nonlocal count\n"
                f"        count += await Work(step)\n"
                f"        return count\n"
                f"    def peek():\n"
                f"        return count\n"
                f"    return bump, peek\n",
                ("closure_nonlocal",),
            ),
            Item(f"bump_{g}, peek_{g} = make_counter_{g}({start})\n", ("closure_nonlocal",)),
            Item(f"b1_{g} = await bump_{g}({x})\n", ("closure_nonlocal",)),
            Item(f"b2_{g} = await bump_{g}({y})\n", ("closure_nonlocal",)),
            Item(
                f"seen_{g} = peek_{g}()\nprint('counter {g}', b1_{g}, b2_{g}, seen_{g})\n",
                ("closure_nonlocal", "print"),
            ),
        ]

    def alias_list(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(f"shared_{g} = [{c}]\nalias_{g} = shared_{g}\n", ("alias_list",)),
            Item(f"shared_{g}.append(await Work({c}))\n", ("alias_list",)),
            Item(f"alias_{g}.append(len(shared_{g}))\n", ("alias_list",)),
            Item(f"print('alias {g}', alias_{g} is shared_{g}, shared_{g})\n", ("alias_list", "print")),
        ]

    def shared_in_two_dicts(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(
                f"items_{g} = ['x{g}']\nleft_{g} = {{'items': items_{g}}}\nright_{g} = {{'items': items_{g}, 'n': 0}}\n",
                ("shared_in_two_dicts",),
            ),
            Item(f"left_{g}['items'].append(await Work({c}))\n", ("shared_in_two_dicts",)),
            Item(f"right_{g}['n'] = len(right_{g}['items'])\n", ("shared_in_two_dicts",)),
        ]

    def class_methods(self, g: int) -> Snippet:
        c, d = self.c(), self.c()
        items = [
            Item(
                f"class Account_{g}:\n"
                f"    def __init__(self, name):\n"
                f"        self.name = name\n"
                f"        self.balance = 0\n"
                f"        self.history = []\n"
                f"    async def deposit(self, amount):\n"
                f"        got = await Work(amount)\n"
                f"        self.balance += got\n"
                f"        self.history.append(got)\n"
                f"        return self.balance\n"
                f"    def summary(self):\n"
                f"        return f'{{self.name}}:{{self.balance}}:{{len(self.history)}}'\n",
                ("class_methods",),
            ),
            Item(f"acct_{g} = Account_{g}('main{g}')\n", ("class_methods",)),
            Item(f"await acct_{g}.deposit({c})\n", ("class_methods",)),
        ]
        if self.rng.random() < 0.6:
            items += [
                Item(f"registry_{g} = {{'main': acct_{g}}}\n", ("alias_registry",)),
                Item(f"await registry_{g}['main'].deposit({d})\n", ("class_methods", "alias_registry")),
                Item(
                    f"same_{g} = registry_{g}['main'] is acct_{g}\nprint('account {g}', acct_{g}.summary(), same_{g})\n",
                    ("alias_registry", "print"),
                ),
            ]
        else:
            items.append(Item(f"print('account {g}', acct_{g}.summary())\n", ("class_methods", "print")))
        return items

    def alias_registry(self, g: int) -> Snippet:
        items = self.class_methods(g)
        if not any("alias_registry" in i.features for i in items):
            return self.alias_registry(g)
        return items

    def _worker(self, g: int, k: int = 10) -> Item:
        return Item(
            f"async def worker_{g}(j):\n"
            f"    a = await Work(j)\n"
            f"    b = await Work(j + {k})\n"
            f"    return a + b\n",
            (),
        )

    def gather(self, g: int) -> Snippet:
        js = [self.c(1, 30) for _ in range(self.c(2, 3))]
        if self.aio:
            calls = ", ".join(f"worker_{g}({j})" for j in js)
            items = [self._worker(g), Item(f"gathered_{g} = await asyncio.gather({calls})\n", ("gather",))]
            if self.rng.random() < 0.5:
                items.append(
                    Item(f"pair_{g} = await asyncio.gather(Work({js[0]}), Greet('g{g}'))\n", ("gather",))
                )
            return items
        return [
            self._worker(g),
            Item(
                f"gathered_{g} = [None] * {len(js)}\n"
                f"async def slot_{g}(i, j):\n"
                f"    gathered_{g}[i] = await worker_{g}(j)\n",
                ("gather",),
            ),
            Item(
                f"async with anyio.create_task_group() as tg_{g}:\n"
                f"    for i_{g}, j_{g} in enumerate({js}):\n"
                f"        tg_{g}.start_soon(slot_{g}, i_{g}, j_{g})\n",
                ("gather",),
            ),
        ]

    def create_task(self, g: int) -> Snippet:
        c = self.c()
        return [
            self._worker(g),
            Item(f"task_{g} = asyncio.create_task(worker_{g}({c}))\n", ("create_task",)),
            Item(f"task_result_{g} = await task_{g}\n", ("create_task",)),
        ]

    def taskgroup(self, g: int) -> Snippet:
        c, d = self.c(), self.c()
        if self.aio:
            return [
                self._worker(g),
                Item(
                    f"async with asyncio.TaskGroup() as group_{g}:\n"
                    f"    ta_{g} = group_{g}.create_task(worker_{g}({c}))\n"
                    f"    tb_{g} = group_{g}.create_task(worker_{g}({d}))\n",
                    ("taskgroup",),
                ),
                Item(f"tg_sum_{g} = ta_{g}.result() + tb_{g}.result()\n", ("taskgroup",)),
            ]
        return [
            self._worker(g),
            Item(
                f"parts_{g} = [0, 0, 0]\n"
                f"async def part_{g}(i, j):\n"
                f"    parts_{g}[i] = await worker_{g}(j)\n"
                f"    if i == 0:\n"
                f"        async with anyio.create_task_group() as inner:\n"
                f"            inner.start_soon(part_{g}, 2, j + 1)\n",
                ("taskgroup",),
            ),
            Item(
                f"async with anyio.create_task_group() as group_{g}:\n"
                f"    group_{g}.start_soon(part_{g}, 0, {c})\n"
                f"    group_{g}.start_soon(part_{g}, 1, {d})\n",
                ("taskgroup",),
            ),
            Item(f"tg_sum_{g} = sum(parts_{g})\n", ("taskgroup",)),
        ]

    def as_completed(self, g: int) -> Snippet:
        js = [self.c(1, 30) for _ in range(3)]
        coros = ", ".join(f"worker_{g}({j})" for j in js)
        return [
            self._worker(g),
            Item(f"done_{g} = sorted([await f for f in asyncio.as_completed([{coros}])])\n", ("as_completed",)),
        ]

    def exc_value(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(
                f"try:\n"
                f"    ev_{g} = await Flaky('value', {c})\n"
                f"except ValueError as e:\n"
                f"    ev_{g} = 'caught ' + str(e)\n",
                ("exc_value",),
            )
        ]

    def exc_custom_init(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(
                f"try:\n"
                f"    ec_{g} = await Flaky('custom', {c})\n"
                f"except Exception as e:\n"
                f"    ec_{g} = [type(e).__name__, e.code, e.detail, str(e)]\n"
                f"    ec_exc_{g} = e\n",
                ("exc_custom_init",),
            )
        ]

    def exc_chained(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(
                f"try:\n"
                f"    await Flaky('chained', {c})\n"
                f"except Exception as e:\n"
                f"    chain_{g} = [type(e).__name__, str(e), type(e.__cause__).__name__, repr(e.__cause__)]\n"
                f"    chain_exc_{g} = e\n",
                ("exc_chained",),
            )
        ]

    def exc_llm_class(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(
                f"class StepError_{g}(Exception):\n"
                f"    def __init__(self, step, reason):\n"
                f"        super().__init__(f'step {{step}}: {{reason}}')\n"
                f"        self.step = step\n"
                f"        self.reason = reason\n",
                ("exc_llm_class",),
            ),
            Item(
                f"try:\n"
                f"    try:\n"
                f"        await Flaky('value', {c})\n"
                f"    except ValueError as inner:\n"
                f"        raise StepError_{g}({c}, str(inner)) from inner\n"
                f"except StepError_{g} as e:\n"
                f"    step_err_{g} = e\n"
                f"    step_info_{g} = [e.step, e.reason, type(e.__cause__).__name__]\n",
                ("exc_llm_class",),
            ),
        ]

    def timeout_hit(self, g: int) -> Snippet:
        c = self.c()
        slow = f"Slow({c}, {TIMEOUT_SLEEP})"
        if self.aio:
            if self.rng.random() < 0.5:
                text = (
                    f"try:\n"
                    f"    th_{g} = await asyncio.wait_for({slow}, timeout={TIMEOUT})\n"
                    f"except TimeoutError:\n"
                    f"    th_{g} = 'timed out'\n"
                )
            else:
                text = (
                    f"th_{g} = 'timed out'\n"
                    f"try:\n"
                    f"    async with asyncio.timeout({TIMEOUT}):\n"
                    f"        th_{g} = await {slow}\n"
                    f"except TimeoutError:\n"
                    f"    pass\n"
                )
        elif self.rng.random() < 0.5:
            text = (
                f"try:\n"
                f"    with anyio.fail_after({TIMEOUT}):\n"
                f"        th_{g} = await {slow}\n"
                f"except TimeoutError:\n"
                f"    th_{g} = 'timed out'\n"
            )
        else:
            text = f"th_{g} = 'timed out'\nwith anyio.move_on_after({TIMEOUT}):\n    th_{g} = await {slow}\n"
        return [Item(text, ("timeout_hit",)), Item(f"after_timeout_{g} = await Work({c})\n", ("timeout_hit",))]

    def timeout_ok(self, g: int) -> Snippet:
        c = self.c()
        slow = f"Slow({c}, {FAST_SLEEP})"
        if self.aio:
            text = f"to_{g} = await asyncio.wait_for({slow}, timeout={GENEROUS_LIMIT})\n"
        else:
            text = f"with anyio.fail_after({GENEROUS_LIMIT}):\n    to_{g} = await {slow}\n"
        return [Item(text, ("timeout_ok",))]

    def task_cancel(self, g: int) -> Snippet:
        # The slow call sleeps TIMEOUT_SLEEP; the quick one and the cancel come far sooner.
        c = self.c()
        if self.aio:
            return [
                Item(
                    f"slow_task_{g} = asyncio.create_task(Slow({c}, {TIMEOUT_SLEEP}))\n"
                    f"quick_{g} = await Work({c})\n"
                    f"slow_task_{g}.cancel()\n"
                    f"try:\n"
                    f"    await slow_task_{g}\n"
                    f"    was_cancelled_{g} = False\n"
                    f"except asyncio.CancelledError:\n"
                    f"    was_cancelled_{g} = True\n",
                    ("task_cancel",),
                )
            ]
        return [
            Item(
                f"cancel_log_{g} = []\n"
                f"async def slow_part_{g}():\n"
                f"    cancel_log_{g}.append(await Slow({c}, {TIMEOUT_SLEEP}))\n",
                ("task_cancel",),
            ),
            Item(
                f"async with anyio.create_task_group() as cancel_group_{g}:\n"
                f"    cancel_group_{g}.start_soon(slow_part_{g})\n"
                f"    quick_{g} = await Work({c})\n"
                f"    cancel_group_{g}.cancel_scope.cancel()\n",
                ("task_cancel",),
            ),
        ]

    def exc_in_gather(self, g: int) -> Snippet:
        c = self.c()
        if self.aio:
            return [
                Item(
                    f"mixed_{g} = await asyncio.gather(Work({c}), Flaky('value', {c}), Flaky('custom', {c}), "
                    f"return_exceptions=True)\n",
                    ("exc_in_gather",),
                ),
                Item(f"mixed_info_{g} = [type(x).__name__ for x in mixed_{g}]\n", ("exc_in_gather",)),
            ]
        # A failing task cancels its sibling (which would sleep TIMEOUT_SLEEP); the group raises a group.
        return [
            Item(
                f"try:\n"
                f"    async with anyio.create_task_group() as failing_group_{g}:\n"
                f"        failing_group_{g}.start_soon(Slow, {c}, {TIMEOUT_SLEEP})\n"
                f"        failing_group_{g}.start_soon(Flaky, 'custom', {c})\n"
                f"except* Exception as group:\n"
                f"    group_info_{g} = [[type(x).__name__, str(x)] for x in group.exceptions]\n",
                ("exc_in_gather",),
            ),
        ]

    def set_iter(self, g: int) -> Snippet:
        names = self.rng.sample(["alice", "bob", "carol", "dave", "erin", "frank", "grace"], self.c(3, 5))
        literal = "{" + ", ".join(f'"{n}"' for n in sorted(names)) + "}"  # not a set's repr: hash order
        items = [Item(f"names_{g} = {literal}\n", ("set_iter",))]
        if self.rng.random() < 0.5:
            # The loop variable's last value depends on the hash seed: it is deleted in the same item.
            items.append(
                Item(
                    f"greetings_{g} = []\n"
                    f"for name_{g} in names_{g}:\n"
                    f"    greetings_{g}.append(await Greet(name_{g}))\n"
                    f"del name_{g}\n"
                    f"greetings_{g}.sort()\n",
                    ("set_iter",),
                )
            )
        else:
            items.append(
                Item(
                    f"async def greet_all_{g}(names):\n"
                    f"    out = []\n"
                    f"    for n in names:\n"
                    f"        out.append(await Greet(n))\n"
                    f"    return sorted(out)\n",
                    ("set_iter",),
                )
            )
            items.append(Item(f"greetings_{g} = await greet_all_{g}(names_{g})\n", ("set_iter",)))
        items.append(Item(f"print('greeted {g}', len(greetings_{g}))\n", ("set_iter", "print")))
        return items

    def dict_iter(self, g: int) -> Snippet:
        a, b, c = self.c(), self.c(), self.c()
        line, tag = self.maybe_print(f"    print('price', key_{g}, prices_{g}[key_{g}])\n")
        return [
            Item(f"prices_{g} = {{'apple': {a}, 'pear': {b}, 'plum': {c}}}\n", ("dict_iter",)),
            Item(
                f"for key_{g}, val_{g} in prices_{g}.items():\n"
                f"    prices_{g}[key_{g}] = await Work(val_{g})\n{line}",
                ("dict_iter", *tag),
            ),
        ]

    def print(self, g: int) -> Snippet:
        c = self.c()
        return [Item(f"print('note {g}', {c} * 2, 'x' * {c % 5})\n", ("print",))]

    def mutate_list_arg(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(f"bag_{g} = ['start']\n", ("mutate_list_arg",)),
            Item(f"n1_{g} = await Tag(bag_{g}, 't{c}')\n", ("mutate_list_arg",)),
            Item(f"n2_{g} = await Tag(bag_{g}, 'u{c}')\n", ("mutate_list_arg",)),
            Item(f"print('bag {g}', bag_{g}, n1_{g}, n2_{g})\n", ("mutate_list_arg", "print")),
        ]

    def mutate_dict_arg(self, g: int) -> Snippet:
        c = self.c()
        return [
            Item(f"info_{g} = {{'id': {c}}}\n", ("mutate_dict_arg",)),
            Item(f"size_{g} = await Annotate(info_{g}, 'seen')\n", ("mutate_dict_arg",)),
            Item(f"size2_{g} = await Annotate(info_{g}, 'again')\n", ("mutate_dict_arg",)),
        ]

    def nested_executor(self, g: int) -> Snippet:
        c, k = self.c(), self.c(1, 3)
        code = (
            f"p = await Work({c})\n"
            f"print('child {g} says', p)\n"
            f"q = 0\n"
            f"for k in range({k}):\n"
            f"    q += await Work(p % 13 + k)\n"
            f"out = [p, q]\n"
        )
        return [
            Item(f"child_{g} = await RunChild({code!r})\n", ("nested_executor",)),
            Item(f"print('child {g}', child_{g})\n", ("nested_executor", "print")),
        ]


def _interleave(rng: random.Random, snippets: list[Snippet]) -> list[Item]:
    """Merge the snippets' items at random, keeping each snippet's order."""
    queues = [list(s) for s in snippets if s]
    out: list[Item] = []
    while queues:
        q = rng.choice(queues)
        out.append(q.pop(0))
        if not q:
            queues.remove(q)
    return out


def generate(
    seed: int,
    backend: str = "asyncio",
    *,
    features: tuple[str, ...] | None = None,
    min_features: int = 2,
    max_features: int = 5,
) -> Program:
    """The program of ``seed`` for ``backend``: ``min_features``..``max_features`` feature instances
    drawn from ``features`` (default: all the backend supports), interleaved at random."""
    rng = random.Random(f"{backend}:{seed}")
    allowed = features_for(backend)
    pool = tuple(f for f in (features or allowed) if f in allowed)
    if not pool:
        raise ValueError(f"none of {features} runs on {backend}")
    gen = _Gen(rng, backend)
    count = rng.randint(min(min_features, max_features), max_features)
    chosen = [rng.choice(pool) for _ in range(count)]
    snippets = []
    for g, name in enumerate(chosen):
        make: Callable[[int], Snippet] = getattr(gen, name)
        snippets.append(make(g))
    head = Item("import asyncio\n" if backend == "asyncio" else "import anyio\n", ())
    recipe = f"--program-seed {seed}"
    if features:
        recipe += f" --features {','.join(features)}"
    if (min_features, max_features) != (2, 5):
        recipe += f" --min-features {min_features} --max-features {max_features}"
    return Program(backend, [head, *_interleave(rng, snippets)], seed=seed, origin="generated", recipe=recipe)


def program_strategy(backend: str = "asyncio", **options: int) -> Any:
    """A hypothesis strategy of generated programs (shrinks toward small seeds)."""
    from hypothesis import strategies as st

    return st.integers(min_value=0, max_value=2**32 - 1).map(lambda seed: generate(seed, backend, **options))
