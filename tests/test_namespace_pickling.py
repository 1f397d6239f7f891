"""Per-variable namespace pickling: what survives, what is referred to, what is reused, what is skipped."""

from __future__ import annotations

import pickle
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from playbooks.checkpoints.namespace import NamespaceEncoder, UnrestoredValue, decode_namespace
from playbooks.errors import UnpicklableValueError, UnrestoredValueError

LLM_CODE = """
import json
count = 3
first, *others = [1, 2, 3]
if (size := len(others)) > 1:
    pass

def add(x):
    return x + count

def fact(n):
    return 1 if n <= 1 else n * fact(n - 1)

def make_counter(start):
    state = [start]
    def bump():
        state[0] += 1
        return state[0]
    return bump

counter = make_counter(10)
square = lambda v: v * v

async def helper(x):
    return await Work(x) + count

class Point:
    def __init__(self, x, y):
        self.x, self.y = x, y
    def norm2(self):
        return square(self.x) + square(self.y)

p = Point(3, 4)
alias = Work
tools = [Work]
g = globals()
"""


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _work(x: int) -> int:
    return x


def _llm_namespace() -> tuple[dict[str, Any], dict[str, Any]]:
    bound = {"Work": _work}
    namespace: dict[str, Any] = {"__name__": "__llm__", "Work": _work}
    exec(LLM_CODE, namespace)
    return namespace, bound


def _round_trip(namespace: dict[str, Any], bound: dict[str, Any], new_bound: dict[str, Any]) -> dict[str, Any]:
    encoded = NamespaceEncoder().encode(namespace, bound=bound)
    assert "Work" not in encoded.blobs and "__builtins__" not in encoded.blobs
    blobs = {k: b.data for k, b in encoded.blobs.items()}
    target: dict[str, Any] = {"__name__": "__llm__", **new_bound}
    decode_namespace({k: v for k, v in blobs.items() if v is not None}, target, bound=new_bound)
    return target


def test_values_functions_classes_and_references_survive() -> None:
    namespace, bound = _llm_namespace()

    def new_work(x: int) -> int:
        return -x

    target = _round_trip(namespace, bound, {"Work": new_work})
    assert target["json"] is __import__("json")
    assert (target["first"], target["others"], target["size"]) == (1, [2, 3], 2)
    assert target["add"](1) == 4
    target["count"] = 100  # restored functions read the live namespace, not a private copy
    assert target["add"](1) == 101
    assert target["add"].__globals__ is target
    assert target["fact"](5) == 120
    assert target["counter"]() == 11 and target["counter"]() == 12
    assert target["p"].norm2() == 25 and type(target["p"]).__name__ == "Point"
    assert target["alias"] is new_work and target["tools"] == [new_work]  # bound again, not stored
    assert target["g"] is target


@pytest.mark.anyio
async def test_restored_async_helper_calls_the_new_tool() -> None:
    namespace, bound = _llm_namespace()

    async def new_work(x: int) -> int:
        return x * 1000

    target = _round_trip(namespace, bound, {"Work": new_work})
    assert await target["helper"](2) == 2000 + 3


