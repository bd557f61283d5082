"""Redis backups from the append-only file (AOF): full and incremental (``docs/backups.md``).

Redis 7 keeps its AOF in ``data/appendonlydir/``: a manifest naming one BASE file (a snapshot)
and INCR files (every write since, as RESP commands). A rewrite (``BGREWRITEAOF``, or Redis's
own once the AOF has doubled) writes a new BASE at its fork point and a new INCR file.

Every backup stands for a point of that log, its ``engine_position``: ``aof_base``, ``aof_incr``
(the INCR files) and ``aof_offset`` (bytes of the last one) at the end of a complete command
outside MULTI/EXEC (``CommandBoundaries``), and ``aof_tail_sha256`` (4 KiB before the offset).
A **full** backup rewrites the AOF first and streams BASE + INCR up to the point; an
**incremental** streams the INCR bytes from its parent's point, or, if the AOF was rewritten
since, the parent is an RDB snapshot or the bytes before its offset changed, is
**self-contained** (BASE + INCR, ``rebased`` says why). Before fixing the point, the backup waits
for Redis's AOF buffer to be written (``appendfsync everysec`` may hold it back up to 2 s).
The stream is a tar archive: ``redis-backup.json``, ``base/<file>``, ``incr/<n>/<file>``; files
are read where they are (twice: to find the boundary, then to stream).

**Restore** checks that each incremental continues where the backup before it ends, then builds
a new ``appendonlydir/`` from the last self-contained backup on (its BASE, one INCR file of the
concatenated INCR bytes, a manifest) and moves it into ``data/`` last. Old backups (an RDB
snapshot) restore as before: ``data/dump.rdb`` loaded at a first start with ``appendonly no``
(a marker in ``etc/``), then ``finish_restore`` turns AOF on. ACL users are not in a backup.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, ClassVar

import redis

from coffer.errors import EngineError
from coffer.guest.backup.base import READ_SIZE, BackupSource, EngineBackup, Payload
from coffer.guest.layout import chown_to

if TYPE_CHECKING:
    import tarfile

    from coffer.guest.backup.archive import Archiver, PointInTime

LOG = logging.getLogger(__name__)

RDB_FILE = "dump.rdb"
RESTORE_MARKER = "rdb-restore.pending"
_RDB_MAGIC = b"REDIS"
_POLL = 0.05
#: How long an AOF rewrite (a full backup's, or the one after an RDB restore) may take.
SAVE_TIMEOUT = 3600.0

#: Redis's defaults for ``appenddirname`` and ``appendfilename`` (immutable at run time).
AOF_DIR = "appendonlydir"
AOF_NAME = "appendonly.aof"
MANIFEST = f"{AOF_NAME}.manifest"
#: The first member of every AOF backup's tar stream.
HEADER = "redis-backup.json"
FORMAT = "coffer-redis-aof"
FORMAT_VERSION = 1
#: Bytes before a backup's offset whose SHA-256 the next incremental compares.
TAIL_BYTES = 4096
#: With ``appendfsync everysec`` Redis writes a postponed AOF buffer within 2 s.
SETTLE_SECONDS = 2.5
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,254}")
#: Longest header line accepted in an AOF: ``*<count>``/``$<length>`` or an annotation.
_MAX_LINE = 1024
_NAME_BYTES = 16
_COMMAND = re.compile(rb"\*(\d{1,10})\r\n")
_VALUE = re.compile(rb"\$(\d{1,10})\r\n")


class AOFFormatError(ValueError):
    """The bytes are not RESP commands as Redis writes them into its AOF."""


class CommandBoundaries:
    """Finds where complete commands end in an AOF's RESP byte stream, fed in pieces.

    Commands are arrays of bulk strings (``*<n>\\r\\n`` then ``$<len>\\r\\n<bytes>\\r\\n`` n
    times); lines starting with ``#`` are annotations (``aof-timestamp-enabled``). ``boundary``
    is the absolute offset just after the last complete command (or annotation) that is not
    inside a MULTI ... EXEC block, so that a cut there never leaves a half command or half a
    transaction. Values are never held in memory, only counted past. ``AOFFormatError`` on
    anything else, naming the offset.
    """

    def __init__(self, start: int = 0) -> None:
        #: Absolute offset of the next byte to be fed.
        self.offset = start
        self.boundary = start
        self.in_multi = False
        self._line = bytearray()
        self._args = 0  # bulk strings still to come in the current command (0: between commands)
        self._first = False  # the bulk string being read is the command's name
        self._name = bytearray()
        self._payload = 0  # bytes of the current bulk string still to pass
        self._crlf = 0  # bytes of the CRLF after it still to match (2, 1 or 0)

    def feed(self, data: bytes) -> None:
        size = len(data)
        i = 0
        while i < size:
            if not self._args and not self._line and data[i] == 0x2A:  # '*' between commands
                after = self._whole_commands(data, i, size)
                if after > i:
                    i = after
                    continue
            if self._payload:
                take = min(self._payload, size - i)
                if self._first and len(self._name) < _NAME_BYTES:
                    self._name += data[i : i + min(take, _NAME_BYTES - len(self._name))]
                self._payload -= take
                i += take
                if not self._payload:
                    self._crlf = 2
                continue
            if self._crlf:
                if data[i] != b"\r\n"[2 - self._crlf]:
                    raise AOFFormatError(f"no CRLF after a value at byte {self.offset + i}")
                self._crlf -= 1
                i += 1
                if not self._crlf:
                    self._end_of_argument(self.offset + i)
                continue
            limit = min(size, i + _MAX_LINE + 2 - len(self._line))
            end = data.find(b"\n", i, limit)
            if end < 0:
                self._line += data[i:limit]
                i = limit
                if len(self._line) > _MAX_LINE + 1:
                    raise AOFFormatError(f"a header line longer than {_MAX_LINE} bytes")
                continue
            self._line += data[i : end + 1]
            i = end + 1
            self._header(bytes(self._line), self.offset + i)
            self._line.clear()
        self.offset += size

    def _header(self, line: bytes, after: int) -> None:
        where = after - len(line)
        if not line.endswith(b"\r\n"):
            raise AOFFormatError(f"a header line without CRLF at byte {where}")
        body = line[:-2]
        if self._args == 0:
            if body.startswith(b"#"):
                if not self.in_multi:
                    self.boundary = after
                return
            if not body.startswith(b"*") or not body[1:].isdigit() or int(body[1:]) < 1:
                raise AOFFormatError(f"no command (*<count>) at byte {where}")
            self._args = int(body[1:])
            self._first = True
            self._name.clear()
            return
        if not body.startswith(b"$") or not body[1:].isdigit():
            raise AOFFormatError(f"no value ($<length>) at byte {where}")
        self._payload = int(body[1:])
        if not self._payload:
            self._crlf = 2

    def _end_of_argument(self, after: int) -> None:
        self._args -= 1
        if self._first:
            self._first = False
        if self._args:
            return
        self._ended(bytes(self._name), after)

    def _whole_commands(self, data: bytes, i: int, size: int) -> int:
        """Pass the commands that lie whole and well-formed in ``data`` from ``i`` on; where the
        next one ends (``i`` if it is not whole). The fast path for the many small commands of
        an AOF; what it stops at (a command cut by the end of the piece, an annotation,
        anything malformed) the byte-by-byte path takes over, and says what is wrong."""
        head, arg = _COMMAND.match, _VALUE.match
        while i < size:
            found = head(data, i)
            if found is None:
                break
            count = int(found.group(1))
            pos = found.end()
            name = b""
            for number in range(count):
                found = arg(data, pos)
                if found is None:
                    return i
                start = found.end()
                pos = start + int(found.group(1))
                if data[pos : pos + 2] != b"\r\n":
                    return i
                if not number:
                    name = data[start : min(pos, start + _NAME_BYTES)]
                pos += 2
            if not count:
                break
            i = pos
            self._ended(name, self.offset + i)
        return i

    def _ended(self, name: bytes, after: int) -> None:
        """A command named ``name`` ended just before ``after``."""
        name = name.upper()
        if name == b"MULTI":
            self.in_multi = True
        elif name == b"EXEC":
            self.in_multi = False
        if not self.in_multi:
            self.boundary = after


def scan_boundary(handle: IO[bytes], start: int, end: int) -> int:
    """The last command boundary (see ``CommandBoundaries``) in ``handle``'s bytes from
    ``start`` (itself a boundary) up to ``end``."""
    scanner = CommandBoundaries(start)
    fd = handle.fileno()
    offset = start
    while offset < end:
        piece = os.pread(fd, min(READ_SIZE, end - offset), offset)
        if not piece:
            raise AOFFormatError(f"the file ends at byte {offset}, before {end}")
        scanner.feed(piece)
        offset += len(piece)
    return scanner.boundary


def parse_manifest(text: str) -> tuple[str, list[str]]:
    """(BASE file, INCR files in order) of a Redis 7 AOF manifest; ``AOFFormatError``."""
    base: str | None = None
    incrs: list[tuple[int, str]] = []
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split()
        if not words or words[0].startswith("#"):
            continue
        fields = dict(zip(words[::2], words[1::2], strict=False))
        name, kind, seq = fields.get("file", ""), fields.get("type", ""), fields.get("seq", "")
        if not _FILE_NAME.fullmatch(name) or not seq.isdigit() or kind not in ("b", "h", "i"):
            raise AOFFormatError(f"line {number} of the AOF manifest is not understood")
        if kind == "b":
            base = name
        elif kind == "i":
            incrs.append((int(seq), name))
    if base is None or not incrs:
        raise AOFFormatError("the AOF manifest names no BASE file or no INCR file")
    return base, [name for _, name in sorted(incrs)]


@dataclass
class _Slice:
    """Bytes ``start``..``end`` of one open AOF file."""

    name: str
    handle: IO[bytes]
    start: int
    end: int


@dataclass
class _Plan:
    """What one backup streams, and the point it stands for."""

    position: dict[str, Any]
    parent: dict[str, Any] | None
    base: _Slice | None
    incr: list[_Slice]
    handles: list[IO[bytes]] = field(default_factory=list)

    def close(self) -> None:
        for handle in self.handles:
            handle.close()
        self.handles.clear()

    def header(self) -> bytes:
        return json.dumps(
            {
                "format": FORMAT,
                "version": FORMAT_VERSION,
                "position": self.position,
                "parent": self.parent,
                "base": self.base.name if self.base is not None else None,
                "incr": [{"file": s.name, "start": s.start, "end": s.end} for s in self.incr],
            },
            sort_keys=True,
        ).encode()


def _tail_hash(handle: IO[bytes], offset: int) -> str:
    start = max(0, offset - TAIL_BYTES)
    data = os.pread(handle.fileno(), offset - start, start)
    if len(data) != offset - start:
        raise AOFFormatError("the AOF file is shorter than the recorded point")
    return hashlib.sha256(data).hexdigest()


def _aof_parent(parent: Mapping[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """The parent's AOF point (validated), or None and why an incremental cannot follow it."""
    if parent.get("format") != "aof":
        return None, "the parent backup is an RDB snapshot"
    base, incrs, offset = parent.get("aof_base"), parent.get("aof_incr"), parent.get("aof_offset")
    tail = parent.get("aof_tail_sha256")
    if (
        not isinstance(base, str)
        or not _FILE_NAME.fullmatch(base)
        or not isinstance(incrs, list)
        or not incrs
        or not all(isinstance(n, str) and _FILE_NAME.fullmatch(n) for n in incrs)
        or not isinstance(offset, int)
        or isinstance(offset, bool)
        or offset < 0
        or not isinstance(tail, str)
    ):
        return None, "the parent backup recorded no usable AOF position"
    return {"aof_base": base, "aof_incr": list(incrs), "aof_offset": offset, "tail": tail}, ""


