"""Run one engine server process: spawn it as a child, or adopt it again after an agent restart.

The engine is started as a child of the agent and stays in the agent's process group, so whoever
supervises the agent can stop the whole tree by signalling the group. It is not tied to the
agent's life otherwise: an agent that restarts finds the engine through its pid file and adopts
it instead of starting a second one. A pid is trusted only if ``/proc/<pid>/cmdline`` carries the
instance's marker argument (its config file path), so a recycled pid is never mistaken for the
engine.

Engines never run as root. When the agent itself is root (tests, or a host where the operator
starts agents as root) the engine is spawned as an unprivileged OS user (``run_as``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from coffer.errors import EngineError, ValidationError
from coffer.guest.layout import chown_to, lookup_user
from coffer.status import ServiceStatus

_POLL_INTERVAL = 0.05


class UnsafeEngineUser(EngineError):
    """The engine would run as root, or as a user this process cannot switch to."""


@dataclass(frozen=True)
class RunAs:
    """The OS identity an engine is spawned with when the agent runs as root."""

    name: str
    uid: int
    gid: int


def resolve_run_as(run_as: str | None, engine: str) -> RunAs | None:
    """Decide who runs ``engine``: a ``RunAs`` to switch to, or None to run as ourselves.

    As root, ``run_as`` must name an existing user other than root. As anyone else, ``run_as``
    is None or names ourselves (nothing to switch). Raises UnsafeEngineUser otherwise.
    """
    euid = os.geteuid()
    if euid == 0:
        if run_as is None:
            raise UnsafeEngineUser(
                f"Refusing to run {engine} as root: set run_as to an unprivileged OS user "
                "(for example 'coffer')."
            )
        try:
            entry = lookup_user(run_as)
        except ValidationError as exc:
            raise UnsafeEngineUser(exc.message) from None
        if entry.pw_uid == 0:
            raise UnsafeEngineUser(
                f"Refusing to run {engine} as {run_as!r}, which has uid 0; "
                "choose an unprivileged OS user."
            )
        return RunAs(run_as, entry.pw_uid, entry.pw_gid)
    if run_as is not None:
        try:
            entry = lookup_user(run_as)
        except ValidationError as exc:
            raise UnsafeEngineUser(exc.message) from None
        if entry.pw_uid != euid:
            raise UnsafeEngineUser(
                f"Cannot run {engine} as {run_as!r}: only root can switch to another user. "
                "Leave run_as unset to run it as the current user."
            )
    return None


def os_user_name(run_as: RunAs | None) -> str:
    """The name of the OS user the engine runs as."""
    if run_as is not None:
        return run_as.name
    return pwd.getpwuid(os.geteuid()).pw_name


class ProcessState(enum.Enum):
    """What the helper sees of the engine process."""

    RUNNING = "running"
    #: Not running, and it ended on request (or was never started).
    STOPPED = "stopped"
    #: Not running, and it ended on its own with a failure (crash, kill, bad exit code).
    DIED = "died"


def _proc_args(pid: int) -> list[str] | None:
    """The argv of ``pid`` from /proc, or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # The state letter follows the parenthesised command name, which may itself hold spaces.
        if stat[stat.rindex(")") + 2] in "ZX":
            return None
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError, IndexError):
        return None
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


