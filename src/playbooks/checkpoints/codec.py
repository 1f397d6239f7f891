"""The integrity envelope around an encoded checkpoint: format version, place, key id and signature.

A checkpoint payload ends up unpickled, and unpickling untrusted or damaged bytes is unsafe. So every
record a provider stores is wrapped here, and :func:`decode_record` hands back a payload only after it
has checked all of it. There is no way to get an unverified payload out of this module.

Layout of a record, format versions 2 and 3 (all integers big-endian)::

    offset  size  field
    0       4     magic b"PBCK"
    4       1     format version: 3 when a flag is set, else 2
    5       1     flags: bit 0 (FLAG_ZLIB, version 3): the payload is zlib-compressed; other bits 0
    6       8     payload length in bytes
    14      8     key id: the first 8 bytes of SHA-256(b"playbooks key id\\0" + key)
    22      16    lineage: random id of this execution's history in this store
    38      8     counter: the record's number in its execution (from 1)
    46      8     previous counter: the record written just before this one (0: none)
    54      32    previous digest: that record's digest (zeros: none)
    86      2     length e of the execution id
    88      e     execution id, UTF-8
    88+e    32    digest: HMAC-SHA256 with the key of bytes 0..88+e, then the payload
    120+e   n     payload (as stored: compressed when FLAG_ZLIB is set)

The digest covers the payload as stored, so a compressed record is verified before it is inflated
(and inflating is bounded): damaged or forged bytes never reach zlib. Large snapshots are compressed
(see ``CheckpointManager``); a playbooks that predates the flag refuses such a record.

Every record is signed: with no key configured, a per-user key is created once (see
:func:`resolve_key`). The digest covers the whole header, so a record is bound to its place: the
execution it belongs to, its counter, the store history (lineage) it was written in, and its
predecessor. The reader says where it found the record (execution id and counter) and
:func:`decode_record` refuses a record found anywhere else: a record copied from another run or
another store (a transplant) cannot pass for this run's. Chains and heads (which detect a missing or
rolled-back record) are checked by :class:`~playbooks.checkpoints.CheckpointManager` with the place
this module returns.

Errors split like this: anything that looks like damage (empty, truncated, bad magic, length or digest
mismatch) raises :class:`~playbooks.errors.CheckpointCorruptError`; a record from an unknown (future)
format raises :class:`~playbooks.errors.CheckpointFormatError`; a record signed with another key than
the configured one raises :class:`~playbooks.errors.CheckpointKeyError`; a record whose signature
verifies but that belongs somewhere else raises :class:`~playbooks.errors.CheckpointForeignError`.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import struct
import zlib
from dataclasses import dataclass, field

from playbooks.errors import (
    CheckpointCorruptError,
    CheckpointForeignError,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointTamperedError,
)

__all__ = (
    "DIGEST_SIZE",
    "FLAG_ZLIB",
    "FORMAT_VERSION",
    "KEY_ENV_VAR",
    "KEY_FILE_ENV_VAR",
    "LINEAGE_SIZE",
    "MAGIC",
    "Place",
    "RecordKey",
    "decode_head",
    "decode_record",
    "default_key_file",
    "derive_run_key",
    "encode_head",
    "encode_record",
    "header_size",
    "key_id",
    "new_lineage",
    "read_place",
    "resolve_key",
    "seal",
)

MAGIC = b"PBCK"
"""The first four bytes of every record."""

FLAG_ZLIB = 0x01
"""Header flag: the payload is stored zlib-compressed."""
_KNOWN_FLAGS = FLAG_ZLIB
_MAX_INFLATED = 1 << 31
"""No verified payload inflates to more than this (2 GiB): a bound, not a limit anyone meets."""

FORMAT_VERSION = 3
"""The newest record format this module writes; it reads versions 2 and 3. Version 3 is version 2
with one flag (:data:`FLAG_ZLIB`): a record is written as version 3 only when its payload is
compressed, so a store without compressed records stays readable by a version-2 playbooks, and one
with them is refused by it as newer (never mistaken for damage). Version 1 (unbound SHA-256 records)
is no longer read."""
_PLAIN_VERSION = 2
"""The version of a record whose flags are all 0."""
_READ_VERSIONS = (2, 3)

KEY_ENV_VAR = "PLAYBOOKS_CHECKPOINT_KEY"
"""Environment variable that holds the HMAC key when none is passed explicitly."""

KEY_FILE_ENV_VAR = "PLAYBOOKS_CHECKPOINT_KEY_FILE"
"""Environment variable naming the per-user key file used when no key is configured."""

DIGEST_SIZE = 32
LINEAGE_SIZE = 16
_KEY_ID_SIZE = 8
_FIXED = struct.Struct(">4sBBQ8s16sQQ32sH")  # up to and including the execution id's length
_NO_DIGEST = bytes(DIGEST_SIZE)
_MAX_ID = 0xFFFF


def header_size(execution_id: str) -> int:
    """Bytes before the payload of a record of ``execution_id``."""
    return _FIXED.size + len(execution_id.encode("utf-8")) + DIGEST_SIZE


@dataclass(frozen=True, slots=True)
class Place:
    """Where a record belongs: its execution, counter, store history and predecessor.

    ``digest`` is the record's own digest (what its successor names as ``prev_digest``); it is empty
    in a place passed to :func:`encode_record`, which computes it.
    """

    execution_id: str
    counter: int
    lineage: bytes
    prev_counter: int = 0
    prev_digest: bytes = _NO_DIGEST
    digest: bytes = b""
    key_id: bytes = b""
    compressed: bool = False
    """Whether the payload is stored zlib-compressed (:data:`FLAG_ZLIB`)."""


@dataclass(frozen=True, slots=True)
class RecordKey:
    """The key that signs and verifies records, and where it came from (named in every key error)."""

    secret: bytes
    source: str
    id: bytes = field(init=False, compare=False)
    _mac: hmac.HMAC = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "id", key_id(self.secret))
        # Keyed once: each record's HMAC starts from a copy (setting up the key and looking up
        # SHA-256 in OpenSSL on every record costs more than the hashing itself).
        object.__setattr__(self, "_mac", hmac.new(self.secret, digestmod=hashlib.sha256))

    def __repr__(self) -> str:  # never show the secret
        return f"RecordKey(id={self.id.hex()}, source={self.source!r})"


def key_id(secret: bytes) -> bytes:
    """The public id of a key: tells "signed with another key" apart from damage."""
    return hashlib.sha256(b"playbooks key id\0" + secret).digest()[:_KEY_ID_SIZE]


def new_lineage() -> bytes:
    """A random id for a new execution history."""
    return secrets.token_bytes(LINEAGE_SIZE)


def default_key_file() -> str:
    """Where the per-user key lives: ``$PLAYBOOKS_CHECKPOINT_KEY_FILE``, else
    ``$XDG_CONFIG_HOME/playbooks/checkpoint.key`` (``~/.config/playbooks/checkpoint.key``)."""
    explicit = os.environ.get(KEY_FILE_ENV_VAR)
    if explicit:
        return os.path.abspath(explicit)
    config_home = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(os.path.abspath(config_home), "playbooks", "checkpoint.key")


def _load_or_create_key_file(path: str) -> bytes:
    """Read the key file at ``path``, creating it (0600, folder 0700) with 32 random bytes if missing."""
    hint = (
        f"set {KEY_ENV_VAR} to a key, or {KEY_FILE_ENV_VAR} to a file this user can create and read"
    )
    try:
        with open(path, "rb") as f:
            raw = f.read().strip()
    except FileNotFoundError:
        try:
            folder = os.path.dirname(path)
            if not os.path.isdir(folder):
                os.makedirs(folder, mode=0o700, exist_ok=True)
                os.chmod(folder, 0o700)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return _load_or_create_key_file(path)  # another process created it just now
        except OSError as exc:
            raise CheckpointKeyError(
                f"cannot create the default checkpoint key file {path}: {exc.strerror or exc}; {hint}"
            ) from exc
        raw = secrets.token_hex(32).encode("ascii")
        try:
            os.write(fd, raw + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return raw
    except OSError as exc:
        raise CheckpointKeyError(
            f"cannot read the checkpoint key file {path}: {exc.strerror or exc}; {hint}"
        ) from exc
    if not raw:
        raise CheckpointKeyError(f"the checkpoint key file {path} is empty; delete it or {hint}")
    return raw


def resolve_key(key: str | bytes | None = None, *, env_var: str = KEY_ENV_VAR) -> RecordKey:
    """The key to sign with: ``key`` if given, else ``$env_var``, else the per-user key file.

    A ``str`` is encoded as UTF-8. An explicitly passed empty key is a ``ValueError`` (it would sign
    without protecting anything); an empty environment variable counts as unset, as shells make it easy
    to export one by accident. The key file is created on first use (see :func:`default_key_file`).
    """
    if key is None:
        env = os.environ.get(env_var)
        if env:
            return RecordKey(env.encode("utf-8"), f"the environment variable {env_var}")
        path = default_key_file()
        return RecordKey(_load_or_create_key_file(path), f"the default key file {path}")
    raw = key.encode("utf-8") if isinstance(key, str) else bytes(key)
    if not raw:
        raise ValueError("checkpoint key must not be empty")
    return RecordKey(raw, "the key passed to CheckpointManager(key=...)")


def derive_run_key(key: RecordKey, execution_id: str) -> RecordKey:
    """The key an isolated worker signs the records of ``execution_id`` with, derived from ``key``.

    A worker runs untrusted code, so it never holds ``key``: with the run key it can sign records of its
    own execution only (the execution id is part of every signed header), and the host knows a record
    so signed came from a worker (its key id differs), so it never unpickles it.
    """
    secret = hmac.new(key.secret, b"playbooks run key\0" + execution_id.encode("utf-8"), hashlib.sha256)
    return RecordKey(secret.hexdigest().encode("ascii"), f"the run key of {execution_id!r}, from {key.source}")


def _digest(header: bytes | memoryview, payload: bytes | memoryview, key: RecordKey) -> bytes:
    mac = key._mac.copy()
    mac.update(header)
    mac.update(payload)
    return mac.digest()


def encode_record(payload: bytes, *, key: RecordKey, place: Place) -> tuple[bytes, bytes]:
    """Wrap ``payload`` in a signed record bound to ``place``; return ``(record, its digest)``."""
    eid = place.execution_id.encode("utf-8")
    if len(eid) > _MAX_ID:
        raise ValueError(f"execution id is too long ({len(eid)} bytes, at most {_MAX_ID})")
    if len(place.lineage) != LINEAGE_SIZE or len(place.prev_digest) != DIGEST_SIZE:
        raise ValueError("a record's lineage must be 16 bytes and its previous digest 32 bytes")
    return seal(payload, key, eid, place.counter, place.lineage, place.prev_counter, place.prev_digest)


def seal(
    payload: bytes, key: RecordKey, eid: bytes, counter: int, lineage: bytes, prev_counter: int,
    prev_digest: bytes, *, compress: bool = False,
) -> tuple[bytes, bytes]:
    """:func:`encode_record` without the checks, for a writer that made its arguments itself (the
    manager, once per record); ``eid`` is the execution id in UTF-8. With ``compress`` the payload is
    stored zlib-compressed (level 1: fast) when that makes it at least a tenth smaller."""
    flags = 0
    if compress and _compressible(payload):
        packed = zlib.compress(payload, 1)
        if len(packed) * 10 <= len(payload) * 9:
            payload, flags = packed, FLAG_ZLIB
    header = _FIXED.pack(
        MAGIC, FORMAT_VERSION if flags else _PLAIN_VERSION, flags, len(payload), key.id, lineage, counter,
        prev_counter, prev_digest, len(eid),
    ) + eid
    digest = _digest(header, payload, key)
    return b"".join((header, digest, payload)), digest


def _compressible(payload: bytes) -> bool:
    """Whether a 64 KiB sample from the middle of ``payload`` compresses by a tenth: compressing a
    megabyte that does not compress (random bytes, an image) costs 20 ms; the sample, 1 ms."""
    if len(payload) <= 2 * _SAMPLE:
        return True
    middle = len(payload) // 2
    sample = payload[middle : middle + _SAMPLE]
    return len(zlib.compress(sample, 1)) * 10 <= len(sample) * 9


_SAMPLE = 64 * 1024
_HEAD = struct.Struct(">4sB16sQ32s")
_HEAD_MAGIC = b"PBHD"


def encode_head(lineage: bytes, counter: int, digest: bytes) -> bytes:
    """An execution's head: its lineage and its newest record (counter and digest).

    The head is not signed: it only points at a record, whose own digest (an HMAC) the reader
    compares with the one named here, so a forged head can only name a record that exists (which
    looks like a rollback) or fail to match (which is reported).
    """
    return _HEAD.pack(_HEAD_MAGIC, _PLAIN_VERSION, lineage, counter, digest)  # unchanged since version 2


def decode_head(data: bytes) -> tuple[bytes, int, bytes]:
    """``(lineage, counter, digest)`` of a head; raise
    :class:`~playbooks.errors.CheckpointCorruptError` (or its ``CheckpointFormatError``) if it is not one."""
    if len(data) != _HEAD.size or data[:4] != _HEAD_MAGIC:
        raise CheckpointCorruptError(f"not a checkpoint head ({len(data)} bytes starting {data[:4]!r})")
    _, version, lineage, counter, digest = _HEAD.unpack(data)
    if version not in _READ_VERSIONS:
        raise CheckpointFormatError(
            f"checkpoint head has format version {version}, and this playbooks reads versions "
            f"{_PLAIN_VERSION} and {FORMAT_VERSION}"
        )
    return lineage, counter, digest


def read_place(data: bytes | memoryview) -> tuple[Place, int]:
    """Structural checks of a record's header, without the key; return its place and payload offset.

    The place is *not verified*: use it only to say what a record claims, never to trust it.
    Raises :class:`~playbooks.errors.CheckpointCorruptError` or
    :class:`~playbooks.errors.CheckpointFormatError`.
    """
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
    if size >= 5 and view[4] not in _READ_VERSIONS:
        version = view[4]
        if version > FORMAT_VERSION:
            raise CheckpointFormatError(
                f"checkpoint record has format version {version}, and this playbooks reads version "
                f"{FORMAT_VERSION} (and {_PLAIN_VERSION}): it was written by a newer playbooks; upgrade "
                "playbooks to resume it"
            )
        raise CheckpointFormatError(
            f"checkpoint record has format version {version}, and this playbooks reads version "
            f"{FORMAT_VERSION} (and {_PLAIN_VERSION}) only: it was written by an older playbooks, whose "
            "records are not bound to their place; finish or clear that run with the playbooks version "
            "that wrote it"
        )
    if size < _FIXED.size:
        raise CheckpointCorruptError(
            f"checkpoint record is truncated: {size} bytes, shorter than its {_FIXED.size}-byte header"
        )
    _, version, flags, length, kid, lineage, counter, prev_counter, prev_digest, eid_len = _FIXED.unpack_from(view)
    if flags & ~(_KNOWN_FLAGS if version >= 3 else 0):
        raise CheckpointCorruptError(
            f"checkpoint record has unknown flags 0x{flags:02x}: the header is damaged"
        )
    start = _FIXED.size + eid_len + DIGEST_SIZE
    if size < start:
        raise CheckpointCorruptError(
            f"checkpoint record is truncated: {size} bytes, shorter than its {start}-byte header"
        )
    actual = size - start
    if length != actual:
        what = "truncated" if actual < length else "longer than its header says (trailing bytes)"
        raise CheckpointCorruptError(
            f"checkpoint record is {what}: the header announces {length} payload bytes, "
            f"the record holds {actual}"
        )
    try:
        execution_id = bytes(view[_FIXED.size : _FIXED.size + eid_len]).decode("utf-8")
    except UnicodeDecodeError:
        raise CheckpointCorruptError("checkpoint record's execution id is not UTF-8: the header is damaged") from None
    digest = bytes(view[start - DIGEST_SIZE : start])
    place = Place(execution_id, counter, lineage, prev_counter, prev_digest, digest, kid, bool(flags & FLAG_ZLIB))
    return place, start


def decode_record(
    data: bytes | memoryview, *, key: RecordKey, execution_id: str, counter: int
) -> tuple[Place, bytes]:
    """Verify a record found at ``(execution_id, counter)`` and return its place and payload.

    Raises :class:`~playbooks.errors.CheckpointCorruptError` if it is damaged,
    :class:`~playbooks.errors.CheckpointFormatError` if its format is unknown,
    :class:`~playbooks.errors.CheckpointKeyError` if it was signed with another key,
    :class:`~playbooks.errors.CheckpointTamperedError` if its signature fails, and
    :class:`~playbooks.errors.CheckpointForeignError` if it verifies but belongs to another place.
    The payload of a record that fails any check is never returned.
    """
    place, start = read_place(data)
    view = memoryview(data)
    if place.key_id != key.id:
        raise CheckpointKeyError(
            f"checkpoint record was signed with another key (key id {place.key_id.hex()}) than the one "
            f"configured ({key.id.hex()}, from {key.source}): resume with the key it was written with "
            f"({KEY_ENV_VAR}, the durability.hmac_key_env variable, or the key file named by "
            f"{KEY_FILE_ENV_VAR})"
        )
    if not hmac.compare_digest(_digest(view[: start - DIGEST_SIZE], view[start:], key), place.digest):
        raise CheckpointTamperedError(
            "checkpoint record fails its HMAC check: its bytes were changed after it was written "
            "(disk error, partial copy, manual edit or forgery)"
        )
    if place.execution_id != execution_id or place.counter != counter:
        raise CheckpointForeignError(
            f"checkpoint record was written as record {place.counter} of execution "
            f"{place.execution_id!r} but was found as record {counter} of execution {execution_id!r}: "
            "it was copied or moved here from another place, and is refused"
        )
    if place.compressed:
        return place, _inflate(view[start:])
    return place, bytes(view[start:])


def _inflate(stored: memoryview) -> bytes:
    """A verified compressed payload, inflated (bounded: a record cannot be a zip bomb)."""
    inflater = zlib.decompressobj()
    try:
        payload = inflater.decompress(stored, _MAX_INFLATED)
    except zlib.error as exc:
        raise CheckpointCorruptError(f"checkpoint record's compressed payload cannot be inflated: {exc}") from None
    if inflater.unconsumed_tail or not inflater.eof:
        raise CheckpointCorruptError(
            "checkpoint record's compressed payload is incomplete or inflates beyond 2 GiB"
        )
    return payload
