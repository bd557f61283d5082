"""MariaDB backups: physical, with ``mariabackup --backup --stream=mbstream``, full or incremental.

The backup runs against the live server (InnoDB pages are copied while its redo log is followed;
a short ``BACKUP STAGE`` lock at the end makes non-InnoDB tables consistent). It connects as the
agent's admin account over the unix socket, with the password in a 0600 ``--defaults-file``
written for the run and removed after it. ``--extra-lsndir`` keeps a copy of
``xtrabackup_checkpoints`` beside the stream, which is how the backup's LSNs become its recorded
``engine_position``; an incremental backup starts from its parent's ``to_lsn``.

Restore extracts the full backup's stream with ``mbstream -x`` into a staging directory and
prepares it with ``mariabackup --prepare`` (crash recovery of the copied pages), then applies each
incremental in order (extracted beside it, ``--prepare --incremental-dir``), and moves the
result into the empty data directory, ``mysql/`` last. The restored data carries the source's
accounts; the datastore's first start gives ``os_admin`` this instance's own password, as it does
for a template copy.

Point in time, from the binary log: instances write a row-based binary log in ``binlog/``
(``coffer.guest.backup.archive.mariadb_binlog_settings``), and each backup records the binary log
file and position it stands for (``xtrabackup_binlog_info``, which mariabackup writes under its
backup lock). Once a backup has enabled archiving, ``Binlogs`` hands the archiver every closed
binary log (found from the index file, not by asking the server) and closes the current one with
``FLUSH BINARY LOGS`` at most every archive timeout, and only when it grew; archived files are
purged from the server. A point-in-time restore restores the chain, fetches (verified) the
archived binary logs from the backup's file through the first one closed at or after the target,
and leaves a marker; when the engine then first starts, ``finish_restore`` replays them with
``mariadb-binlog --start-position ... --stop-datetime ...`` into the server over its admin socket,
before the instance is reported ready. Binary log times have a resolution of one second: the
restore lands on the last transaction committed before the start of the given second.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from coffer.errors import EngineError
from coffer.guest.backup.archive import (
    BINLOG,
    BINLOG_BASE,
    EXTENT_MARGIN,
    LogSource,
    binlog_dir,
)
from coffer.guest.backup.base import (
    BackupSource,
    EngineBackup,
    Payload,
    find_tool,
    write_secret_file,
)
from coffer.guest.layout import chown_to

LOG = logging.getLogger(__name__)


if TYPE_CHECKING:
    from coffer.guest.backup.archive import Archiver, PointInTime

_DEFAULTS_FILE = "backup.cnf"
_REPLAY_FILE = "replay.cnf"
#: Left in ``etc/`` by a point-in-time restore: what ``finish_restore`` replays at first start.
REPLAY_MARKER = "binlog-replay.json"
_BINLOG_INFO = "xtrabackup_binlog_info"
_LSN_KEYS = ("from_lsn", "to_lsn", "last_lsn")


def _key_values(path: Path) -> dict[str, str]:
    """``key = value`` lines of one of mariabackup's metadata files."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return {}
    values = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            values[key.strip()] = value.strip()
    return values


