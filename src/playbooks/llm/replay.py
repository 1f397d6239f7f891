"""Cassettes: record real LLM responses once, replay them deterministically in tests and demos.

A cassette is a JSON file::

    {"version": 1,
     "interactions": [{"request": {"messages": [{"role": "user", "content": "..."}], "model": null},
                       "response": "the full text"}, ...]}

An interaction may also say ``"complete": false``: the consumer stopped reading before the recorded
stream ended, so ``response`` holds only the text that had arrived; and ``"usage": {"prompt_tokens": 812,
"completion_tokens": 95}``: the tokens the endpoint reported for it, which replay reports again as
:attr:`~playbooks.llm.LLMProvider.last_usage` (cassettes recorded without it replay with no usage).

:class:`ReplayProvider` serves the interactions in order and streams each response in chunks of random
sizes, which exercises the consumer's chunk handling like a real endpoint would. The chunking of
interaction *k* depends only on the seed and *k*, so a run resumed at interaction *k*
(``start_index``/:meth:`ReplayProvider.seek`, from a saved :attr:`ReplayProvider.position`) sees
exactly the chunks an uninterrupted run saw.

:class:`RecordingProvider` wraps a real provider and rewrites the cassette atomically after every
interaction, so a recording cut short by a crash keeps every interaction finished before it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import tempfile
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import anyio
import anyio.lowlevel
import anyio.to_thread

from playbooks.llm.base import LLMProvider, LLMRequest, Message, Usage
from playbooks.errors import SecretStoredError
from playbooks.llm.errors import CassetteError

if TYPE_CHECKING:
    from playbooks.checkpoints.secrets import Secret

__all__ = ("CASSETTE_VERSION", "Cassette", "Interaction", "MatchMode", "RecordingProvider", "ReplayProvider")

CASSETTE_VERSION = 1

MatchMode = Literal["sequence", "strict", "none", "request"]
_MATCH_MODES: tuple[MatchMode, ...] = ("sequence", "strict", "none", "request")

_logger = logging.getLogger("playbooks.llm")


def _rerecord_hint(path: str) -> str:
    return (
        f"To (re-)record it, run the program once against a real endpoint wrapped in "
        f"RecordingProvider(provider, {path!r}) (or create_llm_provider('record', cassette_path={path!r}, ...)), "
        f"which writes the cassette anew."
    )


@dataclass(slots=True)
class Interaction:
    """One recorded request (as :meth:`LLMRequest.to_dict` data), the text streamed in response, and
    the token usage the endpoint reported for it (``None``: it reported none, or the cassette predates
    usage)."""

    request: dict[str, Any]
    response: str
    complete: bool = True
    usage: Usage | None = None

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"request": self.request, "response": self.response}
        if not self.complete:
            data["complete"] = False
        if self.usage is not None:
            data["usage"] = {
                "prompt_tokens": self.usage.prompt_tokens,
                "completion_tokens": self.usage.completion_tokens,
            }
        return data

    @classmethod
    def from_dict(cls, data: Any) -> Interaction:
        """Validate and build an interaction; raise ``ValueError`` saying what is wrong."""
        if not isinstance(data, dict):
            raise ValueError("an interaction must be a JSON object")
        request = data.get("request")
        if not isinstance(request, dict):
            raise ValueError("'request' must be a JSON object")
        LLMRequest.from_dict(request)  # validates the messages
        response = data.get("response")
        if not isinstance(response, str):
            raise ValueError("'response' must be a string")
        complete = data.get("complete", True)
        if not isinstance(complete, bool):
            raise ValueError("'complete' must be true or false")
        return cls(request, response, complete, _usage_from(data.get("usage")))

    def messages(self) -> list[Message]:
        return [Message.from_dict(message) for message in self.request.get("messages", [])]


def _usage_from(data: Any) -> Usage | None:
    """The ``usage`` of an interaction (absent or ``null``: ``None``); ``ValueError`` if malformed."""
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError("'usage' must be a JSON object with prompt_tokens and completion_tokens")
    counts = []
    for key in ("prompt_tokens", "completion_tokens"):
        value = data.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"'usage.{key}' must be a whole number >= 0, got {value!r}")
        counts.append(value)
    return Usage(counts[0], counts[1])


@dataclass(slots=True)
class Cassette:
    """The interactions of a cassette file, in the order they were requested."""

    interactions: list[Interaction] = field(default_factory=list)

    @classmethod
    def from_responses(cls, responses: Iterable[str]) -> Cassette:
        """A scripted cassette: these responses, with empty requests (replay it with ``match="none"``)."""
        return cls([Interaction({"messages": [], "model": None}, text) for text in responses])

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Cassette:
        """Read and validate a cassette file; raise :class:`CassetteError` saying what is wrong."""
        where = os.fspath(path)
        try:
            text = Path(where).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise CassetteError(f"cassette {where!r} does not exist. {_rerecord_hint(where)}", path=where) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise CassetteError(f"cannot read cassette {where!r}: {exc}", path=where) from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CassetteError(
                f"cassette {where!r} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}). "
                f"{_rerecord_hint(where)}",
                path=where,
            ) from exc
        except RecursionError:
            raise CassetteError(f"cassette {where!r} is nested too deeply to be a cassette", path=where) from None
        if not isinstance(data, dict) or not isinstance(data.get("interactions"), list):
            raise CassetteError(
                f"cassette {where!r} is not a cassette: expected an object with 'version' and 'interactions'",
                path=where,
            )
        if data.get("version") != CASSETTE_VERSION:
            raise CassetteError(
                f"cassette {where!r} has version {data.get('version')!r}; this playbooks reads version "
                f"{CASSETTE_VERSION}. {_rerecord_hint(where)}",
                path=where,
            )
        interactions = []
        for index, item in enumerate(data["interactions"]):
            try:
                interactions.append(Interaction.from_dict(item))
            except ValueError as exc:
                raise CassetteError(
                    f"interaction {index} of cassette {where!r} is malformed: {exc}", path=where, index=index
                ) from exc
        return cls(interactions)

    def to_json(self) -> str:
        data = {"version": CASSETTE_VERSION, "interactions": [i.to_dict() for i in self.interactions]}
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the cassette atomically (temporary file, fsync, rename, fsync of the folder)."""
        _atomic_write(Path(path), self.to_json().encode("utf-8"))


