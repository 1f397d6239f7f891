"""The channel between an isolated executor (the host) and its worker process: framed messages.

A message is a JSON header (a dict with an ``"op"``) and zero or more binary blobs::

    u64 length of the rest | u32 length of the header | u32 number of blobs | header (UTF-8 JSON)
    | for each blob: u64 length | bytes

Blobs carry what JSON cannot: checkpoint records (opaque to the host: it stores and signs them) and
pickles the *host* made (a tool's result) for the worker to unpickle. The worker never sends the host a
pickle: what the host must read of the worker's values travels as plain data
(:mod:`playbooks.execution.plain_data`).

The host side is async (any anyio backend) and bounds every frame it reads, since the worker runs
untrusted code that can write anything to its end of the socket; the worker side has an async reader
and a blocking round trip for sync calls (a sync tool cannot await).
"""

from __future__ import annotations

import json
import socket
import struct
from collections.abc import Sequence
from typing import Any

import anyio

__all__ = ("ChannelClosed", "FrameReader", "HostChannel", "ProtocolError", "encode_frame")

_PREFIX = struct.Struct(">QII")
_BLOB = struct.Struct(">Q")
_RECV = 1 << 20


class ChannelClosed(Exception):
    """The other end closed the channel (the worker died, or the host did)."""


class ProtocolError(Exception):
    """A frame that breaks the protocol (too big, malformed): the worker is killed."""


def encode_frame(header: dict[str, Any], blobs: Sequence[bytes] = ()) -> list[bytes]:
    """The buffers of one frame (send them in order)."""
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    rest = len(head) + 8 + sum(_BLOB.size + len(b) for b in blobs)
    parts = [_PREFIX.pack(rest, len(head), len(blobs)), head]
    for blob in blobs:
        parts.append(_BLOB.pack(len(blob)))
        parts.append(blob)
    return parts


class FrameReader:
    """Accumulates received bytes and cuts them into ``(header, blobs)`` frames."""

    def __init__(self, max_frame: int | None = None) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def frames(self) -> list[tuple[dict[str, Any], list[bytes]]]:
        """Every complete frame received so far, oldest first."""
        buffer, found = self._buffer, []
        while len(buffer) >= 8:
            (rest,) = struct.unpack_from(">Q", buffer)
            if self.max_frame is not None and rest > self.max_frame:
                raise ProtocolError(f"a frame of {rest} bytes exceeds the limit of {self.max_frame}")
            if len(buffer) < 8 + rest:
                break
            frame = bytes(buffer[8 : 8 + rest])
            del buffer[: 8 + rest]
            found.append(self._parse(frame, rest))
        return found

    @staticmethod
    def _parse(frame: bytes, rest: int) -> tuple[dict[str, Any], list[bytes]]:
        try:
            head_len, count = struct.unpack_from(">II", frame)
            position = 8 + head_len
            header = json.loads(bytes(frame[8:position]).decode("utf-8"))
            blobs: list[bytes] = []
            for _ in range(count):
                (size,) = _BLOB.unpack_from(frame, position)
                position += _BLOB.size
                if position + size > rest:
                    raise ValueError("a blob runs past the frame")
                blobs.append(bytes(frame[position : position + size]))
                position += size
        except (struct.error, ValueError, UnicodeDecodeError) as exc:
            raise ProtocolError(f"malformed frame: {exc}") from None
        if not isinstance(header, dict) or not isinstance(header.get("op"), str) or position != rest:
            raise ProtocolError("malformed frame: no operation, or trailing bytes")
        return header, blobs


class HostChannel:
    """The host's end: async sends (serialized by a lock) and reads of bounded frames."""

    def __init__(self, sock: socket.socket, *, max_frame: int) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._reader = FrameReader(max_frame)
        self._pending: list[tuple[dict[str, Any], list[bytes]]] = []
        self._lock = anyio.Lock()
        self.closed = False

    async def send(self, header: dict[str, Any], blobs: Sequence[bytes] = ()) -> None:
        parts = encode_frame(header, blobs)
        if sum(map(len, parts)) <= _RECV:
            parts = [b"".join(parts)]  # one system call for an ordinary message
        async with self._lock:
            for part in parts:
                view = memoryview(part)
                while view:
                    try:
                        sent = self.sock.send(view)
                    except BlockingIOError:
                        await anyio.wait_writable(self.sock)
                        continue
                    except OSError as exc:
                        raise ChannelClosed(str(exc)) from None
                    view = view[sent:]

    async def receive(self) -> tuple[dict[str, Any], list[bytes]]:
        """The next frame; raises :class:`ChannelClosed` at end of stream."""
        while not self._pending:
            if self.closed:
                raise ChannelClosed("the worker closed the channel")
            try:
                data = self.sock.recv(_RECV)
            except BlockingIOError:
                await anyio.wait_readable(self.sock)
                continue
            except OSError as exc:
                self.closed = True
                raise ChannelClosed(str(exc)) from None
            if not data:
                self.closed = True
                continue
            self._reader.feed(data)
            self._pending.extend(self._reader.frames())
        return self._pending.pop(0)

    def close(self) -> None:
        self.closed = True
        self.sock.close()
