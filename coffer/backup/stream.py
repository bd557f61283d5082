"""The stream every backup goes through: engine bytes → zstd → AES-256-GCM chunks → SHA-256.

``seal_stream`` turns the bytes an engine tool produces (any length, any piece sizes) into the
bytes that storage keeps; ``open_stream`` turns them back, and ``verify_stream`` checks a stored
backup completely without releasing any of it, which is what a restore runs before it writes
anything. Everything is a lazy iterator: a backup is never held in memory or staged on disk, only
about one chunk plus one compression job at a time.

Each backup gets a fresh random 256-bit data key. Only its wrapped form (AES-256-GCM under the
operator's master key, bound to the backup id, see ``coffer.bus.keys.wrap_key``) leaves this
module, in ``SealedStreamInfo.wrapped_key``, for the caller to record in the control DB next to
the checksum. The stored format is described in ``coffer.backup.format``.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from coffer.backup._zstd import CompressionParameter, ZstdCompressor, ZstdDecompressor, ZstdError
from coffer.backup.errors import BackupIntegrityError
from coffer.backup.format import (
    DEFAULT_CHUNK_SIZE,
    MAX_CHUNK_SIZE,
    MIN_CHUNK_SIZE,
    StreamHeader,
    open_chunks,
    seal_chunks,
)
from coffer.bus.keys import check_key, generate_key, unwrap_key, wrap_key
from coffer.errors import SealError, ValidationError

log = logging.getLogger(__name__)

MIN_LEVEL = 1
MAX_LEVEL = 22
#: Level 1: on database pages (half random, half text) it stores within 1 % of level 3's size
#: for a third of the CPU (``python -m bench.backup_stream``), and a backup shares its host's
#: CPUs with the engine tool and the engine.
DEFAULT_LEVEL = 1
MAX_THREADS = 256
# Source pieces are fed to zstd in slices of this size, and decompressed output is returned in
# pieces of at most this size, so neither a huge source piece nor a chunk of highly compressible
# data (1 MiB of zstd can expand to gigabytes of zeros) ever needs an unbounded buffer.
_SLICE = 1 << 20
_CHECKSUM = re.compile(r"[0-9a-fA-F]{64}")
_CHECKSUM_DIFFERS = (
    "the SHA-256 checksum of the stored bytes differs from the one recorded when the backup "
    "was taken"
)


@dataclass(frozen=True)
class SealedStreamInfo:
    """What the caller records about a sealed backup once its stream has been read to the end.

    ``size`` and ``checksum`` (SHA-256, lowercase hex) describe the stored bytes exactly as
    ``seal_stream`` yielded them; ``raw_size`` is the number of source bytes; ``wrapped_key`` is
    the backup's data key wrapped under the master key for this backup id (safe to store, useless
    without the master key).
    """

    size: int
    raw_size: int
    checksum: str
    wrapped_key: str


def seal_stream(
    source: Iterable[bytes],
    master_key: bytes,
    backup_id: str,
    *,
    level: int = DEFAULT_LEVEL,
    threads: int = 0,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Iterator[bytes], Callable[[], SealedStreamInfo]]:
    """Compress, encrypt and checksum ``source``; return the stored bytes and a way to get the info.

    ``source`` yields bytes-like pieces of any size (a tool's stdout, a file read in pieces). The
    returned iterator is lazy: nothing is read from ``source`` until it is iterated, and it yields
    the header and then one sealed chunk (``chunk_size`` + 16 bytes, the last may be shorter) at a
    time. The second value returns the ``SealedStreamInfo`` once the iterator is exhausted and
    raises ``RuntimeError`` before that.

    ``level`` is the zstd level (1-22); ``threads`` is the number of zstd worker threads, 0 for one
    per CPU this process may run on (as ``zstd -T0``); compression then runs beside encryption and
    hashing in the calling thread. ``chunk_size`` is the plaintext size of an encrypted chunk
    (4 KiB to 64 MiB).

    Arguments are checked before anything happens: ``ValidationError`` for a bad level, thread
    count, chunk size or backup id, ``ValueError`` for a master key that is not 32 bytes. An
    exception raised by ``source`` propagates out of the iterator unchanged, the stream then has no
    final chunk (it never opens), and no info is produced. ``source`` is closed (if it has
    ``close``) when the iterator ends or is closed, so an engine tool behind it can be stopped.
    """
    _check_backup_id(backup_id)
    check_key(master_key, "master key")
    options = _compression_options(level, threads)
    _check_chunk_size(chunk_size)
    pieces = iter(source)
    data_key = generate_key()
    outcome = _SealOutcome(wrap_key(master_key, data_key, key_id=backup_id))
    header = StreamHeader.new(chunk_size)
    return _seal(pieces, data_key, header, backup_id, options, outcome), outcome.result


def open_stream(
    stored: Iterable[bytes],
    master_key: bytes,
    backup_id: str,
    wrapped_key: str,
    expected_checksum: str | None = None,
) -> Iterator[bytes]:
    """Return an iterator of the original bytes of a stream ``seal_stream`` produced.

    The data key is unwrapped now, so a wrong master key, backup id or wrapped key fails here,
    before anything is read. While iterating, a chunk's bytes are released only after its tag
    has checked, and nothing is released after the first chunk that fails. With
    ``expected_checksum`` the SHA-256 of the stored bytes is compared after the last stored byte
    is read and before the last chunk's bytes are released, so a consumer that received the whole
    payload received a verified one. Pieces are at most 1 MiB.

    Raises ``BackupIntegrityError`` (409, not transient) on a wrong key or backup id, a bad
    header, an altered, dropped, reordered or duplicated chunk, a stream cut short, invalid
    compressed data or a checksum mismatch. ``ValidationError`` for a malformed
    ``expected_checksum`` or backup id. ``stored`` is closed (if it has ``close``) when done.
    """
    _check_backup_id(backup_id)
    check_key(master_key, "master key")
    expected = None if expected_checksum is None else _check_checksum(expected_checksum)
    data_key = _unwrap(master_key, wrapped_key, backup_id)
    return _open(iter(stored), data_key, backup_id, expected)


def verify_stream(
    stored: Iterable[bytes],
    master_key: bytes,
    backup_id: str,
    wrapped_key: str,
    expected_checksum: str,
) -> int:
    """Check a stored backup completely and return its raw (original) size; release nothing.

    Authenticates every chunk, decompresses the payload to check it is one complete zstd frame,
    and compares the SHA-256 of the stored bytes with ``expected_checksum``. A restore runs this
    before it writes anything, then reads the backup again with ``open_stream``. Raises as
    ``open_stream`` does; ``expected_checksum`` is required here.
    """
    if expected_checksum is None:
        raise ValidationError(
            "verifying a backup needs the checksum recorded when it was taken; none was given"
        )
    raw_size = 0
    for piece in open_stream(stored, master_key, backup_id, wrapped_key, expected_checksum):
        raw_size += len(piece)
    return raw_size


def authenticate_stream(
    stored: Iterable[bytes],
    master_key: bytes,
    backup_id: str,
    wrapped_key: str,
    expected_checksum: str,
) -> int:
    """Check every chunk's tag and the SHA-256 of a stored backup, without decompressing it;
    return the number of stored bytes checked. Release nothing.

    This is ``verify_stream`` less its decompression (the most expensive part of it): it proves
    the stored object is exactly, and completely, the stream ``seal_stream`` wrote under this
    backup's key (no chunk altered, dropped, reordered or from another backup, not cut short).
    What it leaves to the reader of the payload is that the authenticated payload is valid zstd,
    which only a fault of the writer could break; ``open_stream`` checks that as it decompresses
    and raises ``BackupIntegrityError`` if not. A restore runs this before it writes anything
    and fills a staging directory from ``open_stream`` afterwards. Raises as ``verify_stream``.
    """
    _check_backup_id(backup_id)
    check_key(master_key, "master key")
    expected = _check_checksum(expected_checksum)
    data_key = _unwrap(master_key, wrapped_key, backup_id)
    pieces = iter(stored)
    hasher = hashlib.sha256()
    counted = _RawCount()

    def hashed() -> Iterator[bytes]:
        for piece in pieces:
            view = _byte_view(piece, what="stored backup")
            hasher.update(view)
            counted.value += view.nbytes
            yield piece

    def check_checksum() -> None:
        if not hmac.compare_digest(hasher.hexdigest(), expected):
            raise BackupIntegrityError(backup_id, _CHECKSUM_DIFFERS)

    try:
        for _plaintext in open_chunks(hashed(), data_key, backup_id, check_checksum):
            pass
    finally:
        _close(pieces)
    return counted.value


class _SealOutcome:
    """Holds the info of a sealed stream until its iterator has finished."""

    def __init__(self, wrapped_key: str) -> None:
        self.wrapped_key = wrapped_key
        self._info: SealedStreamInfo | None = None

    def finish(self, size: int, raw_size: int, checksum: str) -> None:
        self._info = SealedStreamInfo(
            size=size, raw_size=raw_size, checksum=checksum, wrapped_key=self.wrapped_key
        )

    def result(self) -> SealedStreamInfo:
        if self._info is None:
            raise RuntimeError(
                "the sealed backup stream has not been read to its end, so its size and "
                "checksum are not known yet"
            )
        return self._info


class _RawCount:
    value = 0


def _seal(
    pieces: Iterator[bytes],
    data_key: bytes,
    header: StreamHeader,
    backup_id: str,
    options: dict[int, int],
    outcome: _SealOutcome,
) -> Iterator[bytes]:
    hasher = hashlib.sha256()
    size = 0
    raw = _RawCount()
    try:
        compressed = _compress(pieces, options, raw)
        for stored in seal_chunks(compressed, data_key, header, backup_id):
            hasher.update(stored)
            size += len(stored)
            yield stored
    finally:
        _close(pieces)
    outcome.finish(size, raw.value, hasher.hexdigest())
    log.debug("sealed backup %s: %d bytes into %d stored bytes", backup_id, raw.value, size)


def _compress(pieces: Iterator[bytes], options: dict[int, int], raw: _RawCount) -> Iterator[bytes]:
    compressor = ZstdCompressor(options=options)
    for piece in pieces:
        view = _byte_view(piece)
        raw.value += view.nbytes
        for start in range(0, view.nbytes, _SLICE):
            out = compressor.compress(view[start : start + _SLICE])
            if out:
                yield out
    yield compressor.flush(ZstdCompressor.FLUSH_FRAME)


def _open(
    pieces: Iterator[bytes], data_key: bytes, backup_id: str, expected: str | None
) -> Iterator[bytes]:
    hasher = hashlib.sha256()

    def hashed() -> Iterator[bytes]:
        for piece in pieces:
            hasher.update(_byte_view(piece, what="stored backup"))
            yield piece

    def check_checksum() -> None:
        if expected is not None and not hmac.compare_digest(hasher.hexdigest(), expected):
            raise BackupIntegrityError(backup_id, _CHECKSUM_DIFFERS)

    decompressor = ZstdDecompressor()
    try:
        for compressed in open_chunks(hashed(), data_key, backup_id, check_checksum):
            if decompressor.eof:
                if compressed:
                    raise BackupIntegrityError(backup_id, "data follows the end of the payload")
                continue
            data = compressed
            while True:
                try:
                    out = decompressor.decompress(data, _SLICE)
                except ZstdError:
                    raise BackupIntegrityError(
                        backup_id, "the authenticated payload is not valid zstd data"
                    ) from None
                data = b""
                if out:
                    yield out
                if decompressor.eof or decompressor.needs_input:
                    break
            if decompressor.eof and decompressor.unused_data:
                raise BackupIntegrityError(backup_id, "data follows the end of the payload")
        if not decompressor.eof:
            raise BackupIntegrityError(backup_id, "the compressed payload ends before its end")
    finally:
        _close(pieces)


def _unwrap(master_key: bytes, wrapped_key: str, backup_id: str) -> bytes:
    try:
        return unwrap_key(master_key, wrapped_key, backup_id)
    except SealError:
        raise BackupIntegrityError(
            backup_id,
            "its data key does not unwrap with this master key and backup id (wrong master key, "
            "wrong backup id, or the recorded key was altered)",
        ) from None


def _byte_view(piece: object, what: str = "backup source") -> memoryview:
    if not isinstance(piece, bytes | bytearray | memoryview):
        raise TypeError(f"the {what} must yield bytes, not {type(piece).__name__}")
    view = memoryview(piece)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B")
    return view


def _close(pieces: object) -> None:
    close = getattr(pieces, "close", None)
    if callable(close):
        close()


def _check_backup_id(backup_id: object) -> None:
    if not isinstance(backup_id, str) or not backup_id:
        raise ValidationError("a backup stream needs the backup's id, a non-empty string")


def _check_chunk_size(chunk_size: object) -> None:
    if (
        not isinstance(chunk_size, int)
        or isinstance(chunk_size, bool)
        or not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE
    ):
        raise ValidationError(
            f"the backup chunk size must be an integer from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} "
            f"bytes, got {chunk_size!r}"
        )


def _check_checksum(checksum: object) -> str:
    if not isinstance(checksum, str) or not _CHECKSUM.fullmatch(checksum):
        raise ValidationError(
            "the expected backup checksum must be a SHA-256 digest in hex (64 characters), "
            f"got {checksum!r}"
        )
    return checksum.lower()


def _compression_options(level: object, threads: object) -> dict[int, int]:
    if not isinstance(level, int) or isinstance(level, bool) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValidationError(
            f"the backup compression level must be an integer from {MIN_LEVEL} to {MAX_LEVEL}, "
            f"got {level!r}"
        )
    if not isinstance(threads, int) or isinstance(threads, bool) or not 0 <= threads <= MAX_THREADS:
        raise ValidationError(
            f"the backup compression threads must be an integer from 0 (one per CPU) to "
            f"{MAX_THREADS}, got {threads!r}"
        )
    return {
        CompressionParameter.compression_level: level,
        CompressionParameter.nb_workers: threads or _usable_cpus(),
        # zstd's own frame checksum is cheap and catches a bug in this pipeline that the AEAD
        # layer, which only sees compressed bytes, cannot.
        CompressionParameter.checksum_flag: 1,
    }


def _usable_cpus() -> int:
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        count = os.cpu_count() or 1
    return max(1, min(count, MAX_THREADS))


def pending_wrapped_key(info_of: Callable[[], SealedStreamInfo]) -> str:
    """The wrapped data key of a stream ``seal_stream`` is producing, known before its first byte.

    For stores that take an object's metadata before its body (the WAL archive keeps the key
    there). ``info_of`` is the second value ``seal_stream`` returned; TypeError for anything else.
    """
    outcome = getattr(info_of, "__self__", None)
    if not isinstance(outcome, _SealOutcome):
        raise TypeError("pending_wrapped_key needs the info function seal_stream returned")
    return outcome.wrapped_key
