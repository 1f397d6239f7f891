"""A small async HTTP/1.1 client over anyio streams: one request per connection, streamed bodies.

Theory of operation: :func:`open_request` connects (TLS for ``https``), sends the request with
``Connection: close``, reads the status line and headers (skipping ``1xx`` interim responses) and
returns an :class:`HTTPResponse` whose body is read piece by piece with :meth:`HTTPResponse.receive`,
as it arrives. Bodies framed by ``Transfer-Encoding: chunked``, by ``Content-Length`` or by the end of
the connection are all understood. ``timeout`` bounds the connect, the send and every single wait for
data, never the whole response: a long stream that keeps moving is never cut.

Two kinds of failure, kept apart because the caller treats them differently:

* :class:`TransportError`: no connection, a timeout, or the connection dropped (also when the body
  framing says more was due). ``retryable`` is false only when trying again cannot help (a TLS
  certificate that does not verify).
* :class:`ProtocolError`: the peer does not speak HTTP/1.1 as we understand it.

Proxies: the ``http_proxy`` / ``https_proxy`` / ``all_proxy`` environment variables (and ``no_proxy``)
are honoured as :mod:`urllib.request` reads them. An ``http`` request goes to the proxy with its
absolute URL; an ``https`` one through a ``CONNECT`` tunnel, with TLS to the endpoint inside it.
Credentials in the proxy's URL are sent as ``Proxy-Authorization: Basic``.

No pooling, redirects or compression: this serves POSTs to one LLM endpoint.
"""

from __future__ import annotations

import base64
import os
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

import anyio
import anyio.abc
from anyio.streams.tls import TLSStream

__all__ = (
    "URL", "HTTPResponse", "ProtocolError", "Proxy", "TransportError", "check_header", "open_request", "parse_url",
    "proxy_for",
)

_MAX_LINE = 64 * 1024
_MAX_HEADERS = 200
_RECEIVE_SIZE = 64 * 1024


class TransportError(Exception):
    """The connection could not be made, timed out, or broke; ``retryable`` says if a retry may help."""

    def __init__(self, message: str, *, retryable: bool = True) -> None:
        super().__init__(message)
        self.retryable = retryable


class ProtocolError(Exception):
    """The peer sent something that is not valid HTTP/1.1."""


@dataclass(frozen=True, slots=True)
class URL:
    """The parts of an ``http``/``https`` URL needed to send a request."""

    scheme: str
    host: str
    port: int
    target: str

    @property
    def host_header(self) -> str:
        """The value of the ``Host`` header: the host, with the port when it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        default = 443 if self.scheme == "https" else 80
        return host if self.port == default else f"{host}:{self.port}"

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host_header}{self.target}"


def parse_url(url: str) -> URL:
    """Split an absolute ``http``/``https`` URL; raise ``ValueError`` for anything else."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"only http:// and https:// URLs are supported, got {url!r}")
    if not parts.hostname:
        raise ValueError(f"URL has no host: {url!r}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(f"credentials in the URL are not supported (use the API key): {url!r}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"URL has an invalid port: {url!r}") from exc
    if port is None:
        port = 443 if parts.scheme == "https" else 80
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return URL(parts.scheme, parts.hostname, port, target)


class _Reader:
    """Buffered reads with a per-read timeout over a byte stream."""

    def __init__(self, stream: anyio.abc.ByteReceiveStream, timeout: float) -> None:
        self._stream = stream
        self._timeout = timeout
        self._buffer = bytearray()
        self._eof = False

    async def _fill(self) -> bool:
        """Receive more bytes into the buffer; return ``False`` at the end of the stream."""
        if self._eof:
            return False
        try:
            with anyio.fail_after(self._timeout):
                data = await self._stream.receive(_RECEIVE_SIZE)
        except anyio.EndOfStream:
            self._eof = True
            return False
        except TimeoutError:
            raise TransportError(f"no data received for {self._timeout:g} s (read timeout)") from None
        except (OSError, anyio.BrokenResourceError) as exc:
            raise TransportError(f"connection broken while receiving: {_describe(exc)}") from exc
        self._buffer += data
        return True

    async def read_line(self, what: str) -> bytes:
        """Return the next line without its line end; ``what`` names it in error messages."""
        scanned = 0
        while True:
            end = self._buffer.find(b"\n", scanned)
            if end >= 0:
                line = bytes(self._buffer[:end])
                del self._buffer[: end + 1]
                return line[:-1] if line.endswith(b"\r") else line
            scanned = len(self._buffer)
            if scanned > _MAX_LINE:
                raise ProtocolError(f"{what} is longer than {_MAX_LINE} bytes")
            if not await self._fill():
                raise TransportError(f"connection closed by the server while reading the {what}")

    async def read_some(self, limit: int) -> bytes:
        """Return between 1 and ``limit`` bytes, or ``b""`` at the end of the stream."""
        if not self._buffer and not await self._fill():
            return b""
        data = bytes(self._buffer[:limit])
        del self._buffer[:limit]
        return data


