"""A stored backup that was altered, cut, rearranged or opened with the wrong key never restores.

Every case checks two things: ``BackupIntegrityError`` is raised, and ``open_stream`` released
exactly the bytes of the chunks before the first bad one (computed independently from the
untouched stream), so a restore never writes data that did not authenticate.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import pytest

from coffer.backup import (
    BackupIntegrityError,
    SealedStreamInfo,
    open_stream,
    seal_stream,
    verify_stream,
)
from coffer.backup._zstd import ZstdCompressor, ZstdDecompressor
from coffer.backup.format import HEADER_SIZE, TAG_SIZE, StreamHeader, open_chunks, seal_chunks
from coffer.bus.keys import generate_key, unwrap_key, wrap_key
from coffer.errors import Conflict

CHUNK = 16384
BACKUP_ID = "c0ffee00-0000-4000-8000-000000000001"


@dataclass(frozen=True)
class Sealed:
    master: bytes
    data: bytes
    info: SealedStreamInfo
    header: bytes
    frames: list[bytes]
    #: decodable[k] = how many original bytes the first k chunks hold (whole zstd blocks only).
    decodable: list[int]

    @property
    def blob(self) -> bytes:
        return self.header + b"".join(self.frames)


def _mixed(size: int) -> bytes:
    rng = random.Random(5)
    parts = []
    for index in range(size // 50_000 + 1):
        if index % 2:
            parts.append(rng.randbytes(50_000))
        else:
            parts.append(b"row %08d: some text that repeats\n" % index * 1500)
    return b"".join(parts)[:size]


def _seal(master: bytes, data: bytes, backup_id: str = BACKUP_ID) -> Sealed:
    stored_iter, info_of = seal_stream(iter([data]), master, backup_id, chunk_size=CHUNK)
    blob = b"".join(stored_iter)
    info = info_of()
    body = blob[HEADER_SIZE:]
    frame = CHUNK + TAG_SIZE
    frames = [body[i : i + frame] for i in range(0, len(body), frame)]
    key = unwrap_key(master, info.wrapped_key, backup_id)
    plain = list(open_chunks([blob], key, backup_id))
    decodable = [len(ZstdDecompressor().decompress(b"".join(plain[:k]))) for k in range(len(plain))]
    return Sealed(master, data, info, blob[:HEADER_SIZE], frames, decodable)


@pytest.fixture(scope="module")
def sealed() -> Sealed:
    result = _seal(generate_key(), _mixed(1_500_000))
    # Enough chunks for first/middle/last to differ, and real output before the middle one.
    assert len(result.frames) >= 10
    assert 0 < result.decodable[len(result.frames) // 2] < len(result.data)
    return result


def _pieces(blob: bytes, size: int = 10_000) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def _drain(stream: Iterator[bytes]) -> tuple[bytes, BackupIntegrityError | None]:
    out = bytearray()
    try:
        for piece in stream:
            out += piece
    except BackupIntegrityError as exc:
        return bytes(out), exc
    return bytes(out), None


def _check_refused(
    sealed: Sealed, blob: bytes, released_chunks: int, checksum: str | None = None
) -> BackupIntegrityError:
    """Open ``blob``: it must fail after releasing exactly ``released_chunks`` chunks' bytes."""
    out, error = _drain(
        open_stream(_pieces(blob), sealed.master, BACKUP_ID, sealed.info.wrapped_key, checksum)
    )
    assert error is not None, "a damaged backup opened"
    assert out == sealed.data[: sealed.decodable[released_chunks]]
    with pytest.raises(BackupIntegrityError):
        verify_stream(
            _pieces(blob),
            sealed.master,
            BACKUP_ID,
            sealed.info.wrapped_key,
            checksum or sealed.info.checksum,
        )
    return error


def test_the_untouched_stream_opens(sealed: Sealed) -> None:
    out, error = _drain(
        open_stream(
            _pieces(sealed.blob),
            sealed.master,
            BACKUP_ID,
            sealed.info.wrapped_key,
            sealed.info.checksum,
        )
    )
    assert error is None and out == sealed.data


@pytest.mark.parametrize("offset", range(HEADER_SIZE))
def test_a_flipped_header_byte_releases_nothing(sealed: Sealed, offset: int) -> None:
    blob = bytearray(sealed.blob)
    blob[offset] ^= 0x01
    _check_refused(sealed, bytes(blob), released_chunks=0)