def _atomic_write(path: Path, data: bytes) -> None:
    directory = path.parent if str(path.parent) else Path(".")
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
    except OSError as exc:
        raise CassetteError(f"cannot write cassette {str(path)!r}: {exc}", path=str(path)) from exc
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # no directory handles on this platform
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _show(text: str | None, limit: int = 200) -> str:
    if text is None:
        return "(no user message)"
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def _first_difference(expected: str, got: str) -> str:
    """Describe where two texts first differ, showing a little context on both sides."""
    at = next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    start = max(0, at - 40)
    return (
        f"they first differ at character {at}:\n"
        f"  expected: ...{expected[start : at + 60]!r}\n"
        f"  got:      ...{got[start : at + 60]!r}"
    )


class ReplayProvider(LLMProvider):
    """Serve the responses of a cassette, in order, as realistically chunked streams.

    ``cassette_path`` is a cassette file or an in-memory :class:`Cassette`. Each response is cut into
    chunks of ``chunk_size[0]`` to ``chunk_size[1]`` characters chosen by a generator seeded with
    ``seed`` and the interaction's index; ``delay`` seconds pass before each chunk.

    ``match`` says how a request is checked against the interaction it receives: ``"sequence"``
    compares the last user message, ``"strict"`` every message (roles and contents), ``"none"``
    nothing. ``"request"`` does not serve in order: a request gets the first interaction not served
    yet whose recorded request is the same (every message), else one already served (a request made
    again, as a resumed run does for the response a crash cut off); so agents that call the LLM
    concurrently replay whatever order their requests come in. A request the cassette cannot serve
    raises :class:`CassetteError`.

    ``start_index`` (or :meth:`seek`) makes the next request receive that interaction: a resumed run
    passes the :attr:`position` it saved so it does not consume interactions twice.
    """

    def __init__(
        self,
        cassette_path: str | os.PathLike[str] | Cassette,
        *,
        chunk_size: tuple[int, int] = (1, 12),
        seed: int = 0,
        match: MatchMode = "sequence",
        delay: float = 0.0,
        start_index: int = 0,
    ) -> None:
        low, high = chunk_size
        if not 1 <= low <= high:
            raise ValueError(f"chunk_size must be (low, high) with 1 <= low <= high, got {chunk_size!r}")
        if match not in _MATCH_MODES:
            raise ValueError(f"match must be one of {_MATCH_MODES}, got {match!r}")
        if delay < 0:
            raise ValueError(f"delay must be >= 0, got {delay}")
        if isinstance(cassette_path, Cassette):
            self.cassette = cassette_path
            self.path = "<in-memory cassette>"
        else:
            self.path = os.fspath(cassette_path)
            self.cassette = Cassette.load(self.path)
        self.chunk_size = (low, high)
        self.seed = seed
        self.match: MatchMode = match
        self.delay = delay
        self._position = 0
        self._served: set[int] = set()
        self.seek(start_index)

    def __repr__(self) -> str:
        return f"ReplayProvider({self.path!r}, position={self._position}/{len(self.cassette.interactions)})"

    @property
    def position(self) -> int:
        """The index of the interaction the next request receives (= requests served so far)."""
        return self._position

    @property
    def remaining(self) -> int:
        """How many interactions have not been served yet."""
        return len(self.cassette.interactions) - self._position

    def seek(self, index: int) -> None:
        """Make the next request receive interaction ``index`` (``0 <= index <= len(interactions)``)."""
        if not 0 <= index <= len(self.cassette.interactions):
            raise ValueError(
                f"cannot start at interaction {index}: cassette {self.path!r} has "
                f"{len(self.cassette.interactions)} interactions"
            )
        self._position = index

    def _find(self, request: LLMRequest) -> tuple[int, Interaction]:
        """``match="request"``: the interaction recorded for this very request."""
        interactions = self.cassette.interactions
        same = [
            i for i, interaction in enumerate(interactions)
            if [m.to_dict() for m in interaction.messages()] == [m.to_dict() for m in request.messages]
        ]
        fresh = [i for i in same if i not in self._served]
        if not same and len(self._served) >= len(interactions):
            raise CassetteError(
                f"cassette {self.path!r} ran out: all {len(interactions)} recorded interactions were served "
                f"and another request was made; its last user message is {_show(request.last_user_message())}. "
                f"The program makes more LLM calls than when the cassette was recorded. "
                f"{_rerecord_hint(self.path)}",
                path=self.path,
                index=len(interactions),
            )
        if not same:
            nearest = min(len(interactions) - 1, self._position)
            detail = (
                self._mismatch_strict(interactions[nearest], request) if interactions else "the cassette is empty"
            )
            raise CassetteError(
                f"no interaction of cassette {self.path!r} was recorded for this request (match='request'); "
                f"compared with interaction {nearest}: {detail}\nThe program asks something else than when "
                f"the cassette was recorded. {_rerecord_hint(self.path)}",
                path=self.path,
                index=nearest,
            )
        index = fresh[0] if fresh else same[-1]
        self._served.add(index)
        self._position = max(self._position, index + 1)
        return index, interactions[index]

    def _take(self, request: LLMRequest) -> tuple[int, Interaction]:
        """Check ``request`` against the next interaction and consume it."""
        if self.match == "request":
            return self._find(request)
        index = self._position
        interactions = self.cassette.interactions
        if index >= len(interactions):
            raise CassetteError(
                f"cassette {self.path!r} ran out: request #{index} (0-based) was made but only "
                f"{len(interactions)} interactions were recorded; its last user message is "
                f"{_show(request.last_user_message())}. The program makes more LLM calls than when the "
                f"cassette was recorded. {_rerecord_hint(self.path)}",
                path=self.path,
                index=index,
            )
        interaction = interactions[index]
        problem = self._mismatch(interaction, request)
        if problem is not None:
            raise CassetteError(
                f"request #{index} (0-based) does not match interaction {index} of cassette {self.path!r} "
                f"(match={self.match!r}): {problem}\nThe program asks something else than when the "
                f"cassette was recorded. {_rerecord_hint(self.path)} Or replay with match='none' to serve "
                f"the recorded responses whatever is asked.",
                path=self.path,
                index=index,
            )
        self._position = index + 1
        return index, interaction

    def _mismatch(self, interaction: Interaction, request: LLMRequest) -> str | None:
        if self.match == "none":
            return None
        recorded = interaction.messages()
        if self.match == "sequence":
            expected = LLMRequest(recorded).last_user_message()
            got = request.last_user_message()
            if expected == got:
                return None
            if expected is None or got is None:
                return f"the last user message differs:\n  expected: {_show(expected)}\n  got:      {_show(got)}"
            return "the last user message differs; " + _first_difference(expected, got)
        return self._mismatch_strict(interaction, request)

    def _mismatch_strict(self, interaction: Interaction, request: LLMRequest) -> str | None:
        recorded = interaction.messages()
        for number, (want, have) in enumerate(zip(recorded, request.messages)):
            if want.role != have.role:
                return f"message {number} has role {have.role!r}, the recording has {want.role!r}"
            if want.content != have.content:
                return f"message {number} ({have.role}) differs; " + _first_difference(want.content, have.content)
        if len(recorded) != len(request.messages):
            return f"the request has {len(request.messages)} messages, the recording {len(recorded)}"
        return None

    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        """Stream the response of the interaction ``request`` receives; once it has been read to its
        end, :attr:`last_usage` is the usage recorded with it (``None`` if none was)."""
        index, interaction = self._take(request)
        chunks = random.Random(f"{self.seed}:{index}")
        low, high = self.chunk_size
        text = interaction.response
        start = 0
        while start < len(text):
            end = start + chunks.randint(low, high)
            if self.delay:
                await anyio.sleep(self.delay)
            else:
                await anyio.lowlevel.checkpoint()
            yield text[start:end]
            start = end
        self.last_usage = interaction.usage  # last, with no await after it: the consumer reads it next


