"""OpenAIProvider against a real local HTTP server speaking the OpenAI streaming protocol."""

from __future__ import annotations

import base64
import email.utils
import logging
import random
import shutil
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from llm_server import (
    FakeOpenAIServer,
    TunnelProxy,
    closed_port,
    drop_after,
    json_completion,
    raw_events,
    stall,
    status,
    stream,
)

from playbooks.llm._http import parse_url, proxy_for
from playbooks.llm import (
    LLMConnectionError,
    LLMError,
    LLMRateLimitError,
    LLMRequest,
    LLMResponseError,
    Message,
    OpenAIProvider,
    RecordingProvider,
    ReplayProvider,
)
from playbooks.llm._sse import SSEDecoder, SSEEvent
from playbooks.llm.openai import _retry_after

pytestmark = pytest.mark.anyio

REQUEST = LLMRequest(
    [Message("system", "You write Python."), Message("user", "Say hello")],
    temperature=0.0,
    max_tokens=64,
    stop=["<END>"],
)
PIECES = ["Hel", "lo", ", wörld 🌍", "\n", "x = 1\n", "print(x)\r\n"]


@pytest.fixture(params=["asyncio", "trio"])
def anyio_backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer() as srv:
        yield srv


def provider_for(server: FakeOpenAIServer, **kwargs: object) -> OpenAIProvider:
    options: dict[str, object] = {"max_retries": 3, "backoff_base": 0.01, "timeout": 5.0}
    options.update(kwargs)
    return OpenAIProvider(server.base_url, "test-model", "sk-test", **options)  # type: ignore[arg-type]


async def collect(chunks: AsyncIterator[str], into: list[str] | None = None) -> list[str]:
    received = into if into is not None else []
    async for chunk in chunks:
        received.append(chunk)
    return received


# --- the happy path --------------------------------------------------------------------------------


async def test_streamed_text_equals_scripted_text(server: FakeOpenAIServer) -> None:
    server.script(stream(PIECES))
    chunks = await collect(provider_for(server).stream(REQUEST))
    assert chunks == PIECES
    assert len(server.requests) == 1


