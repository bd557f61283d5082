"""The backup stream pipeline: round trips, sizes, argument checks and the stored format.

Real data through real zstd and AES-256-GCM; tampering is in test_backup_stream_integrity.py.
"""

from __future__ import annotations

import hashlib
import os
import random
import resource
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coffer.backup import (
    BackupIntegrityError,
    SealedStreamInfo,
    open_stream,
    seal_stream,
    verify_stream,
)
from coffer.backup._zstd import ZstdDecompressor
from coffer.backup.format import (
    HEADER_SIZE,
    MAGIC,
    TAG_SIZE,
    StreamHeader,
    open_chunks,
    seal_chunks,
)
from coffer.bus.keys import generate_key, unwrap_key
from coffer.errors import ValidationError

MIB = 1 << 20
CHUNK = 4096


@pytest.fixture(scope="module")
def master() -> bytes:
    return generate_key()


def mixed_blocks(size: int, block: int = MIB, seed: int = 0) -> Iterator[bytes]:
    """``size`` bytes cycling through incompressible, text-like and mostly-zero blocks."""
    rng = random.Random(seed)
    text = bytes(b" etaoinshrdlu"[i % 13] if i < 208 else i for i in range(256))
    produced = 0
    index = 0
    while produced < size:
        length = min(block, size - produced)
        kind = index % 3
        if kind == 0:
            data = rng.randbytes(length)
        elif kind == 1:
            data = rng.randbytes(length).translate(text)
        else:
            data = bytes(length // 2) + rng.randbytes(64) * ((length - length // 2) // 64 + 1)
            data = data[:length]
        produced += length
        index += 1
        yield data


def seal_all(
    pieces: list[bytes], master: bytes, backup_id: str = "backup-1", **options: int
) -> tuple[list[bytes], SealedStreamInfo]:
    stored_iter, info = seal_stream(iter(pieces), master, backup_id, **options)
    stored = list(stored_iter)
    return stored, info()


def open_all(stored: list[bytes], master: bytes, info: SealedStreamInfo, backup_id: str) -> bytes:
    return b"".join(open_stream(stored, master, backup_id, info.wrapped_key, info.checksum))


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"{field} missing from /proc/self/status")


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark for this process (Linux 4.0+); False if not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


@pytest.mark.slow
def test_384_mib_round_trip_keeps_memory_bounded(master: bytes, tmp_path: Path) -> None:
    size = 384 * MIB
    source_digest = hashlib.sha256()

    def source() -> Iterator[bytes]:
        for block in mixed_blocks(size, seed=7):
            source_digest.update(block)
            yield block

    stored_path = tmp_path / "backup.bin"
    rss_before = _rss_kib("VmRSS")
    precise_rss = _reset_peak_rss()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    tracemalloc.start()
    try:
        stored_iter, info_of = seal_stream(source(), master, "big", chunk_size=MIB, threads=2)
        stored_digest = hashlib.sha256()
        with stored_path.open("wb") as handle:
            for piece in stored_iter:
                stored_digest.update(piece)
                handle.write(piece)
        seal_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()

        info = info_of()

        def stored_source() -> Iterator[bytes]:
            with stored_path.open("rb") as handle:
                while piece := handle.read(MIB):
                    yield piece

        restored_digest = hashlib.sha256()
        restored = 0
        for piece in open_stream(stored_source(), master, "big", info.wrapped_key, info.checksum):
            assert len(piece) <= MIB
            restored_digest.update(piece)
            restored += len(piece)
        open_peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if precise_rss:
        rss_growth = (_rss_kib("VmHWM") - rss_before) * 1024
    else:  # only a lower bound: the process may have peaked higher before this test
        rss_growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss_before) * 1024

    assert info.raw_size == size == restored
    assert restored_digest.digest() == source_digest.digest()
    assert info.size == stored_path.stat().st_size
    assert info.checksum == stored_digest.hexdigest()
    assert info.size < size * 0.7  # it was compressed
    # zstd allocates through Python's allocator, so this counts its two workers' buffers
    # (about 22 MiB at level 3) plus a chunk and a compression job's output: never the data.
    assert seal_peak < 40 * MIB, seal_peak
    assert open_peak < 16 * MIB, open_peak
    # The whole process, zstd's multi-threaded job buffers included (about 70 MiB whatever the
    # data size), stays far below the 384 MiB that went through.
    assert rss_growth < 144 * MIB, rss_growth


@pytest.mark.parametrize(
    "size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, MIB, 3 * MIB + 7], ids=str
)
def test_round_trip_of_sizes_around_chunk_and_slice_boundaries(master: bytes, size: int) -> None:
    data = b"".join(mixed_blocks(size, block=CHUNK * 5 + 3, seed=size))
    rng = random.Random(size)
    pieces: list[bytes] = []
    offset = 0
    while offset < size:  # source pieces of unrelated sizes, empty ones included
        step = rng.choice([0, 1, 7, 4096, 65536, 200000])
        pieces.append(data[offset : offset + step])
        offset += step
    stored, info = seal_all(pieces, master, chunk_size=CHUNK)
    assert info.raw_size == size
    assert info.size == sum(map(len, stored))
    assert info.checksum == hashlib.sha256(b"".join(stored)).hexdigest()
    assert open_all(stored, master, info, "backup-1") == data
    assert verify_stream(stored, master, "backup-1", info.wrapped_key, info.checksum) == size