class EngineProcess:
    """One engine server process, identified by a pid file and a marker argument.

    ``marker`` must be an argument every start of this engine carries and no other instance's
    engine does (e.g. ``--defaults-file=/…/etc/my.cnf``). Not thread-safe: the datastore
    serialises calls.
    """

    def __init__(self, name: str, pidfile: Path, marker: str, run_as: RunAs | None) -> None:
        self.name = name
        self.pidfile = pidfile
        self.marker = marker
        self.run_as = run_as
        self._child: subprocess.Popen[bytes] | None = None

    # -- looking ----------------------------------------------------------------------------------

    def read_pidfile(self) -> int | None:
        """The pid recorded in the pid file, or None if there is none or it is unreadable."""
        try:
            text = self.pidfile.read_text().strip()
        except OSError:
            return None
        return int(text) if text.isdigit() else None

    def is_ours(self, pid: int) -> bool:
        """True if ``pid`` is alive and is this engine (its argv carries the marker)."""
        args = _proc_args(pid)
        return args is not None and self.marker in args

    def pid(self) -> int | None:
        """The pid of the running engine, or None. Reaps our child if it has exited."""
        if self._child is not None and self._child.poll() is None:
            return self._child.pid
        pid = self.read_pidfile()
        if pid is not None and self.is_ours(pid):
            return pid
        return None

    def is_child(self, pid: int) -> bool:
        """True if ``pid`` is the engine this object spawned (not one adopted by pid file)."""
        return self._child is not None and self._child.pid == pid

    def state(self) -> ProcessState:
        """RUNNING, STOPPED (ended on request, or never started) or DIED (ended on its own)."""
        if self.pid() is not None:
            return ProcessState.RUNNING
        if self._child is not None and self._child.returncode not in (None, 0):
            return ProcessState.DIED
        # A pid file outliving its process means the engine did not shut down cleanly.
        if self.read_pidfile() is not None:
            return ProcessState.DIED
        return ProcessState.STOPPED

    def exit_code(self) -> int | None:
        """Our child's exit code once it has ended (negative: killed by that signal)."""
        return None if self._child is None else self._child.poll()

    # -- acting -----------------------------------------------------------------------------------

    def spawn(
        self,
        argv: Sequence[str],
        *,
        cwd: Path,
        console_log: Path,
        env: Mapping[str, str] | None = None,
    ) -> int:
        """Start the engine as our child and record its pid; returns the pid.

        The caller checks first that no engine is running. ``argv`` must contain the marker and
        no secrets (argv is world-readable). Engine output not captured by its own log goes to
        ``console_log``. Raises EngineError if the executable cannot be started.
        """
        if self.marker not in argv:
            raise ValueError(f"argv for {self.name} lacks the marker argument {self.marker!r}")
        base_env = {"PATH": os.environ.get("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")}
        base_env["LANG"] = "C.UTF-8"
        if self.run_as is not None:
            base_env["USER"] = base_env["LOGNAME"] = self.run_as.name
        base_env.update(env or {})
        fd = os.open(console_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        with os.fdopen(fd, "ab") as out:
            chown_to(console_log, None if self.run_as is None else self.run_as.name)
            try:
                self._child = subprocess.Popen(
                    list(argv),
                    cwd=cwd,
                    env=base_env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    close_fds=True,
                    umask=0o027,
                    user=None if self.run_as is None else self.run_as.uid,
                    group=None if self.run_as is None else self.run_as.gid,
                    extra_groups=None if self.run_as is None else [],
                )
            except OSError as exc:
                raise EngineError(f"Could not start {self.name}: {exc.strerror}.") from None
        self._write_pidfile(self._child.pid)
        return self._child.pid

    def _write_pidfile(self, pid: int) -> None:
        tmp = self.pidfile.with_name(self.pidfile.name + ".tmp")
        tmp.write_text(f"{pid}\n")
        chown_to(tmp, None if self.run_as is None else self.run_as.name)
        os.replace(tmp, self.pidfile)

    def forget_stale_pidfile(self) -> None:
        """Remove a pid file that names no running engine (left by a crash)."""
        pid = self.read_pidfile()
        if pid is None or not self.is_ours(pid):
            self.pidfile.unlink(missing_ok=True)

    def wait_gone(self, pid: int, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for ``pid`` to end; True if it did."""
        deadline = time.monotonic() + timeout
        while True:
            if self._child is not None and self._child.pid == pid:
                try:
                    self._child.wait(timeout=max(0.0, deadline - time.monotonic()))
                    return True
                except subprocess.TimeoutExpired:
                    return False
            if not self.is_ours(pid):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(_POLL_INTERVAL)

    def terminate(self, timeout: float) -> bool:
        """Stop the engine: SIGTERM, wait ``timeout`` s, then SIGKILL. No-op if not running.

        Returns True if the engine stopped on SIGTERM (a clean shutdown, or nothing to stop),
        False if it had to be killed. Removes the pid file either way.
        """
        pid = self.pid()
        clean = True
        if pid is not None:
            self._signal(pid, signal.SIGTERM)
            if not self.wait_gone(pid, timeout):
                clean = False
                self._signal(pid, signal.SIGKILL)
                if not self.wait_gone(pid, 10):
                    raise EngineError(
                        f"{self.name} (pid {pid}) did not end even after SIGKILL; "
                        "the host may be overloaded. Try again."
                    )
        if self._child is not None:
            # Reap; a clean stop we asked for is not a death.
            self._child.poll()
            self._child = None
        self.pidfile.unlink(missing_ok=True)
        return clean

    @staticmethod
    def _signal(pid: int, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def engine_status(process: EngineProcess, answers: Callable[[], bool]) -> ServiceStatus:
    """The status every datastore reports: stopped → SHUTDOWN, died without being asked →
    CRASHED, alive → HEALTHY when ``answers()`` (the engine's own health query) succeeds, else
    BLOCKED."""
    state = process.state()
    if state is ProcessState.STOPPED:
        return ServiceStatus.SHUTDOWN
    if state is ProcessState.DIED:
        return ServiceStatus.CRASHED
    return ServiceStatus.HEALTHY if answers() else ServiceStatus.BLOCKED