async def test_request_body_and_headers(server: FakeOpenAIServer) -> None:
    server.script(stream(PIECES))
    await provider_for(server).complete(REQUEST)
    [seen] = server.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == "Bearer sk-test"
    assert seen.headers["content-type"] == "application/json"
    assert seen.headers["accept"] == "text/event-stream"
    assert seen.body == {
        "model": "test-model",
        "messages": [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "Say hello"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0.0,
        "max_tokens": 64,
        "stop": ["<END>"],
    }


async def test_request_model_overrides_provider_model(server: FakeOpenAIServer) -> None:
    request = LLMRequest([Message("user", "hi")], model="other-model")
    await provider_for(server).complete(request)
    assert server.requests[0].body["model"] == "other-model"
    assert "temperature" not in server.requests[0].body


@pytest.mark.parametrize("split", [1, 2, 3, 7])
async def test_body_cut_anywhere_gives_the_same_text(server: FakeOpenAIServer, split: int) -> None:
    # Chunk boundaries fall inside UTF-8 characters, SSE lines and the CRLF of the chunked framing.
    server.script(stream(PIECES, split=split))
    assert await provider_for(server).complete(REQUEST) == "".join(PIECES)


async def test_complete_joins_the_stream(server: FakeOpenAIServer) -> None:
    server.script(stream(PIECES))
    assert await provider_for(server).complete(REQUEST) == "".join(PIECES)


async def test_stream_without_done_after_finish_reason_is_complete(server: FakeOpenAIServer) -> None:
    server.script(
        raw_events(
            [
                '{"choices":[{"delta":{"content":"a"}}]}',
                '{"choices":[{"delta":{"content":"b"},"finish_reason":"stop"}]}',
            ]
        )
    )
    assert await provider_for(server).complete(REQUEST) == "ab"


async def test_usage_chunk_and_role_delta_are_skipped(server: FakeOpenAIServer) -> None:
    server.script(
        raw_events(
            [
                '{"choices":[{"delta":{"role":"assistant","content":null}}]}',
                '{"choices":[{"delta":{"content":"x"}}]}',
                '{"choices":[],"usage":{"total_tokens":3}}',
                "[DONE]",
            ]
        )
    )
    assert await provider_for(server).complete(REQUEST) == "x"


async def test_non_streamed_json_answer_is_accepted(server: FakeOpenAIServer) -> None:
    server.script(json_completion("whole answer"))
    assert await collect(provider_for(server).stream(REQUEST)) == ["whole answer"]


async def test_breaking_out_early_closes_the_connection(server: FakeOpenAIServer) -> None:
    server.script(stream(["a", "b", "c"]))
    chunks = provider_for(server).stream(REQUEST)
    async for chunk in chunks:
        assert chunk == "a"
        break
    await chunks.aclose()  # type: ignore[attr-defined]
    server.script(stream(["next"]))
    assert await provider_for(server).complete(REQUEST) == "next"


# --- retries -------------------------------------------------------------------------------------


async def test_429_is_retried_then_succeeds(server: FakeOpenAIServer, caplog: pytest.LogCaptureFixture) -> None:
    limited = status(429, {"error": {"message": "Rate limit reached"}}, {"Retry-After": "0"})
    server.script(limited, limited, stream(PIECES))
    with caplog.at_level(logging.WARNING, logger="playbooks.llm"):
        assert await provider_for(server).complete(REQUEST) == "".join(PIECES)
    assert len(server.requests) == 3
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2
    assert "Rate limit reached" in retries[0].getMessage()


async def test_retry_after_is_honoured(server: FakeOpenAIServer) -> None:
    server.script(status(429, {}, {"Retry-After": "0.3"}), stream(["ok"]))
    started = time.monotonic()
    assert await provider_for(server).complete(REQUEST) == "ok"
    assert time.monotonic() - started >= 0.3
    assert len(server.requests) == 2


async def test_retry_after_ms_is_honoured(server: FakeOpenAIServer) -> None:
    server.script(status(429, {}, {"retry-after-ms": "200", "Retry-After": "100"}), stream(["ok"]))
    started = time.monotonic()
    assert await provider_for(server).complete(REQUEST) == "ok"
    assert time.monotonic() - started >= 0.2


async def test_retry_after_longer_than_backoff_max_is_not_waited(server: FakeOpenAIServer) -> None:
    server.script(status(429, {"error": {"message": "slow down"}}, {"Retry-After": "120"}), stream(["ok"]))
    with pytest.raises(LLMRateLimitError) as info:
        await provider_for(server, backoff_max=5.0).complete(REQUEST)
    assert info.value.retry_after == 120
    assert info.value.status == 429
    assert "slow down" in str(info.value)
    assert len(server.requests) == 1


async def test_429_until_retries_run_out(server: FakeOpenAIServer) -> None:
    server.script(status(429, {"error": {"message": "quota"}}, {"Retry-After": "0"}))
    with pytest.raises(LLMRateLimitError, match="gave up after 4 attempts") as info:
        await provider_for(server).complete(REQUEST)
    assert "quota" in str(info.value)
    assert len(server.requests) == 4


@pytest.mark.parametrize("code", [500, 502, 503, 504])
async def test_server_errors_are_retried(server: FakeOpenAIServer, code: int) -> None:
    server.script(status(code, {"error": {"message": "boom"}}), stream(["fine"]))
    assert await provider_for(server).complete(REQUEST) == "fine"
    assert len(server.requests) == 2


async def test_server_error_until_retries_run_out(server: FakeOpenAIServer) -> None:
    server.script(status(500, b"Internal Server Error"))
    with pytest.raises(LLMResponseError, match="HTTP 500.*Internal Server Error.*gave up after 3") as info:
        await provider_for(server, max_retries=2).complete(REQUEST)
    assert info.value.status == 500
    assert len(server.requests) == 3


async def test_401_fails_at_once_with_the_server_message(server: FakeOpenAIServer) -> None:
    body = {"error": {"message": "Incorrect API key provided: sk-test.", "type": "invalid_request_error"}}
    server.script(status(401, body))
    started = time.monotonic()
    with pytest.raises(LLMResponseError, match="HTTP 401.*Incorrect API key provided") as info:
        await provider_for(server, backoff_base=1.0).complete(REQUEST)
    assert time.monotonic() - started < 1.0
    assert info.value.status == 401
    assert "invalid_request_error" in info.value.body
    assert not isinstance(info.value, LLMRateLimitError)
    assert len(server.requests) == 1


async def test_drop_before_first_text_is_retried(server: FakeOpenAIServer) -> None:
    server.script(drop_after([]), stream(["again"]))
    assert await provider_for(server).complete(REQUEST) == "again"
    assert len(server.requests) == 2


async def test_no_retry_after_the_first_chunk(server: FakeOpenAIServer) -> None:
    server.script(drop_after(["Hello", " world"]), stream(["never"]))
    received: list[str] = []
    with pytest.raises(LLMConnectionError, match="after 11 characters") as info:
        await collect(provider_for(server).stream(REQUEST), received)
    assert received == ["Hello", " world"]
    assert info.value.received_chars == 11
    assert "not retried" in str(info.value)
    assert len(server.requests) == 1


async def test_endpoint_down_raises_after_retries() -> None:
    port = closed_port()
    provider = OpenAIProvider(f"http://127.0.0.1:{port}/v1", "m", max_retries=2, backoff_base=0.01)
    with pytest.raises(LLMConnectionError) as info:
        await provider.complete(REQUEST)
    message = str(info.value)
    assert f"http://127.0.0.1:{port}/v1/chat/completions" in message
    assert "cannot connect" in message
    assert "gave up after 3 attempts" in message


async def test_read_timeout_is_a_connection_error(server: FakeOpenAIServer) -> None:
    server.script(stall())
    with pytest.raises(LLMConnectionError, match="read timeout.*gave up after 2 attempts"):
        await provider_for(server, timeout=0.2, max_retries=1).complete(REQUEST)
    assert len(server.requests) == 2


async def test_malformed_event_is_a_response_error(server: FakeOpenAIServer) -> None:
    server.script(raw_events(['{"choices":[{"delta":{"content":"a"}}]}', "{not json"]))
    with pytest.raises(LLMResponseError, match="not JSON") as info:
        await provider_for(server).complete(REQUEST)
    assert "{not json" in info.value.body


async def test_error_event_in_the_stream(server: FakeOpenAIServer) -> None:
    server.script(raw_events(['{"error":{"message":"model overloaded"}}']))
    with pytest.raises(LLMResponseError, match="model overloaded"):
        await provider_for(server).complete(REQUEST)
    assert len(server.requests) == 1


# --- configuration -----------------------------------------------------------------------------------


async def test_configuration_from_the_environment(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url + "/")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-env")
    monkeypatch.setenv("PLAYBOOKS_MODEL", "env-model")
    provider = OpenAIProvider()
    assert provider.url == server.base_url + "/chat/completions"
    await provider.complete(REQUEST)
    assert server.requests[0].headers["authorization"] == "Bearer sk-env"
    assert server.requests[0].body["model"] == "env-model"
    assert "sk-env" not in repr(provider)


async def test_no_api_key_sends_no_authorization(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    await OpenAIProvider(server.base_url, "m").complete(REQUEST)
    assert "authorization" not in server.requests[0].headers


async def test_missing_model_is_a_clear_error(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PLAYBOOKS_MODEL", raising=False)
    with pytest.raises(LLMError, match="PLAYBOOKS_MODEL"):
        await OpenAIProvider(server.base_url).complete(REQUEST)
    assert server.requests == []


def test_invalid_configuration() -> None:
    with pytest.raises(ValueError, match="http"):
        OpenAIProvider("ftp://example.com/v1", "m")
    with pytest.raises(ValueError, match="max_retries"):
        OpenAIProvider("http://127.0.0.1/v1", "m", max_retries=-1)
    with pytest.raises(ValueError, match="Authorization"):
        OpenAIProvider("http://127.0.0.1/v1", "m", api_key="sk-1\r\nX-Injected: 1")
    with pytest.raises(ValueError, match="X-Bad"):
        OpenAIProvider("http://127.0.0.1/v1", "m", headers={"X-Bad": "a\nb"})


async def test_record_then_replay_a_real_stream(server: FakeOpenAIServer, tmp_path: Path) -> None:
    server.script(stream(PIECES), stream(["second answer"]))
    cassette = tmp_path / "openai.json"
    recorder = RecordingProvider(provider_for(server), cassette)
    first = await recorder.complete(REQUEST)
    second = await recorder.complete(LLMRequest([Message("user", "again")]))
    replay = ReplayProvider(cassette)
    assert await replay.complete(REQUEST) == first == "".join(PIECES)
    assert await replay.complete(LLMRequest([Message("user", "again")])) == second == "second answer"


def test_retry_after_forms() -> None:
    assert _retry_after({"retry-after": "3"}) == 3.0
    assert _retry_after({"retry-after-ms": "250", "retry-after": "3"}) == 0.25
    assert _retry_after({"retry-after": "-4"}) == 0.0
    assert _retry_after({"retry-after": "soon"}) is None
    assert _retry_after({}) is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 <= (_retry_after({"retry-after": later}) or 0) <= 31


# --- TLS -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make a test certificate")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
         "-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.fixture
def tls_server(certificate: tuple[Path, Path]) -> Iterator[FakeOpenAIServer]:
    cert, key = certificate
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    with FakeOpenAIServer(tls=context) as srv:
        yield srv


async def test_https_stream(tls_server: FakeOpenAIServer, certificate: tuple[Path, Path]) -> None:
    tls_server.script(stream(PIECES, split=5))
    context = ssl.create_default_context(cafile=str(certificate[0]))
    provider = provider_for(tls_server, ssl_context=context)
    assert await provider.complete(REQUEST) == "".join(PIECES)


async def test_https_untrusted_certificate_is_not_retried(tls_server: FakeOpenAIServer) -> None:
    with pytest.raises(LLMConnectionError, match="certificate.*gave up after 1 attempt\\)"):
        await provider_for(tls_server).complete(REQUEST)


# --- the SSE decoder (sans-I/O) ---------------------------------------------------------------------

SSE_TEXT = (
    "\ufeff: a comment\r\n"
    "event: custom\r\n"
    "data: first line\r\n"
    "data:second line\r\n"
    "id: 7\r\n"
    "\r\n"
    "data: é 🌍\r"
    "\r"
    "retry: 100\n"
    "data\n"
    "\n"
    "data: lone\n"
    "\n"
    "event: empty\n"
    "\n"
    "data: trailing, never dispatched"
)
SSE_EVENTS = [
    SSEEvent("first line\nsecond line", "custom", "7"),
    SSEEvent("é 🌍", "message", "7"),
    SSEEvent("", "message", "7"),
    SSEEvent("lone", "message", "7"),
]


def decode_in_pieces(data: bytes, cuts: list[int]) -> list[SSEEvent]:
    decoder = SSEDecoder()
    events: list[SSEEvent] = []
    previous = 0
    for cut in [*cuts, len(data)]:
        events += decoder.feed(data[previous:cut])
        previous = cut
    return events + decoder.close()


def test_sse_whole() -> None:
    assert decode_in_pieces(SSE_TEXT.encode(), []) == SSE_EVENTS


def test_sse_cut_at_every_byte() -> None:
    data = SSE_TEXT.encode()
    assert decode_in_pieces(data, list(range(1, len(data)))) == SSE_EVENTS


def test_sse_cut_in_two_everywhere() -> None:
    data = SSE_TEXT.encode()
    for cut in range(len(data) + 1):
        assert decode_in_pieces(data, [cut]) == SSE_EVENTS, cut


def test_sse_random_cuts() -> None:
    data = SSE_TEXT.encode()
    rng = random.Random(5)
    for _ in range(200):
        cuts = sorted(rng.sample(range(1, len(data)), rng.randint(1, 20)))
        assert decode_in_pieces(data, cuts) == SSE_EVENTS


def test_sse_does_not_split_on_unicode_line_separators() -> None:
    data = 'data: {"content": "a\u2028b\x0bc\x1cd"}\n\n'.encode()
    assert decode_in_pieces(data, []) == [SSEEvent('{"content": "a\u2028b\x0bc\x1cd"}')]



async def test_http_proxy_from_the_environment(server: FakeOpenAIServer, monkeypatch: pytest.MonkeyPatch) -> None:
    server.script(stream(PIECES))
    with TunnelProxy() as proxy:
        monkeypatch.setenv("http_proxy", f"http://user:p%40ss@127.0.0.1:{proxy.port}")
        monkeypatch.delenv("no_proxy", raising=False)
        monkeypatch.delenv("NO_PROXY", raising=False)
        assert "".join(await collect(provider_for(server).stream(REQUEST))) == "".join(PIECES)
    line, auth = proxy.seen[0]
    assert line == f"POST {server.base_url}/chat/completions HTTP/1.1"
    assert auth == "Basic " + base64.b64encode(b"user:p@ss").decode()


async def test_https_through_a_connect_tunnel(
    tls_server: FakeOpenAIServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    tls_server.script(stream(PIECES))
    with TunnelProxy() as proxy:
        monkeypatch.setenv("HTTPS_PROXY", proxy.url)
        monkeypatch.delenv("https_proxy", raising=False)
        monkeypatch.setenv("NO_PROXY", "example.com")
        monkeypatch.delenv("no_proxy", raising=False)
        context = ssl.create_default_context(cafile=str(certificate[0]))
        got = await collect(provider_for(tls_server, ssl_context=context).stream(REQUEST))
    assert "".join(got) == "".join(PIECES)
    assert proxy.seen[0][0] == f"CONNECT 127.0.0.1:{tls_server.port} HTTP/1.1"


def test_no_proxy_is_honoured() -> None:
    url = parse_url("https://api.example.com/v1/chat/completions")
    env = {"https_proxy": "http://proxy:3128"}
    assert proxy_for(url, env) is not None
    for no_proxy in ("*", "example.com", ".example.com", "api.example.com:443", "other, example.com"):
        assert proxy_for(url, {**env, "no_proxy": no_proxy}) is None, no_proxy
    assert proxy_for(url, {**env, "no_proxy": "example.org, api.example.com:8443"}) is not None