class HTTPResponse:
    """A response whose head has been read; the body is read with :meth:`receive` or :meth:`read`."""

    def __init__(
        self,
        stream: anyio.abc.ByteStream,
        reader: _Reader,
        status: int,
        reason: str,
        headers: dict[str, str],
        *,
        has_body: bool,
    ) -> None:
        self.status = status
        self.reason = reason
        #: Header names lower-cased; repeated headers joined with ", ".
        self.headers = headers
        self._stream = stream
        self._reader = reader
        self._done = not has_body
        self._chunked = False
        self._remaining: int | None = None
        self._chunk_left = 0
        self._chunk_crlf_due = False
        if has_body:
            codings = [c.strip().lower() for c in headers.get("transfer-encoding", "").split(",") if c.strip()]
            if codings:
                if codings[-1] != "chunked":
                    raise ProtocolError(f"unsupported Transfer-Encoding {headers['transfer-encoding']!r}")
                self._chunked = True
            elif "content-length" in headers:
                try:
                    self._remaining = int(headers["content-length"])
                except ValueError:
                    raise ProtocolError(f"invalid Content-Length {headers['content-length']!r}") from None
                if self._remaining < 0:
                    raise ProtocolError(f"invalid Content-Length {headers['content-length']!r}")
                self._done = self._remaining == 0

    @property
    def content_type(self) -> str:
        """The media type without parameters, lower-cased (``""`` when absent)."""
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    async def receive(self) -> bytes:
        """Return the next piece of the body as soon as it arrives; ``b""`` once the body is complete.

        Raises :class:`TransportError` when the connection ends before the body does.
        """
        if self._done:
            return b""
        if self._chunked:
            return await self._receive_chunked()
        if self._remaining is not None:
            data = await self._reader.read_some(self._remaining)
            if not data:
                raise TransportError(
                    f"connection closed by the server with {self._remaining} bytes of the body still due"
                )
            self._remaining -= len(data)
            self._done = self._remaining == 0
            return data
        data = await self._reader.read_some(_RECEIVE_SIZE)
        self._done = not data
        return data

    async def _receive_chunked(self) -> bytes:
        if self._chunk_left == 0:
            if self._chunk_crlf_due:
                if await self._reader.read_line("end of a chunk") != b"":
                    raise ProtocolError("chunk data is not followed by CRLF")
                self._chunk_crlf_due = False
            size_line = await self._reader.read_line("chunk size line")
            size_text = size_line.split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise ProtocolError(f"invalid chunk size line {size_line[:80]!r}") from None
            if size < 0:
                raise ProtocolError(f"invalid chunk size line {size_line[:80]!r}")
            if size == 0:
                for _ in range(_MAX_HEADERS):
                    if await self._reader.read_line("chunked trailer") == b"":
                        break
                else:
                    raise ProtocolError("too many trailer lines")
                self._done = True
                return b""
            self._chunk_left = size
        data = await self._reader.read_some(self._chunk_left)
        if not data:
            raise TransportError(
                f"connection closed by the server in the middle of a chunk ({self._chunk_left} bytes due)"
            )
        self._chunk_left -= len(data)
        self._chunk_crlf_due = self._chunk_left == 0
        return data

    async def read(self, limit: int) -> bytes:
        """Return the body, or its first ``limit`` bytes if it is longer."""
        parts: list[bytes] = []
        size = 0
        while size < limit:
            data = await self.receive()
            if not data:
                break
            parts.append(data)
            size += len(data)
        return b"".join(parts)[:limit]

    async def aclose(self) -> None:
        """Close the connection at once (even inside a cancelled scope); idempotent."""
        self._done = True
        await anyio.aclose_forcefully(self._stream)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_header(name: str, value: str) -> None:
    """Raise ``ValueError`` for a header that would break the request (line breaks, NUL, bad name)."""
    if not name or any(c in name for c in ":\r\n\0 ") or any(c in value for c in "\r\n\0"):
        raise ValueError(f"invalid HTTP header {name!r}: names and values cannot hold line breaks")