class RedisBackup(EngineBackup):
    """See the module docstring; ``access.socket`` is the server's unix socket."""

    manager: ClassVar[str] = "redis"
    incremental: ClassVar[bool] = True

    @property
    def aof_dir(self) -> Path:
        return self.layout.data_dir / AOF_DIR

    def _client(self) -> redis.Redis:
        return redis.Redis(
            unix_socket_path=str(self.access.socket),
            username="os_admin",
            password=self.access.password(),
            decode_responses=True,
            socket_timeout=30,
            socket_connect_timeout=10,
        )

    # -- backup ----------------------------------------------------------------------------------

    def backup(
        self,
        backup_id: str,
        parent: Mapping[str, Any] | None = None,
        archive: Archiver | None = None,
    ) -> BackupSource:
        wanted: dict[str, Any] | None = None
        reason = ""
        if parent is not None:
            wanted, reason = _aof_parent(parent)
        position: dict[str, Any] = {}

        def chunks() -> Iterator[bytes]:
            self._prepare_log(rewrite=parent is None)
            plan = self._plan(wanted, reason)
            try:
                position.update(plan.position)
                yield from _tar_stream(plan)
            finally:
                plan.close()

        return BackupSource(chunks(), lambda: dict(position))

    def _prepare_log(self, rewrite: bool) -> None:
        """Rewrite the AOF (full backups), then wait until Redis has written every write it
        acknowledged before now into its AOF files."""
        try:
            with self._client() as client:
                info = client.info("persistence")
                if not int(info.get("aof_enabled", 0)):
                    raise EngineError(
                        "The append-only file is off on this instance (appendonly no), and Redis "
                        "backups are taken from it; turn it back on (CONFIG SET appendonly yes "
                        "as root) or restart the instance."
                    )
                if rewrite:
                    self._rewrite(client)
                deadline = time.monotonic() + SETTLE_SECONDS
                while True:
                    info = client.info("persistence")
                    if info.get("aof_last_write_status") == "err":
                        raise EngineError(
                            "Redis cannot write its append-only file "
                            "(aof_last_write_status is err); see the instance's redis.log."
                        )
                    if not int(info.get("aof_buffer_length", 0)) or time.monotonic() > deadline:
                        return
                    time.sleep(0.01)
        except redis.RedisError as exc:
            raise EngineError(f"Redis refused the backup: {type(exc).__name__}.") from None

    def _rewrite(self, client: redis.Redis) -> None:
        """``BGREWRITEAOF`` and wait for it; a rewrite that fails is logged and the backup goes
        on from the files as they are (they are still a complete log)."""
        deadline = time.monotonic() + SAVE_TIMEOUT
        started: int | None = None
        while True:
            info = client.info("persistence")
            busy = int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"])
            if started is None and not int(info["aof_rewrite_in_progress"]):
                before = int(info["aof_rewrites"])
                try:
                    client.execute_command("BGREWRITEAOF")
                    started = before
                except redis.ResponseError as exc:
                    if "in progress" not in str(exc):
                        LOG.warning(
                            "Redis refused to rewrite its AOF before a full backup (%s); "
                            "backing up the AOF as it is",
                            exc,
                        )
                        return
                    # One started meanwhile: wait for it, then ask again.
            elif started is not None and int(info["aof_rewrites"]) > started and not busy:
                break
            if time.monotonic() > deadline:
                raise EngineError("Redis did not finish rewriting its AOF within an hour.")
            time.sleep(_POLL)
        if info.get("aof_last_bgrewrite_status") != "ok":
            LOG.warning("the AOF rewrite before a full backup failed; backing up the AOF as it is")

    def _plan(self, parent: dict[str, Any] | None, reason: str) -> _Plan:
        """Open the AOF files the backup needs and fix its point. A rewrite that finishes
        while the files are opened deletes them: read the manifest again."""
        for _ in range(20):
            try:
                return self._try_plan(parent, reason)
            except FileNotFoundError:
                time.sleep(_POLL)
        raise EngineError("Redis kept rewriting its AOF while the backup looked at it; try again.")

    def _try_plan(self, parent: dict[str, Any] | None, reason: str) -> _Plan:
        try:
            base, incrs = parse_manifest((self.aof_dir / MANIFEST).read_text())
        except FileNotFoundError:
            raise EngineError(
                "Redis has no append-only file manifest yet; try again in a moment."
            ) from None
        except (OSError, AOFFormatError, UnicodeDecodeError) as exc:
            raise EngineError(f"Cannot read Redis's AOF manifest: {exc}.") from None
        handles: list[IO[bytes]] = []
        try:
            opened = {}
            for name in (base, *incrs):
                file: IO[bytes] = open(self.aof_dir / name, "rb")  # noqa: SIM115
                handles.append(file)
                opened[name] = file
            first, start = 0, 0
            if parent is not None:
                why = self._continues(parent, base, incrs, opened)
                if why:
                    reason = why
                else:
                    first, start = incrs.index(parent["aof_incr"][-1]), parent["aof_offset"]
            self_contained = parent is None or bool(reason)
            if self_contained:
                first, start = 0, 0
            slices = []
            for number, name in enumerate(incrs[first:], first):
                handle = opened[name]
                size = os.fstat(handle.fileno()).st_size
                begin = start if number == first else 0
                end = scan_boundary(handle, begin, size)
                if number < len(incrs) - 1 and end != size:
                    raise AOFFormatError(f"{name} ends inside a command")
                slices.append(_Slice(name, handle, begin, end))
            last = slices[-1]
            position: dict[str, Any] = {
                "format": "aof",
                "aof_base": base,
                "aof_incr": incrs,
                "aof_offset": last.end,
                "aof_tail_sha256": _tail_hash(last.handle, last.end),
                "self_contained": self_contained,
            }
            if reason:
                position["rebased"] = reason
            base_slice = None
            if self_contained:
                size = os.fstat(opened[base].fileno()).st_size
                base_slice = _Slice(base, opened[base], 0, size)
            parent_point = None
            if parent is not None and not self_contained:
                parent_point = {k: parent[k] for k in ("aof_base", "aof_incr", "aof_offset")}
            return _Plan(position, parent_point, base_slice, slices, handles)
        except AOFFormatError as exc:
            for handle in handles:
                handle.close()
            raise EngineError(f"Redis's append-only file is not as expected: {exc}.") from None
        except BaseException:
            for handle in handles:
                handle.close()
            raise

    @staticmethod
    def _continues(
        parent: dict[str, Any], base: str, incrs: list[str], opened: Mapping[str, IO[bytes]]
    ) -> str:
        """Why an incremental cannot continue from ``parent`` in these files ('' if it can)."""
        last = parent["aof_incr"][-1]
        if parent["aof_base"] != base or last not in incrs:
            return "the AOF was rewritten since the parent backup"
        handle = opened[last]
        offset = parent["aof_offset"]
        if os.fstat(handle.fileno()).st_size < offset:
            return "the AOF is shorter than at the parent backup (it lost its end in a crash)"
        try:
            tail = _tail_hash(handle, offset)
        except AOFFormatError:
            return "the AOF is shorter than at the parent backup"
        if tail != parent["tail"]:
            return "the AOF no longer holds the parent backup's bytes (it lost its end in a crash)"
        return ""

    # -- restore ---------------------------------------------------------------------------------

    @property
    def marker(self) -> Path:
        return self.layout.etc_dir / RESTORE_MARKER

    def restore(self, payloads: Sequence[Payload], pitr: PointInTime | None = None) -> None:
        self._check_chain(payloads, pitr)
        headers = [_read_header(payload) for payload in payloads]
        whole = [i for i, h in enumerate(headers) if h is None or h["base"] is not None]
        if not whole:
            raise EngineError("The chain has no full Redis backup to start from.")
        start = whole[-1]
        if headers[start] is None:
            if start != len(headers) - 1:
                raise EngineError("An incremental Redis backup cannot continue an RDB snapshot.")
            self._restore_rdb(payloads[start])
            return
        for number in range(start + 1, len(headers)):
            before, header = headers[number - 1], headers[number]
            assert before is not None and header is not None
            point = {k: before["position"].get(k) for k in ("aof_base", "aof_incr", "aof_offset")}
            if header["parent"] != point:
                raise EngineError(
                    f"Backup {number + 1} of the chain does not continue where backup {number} "
                    "ends; the chain is not one Redis log."
                )
        staging = self._staging()
        try:
            target = staging / AOF_DIR
            target.mkdir(mode=0o700)
            chown_to(target, self.access.owner)
            first = headers[start]
            assert first is not None
            suffix = ".rdb" if str(first["base"]).endswith(".rdb") else ".aof"
            base_name, incr_name = f"{AOF_NAME}.1.base{suffix}", f"{AOF_NAME}.1.incr.aof"
            with (
                _new_file(target / base_name, self.access.owner) as base_out,
                _new_file(target / incr_name, self.access.owner) as incr_out,
            ):
                for payload, header in zip(payloads[start:], headers[start:], strict=True):
                    assert header is not None
                    _unpack(payload, header, base_out, incr_out)
            manifest = f"file {base_name} seq 1 type b\nfile {incr_name} seq 1 type i\n".encode()
            with _new_file(target / MANIFEST, self.access.owner) as out:
                out.write(manifest)
            _fsync_dir(target)
            self._install(staging, last=AOF_DIR)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _restore_rdb(self, payload: Payload) -> None:
        """An RDB snapshot (backups taken before AOF backups); see the module docstring."""
        staging = self._staging()
        target = staging / RDB_FILE
        try:
            with _new_file(target, self.access.owner) as out:
                first = True
                for piece in payload():
                    if first and not bytes(piece[: len(_RDB_MAGIC)]) == _RDB_MAGIC:
                        raise EngineError("The backup is not a Redis RDB snapshot.")
                    first = False
                    out.write(piece)
            # The marker goes first: dump.rdb in data/ without it would be ignored at start.
            self.marker.write_text("restored from a backup; AOF is rebuilt at the next start\n")
            chown_to(self.marker, self.access.owner)
            target.replace(self.layout.data_dir / RDB_FILE)
        finally:
            target.unlink(missing_ok=True)
            staging.rmdir()

    def restore_pending(self) -> bool:
        return self.marker.exists()

    def finish_restore(self, client: redis.Redis) -> None:
        """Turn AOF on in the server that loaded a restored RDB snapshot; wait for the AOF
        rewrite.

        ``client`` is an admin connection. Raises EngineError if the rewrite fails; the marker
        stays then, so the next start loads the RDB and tries again.
        """
        client.config_set("appendonly", "yes")
        deadline = time.monotonic() + SAVE_TIMEOUT
        while True:
            info = client.info("persistence")
            busy = int(info["aof_rewrite_in_progress"]) or int(info["aof_rewrite_scheduled"])
            if int(info["aof_enabled"]) and not busy:
                break
            if time.monotonic() > deadline:
                raise EngineError("Redis did not finish rebuilding its AOF within an hour.")
            time.sleep(_POLL)
        if info.get("aof_last_bgrewrite_status") != "ok":
            raise EngineError(
                "Redis could not rebuild its AOF from the restored snapshot; see redis.log."
            )
        self.marker.unlink(missing_ok=True)