def test_restore_in_a_separate_process(tmp_path: Path) -> None:
    namespace, bound = _llm_namespace()
    encoded = NamespaceEncoder().encode(namespace, bound=bound)
    path = tmp_path / "blobs.pkl"
    path.write_bytes(pickle.dumps({k: b.data for k, b in encoded.blobs.items()}))
    code = (
        "import pickle, sys\n"
        "from playbooks.checkpoints.namespace import decode_namespace\n"
        f"blobs = pickle.loads(open({str(path)!r}, 'rb').read())\n"
        "target = {'__name__': '__llm__'}\n"
        "decode_namespace(blobs, target, bound={'Work': lambda x: x + 1})\n"
        "print(target['add'](1), target['fact'](4), target['p'].norm2(), target['square'](5), target['alias'](1))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["4", "24", "25", "25", "2"]


def test_unpicklable_values_skip_with_a_placeholder_that_explains(tmp_path: Path) -> None:
    handle = open(tmp_path / "out.txt", "w")
    namespace: dict[str, Any] = {
        "__name__": "__llm__",
        "handle": handle,
        "lock": threading.Lock(),
        "gen": (i for i in range(3)),
        "kept": [1, 2],
    }
    try:
        encoded = NamespaceEncoder(policy="skip").encode(namespace)
    finally:
        handle.close()
    assert {s.name for s in encoded.skipped} == {"handle", "lock", "gen"}
    target: dict[str, Any] = {}
    decode_namespace({k: b.data for k, b in encoded.blobs.items() if b.data is not None}, target)
    assert target["kept"] == [1, 2]
    placeholder = target["handle"]
    assert isinstance(placeholder, UnrestoredValue)
    for use in (
        lambda: placeholder.write("x"),
        lambda: placeholder(),
        lambda: list(placeholder),
        lambda: bool(placeholder),
        lambda: placeholder + 1,
        lambda: placeholder == 1,
        lambda: str(placeholder),
        lambda: placeholder[0],
    ):
        with pytest.raises(UnrestoredValueError, match=r"'handle' \(_io.TextIOWrapper\).*could not be saved"):
            use()
    assert "unrestored 'handle'" in repr(placeholder)
    again = pickle.loads(pickle.dumps(placeholder))  # stays a placeholder through later snapshots
    with pytest.raises(UnrestoredValueError):
        again.anything


def test_strict_policy_names_the_variable_and_type() -> None:
    with pytest.raises(UnpicklableValueError, match=r"'lock' \(_thread.lock\)"):
        NamespaceEncoder(policy="strict").encode({"lock": threading.Lock()})


def test_unchanged_values_are_references_after_commit() -> None:
    namespace: dict[str, Any] = {
        "text": "y" * 1_000_000,
        "rows": list(range(100_000)),
        "small": 1,
    }
    encoder = NamespaceEncoder()
    first = encoder.encode(namespace)
    assert first.new_bytes() == first.total_size() > 1_000_000
    encoder.commit(first, 5)
    second = encoder.encode(namespace)
    assert second.blobs["text"].data is None and second.blobs["text"].host == 5
    assert second.blobs["rows"].data is None and second.blobs["rows"].host == 5
    assert second.new_bytes() < 100  # only the small value is inline again
    namespace["rows"].append(1)
    del namespace["small"]
    third = encoder.encode(namespace)
    assert third.blobs["rows"].data is not None and "small" not in third.blobs
    assert third.blobs["text"].host == 5
    assert [name for name, _ in third.largest(2)] == ["text", "rows"]


def test_seed_makes_the_first_snapshot_after_a_resume_reuse() -> None:
    namespace: dict[str, Any] = {"text": "z" * 100_000}
    encoder = NamespaceEncoder()
    encoded = encoder.encode(namespace)
    resumed = NamespaceEncoder()
    resumed.seed(encoded.blobs, {"text": namespace["text"]}, counter_of_inline=7)
    again = resumed.encode(namespace)
    assert again.blobs["text"].data is None and again.blobs["text"].host == 7


def test_a_variable_that_cannot_be_unpickled_becomes_a_placeholder(tmp_path: Path) -> None:
    module = tmp_path / "vanishing_mod.py"
    module.write_text("class Thing:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    try:
        import vanishing_mod  # type: ignore[import-not-found]

        data = pickle.dumps(vanishing_mod.Thing())
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("vanishing_mod", None)
    module.unlink()
    target: dict[str, Any] = {}
    decode_namespace({"thing": data, "ok": pickle.dumps(3)}, target)
    assert target["ok"] == 3
    with pytest.raises(UnrestoredValueError, match="could not be unpickled"):
        target["thing"].attr
