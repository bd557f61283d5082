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
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

from coffer.errors import EngineError
from coffer.guest.backup.base import (
    BackupSource,
    EngineBackup,
    Payload,
    find_tool,
    write_secret_file,
)
from coffer.guest.layout import chown_to

_DEFAULTS_FILE = "backup.cnf"
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

    def _work_dir(self, name: str) -> Path:
        path = self.layout.run_dir / "tmp" / name
        shutil.rmtree(path, ignore_errors=True)
        path.parent.mkdir(mode=0o750, exist_ok=True)
        chown_to(path.parent, self.access.owner)
        path.mkdir(mode=0o700)
        chown_to(path, self.access.owner)
        return path

    def backup(self, backup_id: str, parent: Mapping[str, Any] | None = None) -> BackupSource:
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
        return position

    def restore(self, payloads: Sequence[Payload]) -> None:
        self._check_chain(payloads)
        mbstream = find_tool("mbstream")
        mariabackup = find_tool("mariabackup")
        staging = self._staging()
        log = self._log("mariabackup-restore.log")
        increment = self.layout.root / ".data-restore-increment"
        try:
            self.tool_input([mbstream, "-x", "-C", str(staging)], payloads[0](), "mbstream", log)
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
            self._install(staging, last="mysql")
        finally:
            shutil.rmtree(increment, ignore_errors=True)
            shutil.rmtree(staging, ignore_errors=True)
