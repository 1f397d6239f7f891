"""Tests of the checkpoint integrity envelope: nothing damaged, unverified or misplaced ever comes out."""

from __future__ import annotations

import os
import stat
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from playbooks.checkpoints.codec import (
    FORMAT_VERSION,
    KEY_ENV_VAR,
    KEY_FILE_ENV_VAR,
    MAGIC,
    Place,
    RecordKey,
    decode_record,
    encode_record,
    header_size,
    new_lineage,
    read_place,
    resolve_key,
)
from playbooks.errors import (
    CheckpointCorruptError,
    CheckpointForeignError,
    CheckpointFormatError,
    CheckpointKeyError,
    CheckpointTamperedError,
)

KEY = RecordKey(b"correct horse battery staple", "a test key")
LINEAGE = bytes(range(16))


@pytest.fixture(autouse=True)
def _no_env_key(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(KEY_ENV_VAR, raising=False)
    monkeypatch.setenv(KEY_FILE_ENV_VAR, str(tmp_path / "keys" / "checkpoint.key"))


def _place(counter: int = 7, execution_id: str = "run-1", prev: int = 6) -> Place:
    return Place(execution_id, counter, LINEAGE, prev, bytes([prev]) * 32)


def _encode(payload: bytes, key: RecordKey = KEY, place: Place | None = None) -> bytes:
    return encode_record(payload, key=key, place=place or _place())[0]


def _decode(data: bytes, key: RecordKey = KEY, execution_id: str = "run-1", counter: int = 7) -> bytes:
    return decode_record(data, key=key, execution_id=execution_id, counter=counter)[1]


@given(payload=st.binary(max_size=2048), execution_id=st.text(min_size=1, max_size=40))
@settings(max_examples=100)
def test_roundtrip(payload: bytes, execution_id: str) -> None:
    record, digest = encode_record(payload, key=KEY, place=_place(execution_id=execution_id))
    assert len(record) == header_size(execution_id) + len(payload)
    assert record.startswith(MAGIC)
    place, out = decode_record(record, key=KEY, execution_id=execution_id, counter=7)
    assert out == payload
    assert (place.execution_id, place.counter, place.lineage, place.prev_counter) == (execution_id, 7, LINEAGE, 6)
    assert place.digest == digest and place.key_id == KEY.id


def test_roundtrip_accepts_bytes_like_input() -> None:
    record = _encode(b"abc")
    assert _decode(bytearray(record)) == b"abc"  # type: ignore[arg-type]
    assert _decode(memoryview(record)) == b"abc"  # type: ignore[arg-type]


def test_zero_length_record() -> None:
    with pytest.raises(CheckpointCorruptError, match="empty"):
        _decode(b"")


def test_every_truncation_is_detected() -> None:
    record = _encode(b"some pickled namespace" * 3)
    for cut in range(len(record)):
        with pytest.raises(CheckpointCorruptError, match="empty|truncated|magic"):
            _decode(record[:cut])


def test_trailing_bytes_are_detected() -> None:
    with pytest.raises(CheckpointCorruptError, match="trailing"):
        _decode(_encode(b"abc") + b"\0")


def test_every_bit_flip_is_detected() -> None:
    record = _encode(b"x = 1; y = [1, 2]")
    for i in range(len(record) * 8):
        damaged = bytearray(record)
        damaged[i // 8] ^= 1 << (i % 8)
        with pytest.raises(CheckpointCorruptError):
            _decode(bytes(damaged))


def test_pickle_is_not_mistaken_for_a_record() -> None:
    with pytest.raises(CheckpointCorruptError, match="not a playbooks checkpoint"):
        _decode(b"\x80\x05\x95\x00")


def test_future_version_names_both_versions() -> None:
    record = bytearray(_encode(b"abc"))
    record[4] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointFormatError, match=f"version {FORMAT_VERSION + 1}.*version {FORMAT_VERSION}.*newer"):
        _decode(bytes(record))


def test_older_version_is_refused_with_both_versions() -> None:
    record = bytearray(_encode(b"abc"))
    record[4] = 1
    with pytest.raises(CheckpointFormatError, match=f"version 1.*version {FORMAT_VERSION}.*older"):
        _decode(bytes(record))


def test_unknown_flags() -> None:
    record = bytearray(_encode(b"abc"))
    record[5] |= 0x80
    with pytest.raises(CheckpointCorruptError, match="flags"):
        _decode(bytes(record))


def test_length_mismatch_with_valid_structure() -> None:
    record = bytearray(_encode(b"abcdef"))
    struct.pack_into(">Q", record, 6, 5)
    with pytest.raises(CheckpointCorruptError, match="announces 5"):
        _decode(bytes(record))


def test_tampered_payload() -> None:
    record = bytearray(_encode(b"balance = 10"))
    record[-2:] = b"99"
    with pytest.raises(CheckpointTamperedError, match="HMAC"):
        _decode(bytes(record))


def test_wrong_key_is_a_key_error_naming_where_the_key_comes_from() -> None:
    record = _encode(b"abc")
    other = RecordKey(b"another key", "the environment variable MY_KEY")
    with pytest.raises(CheckpointKeyError, match=f"key id {KEY.id.hex()}.*{other.id.hex()}.*MY_KEY"):
        _decode(record, key=other)


def test_transplants_are_refused() -> None:
    record = _encode(b"abc", place=_place(counter=7, execution_id="run-1"))
    with pytest.raises(CheckpointForeignError, match="record 7 of execution 'run-1'.*record 8"):
        _decode(record, counter=8)
    with pytest.raises(CheckpointForeignError, match="execution 'run-2'"):
        _decode(record, execution_id="run-2")


def test_read_place_needs_no_key() -> None:
    record = _encode(b"abc", place=_place(counter=3, prev=2))
    place, start = read_place(record)
    assert place.counter == 3 and place.prev_counter == 2 and place.prev_digest == bytes([2]) * 32
    assert record[start:] == b"abc"


def test_empty_key_is_refused() -> None:
    with pytest.raises(ValueError):
        resolve_key("")


def test_resolve_key_order(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert resolve_key("s3cret").secret == b"s3cret"
    assert resolve_key(b"\x00\x01").secret == b"\x00\x01"
    monkeypatch.setenv(KEY_ENV_VAR, "from-env")
    assert resolve_key().secret == b"from-env" and KEY_ENV_VAR in resolve_key().source
    assert resolve_key("explicit").secret == b"explicit"  # an explicit key wins
    monkeypatch.setenv("OTHER_VAR", "other")
    assert resolve_key(env_var="OTHER_VAR").secret == b"other"
    monkeypatch.setenv(KEY_ENV_VAR, "")  # empty counts as unset: the default key file
    assert "default key file" in resolve_key().source


def test_default_key_file_is_created_once_private(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        first = resolve_key()
    finally:
        os.umask(old)
    path = tmp_path / "keys" / "checkpoint.key"
    assert str(path) in first.source
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert len(first.secret) == 64
    assert resolve_key().secret == first.secret  # created once, then read


def test_uncreatable_key_file_is_a_key_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv(KEY_FILE_ENV_VAR, str(blocker / "checkpoint.key"))
    with pytest.raises(CheckpointKeyError, match=f"{KEY_ENV_VAR}.*{KEY_FILE_ENV_VAR}"):
        resolve_key()


def test_key_repr_hides_the_secret() -> None:
    assert "horse" not in repr(KEY)


def test_new_lineages_differ() -> None:
    assert new_lineage() != new_lineage() and len(new_lineage()) == 16


def test_large_payload_roundtrip() -> None:
    payload = bytes(range(256)) * 40_000  # ~10 MB
    assert _decode(_encode(payload)) == payload


def test_head_roundtrip_and_damage() -> None:
    from playbooks.checkpoints.codec import decode_head, encode_head

    head = encode_head(LINEAGE, 42, b"d" * 32)
    assert decode_head(head) == (LINEAGE, 42, b"d" * 32)
    with pytest.raises(CheckpointCorruptError, match="not a checkpoint head"):
        decode_head(head[:-1])
    newer = bytearray(head)
    newer[4] = FORMAT_VERSION + 1
    with pytest.raises(CheckpointFormatError, match="version"):
        decode_head(bytes(newer))


# --- compressed payloads ---------------------------------------------------------------------------


def _sealed(payload: bytes, *, compress: bool, key: RecordKey = KEY) -> bytes:
    from playbooks.checkpoints.codec import seal

    place = _place()
    return seal(
        payload, key, place.execution_id.encode(), place.counter, place.lineage, place.prev_counter,
        place.prev_digest, compress=compress,
    )[0]


@given(payload=st.binary(max_size=4096) | st.text(max_size=20000).map(str.encode))
@settings(max_examples=80)
def test_compressed_records_roundtrip_and_only_when_it_pays(payload: bytes) -> None:
    import zlib

    from playbooks.checkpoints.codec import FLAG_ZLIB

    data = _sealed(payload, compress=True)
    place, out = decode_record(data, key=KEY, execution_id="run-1", counter=7)
    assert out == payload
    pays = len(zlib.compress(payload, 1)) * 10 <= len(payload) * 9
    assert place.compressed is pays and bool(data[5] & FLAG_ZLIB) is pays
    assert len(data) <= len(_sealed(payload, compress=False))


def test_a_compressed_record_is_verified_before_it_is_inflated() -> None:
    payload = b"abc" * 50000
    data = bytearray(_sealed(payload, compress=True))
    assert len(data) < 10000
    data[-5] ^= 0xFF  # damage inside the compressed bytes
    with pytest.raises(CheckpointTamperedError):
        _decode(bytes(data))
    forged = bytearray(_sealed(b"x" * 100, compress=False))
    forged[5] = 0x02  # a flag this version does not know
    with pytest.raises(CheckpointCorruptError, match="unknown flags 0x02"):
        _decode(bytes(forged))


def test_a_signed_record_flagged_compressed_that_is_not_zlib_is_corrupt() -> None:
    """Only a key holder can sign one; the reader still says what is wrong instead of crashing."""
    import hashlib
    import hmac as hmac_module

    plain = bytearray(_sealed(b"not zlib at all" * 10, compress=False))
    plain[5] = 0x01
    with pytest.raises(CheckpointCorruptError, match="unknown flags 0x01"):  # a version-2 record has none
        _decode(bytes(plain))
    plain[4] = 3
    eid_len = struct.unpack_from(">H", plain, 86)[0]
    start = 88 + eid_len
    mac = hmac_module.new(KEY.secret, digestmod=hashlib.sha256)
    mac.update(bytes(plain[:start]))
    mac.update(bytes(plain[start + 32 :]))
    plain[start : start + 32] = mac.digest()
    with pytest.raises(CheckpointCorruptError, match="cannot be inflated"):
        _decode(bytes(plain))


def test_run_keys_are_bound_to_their_execution_and_never_the_key_itself() -> None:
    from playbooks.checkpoints.codec import derive_run_key

    run_a, run_b = derive_run_key(KEY, "run-a"), derive_run_key(KEY, "run-b")
    assert run_a.secret != KEY.secret and run_a.id != KEY.id and run_a.id != run_b.id
    assert derive_run_key(KEY, "run-a").secret == run_a.secret  # the host derives it again at resume
    assert derive_run_key(RecordKey(b"another key", "x"), "run-a").secret != run_a.secret
    data, _ = encode_record(b"payload", key=run_a, place=Place("run-a", 1, LINEAGE))
    with pytest.raises(CheckpointKeyError):
        decode_record(data, key=KEY, execution_id="run-a", counter=1)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_manager_reads_its_workers_records_but_marks_them(anyio_backend: str) -> None:
    """Records signed with the execution's run key load (metadata: listing, recovery) and are marked
    isolated, so nothing of them is unpickled in the host; any other key is still refused."""
    from playbooks.checkpoints import CheckpointManager
    from playbooks.checkpoints.model import Record
    from playbooks.checkpoints.providers.memory import MemoryCheckpointProvider
    from playbooks.errors import IsolatedRunError

    provider = MemoryCheckpointProvider()
    host = CheckpointManager("iso", provider, key=KEY.secret)
    worker = CheckpointManager("iso", provider, key=host.run_key)
    await worker.open()
    await worker.write(Record("snapshot", "iso", worker.allocate_counter(), 0.0, "f", "agent", (), 0, "x = 1\n",
                              executed_offset=6), sync=True)
    await worker.close()
    checkpoint = await host.get_latest_checkpoint()
    assert checkpoint is not None and checkpoint.state.isolated and checkpoint.state.response == "x = 1\n"
    with pytest.raises(IsolatedRunError):
        checkpoint["namespace"]
    stranger = CheckpointManager("iso", provider, key=b"some other key")
    with pytest.raises(CheckpointKeyError):
        await stranger.load_records()
    await host.close()