class _Dropped:
    """Marks a reserved cassette slot whose stream failed (nothing to record)."""


_DROPPED = _Dropped()


class RecordingProvider(LLMProvider):
    """Pass requests to ``inner`` and record each streamed response into a cassette.

    The cassette file is rewritten atomically after every interaction. Interactions keep the order in
    which their requests were made, also when streams overlap. A stream the inner provider fails is
    not recorded (the error propagates); a stream the consumer stops reading early is recorded with
    the text received so far and ``"complete": false``. The usage the inner provider reports for a
    complete stream is recorded with it.

    With ``append=False`` (the default) an existing cassette is replaced; with ``append=True`` new
    interactions are added after the recorded ones, for a recording run resumed after a crash.
    """

    def __init__(
        self,
        inner: LLMProvider,
        cassette_path: str | os.PathLike[str],
        *,
        append: bool = False,
        secrets: Iterable[Secret] = (),
    ) -> None:
        self.inner = inner
        self.secrets = tuple(secrets)
        """Values no interaction may hold (an API key the code printed): such an interaction is not
        recorded and the stream raises :class:`~playbooks.errors.SecretStoredError`."""
        self.path = os.fspath(cassette_path)
        self._slots: list[Interaction | _Dropped | None] = []
        if append and Path(self.path).exists():
            self._slots.extend(Cassette.load(self.path).interactions)
        self._write_lock = threading.Lock()
        self._generation = 0
        self._written_generation = 0
        Cassette(self.interactions).save(self.path)

    def __repr__(self) -> str:
        return f"RecordingProvider({self.inner!r}, {self.path!r})"

    @property
    def interactions(self) -> list[Interaction]:
        """The interactions recorded so far, in request order (streams still running are left out)."""
        return [slot for slot in self._slots if isinstance(slot, Interaction)]

    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        slot = len(self._slots)
        self._slots.append(None)
        received: list[str] = []
        outcome = "failed"
        usage: Usage | None = None
        inner = self.inner.stream(request)
        try:
            async for chunk in inner:
                received.append(chunk)
                yield chunk
            outcome = "complete"
            usage = self.inner.last_usage  # read at once: the inner provider sets it as its stream ends
        except BaseException as exc:
            # An Exception comes from the inner provider: nothing to record. GeneratorExit or a
            # cancellation means the consumer stopped reading: keep what it saw.
            if not isinstance(exc, Exception):
                outcome = "partial"
            raise
        finally:
            with anyio.CancelScope(shield=True):
                aclose = getattr(inner, "aclose", None)
                if aclose is not None:
                    await aclose()
                if outcome == "failed":
                    self._slots[slot] = _DROPPED
                else:
                    interaction = Interaction(request.to_dict(), "".join(received), outcome == "complete", usage)
                    from playbooks.checkpoints.secrets import check_secrets

                    try:
                        check_secrets(
                            Cassette([interaction]).to_json().encode("utf-8"), self.secrets,
                            f"interaction {slot} of cassette {self.path!r}",
                        )
                    except SecretStoredError:
                        self._slots[slot] = _DROPPED
                        raise
                    self._slots[slot] = interaction
                    if outcome == "partial":
                        _logger.warning(
                            "recorded interaction %d of cassette %r as incomplete: the stream was not read "
                            "to its end (%d characters received)",
                            slot,
                            self.path,
                            sum(map(len, received)),
                        )
                    await self._save()
        self.last_usage = usage  # after the last await: the consumer reads it next

    async def _save(self) -> None:
        self._generation += 1
        generation = self._generation
        data = Cassette(self.interactions).to_json().encode("utf-8")
        await anyio.to_thread.run_sync(self._write, generation, data)

    def _write(self, generation: int, data: bytes) -> None:
        # Writes run in worker threads; never let an older state overwrite a newer one.
        with self._write_lock:
            if generation <= self._written_generation:
                return
            _atomic_write(Path(self.path), data)
            self._written_generation = generation
