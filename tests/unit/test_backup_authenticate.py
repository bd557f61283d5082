"""``authenticate_stream``: the verifying pass of a restore that does not decompress. It refuses
every stored object that is not exactly the stream ``seal_stream`` wrote under the backup's key,
and it leaves only the validity of the authenticated zstd payload to ``open_stream``."""

from __future__ import annotations

import os
import random

import pytest

from coffer.backup import (
    BackupIntegrityError,
    authenticate_stream,
    open_stream,
    seal_stream,
    verify_stream,
)
from coffer.backup.format import HEADER_SIZE, TAG_SIZE, StreamHeader, seal_chunks
from coffer.bus.keys import generate_key, wrap_key
from coffer.errors import ValidationError

CHUNK = 16384
BACKUP_ID = "b0b0b0b0-0000-4000-8000-000000000002"


def _data(size: int = 300_000) -> bytes:
    rng = random.Random(7)
    return b"".join(rng.randbytes(512) + b"text %06d " % i * 40 for i in range(size // 912 + 1))[
        :size
    ]


def _sealed(data: bytes) -> tuple[bytes, bytes, str, str]:
    """(master key, stored bytes, wrapped key, checksum)."""
    master = generate_key()
    stored, info_of = seal_stream(iter([data]), master, BACKUP_ID, chunk_size=CHUNK)
    blob = b"".join(stored)
    info = info_of()
    return master, blob, info.wrapped_key, info.checksum


def _pieces(blob: bytes, size: int = 5000) -> list[bytes]:
    return [blob[i : i + size] for i in range(0, len(blob), size)]


def test_an_intact_stream_authenticates_and_counts_its_stored_bytes() -> None:
    data = _data()
    master, blob, wrapped, checksum = _sealed(data)
    assert authenticate_stream(_pieces(blob), master, BACKUP_ID, wrapped, checksum) == len(blob)
    # The same object still opens to the original bytes.
    assert b"".join(open_stream(_pieces(blob), master, BACKUP_ID, wrapped, checksum)) == data


@pytest.mark.parametrize("where", ["header", "first tag", "middle", "last byte"])
def test_one_flipped_bit_anywhere_is_refused(where: str) -> None:
    master, blob, wrapped, checksum = _sealed(_data())
    offset = {
        "header": 10,
        "first tag": HEADER_SIZE + CHUNK + TAG_SIZE - 1,
        "middle": len(blob) // 2,
        "last byte": len(blob) - 1,
    }[where]
    damaged = bytearray(blob)
    damaged[offset] ^= 0x01
    with pytest.raises(BackupIntegrityError, match="tampered or corrupted"):
        authenticate_stream(_pieces(bytes(damaged)), master, BACKUP_ID, wrapped, checksum)


def test_a_stream_cut_at_a_chunk_boundary_is_refused() -> None:
    master, blob, wrapped, checksum = _sealed(_data())
    cut = blob[: HEADER_SIZE + 3 * (CHUNK + TAG_SIZE)]
    with pytest.raises(BackupIntegrityError):
        authenticate_stream(_pieces(cut), master, BACKUP_ID, wrapped, checksum)


def test_another_checksum_or_backup_id_is_refused() -> None:
    master, blob, wrapped, checksum = _sealed(_data())
    other = ("0" if checksum[0] != "0" else "1") + checksum[1:]
    with pytest.raises(BackupIntegrityError, match="SHA-256"):
        authenticate_stream(_pieces(blob), master, BACKUP_ID, wrapped, other)
    with pytest.raises(BackupIntegrityError):
        authenticate_stream(_pieces(blob), master, "another-backup", wrapped, checksum)
    with pytest.raises(ValidationError):
        authenticate_stream(_pieces(blob), master, BACKUP_ID, wrapped, "not a checksum")


def test_an_authentic_payload_that_is_not_zstd_is_left_to_the_reader() -> None:
    """Only Coffer's own writer could produce this (it holds the key): authentication passes,
    and the decompressing reader refuses it, which a restore does into its staging area."""
    import hashlib

    master, data_key = generate_key(), generate_key()
    wrapped = wrap_key(master, data_key, key_id=BACKUP_ID)
    header = StreamHeader.new(CHUNK)
    blob = b"".join(seal_chunks([os.urandom(50_000)], data_key, header, BACKUP_ID))
    checksum = hashlib.sha256(blob).hexdigest()
    assert authenticate_stream(_pieces(blob), master, BACKUP_ID, wrapped, checksum) == len(blob)
    with pytest.raises(BackupIntegrityError, match="zstd"):
        verify_stream(_pieces(blob), master, BACKUP_ID, wrapped, checksum)