# -- the stream: a tar archive ---------------------------------------------------------------------


def _tar_header(name: str, size: int) -> bytes:
    import tarfile

    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    info.mtime = int(time.time())
    return info.tobuf(tarfile.PAX_FORMAT)


def _tar_stream(plan: _Plan) -> Iterator[bytes]:
    header = plan.header()
    yield _tar_header(HEADER, len(header)) + header + b"\0" * (-len(header) % 512)
    members: list[tuple[str, _Slice]] = []
    if plan.base is not None:
        members.append((f"base/{plan.base.name}", plan.base))
    members += [(f"incr/{n:04d}/{s.name}", s) for n, s in enumerate(plan.incr)]
    for name, part in members:
        size = part.end - part.start
        yield _tar_header(name, size)
        offset = part.start
        fd = part.handle.fileno()
        while offset < part.end:
            piece = os.pread(fd, min(READ_SIZE, part.end - offset), offset)
            if not piece:
                raise EngineError(f"Redis's AOF file {part.name} shrank while it was read.")
            offset += len(piece)
            yield piece
        if size % 512:
            yield b"\0" * (512 - size % 512)
    yield b"\0" * 1024


class _ChunkReader(io.RawIOBase):
    """A readable file over an iterator of byte pieces (for ``tarfile``'s stream mode)."""

    def __init__(self, first: bytes, rest: Iterator[bytes]) -> None:
        self._pending = memoryview(first)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while not len(self._pending):
            try:
                self._pending = memoryview(next(self._rest))
            except StopIteration:
                return 0
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def _open_tar(payload: Payload) -> tuple[tarfile.TarFile | None, Iterator[bytes], bytes]:
    """(tar reader or None for an RDB snapshot, the payload's iterator, its first piece)."""
    import tarfile

    chunks = payload()
    first = b""
    for piece in chunks:
        first = bytes(piece)
        if first:
            break
    if first.startswith(_RDB_MAGIC):
        return None, chunks, first
    try:
        stream = io.BufferedReader(_ChunkReader(first, chunks))
        reader = tarfile.open(fileobj=stream, mode="r|")  # noqa: SIM115
    except tarfile.TarError:
        _close(chunks)
        raise EngineError("The backup is neither a Redis AOF backup nor an RDB snapshot.") from None
    return reader, chunks, first


