"""A fresh identity for a PostgreSQL data directory copied from a template.

``initdb`` writes two values into ``global/pg_control`` that are meant to be unique to one
cluster: the *system identifier* (first 8 bytes; WAL, base backups and standbys carry it to
tell clusters apart) and the *mock authentication nonce* (32 bytes just before the trailing
CRC-32C; SCRAM derives the fake salts it shows for unknown roles from it, so two clusters
sharing it would let a client tell real roles from unknown ones by comparing them). Copies of
one template would share both, so every copy gets new random values here, followed by
``pg_resetwal``, which writes a new write-ahead log stamped with the new identifier (WAL pages
name their cluster, and the template ships without WAL for exactly that reason).

The layout relied on holds for every PostgreSQL from 10 on: ``system_identifier`` is the
first field of ``ControlFileData`` and ``mock_authentication_nonce`` the last before ``crc``,
which covers everything before it. The CRC's offset is found by checking the CRC itself, so no
version's struct size is hard-coded; a file where no offset checks out is refused.
"""

from __future__ import annotations

import os
import secrets
import struct
import time
from pathlib import Path

from coffer.errors import EngineError

CONTROL_FILE = Path("global") / "pg_control"
NONCE_LENGTH = 32
#: ControlFileData is a few hundred bytes; the file is padded with zeros to 8 kB.
_SEARCH_LIMIT = 1024


def _crc_table() -> tuple[int, ...]:
    table = []
    for index in range(256):
        value = index
        for _ in range(8):
            value = (value >> 1) ^ 0x82F63B78 if value & 1 else value >> 1
        table.append(value)
    return tuple(table)


_TABLE = _crc_table()


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC-32C (Castagnoli), the checksum PostgreSQL puts on its control file."""
    value = 0xFFFFFFFF
    for byte in bytes(data):
        value = _TABLE[(value ^ byte) & 0xFF] ^ (value >> 8)
    return value ^ 0xFFFFFFFF


def crc_offset(control: bytes | bytearray) -> int:
    """Where the CRC sits in a control file: the first offset whose 4 bytes are the CRC-32C
    of everything before them. Raises EngineError if there is none (not a control file)."""
    state = 0xFFFFFFFF
    for offset in range(min(len(control) - 4, _SEARCH_LIMIT)):
        if offset >= NONCE_LENGTH + 8 and offset % 4 == 0:
            (stored,) = struct.unpack_from("<I", control, offset)
            if stored == state ^ 0xFFFFFFFF:
                return offset
        state = _TABLE[(state ^ control[offset]) & 0xFF] ^ (state >> 8)
    raise EngineError("global/pg_control has no valid checksum; it is not a usable control file.")


def read_identity(data_dir: Path) -> tuple[int, bytes]:
    """The system identifier and mock authentication nonce of the cluster in ``data_dir``."""
    control = (data_dir / CONTROL_FILE).read_bytes()
    offset = crc_offset(control)
    (system_id,) = struct.unpack_from("<Q", control, 0)
    return system_id, bytes(control[offset - NONCE_LENGTH : offset])


def new_system_identifier() -> int:
    """A system identifier shaped like initdb's (seconds in the high 32 bits), with random low
    bits where initdb puts microseconds and its pid."""
    return (int(time.time()) << 32) | secrets.randbits(32)


def renew_identity(data_dir: Path) -> int:
    """Give the (stopped) cluster in ``data_dir`` a new system identifier and nonce, in place.

    The caller must run ``pg_resetwal`` afterwards so the write-ahead log carries the new
    identifier. Returns the new identifier. Raises EngineError for an unreadable control file.
    """
    path = data_dir / CONTROL_FILE
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except OSError as exc:
        raise EngineError(f"Cannot open {path} ({exc.strerror}).") from None
    try:
        control = bytearray(os.pread(fd, 8192, 0))
        offset = crc_offset(control)
        system_id = new_system_identifier()
        struct.pack_into("<Q", control, 0, system_id)
        control[offset - NONCE_LENGTH : offset] = secrets.token_bytes(NONCE_LENGTH)
        struct.pack_into("<I", control, offset, crc32c(control[:offset]))
        os.pwrite(fd, bytes(control[: offset + 4]), 0)
        os.fsync(fd)
    except OSError as exc:
        raise EngineError(f"Cannot rewrite {path} ({exc.strerror}).") from None
    finally:
        os.close(fd)
    return system_id