async def open_request(
    method: str,
    url: URL,
    headers: list[tuple[str, str]],
    body: bytes,
    *,
    timeout: float,
    ssl_context: ssl.SSLContext | None = None,
) -> HTTPResponse:
    """Send one request and return the response once its head has arrived.

    ``Host``, ``Content-Length`` and ``Connection: close`` are added. Raises :class:`TransportError`
    or :class:`ProtocolError`; ``ValueError`` for a header that would break the request.
    """
    proxy = proxy_for(url)
    target = url.target
    if proxy is not None and url.scheme == "http":
        target = f"http://{url.host_header}{url.target}"  # absolute form: the proxy forwards it
    lines = [f"{method} {target} HTTP/1.1", f"Host: {url.host_header}"]
    if proxy is not None and url.scheme == "http" and proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    for name, value in headers:
        check_header(name, value)
        lines.append(f"{name}: {value}")
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    if proxy is None:
        stream = await _connect(url, timeout=timeout, ssl_context=ssl_context)
    else:
        stream = await _connect_through(proxy, url, timeout=timeout, ssl_context=ssl_context)
    try:
        try:
            with anyio.fail_after(timeout):
                await stream.send(head + body)
        except TimeoutError:
            raise TransportError(f"sending the request timed out after {timeout:g} s") from None
        except (OSError, anyio.BrokenResourceError) as exc:
            raise TransportError(f"connection broken while sending: {_describe(exc)}") from exc
        reader = _Reader(stream, timeout)
        while True:
            status, reason = _parse_status_line(await reader.read_line("status line"))
            response_headers = await _read_headers(reader)
            if not 100 <= status < 200:
                break
        has_body = method != "HEAD" and status not in (204, 304)
        return HTTPResponse(stream, reader, status, reason, response_headers, has_body=has_body)
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


async def _connect(url: URL, *, timeout: float, ssl_context: ssl.SSLContext | None) -> anyio.abc.ByteStream:
    tls = url.scheme == "https"
    where = f"{url.host}:{url.port}"
    try:
        with anyio.fail_after(timeout):
            if tls:
                return await anyio.connect_tcp(
                    url.host,
                    url.port,
                    tls=True,
                    ssl_context=ssl_context or ssl.create_default_context(),
                    # Bodies are framed (chunked / Content-Length), so a missing TLS close_notify
                    # cannot hide a truncation; many servers omit it.
                    tls_standard_compatible=False,
                )
            return await anyio.connect_tcp(url.host, url.port)
    except TimeoutError:
        raise TransportError(f"connecting to {where} timed out after {timeout:g} s") from None
    except ssl.SSLCertVerificationError as exc:
        raise TransportError(
            f"TLS certificate of {where} does not verify: {exc.verify_message}", retryable=False
        ) from exc
    except (OSError, anyio.BrokenResourceError) as exc:
        raise TransportError(f"cannot connect to {where}: {_describe(exc)}") from exc


@dataclass(frozen=True, slots=True)
class Proxy:
    """An HTTP proxy: where it listens and the ``Proxy-Authorization`` value for its credentials."""

    host: str
    port: int
    authorization: str | None

    def __str__(self) -> str:
        return f"proxy {self.host}:{self.port}"