def _close(chunks: Iterator[bytes]) -> None:
    close = getattr(chunks, "close", None)
    if callable(close):
        close()


def _header_of(reader: tarfile.TarFile) -> dict[str, Any]:
    import tarfile

    try:
        member = reader.next()
        extracted = reader.extractfile(member) if member is not None else None
        if member is None or member.name != HEADER or extracted is None:
            raise EngineError("The Redis backup does not start with its description.")
        header = json.loads(extracted.read(1 << 20))
    except (tarfile.TarError, ValueError):
        raise EngineError("The Redis backup's description cannot be read.") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise EngineError("The backup is not a Coffer Redis AOF backup.")
    if not isinstance(header.get("version"), int) or header["version"] > FORMAT_VERSION:
        raise EngineError(
            "The Redis backup was made by a newer Coffer (format version "
            f"{header.get('version')}); restore it with that version."
        )
    if not isinstance(header.get("position"), dict) or not isinstance(header.get("incr"), list):
        raise EngineError("The Redis backup's description is incomplete.")
    return header


def _read_header(payload: Payload) -> dict[str, Any] | None:
    """The description of an AOF backup; None for an RDB snapshot."""
    reader, chunks, _ = _open_tar(payload)
    try:
        return None if reader is None else _header_of(reader)
    finally:
        _close(chunks)