class MariaDBBackup(EngineBackup):
    """See the module docstring; ``access.socket`` is the server's unix socket."""

    manager: ClassVar[str] = "mariadb"
    incremental: ClassVar[bool] = True
    point_in_time: ClassVar[bool] = True

    def archive_source(self) -> LogSource:
        return Binlogs(self)

    def _work_dir(self, name: str) -> Path:
        path = self.layout.run_dir / "tmp" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(mode=0o750, exist_ok=True)
        chown_to(path.parent, self.access.owner)
        path.mkdir(mode=0o700)
        chown_to(path, self.access.owner)
        return path

    def backup(
        self,
        backup_id: str,
        parent: Mapping[str, Any] | None = None,
        archive: Archiver | None = None,
    ) -> BackupSource:
        parent_lsn = None
        if parent is not None:
            parent_lsn = str(parent.get("to_lsn", ""))
            if not parent_lsn.isdigit():
                raise EngineError(
                    "The parent backup recorded no LSN, so no incremental backup can start from "
                    "it; take a full backup."
                )
        position: dict[str, Any] = {}

        def chunks() -> Iterator[bytes]:
            tool = find_tool("mariabackup")
            work = self._work_dir(f"backup-{backup_id}")
            defaults = self.layout.secrets_dir / _DEFAULTS_FILE
            try:
                (work / "target").mkdir(mode=0o700)
                (work / "lsn").mkdir(mode=0o700)
                for sub in ("target", "lsn"):
                    chown_to(work / sub, self.access.owner)
                write_secret_file(
                    defaults,
                    "[client]\n"
                    "user=os_admin\n"
                    f"password={self.access.password()}\n"
                    f"socket={self.access.socket}\n",
                    self.access.owner,
                )
                argv = [
                    tool,
                    f"--defaults-file={defaults}",  # must come first
                    "--backup",
                    "--stream=mbstream",
                    f"--datadir={self.layout.data_dir}",
                    f"--target-dir={work / 'target'}",
                    f"--extra-lsndir={work / 'lsn'}",
                ]
                if parent_lsn is not None:
                    argv.append(f"--incremental-lsn={parent_lsn}")
                yield from self.tool_output(argv, "mariabackup", self._log("mariabackup.log"))
                position.update(self._position(work / "lsn"))
            finally:
                defaults.unlink(missing_ok=True)
                shutil.rmtree(work, ignore_errors=True)

        return BackupSource(chunks(), lambda: dict(position))

    @staticmethod
    def _position(lsn_dir: Path) -> dict[str, Any]:
        checkpoints = _key_values(lsn_dir / "xtrabackup_checkpoints")
        missing = [key for key in _LSN_KEYS if not checkpoints.get(key, "").isdigit()]
        if missing:
            raise EngineError(
                "mariabackup finished but recorded no LSNs (xtrabackup_checkpoints); the "
                "backup cannot be trusted."
            )
        position: dict[str, Any] = {key: checkpoints[key] for key in _LSN_KEYS}
        position["backup_type"] = checkpoints.get("backup_type", "")
        binlog = _key_values(lsn_dir / "xtrabackup_info").get("binlog_pos", "")
        if binlog:
            position["binlog_pos"] = binlog
        position.update(_binlog_info(lsn_dir))
        return position

    def restore(self, payloads: Sequence[Payload], pitr: PointInTime | None = None) -> None:
        self._check_chain(payloads, pitr)
        mbstream = find_tool("mbstream")
        mariabackup = find_tool("mariabackup")
        staging = self._staging()
        log = self._log("mariabackup-restore.log")
        increment = self.layout.root / ".data-restore-increment"
        fetched = self.layout.root / ".restore-binlog"
        try:
            self.tool_input([mbstream, "-x", "-C", str(staging)], payloads[0](), "mbstream", log)
            position = _binlog_info(staging)
            # --no-defaults: the host's my.cnf must not steer the prepare; mariabackup reads the
            # settings the backup was taken with from backup-my.cnf in the target directory.
            self.run_tool(
                [mariabackup, "--no-defaults", "--prepare", f"--target-dir={staging}"],
                "mariabackup --prepare",
                log,
            )
            for payload in payloads[1:]:
                shutil.rmtree(increment, ignore_errors=True)
                increment.mkdir(mode=0o700)
                chown_to(increment, self.access.owner)
                self.tool_input([mbstream, "-x", "-C", str(increment)], payload(), "mbstream", log)
                position = _binlog_info(increment)
                self.run_tool(
                    [
                        mariabackup,
                        "--no-defaults",
                        "--prepare",
                        f"--target-dir={staging}",
                        f"--incremental-dir={increment}",
                    ],
                    "mariabackup --prepare --incremental-dir",
                    log,
                )
                shutil.rmtree(increment, ignore_errors=True)
            if pitr is not None:
                # The marker goes before the data: data/ without it would start as the backup.
                self._fetch_binlogs(pitr, position, fetched)
            self._install(staging, last="mysql")
        except BaseException:
            self.marker.unlink(missing_ok=True)
            shutil.rmtree(fetched, ignore_errors=True)
            raise
        finally:
            shutil.rmtree(increment, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)

    # -- point in time ---------------------------------------------------------------------------

    @property
    def marker(self) -> Path:
        return self.layout.etc_dir / REPLAY_MARKER

    def _fetch_binlogs(self, pitr: PointInTime, position: dict[str, Any], into: Path) -> None:
        """Fetch (verified) the archived binary logs from the backup's file to the first one
        closed at or after the target time, and write the replay marker."""
        start = str(position.get("binlog_file", ""))
        match = BINLOG.fullmatch(start)
        if match is None or not str(position.get("binlog_position", "")).isdigit():
            raise EngineError(
                "The backup recorded no binary log position (it was taken before binary logging "
                "was on), so it cannot be restored to a point in time."
            )
        shutil.rmtree(into, ignore_errors=True)
        into.mkdir(mode=0o700)
        chown_to(into, self.access.owner)
        expected = int(match.group(1))
        files: list[str] = []
        reached = False
        for name in pitr.reader.names():
            found = BINLOG.fullmatch(name)
            if found is None or int(found.group(1)) < expected:
                continue
            if int(found.group(1)) != expected:
                break  # a gap: nothing after it can be replayed
            pitr.reader.fetch(name, into / name, self.access.owner)
            files.append(name)
            expected += 1
            closed = pitr.reader.segment_time(name)
            if closed is not None and closed - EXTENT_MARGIN >= pitr.target_time:
                reached = True
                break
        if not reached and not pitr.idle_covers(files[-1] if files else ""):
            raise EngineError(
                "The binary log archive does not reach the requested time "
                f"{pitr.target_time.isoformat()}; choose an earlier one."
            )
        # Binary log times are whole seconds: stop at the first event of the target's second.
        stop = pitr.target_time.astimezone(UTC).replace(microsecond=0, tzinfo=None)
        marker = {
            "files": files,
            "start_position": int(position["binlog_position"]),
            "stop_datetime": stop.strftime("%Y-%m-%d %H:%M:%S"),
        }
        self.marker.write_text(json.dumps(marker))
        chown_to(self.marker, self.access.owner)

    def restore_pending(self) -> bool:
        return self.marker.exists()

    def finish_restore(self) -> None:
        """Replay the fetched binary logs into the running server (its first start after a
        point-in-time restore). The marker goes first: a replay is never run twice; one that
        fails leaves the instance failed with the tool's words."""
        try:
            plan = json.loads(self.marker.read_text())
        except (OSError, ValueError):
            return
        fetched = self.layout.root / ".restore-binlog"
        self.marker.unlink()
        defaults = self.layout.secrets_dir / _REPLAY_FILE
        try:
            write_secret_file(
                defaults,
                "[client]\n"
                "user=os_admin\n"
                f"password={self.access.password()}\n"
                f"socket={self.access.socket}\n",
                self.access.owner,
            )
            self._replay(plan, fetched, defaults)
        finally:
            defaults.unlink(missing_ok=True)
            shutil.rmtree(fetched, ignore_errors=True)

    def _replay(self, plan: dict[str, Any], fetched: Path, defaults: Path) -> None:
        files = [str(fetched / str(name)) for name in plan.get("files", [])]
        if not files:
            return
        reader_log = self._log("binlog-replay-reader.log")
        writer_log = self._log("binlog-replay.log")
        reader = self._popen(
            [
                find_tool("mariadb-binlog"),
                "--disable-log-bin",
                f"--start-position={int(plan['start_position'])}",
                f"--stop-datetime={plan['stop_datetime']}",
                *files,
            ],
            reader_log,
            stdout=subprocess.PIPE,
            env={"TZ": "UTC"},
        )
        assert reader.stdout is not None
        try:
            writer = self._popen(
                [find_tool("mariadb"), f"--defaults-file={defaults}", "--binary-mode"],
                writer_log,
                stdin=reader.stdout.fileno(),
            )
            reader.stdout.close()
            code = writer.wait()
            if code != 0:
                raise self._failure("Replaying the binary log (mariadb)", code, writer_log)
            code = reader.wait()
            if code != 0:
                raise self._failure("Reading the binary log (mariadb-binlog)", code, reader_log)
        finally:
            if reader.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    reader.kill()
                reader.wait()
        LOG.info("replayed %d binary log file(s) up to %s", len(files), plan["stop_datetime"])

    # -- SQL for the archiver --------------------------------------------------------------------

    def execute(self, statement: str) -> None:
        """Run one administrative statement over the admin socket."""
        import pymysql

        try:
            conn = pymysql.connect(
                unix_socket=str(self.access.socket),
                user="os_admin",
                password=self.access.password(),
                autocommit=True,
                connect_timeout=10,
            )
        except pymysql.MySQLError as exc:
            raise EngineError(f"MariaDB is not answering ({type(exc).__name__}).") from None
        try:
            with conn.cursor() as cur:
                cur.execute(statement)
        except pymysql.MySQLError as exc:
            raise EngineError(f"MariaDB refused {statement.split()[0]} ({exc.args[0]}).") from None
        finally:
            conn.close()


