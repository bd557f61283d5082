"""The engine side of backups: the contract each engine's handler keeps, and the tool runners.

A datastore owns one ``EngineBackup`` (composed, not inherited: ``datastore.backups``) that knows
how to read a consistent copy of its engine's data as a byte stream and how to turn such streams
back into a data directory. Everything between the engine and the store (compression,
encryption, checksums, storage) is the caller's: see ``coffer.guest.backup.worker``.

Engine tools (``mariabackup``, ``pg_basebackup``, ``redis-cli``, ``mbstream``, ``tar``) run as
the engine's OS user with argv lists; passwords reach them through 0600 files or the environment,
never the command line. Their stderr goes to a log file in the instance's ``log/`` directory, of
which only the last lines (with the admin password masked) ever reach an error message.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import subprocess
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from coffer.errors import EngineError
from coffer.guest.datastores.process import RunAs
from coffer.guest.layout import InstanceLayout, chown_to, write_private_file

if TYPE_CHECKING:
    from coffer.guest.backup.archive import Archiver, LogSource, PointInTime

#: Bytes read from a tool's stdout at a time.
READ_SIZE = 1 << 20
#: What a tool's stdin or stdout pipe holds (Linux's ``fs.pipe-max-size`` by default; a host
#: that allows less keeps its default).
PIPE_SIZE = 1 << 20
#: A restore opens each backup of its chain with one of these: the verified original bytes.
Payload = Callable[[], Iterator[bytes]]
_PATH = "/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class EngineAccess:
    """What a backup handler may use of its datastore: where things are and who runs them.

    ``password`` returns the engine admin's password (read when needed, never kept);
    ``run_as`` is the engine's OS user when the agent runs as root (None: ourselves).
    """

    layout: InstanceLayout
    run_as: RunAs | None
    socket: Path
    password: Callable[[], str]
    port: int = 0
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def owner(self) -> str | None:
        return None if self.run_as is None else self.run_as.name


class BackupSource:
    """The engine's bytes for one backup: iterate them once, then ask for ``position()``.

    ``close()`` stops the engine tool if the consumer gives up early (the storage upload failed);
    iterating to the end waits for the tool and raises ``EngineError`` if it failed, so a stream
    that ends normally is a complete backup.
    """

    def __init__(
        self,
        chunks: Iterator[bytes],
        position: Callable[[], dict[str, Any]] = dict,
        cleanup: Callable[[], None] | None = None,
    ) -> None:
        self._chunks = chunks
        self._position = position
        self._cleanup = cleanup
        self._finished = False

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        try:
            return next(self._chunks)
        except StopIteration:
            self._finished = True
            self.close()
            raise

    def close(self) -> None:
        close = getattr(self._chunks, "close", None)
        if callable(close):
            close()
        if self._cleanup is not None:
            cleanup, self._cleanup = self._cleanup, None
            cleanup()

    def position(self) -> dict[str, Any]:
        """What the engine said about the point this backup stands for (after the last byte)."""
        if not self._finished:
            raise RuntimeError("the backup position is known only once the stream has ended")
        return self._position()


class EngineBackup(ABC):
    """Backup and restore of one engine's data. The contract every engine's handler keeps:

    * ``backup`` returns at once with a ``BackupSource``; the engine tool starts when the first
      bytes are pulled. The stream is a consistent copy of the running engine (physical or
      snapshot) taken without stopping it. With ``parent`` (the parent backup's recorded
      ``engine_position``) it holds only what changed since; only handlers whose
      ``incremental`` is True accept one (others raise ``EngineError``).
    * ``restore`` takes the payloads of a chain (the full backup first, then each incremental
      in order), each already verified by the caller, and fills the instance's data directory,
      which must be empty, so that the datastore's next ``start`` runs the restored data. It
      stages everything in a hidden directory beside ``data/`` and moves it in last, with the
      file the datastore checks for "initialised" moved last of all: an interrupted restore
      leaves ``data/`` looking uninitialised and can simply be run again.
    * Both block for as long as the data takes; errors are ``EngineError`` with the tool's
      last words (secrets masked).
    """

    manager: ClassVar[str]
    incremental: ClassVar[bool] = False
    #: True if ``restore`` takes ``pitr`` (replays the source's archived log to a given time).
    point_in_time: ClassVar[bool] = False

    def __init__(self, access: EngineAccess) -> None:
        self.access = access
        self.layout = access.layout

    @abstractmethod
    def backup(
        self,
        backup_id: str,
        parent: Mapping[str, Any] | None = None,
        archive: Archiver | None = None,
    ) -> BackupSource:
        """Start streaming a backup (see the class docstring). ``archive`` is the instance's
        log archiver, for handlers whose incremental backups are built from archived log."""

    @abstractmethod
    def restore(self, payloads: Sequence[Payload], pitr: PointInTime | None = None) -> None:
        """Fill the empty data directory from a verified chain (see the class docstring); with
        ``pitr`` (only handlers whose ``point_in_time`` is True), recovered to its time."""

    def restore_pending(self) -> bool:
        """True while restored data still needs a step at the engine's next start."""
        return False

    def archive_source(self) -> LogSource | None:
        """Where the engine's completed log files wait for the archiver (handlers whose
        ``point_in_time`` is True); None for engines without a log archive."""
        return None

    # -- helpers for handlers ---------------------------------------------------------------------

    def _check_chain(self, payloads: Sequence[Payload], pitr: object = None) -> None:
        if pitr is not None and not self.point_in_time:
            raise EngineError(f"The {self.manager} datastore has no point-in-time restore.")
        if not payloads:
            raise EngineError("A restore needs at least one backup.")
        if len(payloads) > 1 and not self.incremental:
            raise EngineError(f"The {self.manager} datastore has no incremental backups.")

    def _staging(self, name: str = ".data-restore") -> Path:
        """An empty directory beside ``data/``, owned by the engine user (removed first)."""
        self.layout.create(self.access.owner)
        data_dir = self.layout.data_dir
        leftovers = sorted(p.name for p in data_dir.iterdir())
        if leftovers:
            raise EngineError(
                f"The data directory {data_dir} is not empty ({', '.join(leftovers[:5])}); a "
                "backup is restored only into a new instance."
            )
        staging = self.layout.root / name
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(mode=0o700)
        chown_to(staging, self.access.owner)
        return staging

    def _install(self, staging: Path, last: str) -> None:
        """Move everything from ``staging`` into ``data/``, ``last`` at the very end."""
        entries = sorted(staging.iterdir(), key=lambda p: (p.name == last, p.name))
        if not any(p.name == last for p in entries):
            raise EngineError(
                f"The restored data has no {last!r}; the backup does not hold a data directory."
            )
        for entry in entries:
            entry.replace(self.layout.data_dir / entry.name)
        staging.rmdir()

    def _log(self, name: str) -> Path:
        return self.layout.log_dir / name

    def _mask(self, lines: list[str]) -> list[str]:
        try:
            secret = self.access.password()
        except Exception:
            return lines
        return [line.replace(secret, "***") for line in lines] if secret else lines

    def _tail(self, path: Path, lines: int = 6) -> list[str]:
        try:
            text = path.read_text(errors="replace")
        except OSError:
            return []
        return self._mask([line.strip() for line in text.splitlines() if line.strip()][-lines:])

    def _env(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        return {"PATH": _PATH, "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", **(extra or {})}

    def _popen(
        self,
        argv: list[str],
        log: Path,
        *,
        stdin: int | None = subprocess.DEVNULL,
        stdout: int | None = subprocess.DEVNULL,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.Popen[bytes]:
        run_as = self.access.run_as
        with _log_file(log, self.access.owner) as err:
            try:
                return subprocess.Popen(
                    argv,
                    cwd=self.layout.root,
                    env=self._env(env),
                    stdin=stdin,
                    stdout=stdout,
                    stderr=err,
                    close_fds=True,
                    user=None if run_as is None else run_as.uid,
                    group=None if run_as is None else run_as.gid,
                    extra_groups=None if run_as is None else [],
                    umask=0o027,
                )
            except OSError as exc:
                raise EngineError(f"Cannot run {argv[0]}: {exc.strerror}.") from None

    def _failure(self, what: str, code: int, log: Path) -> EngineError:
        tail = self._tail(log)
        return EngineError(
            f"{what} failed with exit code {code}"
            + (": " + " | ".join(tail) if tail else "; see its log in the instance's log/.")
        )

    def tool_output(
        self, argv: list[str], what: str, log: Path, env: Mapping[str, str] | None = None
    ) -> Iterator[bytes]:
        """The stdout of ``argv`` (run as the engine user) in pieces of up to 1 MiB.

        Lazy: the tool starts at the first ``next``. After its last byte, waits for it and
        raises ``EngineError`` on a non-zero exit. Closing the iterator early kills the tool.
        """
        proc = self._popen(argv, log, stdout=subprocess.PIPE, env=env)
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        _widen_pipe(fd)
        try:
            while True:
                piece = os.read(fd, READ_SIZE)
                if not piece:
                    break
                yield piece
            code = proc.wait()
            if code != 0:
                raise self._failure(what, code, log)
        finally:
            _stop(proc)

    def tool_input(
        self,
        argv: list[str],
        chunks: Iterable[bytes],
        what: str,
        log: Path,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Feed ``chunks`` to the stdin of ``argv`` (run as the engine user) and wait for it.

        ``EngineError`` if the tool exits non-zero or stops reading before the end.
        """
        proc = self._popen(argv, log, stdin=subprocess.PIPE, env=env)
        assert proc.stdin is not None
        _widen_pipe(proc.stdin.fileno())
        try:
            try:
                for chunk in chunks:
                    proc.stdin.write(chunk)
                proc.stdin.close()
            except BrokenPipeError:
                code = proc.wait()
                raise self._failure(what, code or 1, log) from None
            code = proc.wait()
            if code != 0:
                raise self._failure(what, code, log)
        finally:
            _stop(proc)

    def run_tool(
        self, argv: list[str], what: str, log: Path, env: Mapping[str, str] | None = None
    ) -> None:
        """Run ``argv`` as the engine user to completion; ``EngineError`` on a non-zero exit."""
        proc = self._popen(argv, log, env=env)
        try:
            code = proc.wait()
            if code != 0:
                raise self._failure(what, code, log)
        finally:
            _stop(proc)


@contextlib.contextmanager
def _log_file(path: Path, owner: str | None) -> Iterator[int]:
    """A descriptor on a fresh log file for one tool run, given to the engine user."""
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o640)
    try:
        chown_to(path, owner)
        yield fd
    finally:
        os.close(fd)


def _widen_pipe(fd: int) -> None:
    """Let a tool's pipe hold ``PIPE_SIZE`` bytes (Linux's default is 64 KiB), so the tool and
    the agent each work on their own piece instead of taking turns at every 64 KiB."""
    with contextlib.suppress(OSError, AttributeError):
        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, PIPE_SIZE)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Kill ``proc`` if it still runs, reap it, close its pipes."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait()
    for pipe in (proc.stdin, proc.stdout):
        if pipe is not None:
            with contextlib.suppress(OSError):
                pipe.close()


def find_tool(name: str) -> str:
    """The path of engine tool ``name``; ``EngineError`` naming the package when missing."""
    found = shutil.which(name) or shutil.which(name, path=_PATH)
    if found is None:
        raise EngineError(f"{name} is not installed on this host; install it to take backups.")
    return found


def write_secret_file(path: Path, content: str, owner: str | None) -> None:
    """A 0600 file for a tool to read a password from, given to the engine user."""
    write_private_file(path, content, owner)