@pytest.mark.parametrize("where", ["first", "second", "middle", "last-ciphertext", "last-tag"])
@pytest.mark.parametrize("with_checksum", [False, True], ids=["no-checksum", "checksum"])
def test_a_flipped_chunk_byte_stops_before_that_chunk(
    sealed: Sealed, where: str, with_checksum: bool
) -> None:
    last = len(sealed.frames) - 1
    chunk, position = {
        "first": (0, 0),
        "second": (1, CHUNK // 2),
        "middle": (last // 2, 100),
        "last-ciphertext": (last, 0),
        "last-tag": (last, len(sealed.frames[last]) - 1),
    }[where]
    offset = HEADER_SIZE + chunk * (CHUNK + TAG_SIZE) + position
    blob = bytearray(sealed.blob)
    blob[offset] ^= 0x80
    checksum = sealed.info.checksum if with_checksum else None
    error = _check_refused(sealed, bytes(blob), released_chunks=chunk, checksum=checksum)
    if not with_checksum:
        assert f"chunk ({chunk})" in str(error) or f"chunk {chunk} " in str(error)


def _rearranged(sealed: Sealed, change: str) -> tuple[bytes, int]:
    """The stream after ``change``, and how many chunks are still in place before the damage."""
    frames = list(sealed.frames)
    last = len(frames) - 1
    if change == "drop-second":
        del frames[1]
        return sealed.header + b"".join(frames), 1
    if change == "swap-2-3":
        frames[2], frames[3] = frames[3], frames[2]
        return sealed.header + b"".join(frames), 2
    if change == "duplicate-2":
        frames.insert(3, frames[2])
        return sealed.header + b"".join(frames), 3
    if change == "drop-last":
        del frames[last]
        return sealed.header + b"".join(frames), last - 1
    if change == "duplicate-last":
        frames.append(frames[last])
        return sealed.header + b"".join(frames), last
    if change == "last-moved-first":
        frames.insert(0, frames.pop())
        return sealed.header + b"".join(frames), 0
    if change == "one-byte-appended":
        return sealed.blob + b"\0", last
    if change == "cut-inside-last":
        return sealed.blob[:-TAG_SIZE], last
    if change == "cut-one-byte":
        return sealed.blob[:-1], last
    raise AssertionError(change)


@pytest.mark.parametrize(
    "change",
    [
        "drop-second",
        "swap-2-3",
        "duplicate-2",
        "drop-last",
        "duplicate-last",
        "last-moved-first",
        "one-byte-appended",
        "cut-inside-last",
        "cut-one-byte",
    ],
)
@pytest.mark.parametrize("with_checksum", [False, True], ids=["no-checksum", "checksum"])
def test_dropped_reordered_duplicated_or_cut_chunks_are_refused(
    sealed: Sealed, change: str, with_checksum: bool
) -> None:
    blob, intact = _rearranged(sealed, change)
    checksum = sealed.info.checksum if with_checksum else None
    _check_refused(sealed, blob, released_chunks=intact, checksum=checksum)


@pytest.mark.parametrize(
    "cut", [0, 1, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 1, HEADER_SIZE + TAG_SIZE - 1]
)
def test_a_stream_cut_near_its_start_releases_nothing(sealed: Sealed, cut: int) -> None:
    _check_refused(sealed, sealed.blob[:cut], released_chunks=0)


def test_chunks_spliced_from_another_backup_are_refused(sealed: Sealed) -> None:
    # Same master key, same data, same backup id: only the per-backup key and nonces differ.
    other = _seal(sealed.master, sealed.data)
    frames = list(sealed.frames)
    frames[2] = other.frames[2]
    _check_refused(sealed, sealed.header + b"".join(frames), released_chunks=2)
    # Another backup's header (its nonce prefix) in front of our chunks.
    _check_refused(sealed, other.header + b"".join(sealed.frames), released_chunks=0)


def _untouched_source(sealed: Sealed, touched: list[bool]) -> Iterator[bytes]:
    touched.append(True)
    yield sealed.blob


@pytest.mark.parametrize("wrong", ["backup-id", "master-key", "altered-key"])
def test_wrong_keys_or_backup_id_fail_before_reading(sealed: Sealed, wrong: str) -> None:
    backup_id, master, wrapped = BACKUP_ID, sealed.master, sealed.info.wrapped_key
    if wrong == "backup-id":
        backup_id = "c0ffee00-0000-4000-8000-000000000002"
    elif wrong == "master-key":
        master = generate_key()
    else:
        middle = len(wrapped) // 2
        flipped = "A" if wrapped[middle] != "A" else "B"
        wrapped = wrapped[:middle] + flipped + wrapped[middle + 1 :]
    touched: list[bool] = []
    with pytest.raises(BackupIntegrityError, match="does not unwrap") as caught:
        open_stream(_untouched_source(sealed, touched), master, backup_id, wrapped)
    with pytest.raises(BackupIntegrityError, match="does not unwrap"):
        verify_stream(
            _untouched_source(sealed, touched), master, backup_id, wrapped, sealed.info.checksum
        )
    assert touched == []
    message = str(caught.value)
    assert master.hex() not in message and wrapped not in message


def test_the_data_key_of_another_backup_opens_no_chunk(sealed: Sealed) -> None:
    # A key recorded for another backup under the same id (a retried backup, a mixed-up row)
    # unwraps, but it is not this stream's key: the first chunk already fails.
    other = _seal(sealed.master, b"other data")
    out, error = _drain(
        open_stream(_pieces(sealed.blob), sealed.master, BACKUP_ID, other.info.wrapped_key)
    )
    assert out == b""
    assert error is not None and "chunk 0 failed authentication" in str(error)


def test_a_wrong_checksum_withholds_the_last_chunk(sealed: Sealed) -> None:
    wrong = "0" * 64
    out, error = _drain(
        open_stream(_pieces(sealed.blob), sealed.master, BACKUP_ID, sealed.info.wrapped_key, wrong)
    )
    assert error is not None and "checksum" in str(error)
    assert out == sealed.data[: sealed.decodable[len(sealed.frames) - 1]]
    assert len(out) < len(sealed.data)
    with pytest.raises(BackupIntegrityError, match="checksum"):
        verify_stream(
            _pieces(sealed.blob), sealed.master, BACKUP_ID, sealed.info.wrapped_key, wrong
        )


def test_the_error_is_a_409_conflict_that_is_not_transient(sealed: Sealed) -> None:
    error = _check_refused(sealed, sealed.blob[:-1], released_chunks=len(sealed.frames) - 1)
    assert isinstance(error, Conflict)
    assert error.status == 409 and error.transient is False
    assert str(error).startswith(f"backup {BACKUP_ID} is tampered or corrupted: ")
    assert sealed.master.hex() not in str(error)


def _seal_payload(master: bytes, payload: Iterable[bytes]) -> tuple[bytes, str]:
    """A stream whose chunks authenticate but whose payload is whatever the test wants."""
    key = generate_key()
    blob = b"".join(seal_chunks(payload, key, StreamHeader.new(CHUNK), BACKUP_ID))
    return blob, wrap_key(master, key, key_id=BACKUP_ID)


def _frame(data: bytes) -> bytes:
    compressor = ZstdCompressor()
    return compressor.compress(data) + compressor.flush(ZstdCompressor.FLUSH_FRAME)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (lambda: b"this is not zstd at all", "not valid zstd data"),
        (lambda: _frame(b"x" * 50_000)[:-3], "ends before its end"),
        (lambda: _frame(b"x" * 50_000) + b"junk", "data follows the end"),
        (lambda: _frame(b"x" * 50_000) + _frame(b"second frame"), "data follows the end"),
        (lambda: b"", "ends before its end"),
    ],
    ids=["not-zstd", "cut-frame", "trailing-bytes", "second-frame", "empty"],
)
def test_an_authentic_but_malformed_payload_is_refused(
    payload: Callable[[], bytes], message: str
) -> None:
    # Only a bug in the writer could produce these; the reader still refuses them.
    master = generate_key()
    blob, wrapped = _seal_payload(master, [payload()])
    with pytest.raises(BackupIntegrityError, match=message):
        b"".join(open_stream([blob], master, BACKUP_ID, wrapped))