class Binlogs(LogSource):
    """MariaDB: closed binary logs, found from the index file (see the module docstring)."""

    kind: ClassVar[str] = "binary log"

    def __init__(self, handler: MariaDBBackup) -> None:
        self.handler = handler
        self.directory = binlog_dir(handler.layout)
        self.index = self.directory / f"{BINLOG_BASE}.index"
        self.state_file = handler.layout.root / "state" / "binlog-archive.json"
        #: The current file, its size when first seen after a rotation, and when.
        self._current: tuple[str, int, float] | None = None
        self._rotated = False
        self._purged_at = 0.0

    def _names(self) -> list[str]:
        try:
            lines = self.index.read_text().splitlines()
        except OSError:
            return []
        names = [Path(line.strip()).name for line in lines if line.strip()]
        return [n for n in names if BINLOG.fullmatch(n)]

    def _state(self) -> dict[str, Any]:
        try:
            data = json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, state: dict[str, Any]) -> None:
        self.state_file.parent.mkdir(mode=0o700, exist_ok=True)
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_file)

    def enable(self) -> None:
        state = self._state()
        if "first" not in state:
            names = self._names()
            # From the file being written now: a backup that starts after this is in it or later.
            state["first"] = names[-1] if names else ""
            self._save(state)

    def pending(self) -> list[Path]:
        closed = self._names()[:-1]
        state = self._state()
        first, done = str(state.get("first", "")), str(state.get("uploaded", ""))
        return [
            self.directory / n
            for n in closed
            if self.order(n) >= self.order(first or n)
            and (not done or self.order(n) > self.order(done))
        ]

    def uploaded(self, path: Path) -> None:
        state = self._state()
        state["uploaded"] = path.name
        self._save(state)

    def after_uploads(self) -> None:
        self._purge()

    def _purge(self) -> None:
        """Purge the archived files from the server. The server keeps a file until its binary
        log checkpoint has passed it, so this is tried again at later looks while archived
        files remain on disk."""
        done = str(self._state().get("uploaded", ""))
        names = self._names()
        later = [n for n in names if self.order(n) > self.order(done)]
        if done and later and self.order(names[0]) <= self.order(done):
            self.handler.execute(f"PURGE BINARY LOGS TO '{later[0]}'")
        self._purged_at = time.monotonic()

    def tick(self, timeout: int) -> datetime | None:
        names = self._names()
        if not names:
            return None
        done = str(self._state().get("uploaded", ""))
        archived_on_disk = bool(done) and self.order(names[0]) <= self.order(done)
        if archived_on_disk and time.monotonic() - self._purged_at >= timeout:
            self._purge()
        current = names[-1]
        path = self.directory / current
        looked = datetime.now(UTC)
        try:
            size = path.stat().st_size
        except OSError:
            return None
        now = time.monotonic()
        if self._current is None or self._current[0] != current:
            # A file we just opened starts from its header; one found otherwise may hold changes.
            self._current = (current, size if self._rotated else 0, now)
            self._rotated = False
            return None
        _, baseline, since = self._current
        if size > baseline and now - since >= timeout:
            if _holds_transactions(path):
                self.handler.execute("FLUSH BINARY LOGS")
                self._rotated = True
                return None
            self._current = (current, size, since)
        if size == self._current[1] and not _holds_transactions(path):
            return looked
        return None

    def extent_of(self, name: str, written: datetime) -> dict[str, Any] | None:
        if BINLOG.fullmatch(name) is None:
            return None
        return {"segment": name, "lsn": None, "time": (written - EXTENT_MARGIN).isoformat()}

    @staticmethod
    def order(name: str) -> tuple[Any, ...]:
        match = BINLOG.fullmatch(name)
        return (int(match.group(1)) if match else -1,)


