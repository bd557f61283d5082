"""The stored format of a backup: a header, then independently authenticated AES-256-GCM chunks.

Layout (all integers big-endian)::

    header (24 bytes)
        magic        8 bytes   b"COFFERBK"
        version      1 byte    1
        compression  1 byte    1 = zstd (one frame)
        cipher       1 byte    1 = AES-256-GCM
        flags        1 byte    0 (reserved)
        chunk_size   4 bytes   plaintext bytes per chunk, MIN_CHUNK_SIZE..MAX_CHUNK_SIZE
        nonce_prefix 8 bytes   random per backup
    chunk 0 .. chunk n-1
        AES-256-GCM(data key, nonce, plaintext, aad) = ciphertext || 16-byte tag
        nonce = nonce_prefix || index (4 bytes)
        aad   = header || index (4 bytes) || final (1 byte: 1 on the last chunk, else 0)
                || backup id (UTF-8)

Every chunk but the last carries exactly ``chunk_size`` plaintext bytes; the last carries 1 to
``chunk_size`` bytes (0 only when the whole payload is empty), so chunk boundaries follow from the
header alone and a reader needs no length fields. Because the header is part of every chunk's
associated data it is authenticated; because the index and the final flag are too, dropping,
reordering, duplicating or splicing chunks, or cutting the stream at a chunk boundary, makes a
tag fail. The data key is random per backup, so a chunk of another backup never opens either.

The plaintext of the chunks is opaque here (the stream module puts one zstd frame in it).
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from coffer.backup.errors import BackupIntegrityError

MAGIC = b"COFFERBK"
FORMAT_VERSION = 1
COMPRESSION_ZSTD = 1
CIPHER_AES_256_GCM = 1
NONCE_PREFIX_SIZE = 8
TAG_SIZE = 16
MIN_CHUNK_SIZE = 4 << 10
MAX_CHUNK_SIZE = 64 << 20
DEFAULT_CHUNK_SIZE = 1 << 20
#: The chunk index is 4 bytes of the 12-byte nonce, so a stream holds at most this many chunks
#: (4 PiB at the default chunk size).
MAX_CHUNKS = 1 << 32

_HEADER = struct.Struct(">8sBBBBI8s")
HEADER_SIZE = _HEADER.size
_POSITION = struct.Struct(">IB")
_COUNTER = struct.Struct(">I")


@dataclass(frozen=True)
class StreamHeader:
    """The parameters a reader needs before the first chunk; authenticated with every chunk."""

    chunk_size: int
    nonce_prefix: bytes
    version: int = FORMAT_VERSION
    compression: int = COMPRESSION_ZSTD
    cipher: int = CIPHER_AES_256_GCM

    @classmethod
    def new(cls, chunk_size: int) -> StreamHeader:
        """A header for a new stream, with a fresh random nonce prefix."""
        return cls(chunk_size=chunk_size, nonce_prefix=secrets.token_bytes(NONCE_PREFIX_SIZE))

    def pack(self) -> bytes:
        return _HEADER.pack(
            MAGIC,
            self.version,
            self.compression,
            self.cipher,
            0,
            self.chunk_size,
            self.nonce_prefix,
        )

    @classmethod
    def parse(cls, data: bytes, backup_id: str) -> StreamHeader:
        """Read a header written by ``pack``.

        Raises ``BackupIntegrityError`` if ``data`` is not a header this version of Coffer can
        read. A header that parses is still only trusted once the first chunk authenticates it.
        """
        if len(data) != HEADER_SIZE:
            raise BackupIntegrityError(backup_id, "the stream ends inside its header")
        magic, version, compression, cipher, flags, chunk_size, prefix = _HEADER.unpack(data)
        if magic != MAGIC:
            raise BackupIntegrityError(
                backup_id, "the stream does not start with the Coffer backup header"
            )
        if version != FORMAT_VERSION:
            raise BackupIntegrityError(
                backup_id,
                f"the header declares format version {version}, which this Coffer cannot read "
                "(the header is damaged, or a newer Coffer wrote the backup)",
            )
        if compression != COMPRESSION_ZSTD or cipher != CIPHER_AES_256_GCM or flags != 0:
            raise BackupIntegrityError(
                backup_id,
                f"the header declares unknown algorithms (compression {compression}, "
                f"cipher {cipher}, flags {flags})",
            )
        if not MIN_CHUNK_SIZE <= chunk_size <= MAX_CHUNK_SIZE:
            raise BackupIntegrityError(
                backup_id, f"the header declares an impossible chunk size of {chunk_size} bytes"
            )
        return cls(chunk_size=chunk_size, nonce_prefix=prefix)


class _ChunkCipher:
    """AES-256-GCM for the chunks of one stream; the nonce and AAD rules of the module doc."""

    __slots__ = ("_aad_prefix", "_aad_suffix", "_aead", "_nonce_prefix")

    def __init__(self, key: bytes, header: StreamHeader, backup_id: str) -> None:
        self._aead = AESGCM(key)
        self._nonce_prefix = header.nonce_prefix
        self._aad_prefix = header.pack()
        self._aad_suffix = backup_id.encode("utf-8")

    def __repr__(self) -> str:
        return "_ChunkCipher(<key hidden>)"

    def _nonce_and_aad(self, index: int, final: bool) -> tuple[bytes, bytes]:
        if index >= MAX_CHUNKS:
            raise ValueError(f"a backup stream holds at most {MAX_CHUNKS} chunks")
        nonce = self._nonce_prefix + _COUNTER.pack(index)
        aad = self._aad_prefix + _POSITION.pack(index, 1 if final else 0) + self._aad_suffix
        return nonce, aad

    def seal(self, index: int, plaintext: bytes | bytearray | memoryview, final: bool) -> bytes:
        nonce, aad = self._nonce_and_aad(index, final)
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, index: int, sealed: bytes | memoryview, final: bool) -> bytes | None:
        """The plaintext, or None when the tag does not match."""
        if index >= MAX_CHUNKS:
            return None  # the writer never gets this far, so such a chunk cannot be authentic
        nonce, aad = self._nonce_and_aad(index, final)
        try:
            return self._aead.decrypt(nonce, sealed, aad)
        except InvalidTag:
            return None


def seal_chunks(
    payload: Iterable[bytes], key: bytes, header: StreamHeader, backup_id: str
) -> Iterator[bytes]:
    """Yield the stored form of ``payload``: the packed header, then one sealed chunk at a time.

    ``payload`` pieces may have any sizes; besides the piece in hand, at most one chunk is
    buffered. The last chunk is only sealed once ``payload`` is exhausted, because only then is it
    known to be last. Exceptions from ``payload`` propagate unchanged and no final chunk is
    written, so a failed source can never produce a stream that opens.
    """
    cipher = _ChunkCipher(key, header, backup_id)
    size = header.chunk_size
    yield header.pack()
    pending = bytearray()
    index = 0
    for piece in payload:
        with memoryview(piece) as view:
            offset = 0
            while offset < len(view):
                if len(pending) == size:
                    # More bytes follow, so the full chunk in hand is not the last one.
                    sealed = cipher.seal(index, pending, final=False)
                    pending.clear()
                elif not pending and len(view) - offset > size:
                    sealed = cipher.seal(index, view[offset : offset + size], final=False)
                    offset += size
                else:
                    take = min(size - len(pending), len(view) - offset)
                    pending += view[offset : offset + take]
                    offset += take
                    continue
                index += 1
                yield sealed
    yield cipher.seal(index, bytes(pending), final=True)


def open_chunks(
    stored: Iterable[bytes],
    key: bytes,
    backup_id: str,
    before_final: Callable[[], None] | None = None,
) -> Iterator[bytes]:
    """Yield the plaintext of each chunk of ``stored`` once its tag has been checked.

    Nothing of a chunk is yielded before it authenticates, and nothing after the first chunk that
    does not. ``before_final`` runs after ``stored`` is exhausted and before the last chunk is
    opened, so a caller can check a checksum over the whole stored stream before the end of the
    payload is released. Raises ``BackupIntegrityError`` on a bad header, a chunk that fails
    authentication (altered, dropped, reordered, duplicated, from another backup, wrong key) or a
    stream cut short.
    """
    pieces = iter(stored)
    buffer = bytearray()
    for piece in pieces:
        buffer += piece
        if len(buffer) >= HEADER_SIZE:
            break
    if not buffer:
        raise BackupIntegrityError(backup_id, "the stored stream is empty")
    header = StreamHeader.parse(bytes(buffer[:HEADER_SIZE]), backup_id)
    del buffer[:HEADER_SIZE]
    cipher = _ChunkCipher(key, header, backup_id)
    frame = header.chunk_size + TAG_SIZE
    index = 0
    while True:
        # A frame is known not to be the last only once more bytes follow it. Frames are
        # opened where they lie in the buffer (no copy); it is only resized between frames.
        start = 0
        with memoryview(buffer) as view:
            while len(view) - start > frame:
                plaintext = cipher.open(index, view[start : start + frame], final=False)
                if plaintext is None:
                    raise BackupIntegrityError(
                        backup_id,
                        f"chunk {index} failed authentication (altered, reordered, or from "
                        "another backup)",
                    )
                start += frame
                index += 1
                yield plaintext
        del buffer[:start]
        more = next(pieces, None)
        if more is None:
            break
        buffer += more
    if len(buffer) < TAG_SIZE:
        raise BackupIntegrityError(backup_id, f"the stream is cut short before chunk {index}")
    if before_final is not None:
        before_final()
    last = cipher.open(index, bytes(buffer), final=True)
    if last is None:
        raise BackupIntegrityError(
            backup_id,
            f"the last chunk ({index}) failed authentication (the stream was cut short or altered)",
        )
    yield last