def proxy_for(url: URL, env: Mapping[str, str] | None = None) -> Proxy | None:
    """The proxy the environment (``env``, default ``os.environ``) names for ``url``; ``None``:
    connect directly. Read as :func:`urllib.request.getproxies` reads the environment (a lowercase
    name wins); ``no_proxy`` lists hosts (``*``, a name, ``.domain`` or a domain, with or without a port)
    to reach directly.

    Raises :class:`TransportError` (not retryable) for a proxy URL that cannot be used.
    """
    environment = os.environ if env is None else env
    proxies: dict[str, str] = {}
    for name, value in environment.items():  # upper case first, so the lowercase name wins
        if name.isupper() and name.lower().endswith("_proxy") and value:
            proxies[name.lower()[:-6]] = value
    for name, value in environment.items():
        if name.islower() and name.endswith("_proxy") and value:
            proxies[name[:-6]] = value
    raw = proxies.get(url.scheme) or proxies.get("all")
    if not raw or _bypassed(url, proxies.get("no", "")):
        return None
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme != "http" or not parts.hostname:
        raise TransportError(f"cannot use the proxy {raw!r} from the environment: only http:// proxies are "
                             "supported", retryable=False)
    authorization = None
    if parts.username is not None:
        pair = f"{unquote(parts.username)}:{unquote(parts.password or '')}".encode()
        authorization = "Basic " + base64.b64encode(pair).decode("ascii")
    return Proxy(parts.hostname, parts.port or 80, authorization)


def _bypassed(url: URL, no_proxy: str) -> bool:
    host = url.host.lower().strip("[]")
    for entry in (item.strip().lower() for item in no_proxy.split(",")):
        if not entry:
            continue
        if entry == "*":
            return True
        name, _, port = entry.rpartition(":") if entry.count(":") == 1 else (entry, "", "")
        if port and port != str(url.port):
            continue
        name = name.lstrip(".")
        if host == name or host.endswith("." + name):
            return True
    return False


async def _connect_through(
    proxy: Proxy, url: URL, *, timeout: float, ssl_context: ssl.SSLContext | None
) -> anyio.abc.ByteStream:
    """A connection to ``url`` through ``proxy``: the proxy's socket for ``http``, a ``CONNECT``
    tunnel wrapped in TLS for ``https``."""
    stream = await _connect(URL("http", proxy.host, proxy.port, "/"), timeout=timeout, ssl_context=None)
    if url.scheme != "https":
        return stream
    try:
        authority = f"[{url.host}]:{url.port}" if ":" in url.host else f"{url.host}:{url.port}"
        lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
        if proxy.authorization:
            lines.append(f"Proxy-Authorization: {proxy.authorization}")
        try:
            with anyio.fail_after(timeout):
                await stream.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        except TimeoutError:
            raise TransportError(f"sending CONNECT to the {proxy} timed out after {timeout:g} s") from None
        reader = _Reader(stream, timeout)
        status, reason = _parse_status_line(await reader.read_line("status line of CONNECT"))
        await _read_headers(reader)
        if status != 200:
            raise TransportError(
                f"the {proxy} refused to open a tunnel to {url.host}:{url.port}: {status} {reason}",
                retryable=status in (502, 503, 504),
            )
        try:
            with anyio.fail_after(timeout):
                return await TLSStream.wrap(
                    stream, hostname=url.host, ssl_context=ssl_context or ssl.create_default_context(),
                    standard_compatible=False,
                )
        except TimeoutError:
            raise TransportError(f"TLS through the {proxy} timed out after {timeout:g} s") from None
        except ssl.SSLCertVerificationError as exc:
            raise TransportError(
                f"TLS certificate of {url.host}:{url.port} does not verify: {exc.verify_message}", retryable=False
            ) from exc
        except (OSError, ssl.SSLError, anyio.BrokenResourceError) as exc:
            raise TransportError(f"TLS through the {proxy} failed: {_describe(exc)}") from exc
    except BaseException:
        await anyio.aclose_forcefully(stream)
        raise


def _parse_status_line(line: bytes) -> tuple[int, str]:
    parts = line.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit() or len(parts[1]) != 3:
        raise ProtocolError(f"not an HTTP/1.1 status line: {line[:80]!r}")
    reason = parts[2].decode("latin-1") if len(parts) == 3 else ""
    return int(parts[1]), reason


async def _read_headers(reader: _Reader) -> dict[str, str]:
    headers: dict[str, str] = {}
    last = ""
    for _ in range(_MAX_HEADERS):
        line = await reader.read_line("response headers")
        if not line:
            return headers
        text = line.decode("latin-1")
        if text[0] in " \t":
            if not last:
                raise ProtocolError(f"header continuation line without a header: {text[:80]!r}")
            headers[last] += " " + text.strip()
            continue
        name, colon, value = text.partition(":")
        name = name.strip().lower()
        if not colon or not name:
            raise ProtocolError(f"malformed header line: {text[:80]!r}")
        value = value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
        last = name
    raise ProtocolError(f"more than {_MAX_HEADERS} header lines")