#: Binary log events a new file starts with (format description, GTID list, checkpoint,
#: rotate, encryption start): a file holding only these holds no transaction.
_HEADER_EVENTS = frozenset({4, 15, 161, 163, 164})
#: A file larger than this is taken to hold transactions without reading it.
_HEADER_LIMIT = 64 * 1024


def _holds_transactions(path: Path) -> bool:
    """True unless binary log ``path`` holds header events only (read from disk, no SQL)."""
    try:
        with open(path, "rb") as handle:
            data = handle.read(_HEADER_LIMIT + 1)
    except OSError:
        return True
    if len(data) > _HEADER_LIMIT or not data.startswith(b"\xfebin"):
        return True
    pos = 4
    while pos + 19 <= len(data):
        kind = data[pos + 4]
        size = int.from_bytes(data[pos + 9 : pos + 13], "little")
        if kind not in _HEADER_EVENTS or size < 19:
            return True
        pos += size
    return False


def _binlog_info(directory: Path) -> dict[str, Any]:
    """The binary log file, position and GTID a backup in ``directory`` stands for, from
    ``xtrabackup_binlog_info`` (tab-separated) or else ``xtrabackup_info``'s ``binlog_pos``
    (``filename 'f', position 'p', GTID of the last change 'g'``); empty when the server had no
    binary log."""
    fields: list[str] = []
    try:
        fields = (directory / _BINLOG_INFO).read_text().split()
    except OSError:
        pos = _key_values(directory / "xtrabackup_info").get("binlog_pos", "")
        fields = re.findall(r"'([^']*)'", pos)
    if len(fields) < 2 or not BINLOG.fullmatch(fields[0]) or not fields[1].isdigit():
        return {}
    info: dict[str, Any] = {"binlog_file": fields[0], "binlog_position": int(fields[1])}
    if len(fields) > 2 and fields[2]:
        info["gtid"] = fields[2]
    return info
