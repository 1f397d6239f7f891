"""The integrity envelope around an encoded checkpoint: format version, length and digest.

A checkpoint payload is a pickle, and unpickling untrusted or damaged bytes is unsafe. So every record a
provider stores is wrapped here, and :func:`decode_record` hands back a payload only after it has checked
all of it. There is no way to get an unverified payload out of this module.

Layout of a record (all integers big-endian)::

    offset  size  field
    0       4     magic b"PBCK"
    4       1     format version (FORMAT_VERSION)
    5       1     flags: bit 0 set = the digest is an HMAC; other bits must be 0
    6       8     payload length in bytes
    14      32    digest: SHA-256, or HMAC-SHA256 with the key, of bytes 0..13 then the payload
    46      n     payload

The digest covers the header fields as well as the payload, so a flipped flag or length is caught by the
digest even where a structural check would not notice it. Whether a record must be signed is decided by the
reader's configuration, never by the record: with a key configured an unsigned record is refused (an
attacker could simply strip the signature), and without a key a signed record is refused (it cannot be
verified, and accepting it unchecked would silently drop the protection its writer asked for).

Errors split like this: anything that looks like damage (empty, truncated, bad magic, unknown version,
length or checksum mismatch) raises :class:`~playbooks.errors.CheckpointCorruptError`; anything that is
about the key (HMAC mismatch, signed/unsigned disagreement) raises its subclass
:class:`~playbooks.errors.CheckpointTamperedError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import struct

from playbooks.errors import CheckpointCorruptError, CheckpointTamperedError

__all__ = (
    "FORMAT_VERSION",
    "HEADER_SIZE",
    "KEY_ENV_VAR",
    "MAGIC",
    "decode_record",
    "encode_record",
    "resolve_key",
)

MAGIC = b"PBCK"
"""The first four bytes of every record."""

FORMAT_VERSION = 1
"""The newest record format this module writes and reads."""

KEY_ENV_VAR = "PLAYBOOKS_CHECKPOINT_KEY"
"""Environment variable that holds the HMAC key when none is passed explicitly."""

_FLAG_SIGNED = 0x01
_KNOWN_FLAGS = _FLAG_SIGNED
_PREFIX = struct.Struct(">4sBBQ")  # magic, version, flags, payload length
_DIGEST_SIZE = 32
HEADER_SIZE = _PREFIX.size + _DIGEST_SIZE
"""Bytes before the payload (46)."""


def resolve_key(key: str | bytes | None = None) -> bytes | None:
    """Return the HMAC key to use: ``key`` if given, else ``$PLAYBOOKS_CHECKPOINT_KEY``, else ``None``.

    A ``str`` is encoded as UTF-8. An explicitly passed empty key is a ``ValueError`` (it would sign
    without protecting anything); an empty environment variable counts as unset, as shells make it easy
    to export one by accident.
    """
    if key is None:
        env = os.environ.get(KEY_ENV_VAR)
        return env.encode("utf-8") if env else None
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not raw:
        raise ValueError("checkpoint key must not be empty")
    return raw


def _digest(prefix: bytes | memoryview, payload: bytes | memoryview, key: bytes | None) -> bytes:
    """Digest of header prefix then payload: HMAC-SHA256 with ``key``, plain SHA-256 without."""
    h = hmac.new(key, prefix, hashlib.sha256) if key is not None else hashlib.sha256(prefix)
    h.update(payload)
    return h.digest()


def _check_key(key: bytes | None) -> None:
    if key is not None and not key:
        raise ValueError("checkpoint key must not be empty (pass None for an unsigned record)")


def encode_record(payload: bytes, *, key: bytes | None = None) -> bytes:
    """Wrap ``payload`` in a versioned, checksummed record; signed with HMAC-SHA256 when ``key`` is set.

    The result is the only copy made of the payload.
    """
    _check_key(key)
    flags = _FLAG_SIGNED if key is not None else 0
    prefix = _PREFIX.pack(MAGIC, FORMAT_VERSION, flags, len(payload))
    return b"".join((prefix, _digest(prefix, payload, key), payload))


def decode_record(data: bytes, *, key: bytes | None = None) -> bytes:
    """Verify a record made by :func:`encode_record` and return its payload.

    Raises :class:`~playbooks.errors.CheckpointCorruptError` if the record is damaged and
    :class:`~playbooks.errors.CheckpointTamperedError` if it fails the key check; the payload of a
    record that fails any check is never returned.
    """
    _check_key(key)
    size = len(data)
    if size == 0:
        raise CheckpointCorruptError(
            "checkpoint record is empty (0 bytes): its write never completed or the file was truncated"
        )
    view = memoryview(data)
    if size < len(MAGIC) or bytes(view[: len(MAGIC)]) != MAGIC:
        raise CheckpointCorruptError(
            f"not a playbooks checkpoint record: it starts with {bytes(view[:8])!r}, "
            f"expected the magic {MAGIC!r} (a foreign or overwritten file?)"
        )
    if size < HEADER_SIZE:
        raise CheckpointCorruptError(
            f"checkpoint record is truncated: {size} bytes, shorter than its {HEADER_SIZE}-byte header"
        )
    _, version, flags, length = _PREFIX.unpack_from(view)
    if version != FORMAT_VERSION:
        if version > FORMAT_VERSION:
            hint = "it was written by a newer playbooks; upgrade playbooks to read it"
        else:
            hint = "no playbooks version writes it; the header is damaged"
        raise CheckpointCorruptError(
            f"checkpoint record has format version {version}, this playbooks reads version "
            f"{FORMAT_VERSION}: {hint}"
        )
    if flags & ~_KNOWN_FLAGS:
        raise CheckpointCorruptError(
            f"checkpoint record has unknown flags 0x{flags:02x}: the header is damaged "
            "or it was written by a newer playbooks"
        )
    actual = size - HEADER_SIZE
    if length != actual:
        what = "truncated" if actual < length else "longer than its header says (trailing bytes)"
        raise CheckpointCorruptError(
            f"checkpoint record is {what}: the header announces {length} payload bytes, "
            f"the record holds {actual}"
        )
    signed = bool(flags & _FLAG_SIGNED)
    if signed and key is None:
        raise CheckpointTamperedError(
            "checkpoint record is HMAC-signed but no key is configured, so it cannot be verified: "
            f"set {KEY_ENV_VAR} (or pass the key) to the key it was written with"
        )
    if not signed and key is not None:
        raise CheckpointTamperedError(
            "checkpoint record is not signed but a key is configured; refusing it, since an unsigned "
            "record could be a forgery. If it was written before signing was enabled, read it with "
            f"{KEY_ENV_VAR} unset"
        )
    prefix = view[: _PREFIX.size]
    stored = view[_PREFIX.size : HEADER_SIZE]
    payload = view[HEADER_SIZE:]
    if not hmac.compare_digest(_digest(prefix, payload, key), stored):
        if signed:
            raise CheckpointTamperedError(
                "checkpoint record fails its HMAC check: it was modified after it was written, or it "
                f"was signed with a different key (check {KEY_ENV_VAR})"
            )
        raise CheckpointCorruptError(
            "checkpoint record fails its SHA-256 checksum: its bytes were damaged after it was written "
            "(disk error, partial copy or manual edit)"
        )
    return bytes(payload)
