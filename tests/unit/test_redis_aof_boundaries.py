"""The RESP command boundary scanner and manifest reader behind Redis AOF backups.

Commands are encoded by redis-py's own packer (the same RESP Redis writes into its AOF); the
end-to-end checks against files a real ``redis-server`` wrote are in
``tests/integration/test_backups_redis_incremental.py``.
"""

from __future__ import annotations

import os
import tempfile

import pytest
from redis.connection import Connection

from coffer.guest.backup.redis import (
    AOFFormatError,
    CommandBoundaries,
    parse_manifest,
    scan_boundary,
)


def resp(*args: str | bytes) -> bytes:
    return b"".join(Connection().pack_command(*args))


def ends(stream: bytes, pieces: int = 1) -> tuple[int, bool]:
    """(boundary, in_multi) after feeding ``stream`` in ``pieces`` roughly equal parts."""
    scanner = CommandBoundaries()
    step = max(1, len(stream) // pieces)
    for start in range(0, len(stream), step):
        scanner.feed(stream[start : start + step])
    assert scanner.offset == len(stream)
    return scanner.boundary, scanner.in_multi


COMMANDS = [
    resp("SELECT", "0"),
    resp("SET", "item:1", "first"),
    resp("SET", "empty", ""),
    resp("SET", "big", b"\r\n*3\r\n$3\r\nSET" * 5000),  # RESP inside a value is only bytes
    resp("HSET", "h", "f", "v", "g", "w"),
]


@pytest.mark.parametrize("pieces", [1, 2, 7, 1000, 10**9])
def test_complete_commands_end_where_the_stream_ends_however_it_is_cut(pieces: int) -> None:
    stream = b"".join(COMMANDS)
    assert ends(stream, pieces) == (len(stream), False)


def test_the_boundary_is_after_every_complete_command_and_never_inside_one() -> None:
    stream = b"".join(COMMANDS)
    command_ends = set()
    total = 0
    for command in COMMANDS:
        total += len(command)
        command_ends.add(total)
    scanner = CommandBoundaries()
    last = 0
    for index in range(len(stream)):
        scanner.feed(stream[index : index + 1])
        if index + 1 in command_ends:
            last = index + 1
        assert scanner.boundary == last, index


def test_a_partial_command_at_the_end_is_left_out() -> None:
    whole = b"".join(COMMANDS[:2])
    for cut in range(1, len(COMMANDS[2])):
        stream = whole + COMMANDS[2][:cut]
        assert ends(stream) == (len(whole), False), cut


def test_no_cut_inside_a_transaction() -> None:
    before = resp("SET", "a", "1")
    transaction = resp("MULTI") + resp("INCR", "n") + resp("SET", "b", "2")
    exec_ = resp("EXEC")
    assert ends(before + transaction) == (len(before), True)
    assert ends(before + transaction + exec_, 3) == (len(before + transaction + exec_), False)
    # Command names are matched without regard to case, even when split between pieces.
    lower = before + resp("multi") + resp("set", "c", "3") + resp("exec") + resp("GET", "c")
    assert ends(lower, len(lower)) == (len(lower), False)


def test_annotations_are_boundaries_too() -> None:
    stream = b"#TS:1795327239\r\n" + resp("SET", "a", "1") + b"#TS:1795327240\r\n"
    assert ends(stream, 5) == (len(stream), False)


def test_the_offsets_are_absolute_when_scanning_starts_mid_file() -> None:
    scanner = CommandBoundaries(start=1000)
    scanner.feed(resp("SET", "a", "1") + b"*2\r\n$3\r\nGET")
    assert scanner.boundary == 1000 + len(resp("SET", "a", "1"))


@pytest.mark.parametrize(
    "stream",
    [
        b"SET a 1\r\n",  # inline commands are not what Redis writes
        b"*0\r\n",
        b"*x\r\n",
        b"*1\r\n+OK\r\n",
        b"*1\r\n$2\r\nabXY",  # no CRLF after the value
        b"*1\r\n$2\r\nab\n",
        b"*1\n",
        b"*" + b"1" * 2000 + b"\r\n",  # an endless header line
    ],
)
def test_anything_else_is_refused(stream: bytes) -> None:
    with pytest.raises(AOFFormatError):
        ends(stream, 3)


def test_scan_boundary_reads_a_file_from_a_point_to_a_size() -> None:
    first, second = resp("SET", "a", "1"), resp("SET", "b", "2" * 3000)
    with tempfile.TemporaryFile() as handle:
        handle.write(first + second + b"*3\r\n$3\r\nSET")
        handle.flush()
        size = os.fstat(handle.fileno()).st_size
        assert scan_boundary(handle, 0, size) == len(first + second)
        assert scan_boundary(handle, len(first), size) == len(first + second)
        assert scan_boundary(handle, 0, len(first) + 10) == len(first)
        with pytest.raises(AOFFormatError):
            scan_boundary(handle, 0, size + 100)


def test_the_manifest_names_the_base_and_the_incr_files_in_order() -> None:
    text = (
        "file appendonly.aof.3.base.rdb seq 3 type b\n"
        "file appendonly.aof.2.incr.aof seq 2 type h\n"
        "file appendonly.aof.5.incr.aof seq 5 type i\n"
        "file appendonly.aof.4.incr.aof seq 4 type i\n"
    )
    assert parse_manifest(text) == (
        "appendonly.aof.3.base.rdb",
        ["appendonly.aof.4.incr.aof", "appendonly.aof.5.incr.aof"],
    )


@pytest.mark.parametrize(
    "text",
    [
        "",
        "file appendonly.aof.1.incr.aof seq 1 type i\n",  # no base
        "file appendonly.aof.1.base.rdb seq 1 type b\n",  # no incr
        "file ../escape seq 1 type b\nfile appendonly.aof.1.incr.aof seq 1 type i\n",
        "file a.rdb seq one type b\nfile appendonly.aof.1.incr.aof seq 1 type i\n",
        "file a.rdb seq 1 type x\nfile appendonly.aof.1.incr.aof seq 1 type i\n",
    ],
)
def test_a_manifest_out_of_the_ordinary_is_refused(text: str) -> None:
    with pytest.raises(AOFFormatError):
        parse_manifest(text)
