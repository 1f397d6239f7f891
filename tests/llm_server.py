"""A real HTTP server speaking the OpenAI streaming protocol, scripted reply by reply, for the LLM tests.

It runs ``http.server.ThreadingHTTPServer`` on 127.0.0.1 (port 0) in a background thread. Each POST is
recorded (path, headers, JSON body) and answered by the next scripted :class:`Reply`; the last reply is
repeated when the script runs out. Streams are sent with ``Transfer-Encoding: chunked``, one SSE event
per HTTP chunk unless ``split`` asks to cut the body into chunks of a few bytes (cutting UTF-8
characters and line ends apart).
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass
class Reply:
    """One scripted answer; build it with the functions below."""

    kind: str
    pieces: list[str] = field(default_factory=list)
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    split: int | None = None
    done: bool = True
    events: list[str] | None = None
    delay: float = 0.0
    usage: tuple[int, int] | None = None


def stream(
    pieces: list[str], *, split: int | None = None, done: bool = True, delay: float = 0.0,
    usage: tuple[int, int] | None = None,
) -> Reply:
    """A 200 event stream with one content delta per piece, then ``finish_reason`` and ``[DONE]``;
    ``delay`` seconds pass before each HTTP chunk (a slow model, to be killed mid-response); ``usage``
    (prompt, completion tokens) adds a usage chunk before ``[DONE]``, as OpenAI sends for
    ``stream_options.include_usage``."""
    return Reply("stream", pieces=pieces, split=split, done=done, delay=delay, usage=usage)


def raw_events(events: list[str]) -> Reply:
    """A 200 event stream sending these ``data:`` payloads as they are (no [DONE] added)."""
    return Reply("stream", events=events, done=False)


def status(code: int, body: Any = None, headers: dict[str, str] | None = None) -> Reply:
    """An error status with a JSON (or bytes) body."""
    data = body if isinstance(body, bytes) else json.dumps(body if body is not None else {}).encode()
    return Reply("status", status=code, body=data, headers=headers or {})


def drop_after(pieces: list[str]) -> Reply:
    """Start a stream, send these content deltas, then close the connection without ending the body."""
    return Reply("drop", pieces=pieces)


def stall() -> Reply:
    """Read the request and never answer (until the server stops)."""
    return Reply("stall")


def json_completion(text: str) -> Reply:
    """A non-streamed ``application/json`` chat completion, as a server ignoring ``stream`` sends."""
    body = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]})
    return Reply("status", status=200, body=body.encode(), headers={"Content-Type": "application/json"})


@dataclass
class RecordedRequest:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


def _event(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {payload}\n\n".encode()


def _delta(piece: str) -> bytes:
    return _event({"choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})


class FakeOpenAIServer:
    """Scripted OpenAI-compatible server; use as a context manager or call :meth:`close`."""

    def __init__(self, *, tls: ssl.SSLContext | None = None) -> None:
        self.requests: list[RecordedRequest] = []
        self._script: list[Reply] = [stream(["ok"])]
        self.responder: Callable[[RecordedRequest], Reply] | None = None
        """When set, answers each request (the script is not used): replies that depend on the request."""
        self._lock = threading.Lock()
        self.stopping = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                raw = self.rfile.read(length)
                request = server._record(self.path, dict(self.headers.items()), raw)
                responder = server.responder
                try:
                    server._answer(self, responder(request) if responder is not None else server._next())
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True  # the client went away (killed mid-response)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.scheme = "https" if tls is not None else "http"
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.01}, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}/v1"

    def script(self, *replies: Reply) -> None:
        with self._lock:
            self._script = list(replies)

    def _next(self) -> Reply:
        with self._lock:
            return self._script.pop(0) if len(self._script) > 1 else self._script[0]

    def _record(self, path: str, headers: dict[str, str], raw: bytes) -> RecordedRequest:
        try:
            body = json.loads(raw)
        except ValueError:
            body = {"<raw>": raw.decode("latin-1")}
        request = RecordedRequest(path, {k.lower(): v for k, v in headers.items()}, body)
        with self._lock:
            self.requests.append(request)
        return request

    def _answer(self, handler: BaseHTTPRequestHandler, reply: Reply) -> None:
        if reply.kind == "stall":
            self.stopping.wait(10)
            handler.close_connection = True
            return
        if reply.kind == "status":
            handler.send_response(reply.status)
            headers = {"Content-Type": "application/json", **reply.headers}
            for name, value in headers.items():
                handler.send_header(name, value)
            handler.send_header("Content-Length", str(len(reply.body)))
            handler.end_headers()
            handler.wfile.write(reply.body)
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "text/event-stream; charset=utf-8")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Cache-Control", "no-cache")
        handler.end_headers()
        events: list[bytes] = []
        if reply.events is not None:
            events += [_event(data) for data in reply.events]
        else:
            events.append(_event({"choices": [{"index": 0, "delta": {"role": "assistant"}}]}))
            events += [_delta(piece) for piece in reply.pieces]
        if reply.kind == "stream" and reply.done:
            events.append(_event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
            if reply.usage is not None:
                prompt, completion = reply.usage
                events.append(_event({"choices": [], "usage": {
                    "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
                }}))
            events.append(_event("[DONE]"))
        if reply.split:
            body = b"".join(events)
            events = [body[i : i + reply.split] for i in range(0, len(body), reply.split)]
        for data in events:
            if reply.delay:
                time.sleep(reply.delay)
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()
        if reply.kind == "drop":
            handler.close_connection = True
            handler.connection.shutdown(socket.SHUT_RDWR)
            return
        handler.wfile.write(b"0\r\n\r\n")
        handler.wfile.flush()

    def close(self) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> FakeOpenAIServer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


class TunnelProxy:
    """A minimal HTTP proxy on 127.0.0.1 for the proxy tests: ``CONNECT host:port`` opens a tunnel; a
    request in absolute form (``POST http://host:port/path``) is forwarded as it is. Each request line
    is recorded in :attr:`seen` (with its ``Proxy-Authorization`` header, if any)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._serve, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _serve(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(client,), daemon=True).start()

    def _handle(self, client: socket.socket) -> None:
        with client:
            head = b""
            while b"\r\n\r\n" not in head:
                data = client.recv(65536)
                if not data:
                    return
                head += data
            text = head.split(b"\r\n\r\n", 1)[0].decode("latin-1")
            line = text.split("\r\n", 1)[0]
            auth = next((h.split(":", 1)[1].strip() for h in text.split("\r\n")[1:]
                         if h.lower().startswith("proxy-authorization:")), None)
            self.seen.append((line, auth))
            method, target, _ = line.split(" ", 2)
            if method == "CONNECT":
                host, port = target.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
                rest = head.split(b"\r\n\r\n", 1)[1]
            else:
                where = target.split("//", 1)[1].split("/", 1)[0]
                host, port = where.rsplit(":", 1)
                upstream = socket.create_connection((host, int(port)))
                rest = head
            with upstream:
                if rest:
                    upstream.sendall(rest)
                pump = threading.Thread(target=self._pump, args=(upstream, client), daemon=True)
                pump.start()
                self._pump(client, upstream)
                pump.join(10)

    @staticmethod
    def _pump(source: socket.socket, target: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                target.sendall(data)
            target.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def __enter__(self) -> TunnelProxy:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
