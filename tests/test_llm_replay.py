"""Cassettes: ReplayProvider, RecordingProvider, and the public surface of playbooks.llm."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import anyio
import pytest

import playbooks.llm
from playbooks.errors import InterpreterError
from playbooks.llm import (
    Cassette,
    CassetteError,
    Interaction,
    LLMConnectionError,
    LLMError,
    LLMProvider,
    LLMRequest,
    Message,
    OpenAIProvider,
    RecordingProvider,
    ReplayProvider,
    create_llm_provider,
)
from playbooks.llm.base import Usage

pytestmark = pytest.mark.anyio

LONG = "".join(f"result_{i} = await Step('do thing {i}')  # ünïcode 🌍\n" for i in range(40))


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def ask(text: str, system: str = "You write Python.") -> LLMRequest:
    return LLMRequest([Message("system", system), Message("user", text)])


def write_cassette(path: Path, pairs: list[tuple[LLMRequest, str]]) -> Path:
    Cassette([Interaction(request.to_dict(), response) for request, response in pairs]).save(path)
    return path


@pytest.fixture
def cassette(tmp_path: Path) -> Path:
    return write_cassette(
        tmp_path / "c.json",
        [(ask("first"), LONG), (ask("second"), "short answer"), (ask("third"), "")],
    )


async def chunks_of(provider: LLMProvider, request: LLMRequest) -> list[str]:
    return [chunk async for chunk in provider.stream(request)]


# --- replay ----------------------------------------------------------------------------------------


async def test_chunks_join_to_the_exact_text(cassette: Path) -> None:
    provider = ReplayProvider(cassette)
    first = await chunks_of(provider, ask("first"))
    assert "".join(first) == LONG
    assert await provider.complete(ask("second")) == "short answer"
    assert await chunks_of(provider, ask("third")) == []
    assert provider.position == 3
    assert provider.remaining == 0


async def test_chunk_sizes_vary_within_bounds(cassette: Path) -> None:
    chunks = await chunks_of(ReplayProvider(cassette, chunk_size=(2, 9)), ask("first"))
    sizes = [len(chunk) for chunk in chunks]
    assert all(2 <= size <= 9 for size in sizes[:-1])
    assert 1 <= sizes[-1] <= 9
    assert len(set(sizes)) > 3


async def test_chunking_is_deterministic_per_seed(cassette: Path) -> None:
    one = await chunks_of(ReplayProvider(cassette, seed=1), ask("first"))
    again = await chunks_of(ReplayProvider(cassette, seed=1), ask("first"))
    other = await chunks_of(ReplayProvider(cassette, seed=2), ask("first"))
    assert one == again
    assert one != other
    assert "".join(other) == LONG


async def test_fixed_chunk_size(cassette: Path) -> None:
    chunks = await chunks_of(ReplayProvider(cassette, chunk_size=(5, 5)), ask("first"))
    assert all(len(chunk) == 5 for chunk in chunks[:-1])


async def test_delay_between_chunks(cassette: Path) -> None:
    provider = ReplayProvider(cassette, delay=0.001, start_index=1)
    assert await provider.complete(ask("second")) == "short answer"


async def test_in_memory_scripted_cassette() -> None:
    provider = ReplayProvider(Cassette.from_responses(["a = 1\n", "b = 2\n"]), match="none")
    assert await provider.complete(ask("anything")) == "a = 1\n"
    assert await provider.complete(ask("else")) == "b = 2\n"


async def test_running_out_is_a_cassette_error(cassette: Path) -> None:
    provider = ReplayProvider(cassette, start_index=3)
    with pytest.raises(CassetteError) as info:
        await provider.complete(ask("fourth"))
    message = str(info.value)
    assert "ran out" in message
    assert "request #3" in message
    assert "only 3 interactions" in message
    assert "'fourth'" in message
    assert "RecordingProvider" in message
    assert info.value.index == 3
    assert info.value.path == str(cassette)
    assert isinstance(info.value, LLMError) and isinstance(info.value, InterpreterError)


async def test_mismatch_in_sequence_mode_names_both_sides(cassette: Path) -> None:
    provider = ReplayProvider(cassette)
    with pytest.raises(CassetteError) as info:
        await provider.complete(ask("frist"))
    message = str(info.value)
    assert "request #0" in message and "interaction 0" in message
    assert "'first'" in message and "'frist'" in message
    assert "first differ at character 1" in message
    assert "re-)record" in message
    assert provider.position == 0  # a rejected request consumes nothing


async def test_sequence_mode_checks_only_the_last_user_message(cassette: Path) -> None:
    provider = ReplayProvider(cassette)
    assert await provider.complete(ask("first", system="A different system prompt")) == LONG


async def test_strict_mode_compares_every_message(cassette: Path) -> None:
    with pytest.raises(CassetteError, match="message 0 \\(system\\) differs"):
        await ReplayProvider(cassette, match="strict").complete(ask("first", system="Other"))
    longer = LLMRequest([*ask("first").messages, Message("assistant", "x")])
    with pytest.raises(CassetteError, match="3 messages, the recording 2"):
        await ReplayProvider(cassette, match="strict").complete(longer)
    assert await ReplayProvider(cassette, match="strict").complete(ask("first")) == LONG


async def test_match_none_serves_whatever_is_asked(cassette: Path) -> None:
    assert await ReplayProvider(cassette, match="none").complete(ask("unrelated")) == LONG


async def test_start_index_sees_the_same_chunks_as_an_uninterrupted_run(cassette: Path) -> None:
    full = ReplayProvider(cassette, seed=3)
    await full.complete(ask("first"))
    uninterrupted = await chunks_of(full, ask("second"))
    resumed = ReplayProvider(cassette, seed=3, start_index=full.position - 1)
    assert resumed.position == 1
    assert await chunks_of(resumed, ask("second")) == uninterrupted
    assert resumed.position == 2


async def test_seek(cassette: Path) -> None:
    provider = ReplayProvider(cassette)
    provider.seek(2)
    assert await provider.complete(ask("third")) == ""
    provider.seek(0)
    assert await provider.complete(ask("first")) == LONG
    with pytest.raises(ValueError, match="cannot start at interaction 4"):
        provider.seek(4)
    with pytest.raises(ValueError):
        ReplayProvider(cassette, start_index=-1)


def test_invalid_options(cassette: Path) -> None:
    with pytest.raises(ValueError, match="chunk_size"):
        ReplayProvider(cassette, chunk_size=(0, 3))
    with pytest.raises(ValueError, match="chunk_size"):
        ReplayProvider(cassette, chunk_size=(5, 3))
    with pytest.raises(ValueError, match="match"):
        ReplayProvider(cassette, match="fuzzy")  # type: ignore[arg-type]


def test_missing_cassette(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(CassetteError, match="does not exist.*RecordingProvider") as info:
        ReplayProvider(missing)
    assert info.value.path == str(missing)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "not a cassette"),
        ('{"version": 2, "interactions": []}', "version 2"),
        ('{"version": 1, "interactions": [{"request": {}, "response": "x"}]}', "interaction 0 .*messages"),
        (
            '{"version": 1, "interactions": [{"request": {"messages": []}, "response": 3}]}',
            "interaction 0 .*'response' must be a string",
        ),
        (
            '{"version": 1, "interactions": [{"request": {"messages": []}, "response": "x", "usage": 3}]}',
            "interaction 0 .*'usage' must be a JSON object",
        ),
        (
            '{"version": 1, "interactions": [{"request": {"messages": []}, "response": "x", '
            '"usage": {"prompt_tokens": -1, "completion_tokens": 2}}]}',
            r"interaction 0 .*'usage.prompt_tokens' must be a whole number >= 0, got -1",
        ),
        (
            '{"version": 1, "interactions": [{"request": {"messages": []}, "response": "x", '
            '"usage": {"prompt_tokens": 1}}]}',
            r"interaction 0 .*'usage.completion_tokens' must be a whole number >= 0, got None",
        ),
    ],
)
def test_malformed_cassettes(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CassetteError, match=expected):
        ReplayProvider(path)


def test_cassette_file_format(cassette: Path) -> None:
    data = json.loads(cassette.read_text())
    assert data["version"] == 1
    assert data["interactions"][1] == {
        "request": {
            "messages": [
                {"role": "system", "content": "You write Python."},
                {"role": "user", "content": "second"},
            ],
            "model": None,
        },
        "response": "short answer",
    }


# --- recording ------------------------------------------------------------------------------------


class Scripted(LLMProvider):
    """Yields scripted responses word by word; a response that is an exception is raised midway.

    ``usage`` gives, per response, the usage it reports as its stream ends (like an endpoint asked for
    ``stream_options.include_usage``); ``None`` reports none."""

    def __init__(self, *responses: str | Exception, usage: list[Usage | None] | None = None) -> None:
        self.responses = list(responses)
        self.usages = list(usage or [])

    async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
        response = self.responses.pop(0)
        usage = self.usages.pop(0) if self.usages else None
        if isinstance(response, Exception):
            yield "partial "
            raise response
        for word in response.split(" "):
            await anyio.lowlevel.checkpoint()
            yield word + " "
        self.last_usage = usage


async def test_record_then_replay_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    recorder = RecordingProvider(Scripted("alpha beta gamma", "delta"), path)
    first = await recorder.complete(ask("one"))
    assert json.loads(path.read_text())["interactions"][0]["response"] == first  # written after each call
    second = await recorder.complete(ask("two"))
    assert [i.response for i in recorder.interactions] == [first, second]

    replay = ReplayProvider(path, match="strict")
    assert await replay.complete(ask("one")) == first == "alpha beta gamma "
    assert await replay.complete(ask("two")) == second == "delta "


async def test_record_around_a_replay(cassette: Path, tmp_path: Path) -> None:
    copy = tmp_path / "copy.json"
    recorder = RecordingProvider(ReplayProvider(cassette), copy)
    for text in ("first", "second", "third"):
        await recorder.complete(ask(text))
    assert Cassette.load(copy) == Cassette.load(cassette)


async def test_recording_starts_a_fresh_cassette(cassette: Path) -> None:
    RecordingProvider(Scripted(), cassette)
    assert Cassette.load(cassette).interactions == []


async def test_recording_can_append(cassette: Path) -> None:
    recorder = RecordingProvider(Scripted("more"), cassette, append=True)
    await recorder.complete(ask("fourth"))
    replay = ReplayProvider(cassette, start_index=3)
    assert await replay.complete(ask("fourth")) == "more "


async def test_a_failed_stream_is_not_recorded(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    recorder = RecordingProvider(Scripted(LLMConnectionError("lost"), "ok"), path)
    with pytest.raises(LLMConnectionError):
        await recorder.complete(ask("one"))
    await recorder.complete(ask("one"))
    assert [i.response for i in Cassette.load(path).interactions] == ["ok "]


async def test_a_stream_abandoned_early_is_recorded_as_incomplete(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "rec.json"
    recorder = RecordingProvider(Scripted("a b c d"), path)
    chunks = recorder.stream(ask("one"))
    with caplog.at_level(logging.WARNING, logger="playbooks.llm"):
        assert await chunks.__anext__() == "a "
        assert await chunks.__anext__() == "b "
        await chunks.aclose()  # type: ignore[attr-defined]
    [interaction] = Cassette.load(path).interactions
    assert interaction.response == "a b "
    assert interaction.complete is False
    assert json.loads(path.read_text())["interactions"][0]["complete"] is False
    assert "incomplete" in caplog.text


async def test_a_cancelled_stream_is_recorded_as_incomplete(tmp_path: Path) -> None:
    class Slow(LLMProvider):
        async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
            yield "begin "
            await anyio.sleep(10)
            yield "never"

    path = tmp_path / "rec.json"
    recorder = RecordingProvider(Slow(), path)
    received: list[str] = []
    with anyio.move_on_after(0.05):
        async for chunk in recorder.stream(ask("one")):
            received.append(chunk)
    assert received == ["begin "]
    [interaction] = Cassette.load(path).interactions
    assert (interaction.response, interaction.complete) == ("begin ", False)


async def test_overlapping_streams_keep_request_order(tmp_path: Path) -> None:
    class Timed(LLMProvider):
        async def stream(self, request: LLMRequest) -> AsyncIterator[str]:
            text = request.last_user_message() or ""
            await anyio.sleep(0.05 if text == "slow" else 0.0)
            yield text

    path = tmp_path / "rec.json"
    recorder = RecordingProvider(Timed(), path)
    results: dict[str, str] = {}

    async def run(text: str) -> None:
        results[text] = await recorder.complete(ask(text))

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, "slow")
        await anyio.sleep(0.01)
        tg.start_soon(run, "fast")
    assert [i.response for i in Cassette.load(path).interactions] == ["slow", "fast"]


# --- the factory and the public surface ---------------------------------------------------------------


def test_create_llm_provider(cassette: Path, tmp_path: Path) -> None:
    openai = create_llm_provider("openai", base_url="http://127.0.0.1:9/v1", model="m", max_retries=0)
    assert isinstance(openai, OpenAIProvider) and openai.max_retries == 0
    replay = create_llm_provider("replay", cassette_path=cassette, seed=4)
    assert isinstance(replay, ReplayProvider) and replay.seed == 4
    record = create_llm_provider("record", cassette_path=tmp_path / "r.json", base_url="http://127.0.0.1:9/v1")
    assert isinstance(record, RecordingProvider) and isinstance(record.inner, OpenAIProvider)
    inner = ReplayProvider(cassette)
    around = create_llm_provider("record", cassette_path=tmp_path / "r2.json", inner=inner, append=True)
    assert isinstance(around, RecordingProvider) and around.inner is inner


def test_create_llm_provider_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown LLM provider 'nope'.*openai, replay, record"):
        create_llm_provider("nope")
    with pytest.raises(TypeError, match="cassette_path"):
        create_llm_provider("record")
    with pytest.raises(TypeError):
        create_llm_provider("record", cassette_path=tmp_path / "x.json", inner=Scripted(), model="m")


def test_all_is_complete_and_unique() -> None:
    exported = playbooks.llm.__all__
    assert isinstance(exported, tuple)
    assert len(exported) == len(set(exported))
    for name in exported:
        assert hasattr(playbooks.llm, name), name
    public_classes = {
        name
        for name, value in vars(playbooks.llm).items()
        if isinstance(value, type) and not name.startswith("_") and value.__module__.startswith("playbooks.llm")
    }
    assert public_classes <= set(exported)


def test_request_roundtrip() -> None:
    request = LLMRequest([Message("user", "hi")], model="m", temperature=0.5, max_tokens=3, stop=["x"])
    assert LLMRequest.from_dict(request.to_dict()) == request
    data: dict[str, Any] = {"messages": [{"role": "user"}]}
    with pytest.raises(ValueError, match="content"):
        LLMRequest.from_dict(data)


# --- match="request": any order, and a request made again --------------------------------------------


async def test_request_matching_serves_in_any_order(cassette: Path) -> None:
    provider = ReplayProvider(cassette, match="request")
    assert await provider.complete(ask("second")) == "short answer"
    assert await provider.complete(ask("first")) == LONG
    assert await provider.complete(ask("first")) == LONG  # asked again (a resumed run): served again
    assert await provider.complete(ask("third")) == ""


async def test_request_matching_serves_equal_requests_in_recorded_order(tmp_path: Path) -> None:
    path = write_cassette(tmp_path / "c.json", [(ask("same"), "one"), (ask("same"), "two")])
    provider = ReplayProvider(path, match="request")
    assert [await provider.complete(ask("same")) for _ in range(3)] == ["one", "two", "two"]


async def test_request_matching_says_what_differs_and_when_it_ran_out(cassette: Path) -> None:
    provider = ReplayProvider(cassette, match="request")
    with pytest.raises(CassetteError, match=r"no interaction .* was recorded for this request.*differs"):
        await provider.complete(ask("fourth"))
    for text in ("first", "second", "third"):
        await provider.complete(ask(text))
    with pytest.raises(CassetteError, match="ran out: all 3 recorded interactions were served"):
        await provider.complete(ask("fourth"))


# --- token usage ----------------------------------------------------------------------------------


async def test_usage_is_recorded_and_replayed(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    inner = Scripted("alpha beta", "gamma", "delta epsilon", usage=[Usage(812, 95), None, Usage(900, 7)])
    recorder = RecordingProvider(inner, path)
    seen = []
    for text in ("one", "two", "three"):
        await recorder.complete(ask(text))
        seen.append(recorder.last_usage)
    assert seen == [Usage(812, 95), None, Usage(900, 7)]  # the recorder passes the usage on
    recorded = json.loads(path.read_text())["interactions"]
    assert recorded[0]["usage"] == {"prompt_tokens": 812, "completion_tokens": 95}
    assert "usage" not in recorded[1]  # the endpoint reported none: nothing is made up

    replay = ReplayProvider(path, match="strict", chunk_size=(1, 3))
    replayed = []
    for text in ("one", "two", "three"):
        async for _ in replay.stream(ask(text)):
            if not replayed:
                assert replay.last_usage is None  # set as the stream ends, not before
        replayed.append(replay.last_usage)
    assert replayed == seen


async def test_a_stream_abandoned_early_records_and_replays_no_usage(tmp_path: Path) -> None:
    path = tmp_path / "rec.json"
    recorder = RecordingProvider(Scripted("a b c d", usage=[Usage(5, 4)]), path)
    stream = recorder.stream(ask("one"))
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    (interaction,) = Cassette.load(path).interactions
    assert not interaction.complete and interaction.usage is None


async def test_cassettes_without_usage_still_replay(cassette: Path, tmp_path: Path) -> None:
    """A cassette recorded before usage was kept loads and replays, reporting no usage."""
    assert all("usage" not in item for item in json.loads(cassette.read_text())["interactions"])
    replay = ReplayProvider(cassette)
    assert await replay.complete(ask("first")) == LONG
    assert replay.last_usage is None
    old = tmp_path / "old.json"
    old.write_text('{"version": 1, "interactions": [{"request": {"messages": []}, "response": "x", "usage": null}]}')
    assert Cassette.load(old).interactions[0].usage is None


def test_interaction_usage_roundtrips_through_json() -> None:
    interaction = Interaction({"messages": [], "model": None}, "x", usage=Usage(3, 4))
    again = Interaction.from_dict(json.loads(json.dumps(interaction.to_dict())))
    assert again == interaction
