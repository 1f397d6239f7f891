"""Tests of the checkpoint integrity envelope: nothing damaged or unverified ever comes out."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from playbooks.checkpoints.codec import (
    FORMAT_VERSION,
    HEADER_SIZE,
    KEY_ENV_VAR,
    MAGIC,
    decode_record,
    encode_record,
    resolve_key,
)
from playbooks.errors import CheckpointCorruptError, CheckpointTamperedError

KEY = b"correct horse battery staple"


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV_VAR, raising=False)


@given(payload=st.binary(max_size=2048), signed=st.booleans())
@settings(max_examples=100)
def test_roundtrip(payload: bytes, signed: bool) -> None:
    key = KEY if signed else None
    record = encode_record(payload, key=key)
    assert len(record) == HEADER_SIZE + len(payload)
    assert record.startswith(MAGIC)
    assert decode_record(record, key=key) == payload


def test_roundtrip_accepts_bytes_like_input() -> None:
    record = encode_record(b"abc")
    assert decode_record(bytearray(record)) == b"abc"  # type: ignore[arg-type]
    assert decode_record(memoryview(record)) == b"abc"  # type: ignore[arg-type]


def test_empty_payload_is_a_valid_record() -> None:
    assert decode_record(encode_record(b"")) == b""


def test_zero_length_record() -> None:
    with pytest.raises(CheckpointCorruptError, match="empty"):
        decode_record(b"")


@pytest.mark.parametrize("signed", [False, True])
def test_every_truncation_is_detected(signed: bool) -> None:
    key = KEY if signed else None
    record = encode_record(b"some pickled namespace" * 3, key=key)
    for cut in range(len(record)):
        with pytest.raises(CheckpointCorruptError) as info:
            decode_record(record[:cut], key=key)
        assert not isinstance(info.value, CheckpointTamperedError), cut


@pytest.mark.parametrize("cut", [0, 1, 3, 4, 13, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 5])
def test_truncation_messages(cut: int) -> None:
    record = encode_record(b"0123456789")
    with pytest.raises(CheckpointCorruptError, match="empty|truncated|magic"):
        decode_record(record[:cut])


def test_trailing_bytes_are_detected() -> None:
    with pytest.raises(CheckpointCorruptError, match="trailing"):
        decode_record(encode_record(b"abc") + b"\0")


@pytest.mark.parametrize("signed", [False, True])
def test_every_bit_flip_is_detected(signed: bool) -> None:
    key = KEY if signed else None
    record = encode_record(b"x = 1; y = [1, 2]", key=key)
    for i in range(len(record) * 8):
        damaged = bytearray(record)
        damaged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CheckpointCorruptError):
            decode_record(bytes(damaged), key=key)


def test_wrong_magic() -> None:
    record = b"XXXX" + encode_record(b"abc")[4:]
    with pytest.raises(CheckpointCorruptError, match="magic"):
        decode_record(record)


def test_pickle_is_not_mistaken_for_a_record() -> None:
    with pytest.raises(CheckpointCorruptError, match="not a playbooks checkpoint"):
        decode_record(b"\x80\x05\x95\x00")


def test_future_version() -> None:
    record = bytearray(encode_record(b"abc"))
    record[4] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointCorruptError, match="newer playbooks"):
        decode_record(bytes(record))


def test_version_zero() -> None:
    record = bytearray(encode_record(b"abc"))
    record[4] = 0
    with pytest.raises(CheckpointCorruptError, match="format version 0"):
        decode_record(bytes(record))


def test_unknown_flags() -> None:
    record = bytearray(encode_record(b"abc"))
    record[5] |= 0x80
    with pytest.raises(CheckpointCorruptError, match="flags"):
        decode_record(bytes(record))


def test_length_mismatch_with_valid_structure() -> None:
    record = bytearray(encode_record(b"abcdef"))
    struct.pack_into(">Q", record, 6, 5)
    with pytest.raises(CheckpointCorruptError, match="announces 5"):
        decode_record(bytes(record))


def test_checksum_mismatch() -> None:
    record = bytearray(encode_record(b"abcdef"))
    record[-1] ^= 0xFF
    with pytest.raises(CheckpointCorruptError, match="checksum") as info:
        decode_record(bytes(record))
    assert not isinstance(info.value, CheckpointTamperedError)


def test_tampered_payload_with_key() -> None:
    record = bytearray(encode_record(b"balance = 10", key=KEY))
    record[-2:] = b"99"
    with pytest.raises(CheckpointTamperedError, match="HMAC"):
        decode_record(bytes(record), key=KEY)


def test_wrong_key() -> None:
    record = encode_record(b"abc", key=KEY)
    with pytest.raises(CheckpointTamperedError, match=KEY_ENV_VAR):
        decode_record(record, key=b"another key")


def test_forged_record_with_recomputed_plain_checksum_fails_with_key() -> None:
    # An attacker without the key can only produce unsigned records; they are refused.
    forged = encode_record(b"evil")
    with pytest.raises(CheckpointTamperedError, match="not signed"):
        decode_record(forged, key=KEY)


def test_signed_without_key() -> None:
    with pytest.raises(CheckpointTamperedError, match=KEY_ENV_VAR):
        decode_record(encode_record(b"abc", key=KEY))


def test_empty_key_is_refused() -> None:
    with pytest.raises(ValueError):
        encode_record(b"abc", key=b"")
    with pytest.raises(ValueError):
        decode_record(encode_record(b"abc"), key=b"")
    with pytest.raises(ValueError):
        resolve_key("")


def test_resolve_key(monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve_key() is None
    assert resolve_key("s3cret") == b"s3cret"
    assert resolve_key(b"\x00\x01") == b"\x00\x01"
    monkeypatch.setenv(KEY_ENV_VAR, "from-env")
    assert resolve_key() == b"from-env"
    assert resolve_key("explicit") == b"explicit"
    monkeypatch.setenv(KEY_ENV_VAR, "")
    assert resolve_key() is None


def test_env_var_key_roundtrip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV_VAR, "env-key")
    record = encode_record(b"payload", key=resolve_key())
    assert decode_record(record, key=resolve_key()) == b"payload"
    monkeypatch.setenv(KEY_ENV_VAR, "rotated")
    with pytest.raises(CheckpointTamperedError):
        decode_record(record, key=resolve_key())
    monkeypatch.delenv(KEY_ENV_VAR)
    with pytest.raises(CheckpointTamperedError, match="no key"):
        decode_record(record, key=resolve_key())


def test_large_payload_roundtrip() -> None:
    payload = bytes(range(256)) * 40_000  # ~10 MB
    assert decode_record(encode_record(payload, key=KEY), key=KEY) == payload