def test_empty_source_gives_a_small_valid_stream(master: bytes) -> None:
    stored, info = seal_all([], master)
    assert info.raw_size == 0
    assert len(stored) == 2  # the header and one final chunk holding an empty zstd frame
    assert stored[0].startswith(MAGIC)
    assert open_all(stored, master, info, "backup-1") == b""
    assert verify_stream(stored, master, "backup-1", info.wrapped_key, info.checksum) == 0


def _payload_length(stored: list[bytes]) -> int:
    return sum(len(piece) - TAG_SIZE for piece in stored[1:])


@pytest.mark.parametrize(
    ("chunks", "delta"), [(1, -1), (1, 0), (1, 1), (2, 0), (2, 1), (3, -1)], ids=str
)
def test_compressed_payload_at_exact_chunk_boundaries(
    master: bytes, chunks: int, delta: int
) -> None:
    # Incompressible data grows by a constant overhead in zstd, so the raw size that puts the
    # compressed payload exactly on a chunk boundary can be found by adjusting once or twice.
    pool = random.Random(99).randbytes(4 * CHUNK)
    target = chunks * CHUNK + delta
    raw = target
    for _ in range(5):
        stored, info = seal_all([pool[:raw]], master, chunk_size=CHUNK, threads=1)
        got = _payload_length(stored)
        if got == target:
            break
        raw += target - got
    assert _payload_length(stored) == target
    expected_chunks = -(-target // CHUNK)
    assert len(stored) == 1 + expected_chunks
    assert [len(piece) for piece in stored[1:-1]] == [CHUNK + TAG_SIZE] * (expected_chunks - 1)
    assert open_all(stored, master, info, "backup-1") == pool[:raw]


@pytest.mark.parametrize(
    "length", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, 2 * CHUNK + 1], ids=str
)
def test_format_frames_exact_payload_lengths(length: int) -> None:
    key = generate_key()
    header = StreamHeader.new(CHUNK)
    payload = os.urandom(length)
    pieces = [payload[i : i + 1000] for i in range(0, length, 1000)]
    stored = list(seal_chunks(pieces, key, header, "b"))
    assert stored[0] == header.pack() and len(stored[0]) == HEADER_SIZE
    expected = max(1, -(-length // CHUNK))  # the last chunk is never empty unless all is
    assert len(stored) == 1 + expected
    assert sum(len(piece) for piece in stored[1:]) == length + TAG_SIZE * expected
    # Re-split the stored bytes at odd places: framing must not depend on piece boundaries.
    blob = b"".join(stored)
    resplit = [blob[i : i + 777] for i in range(0, len(blob), 777)]
    assert b"".join(open_chunks(resplit, key, "b")) == payload


def _decode_independently(
    stored: bytes, master: bytes, info: SealedStreamInfo, backup_id: str
) -> list[bytes]:
    """Decrypt the chunks following only the format's documentation in coffer.backup.format."""
    key = unwrap_key(master, info.wrapped_key, backup_id)
    header = stored[:HEADER_SIZE]
    assert header[:8] == MAGIC and header[8:12] == bytes([1, 1, 1, 0])
    chunk_size = int.from_bytes(header[12:16], "big")
    prefix = header[16:24]
    frame = chunk_size + TAG_SIZE
    body = stored[HEADER_SIZE:]
    frames = [body[i : i + frame] for i in range(0, len(body), frame)]
    plain = []
    for index, sealed in enumerate(frames):
        final = index == len(frames) - 1
        nonce = prefix + index.to_bytes(4, "big")
        aad = header + index.to_bytes(4, "big") + bytes([final]) + backup_id.encode()
        plain.append(AESGCM(key).decrypt(nonce, sealed, aad))
    return plain


def test_stored_format_matches_its_documentation(master: bytes) -> None:
    data = b"".join(mixed_blocks(200_000, block=50_000))
    stored, info = seal_all([data], master, "doc-check", chunk_size=CHUNK)
    plain = _decode_independently(b"".join(stored), master, info, "doc-check")
    assert len(plain) == len(stored) - 1
    assert ZstdDecompressor().decompress(b"".join(plain)) == data


def test_each_backup_gets_its_own_key_and_nonces(master: bytes) -> None:
    data = os.urandom(3 * CHUNK)
    first, first_info = seal_all([data], master, chunk_size=CHUNK)
    second, second_info = seal_all([data], master, chunk_size=CHUNK)
    assert first_info.wrapped_key != second_info.wrapped_key
    assert first[0][16:24] != second[0][16:24]  # nonce prefixes
    assert first_info.checksum != second_info.checksum
    key = unwrap_key(master, first_info.wrapped_key, "backup-1")
    blob = b"".join(first)
    assert key not in blob and master not in blob
    assert key.hex() not in repr(first_info) and master.hex() not in repr(first_info)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_multithreaded_compression_gives_a_valid_stream(master: bytes, threads: int) -> None:
    # Large enough that zstd splits the work into several jobs across its workers.
    data = b"".join(mixed_blocks(24 * MIB, seed=threads))
    pieces = [data[i : i + 300_000] for i in range(0, len(data), 300_000)]
    stored, info = seal_all(pieces, master, threads=threads, level=5)
    assert info.size < len(data) * 0.7
    assert open_all(stored, master, info, "backup-1") == data


def test_source_pieces_may_be_any_bytes_like(master: bytes) -> None:
    pieces: list[bytes] = [b"abc", bytearray(b"def"), memoryview(b"ghi"), b""]  # type: ignore[list-item]
    stored, info = seal_all(pieces, master)
    assert open_all(stored, master, info, "backup-1") == b"abcdefghi"
    assert info.raw_size == 9


def test_info_is_only_available_once_the_stream_is_exhausted(master: bytes) -> None:
    stored_iter, info = seal_stream(iter([b"x" * 100_000]), master, "b", chunk_size=CHUNK)
    next(stored_iter)
    with pytest.raises(RuntimeError, match="has not been read to its end"):
        info()
    list(stored_iter)
    assert info().raw_size == 100_000


def test_source_errors_propagate_and_leave_no_info(master: bytes) -> None:
    class EngineFailed(Exception):
        pass

    def source() -> Iterator[bytes]:
        yield os.urandom(3 * CHUNK)
        raise EngineFailed("mariabackup exited with status 1")

    stored_iter, info = seal_stream(source(), master, "b", chunk_size=CHUNK)
    produced = []
    with pytest.raises(EngineFailed):
        for piece in stored_iter:
            produced.append(piece)
    with pytest.raises(RuntimeError):
        info()
    assert produced[0].startswith(MAGIC)  # the stream had started when the source failed


def test_a_stream_whose_payload_failed_never_opens() -> None:
    key = generate_key()
    header = StreamHeader.new(CHUNK)

    def payload() -> Iterator[bytes]:
        yield os.urandom(5 * CHUNK)
        raise OSError("the engine's pipe broke")

    produced = []
    with pytest.raises(OSError, match="pipe broke"):
        for piece in seal_chunks(payload(), key, header, "b"):
            produced.append(piece)
    assert len(produced) == 1 + 4  # the header and the chunks known not to be last
    with pytest.raises(BackupIntegrityError, match="last chunk \\(3\\) failed authentication"):
        list(open_chunks(produced, key, "b"))


def test_closing_the_stored_stream_closes_the_source(master: bytes) -> None:
    closed = []

    def source() -> Iterator[bytes]:
        try:
            while True:
                yield os.urandom(CHUNK)
        finally:
            closed.append(True)

    stored_iter, _ = seal_stream(source(), master, "b", chunk_size=CHUNK, threads=1)
    for _ in range(5):
        next(stored_iter)
    stored_iter.close()  # type: ignore[attr-defined]
    assert closed == [True]


def test_a_source_of_text_is_refused(master: bytes) -> None:
    stored_iter, _ = seal_stream(iter(["not bytes"]), master, "b")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="must yield bytes, not str"):
        list(stored_iter)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"level": 0}, "compression level must be an integer from 1 to 22"),
        ({"level": 23}, "compression level"),
        ({"level": True}, "compression level"),
        ({"threads": -1}, "compression threads must be an integer from 0"),
        ({"threads": 257}, "compression threads"),
        ({"chunk_size": 100}, "chunk size must be an integer from 4096"),
        ({"chunk_size": 128 * MIB}, "chunk size"),
    ],
    ids=str,
)
def test_bad_options_are_refused_before_the_source_is_touched(
    master: bytes, options: dict[str, int], message: str
) -> None:
    touched = []

    def source() -> Iterator[bytes]:
        touched.append(True)
        yield b"data"

    with pytest.raises(ValidationError, match=message):
        seal_stream(source(), master, "b", **options)
    assert touched == []


def test_bad_keys_and_ids_are_refused_up_front(master: bytes) -> None:
    with pytest.raises(ValueError, match="master key must be 32 bytes"):
        seal_stream([b"x"], master[:16], "b")
    with pytest.raises(ValidationError, match="backup's id"):
        seal_stream([b"x"], master, "")
    stored, info = seal_all([b"x"], master)
    with pytest.raises(ValidationError, match="SHA-256 digest in hex"):
        open_stream(stored, master, "backup-1", info.wrapped_key, "abc")
    with pytest.raises(ValidationError, match="needs the checksum"):
        verify_stream(stored, master, "backup-1", info.wrapped_key, None)  # type: ignore[arg-type]
    # An upper-case digest is the same digest.
    assert verify_stream(stored, master, "backup-1", info.wrapped_key, info.checksum.upper()) == 1