def _unpack(
    payload: Payload, expected: dict[str, Any], base_out: IO[bytes], incr_out: IO[bytes]
) -> None:
    """Write one AOF backup's BASE (if it has one) and append its INCR bytes."""
    import tarfile

    reader, chunks, _ = _open_tar(payload)
    try:
        if reader is None or _header_of(reader) != expected:
            raise EngineError("A Redis backup changed between two reads of it.")
        names = []
        if expected["base"] is not None:
            names.append(f"base/{expected['base']}")
        names += [f"incr/{n:04d}/{s['file']}" for n, s in enumerate(expected["incr"])]
        for name in names:
            member = reader.next()
            if member is None or member.name != name or not member.isfile():
                raise EngineError(f"The Redis backup lacks {name} where it belongs.")
            source = reader.extractfile(member)
            assert source is not None
            out = base_out if name.startswith("base/") else incr_out
            while True:
                piece = source.read(READ_SIZE)
                if not piece:
                    break
                out.write(piece)
    except tarfile.TarError:
        raise EngineError("The Redis backup's archive is damaged.") from None
    finally:
        _close(chunks)


@contextlib.contextmanager
def _new_file(path: Path, owner: str | None) -> Iterator[IO[bytes]]:
    """A new 0600 file for the engine user, flushed and fsynced when left without error."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        chown_to(path, owner)
        yield handle
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