# The chunk layer on its own: with an opaque payload there is no zstd frame end to notice a cut,
# so these pin that the AEAD framing alone detects it.


@pytest.mark.parametrize(
    "change", ["drop-last", "drop-second", "swap-2-3", "duplicate-last", "cut-inside-last"]
)
def test_the_chunk_layer_alone_detects_cuts_and_reordering(change: str) -> None:
    key = generate_key()
    payload = os.urandom(6 * CHUNK + 100)
    stored = list(seal_chunks([payload], key, StreamHeader.new(CHUNK), BACKUP_ID))
    header, frames = stored[0], stored[1:]
    last = len(frames) - 1
    if change == "drop-last":
        kept, intact = frames[:last], last - 1
    elif change == "drop-second":
        kept, intact = frames[:1] + frames[2:], 1
    elif change == "swap-2-3":
        kept, intact = [*frames[:2], frames[3], frames[2], *frames[4:]], 2
    elif change == "duplicate-last":
        kept, intact = [*frames, frames[last]], last
    else:
        kept, intact = [*frames[:last], frames[last][:-1]], last
    released = []
    with pytest.raises(BackupIntegrityError, match="failed authentication"):
        for plaintext in open_chunks([header, *kept], key, BACKUP_ID):
            released.append(plaintext)
    assert b"".join(released) == payload[: intact * CHUNK]
