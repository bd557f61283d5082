"""The per-instance supervisor: ``python -m coffer.compute.supervisor <instance dir>``.

One supervisor runs per local instance, as the engine user, detached from the control plane so
the instance survives ``coffer up`` stopping. It

* daemonizes (fork + ``setsid``): the process the driver started exits as soon as the daemon has
  taken the instance lock and written ``run/supervisor.pid``, so the driver learns the outcome
  from its exit code (0 started, 3 another supervisor already holds the lock, else failed);
* marks itself a child subreaper, so an engine orphaned by a dying guest agent stays under it;
* runs the guest agent command from ``supervisor.json`` and restarts it whenever it exits, after
  an exponential backoff capped at ``backoff_max`` (reset once an agent has run ``reset_after``
  seconds);
* on SIGTERM/SIGINT forwards SIGTERM to the agent, waits up to ``stop_timeout`` seconds for its
  whole subtree to exit, SIGKILLs whatever is left, and exits.

Stdlib only (with :mod:`coffer.compute.procfs`): it must start under any Python 3.11 the engine
user can run. Nothing secret is passed to it; the agent finds secrets in ``guest.json``.

Forked from the host's zygote (:mod:`coffer.compute.zygote`) instead of started as a new
interpreter, the supervisor already holds the guest agent's modules, so it starts the agent with
a plain ``fork`` (``fork_agent``): no interpreter start and no imports on the way to a serving
agent, and the agent's pages are shared copy-on-write. It is still the agent's parent and
behaves the same in every other way. Such a process carries the zygote's command line, so its
pidfile records ``<pid> <start time>`` and it is recognised by that and its working directory.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import json
import logging
import os
import select
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from coffer.compute import procfs

CONFIG_FILE = "supervisor.json"
PIDFILE = "run/supervisor.pid"
AGENT_PIDFILE = "run/agent.pid"
LOCKFILE = "run/supervisor.lock"
LOGFILE = "log/supervisor.log"
AGENT_LOGFILE = "log/agent.log"
#: Set in the supervisor's environment (and so inherited by the agent and the engine) to find
#: every process of an instance, even one that left the supervisor's session.
MARKER_ENV = "COFFER_INSTANCE_DIR"
MODULE = "coffer.compute.supervisor"

EXIT_STARTED = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_ALREADY_RUNNING = 3

_PR_SET_CHILD_SUBREAPER = 36
_STALE_AGENT_GRACE = 10.0

log = logging.getLogger("coffer.compute.supervisor")


@dataclass(frozen=True)
class SupervisorConfig:
    """What the supervisor reads from ``<instance dir>/supervisor.json`` (no secrets in here)."""

    instance_id: str
    agent_argv: list[str]
    backoff_max: float = 10.0
    backoff_initial: float = 0.5
    reset_after: float = 30.0
    stop_timeout: float = 20.0
    #: Driver-side facts about the server, kept beside the supervisor's own settings.
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SupervisorConfig:
        """Parse and check the file; ``ValueError`` names the first bad field."""
        data = json.loads(text)
        if not isinstance(data, dict):
            raise ValueError("supervisor.json must hold a JSON object")
        argv = data.get("agent_argv")
        if not isinstance(argv, list) or not argv or not all(isinstance(a, str) for a in argv):
            raise ValueError("agent_argv must be a non-empty list of strings")
        if not isinstance(data.get("instance_id"), str):
            raise ValueError("instance_id must be a string")
        numbers = {}
        for name in ("backoff_max", "backoff_initial", "reset_after", "stop_timeout"):
            if name in data:
                value = data[name]
                if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
                    raise ValueError(f"{name} must be a number of seconds, not {value!r}")
                numbers[name] = float(value)
        extra = data.get("extra", {})
        if not isinstance(extra, dict):
            raise ValueError("extra must be a JSON object")
        return cls(instance_id=data["instance_id"], agent_argv=argv, extra=extra, **numbers)


def next_backoff(current: float, maximum: float) -> float:
    """The pause after ``current``: doubled, never above ``maximum``."""
    return min(current * 2, maximum)


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to this process instead of init; False if refused."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def write_pidfile(path: Path, text: str) -> None:
    """Replace ``path`` atomically so a reader never sees a half-written pid."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with open(tmp, "w", encoding="ascii") as handle:
        handle.write(text)
    os.replace(tmp, path)


def _remove_if_mine(path: Path, pid: int) -> None:
    record = procfs.read_pidfile(path)
    if record is not None and record[0] == pid:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


class Supervisor:
    """The supervision loop of one instance; see the module docstring for the behaviour."""

    def __init__(
        self,
        instance_dir: Path,
        config: SupervisorConfig,
        *,
        fork_agent: bool = False,
        private_fds: tuple[int, ...] = (),
    ) -> None:
        self.instance_dir = instance_dir
        self.config = config
        #: Fork the agent from this (pre-imported) process when its command is the standard one.
        self.fork_agent = fork_agent
        #: Descriptors of the supervisor's own (the instance lock) a forked agent must not keep.
        self._private_fds = private_fds
        self._wakeup_w = -1
        self._child: int | None = None
        self._child_started = 0.0
        self._backoff = min(config.backoff_initial, config.backoff_max)
        self._next_start = 0.0
        self._stopping = False
        self._deadline = 0.0
        self._wakeup_r = -1

    # -- signals ------------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        """Route SIGTERM/SIGINT/SIGCHLD to a self-pipe the loop waits on, so none is lost."""
        self._wakeup_r, self._wakeup_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(signum, _note_signal)
        # No terminal: a stray SIGHUP must not stop the instance.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)

    def _wait_for_signal(self, timeout: float | None) -> set[int]:
        readable, _, _ = select.select([self._wakeup_r], [], [], timeout)
        received: set[int] = set()
        if readable:
            with contextlib.suppress(BlockingIOError):
                while chunk := os.read(self._wakeup_r, 512):
                    received.update(chunk)
        return received

    # -- the loop -----------------------------------------------------------------------------

    def run(self) -> int:
        """Supervise until asked to stop; returns the process exit code."""
        self._stop_stale_agent()
        while True:
            now = time.monotonic()
            timeout: float | None
            if self._stopping:
                if self._child is None and not _has_children():
                    log.info("instance %s stopped", self.config.instance_id)
                    break
                if now >= self._deadline:
                    self._kill_all()
                    break
                timeout = self._deadline - now
            else:
                if self._child is None and now >= self._next_start:
                    self._spawn()
                timeout = None if self._child is not None else max(0.0, self._next_start - now)
            received = self._wait_for_signal(timeout)
            if received & {signal.SIGTERM, signal.SIGINT}:
                self._begin_stop()
            self._reap()
        _remove_if_mine(self.instance_dir / AGENT_PIDFILE, self._child or -1)
        return 0

    def _begin_stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        self._deadline = time.monotonic() + self.config.stop_timeout
        log.info(
            "asked to stop: stopping the guest agent, at most %.0f s before killing it",
            self.config.stop_timeout,
        )
        if self._child is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._child, signal.SIGTERM)
        else:
            self._terminate_leftovers()

    def _spawn(self) -> None:
        argv = self.config.agent_argv
        log_fd = os.open(
            self.instance_dir / AGENT_LOGFILE,
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC | os.O_NOFOLLOW,
            0o600,
        )
        try:
            module_args = agent_module_args(argv) if self.fork_agent else None
            if module_args is not None:
                pid = self._fork_agent(module_args, log_fd)
            else:
                pid = os.posix_spawnp(
                    argv[0],
                    argv,
                    dict(os.environ),
                    file_actions=[
                        (os.POSIX_SPAWN_DUP2, log_fd, 1),
                        (os.POSIX_SPAWN_DUP2, log_fd, 2),
                    ],
                    # Python ignores SIGPIPE/SIGXFSZ and the agent must not inherit that.
                    setsigdef=(
                        signal.SIGPIPE,
                        signal.SIGXFSZ,
                        signal.SIGHUP,
                        signal.SIGTERM,
                        signal.SIGINT,
                        signal.SIGCHLD,
                    ),
                    setsigmask=(),
                )
        except OSError as exc:
            log.error("cannot start the guest agent %s: %s", argv[0], exc.strerror or exc)
            self._schedule_restart(ran=0.0)
            return
        finally:
            os.close(log_fd)
        self._child = pid
        self._child_started = time.monotonic()
        info = procfs.read_process(pid)
        start = info.start_time if info is not None else 0
        write_pidfile(self.instance_dir / AGENT_PIDFILE, f"{pid} {start}\n")
        log.info("started the guest agent (pid %d)", pid)

    def _fork_agent(self, args: list[str], log_fd: int) -> int:
        """Run ``coffer.guest.agent`` with ``args`` in a fork of this process; returns its pid.

        The child is what a fresh ``python -P -m coffer.guest.agent`` would be: output to the
        agent's log, default dispositions for the signals the supervisor handles, an empty
        signal mask, and none of the supervisor's descriptors (the instance lock must stay
        with the supervisor, or a new supervisor could not start while this agent lives).
        """
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            os.dup2(log_fd, 1)
            os.dup2(log_fd, 2)
            signal.set_wakeup_fd(-1)
            for fd in (log_fd, self._wakeup_r, self._wakeup_w, *self._private_fds):
                with contextlib.suppress(OSError):
                    os.close(fd)
            for signum in (
                signal.SIGHUP,
                signal.SIGTERM,
                signal.SIGINT,
                signal.SIGCHLD,
            ):
                signal.signal(signum, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_SETMASK, ())
            from coffer.guest.agent import cli

            code = cli(args)
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(code)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self._child:
                self._on_agent_exit(status)

    def _on_agent_exit(self, status: int) -> None:
        ran = time.monotonic() - self._child_started
        how = (
            f"was killed by signal {os.WTERMSIG(status)}"
            if os.WIFSIGNALED(status)
            else f"exited with code {os.waitstatus_to_exitcode(status)}"
        )
        log.info("the guest agent (pid %s) %s after %.1f s", self._child, how, ran)
        _remove_if_mine(self.instance_dir / AGENT_PIDFILE, self._child or -1)
        self._child = None
        if self._stopping:
            self._terminate_leftovers()
        else:
            self._schedule_restart(ran)

    def _schedule_restart(self, ran: float) -> None:
        if ran >= self.config.reset_after:
            self._backoff = min(self.config.backoff_initial, self.config.backoff_max)
        delay = self._backoff
        self._backoff = next_backoff(self._backoff, self.config.backoff_max)
        self._next_start = time.monotonic() + delay
        log.info("restarting the guest agent in %.1f s", delay)

    def _terminate_leftovers(self) -> None:
        """The agent is gone but adopted processes (an orphaned engine) remain: ask them to stop."""
        me = os.getpid()
        for proc in procfs.descendants(me):
            if proc.ppid == me:
                log.info("stopping leftover process %d", proc.pid)
                procfs.send_signal(proc, signal.SIGTERM)

    def _kill_all(self) -> None:
        leftovers = procfs.descendants(os.getpid())
        log.warning(
            "the instance did not stop within %.0f s: killing %d process(es)",
            self.config.stop_timeout,
            len(leftovers),
        )
        for proc in leftovers:
            procfs.send_signal(proc, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while _has_children() and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.02)
        self._reap()
        self._child = None

    def _stop_stale_agent(self) -> None:
        """Stop an agent left by a previous supervisor that died, so two never run at once.

        Its engine is left alone: the new agent adopts it by the engine's own pidfile.
        """
        path = self.instance_dir / AGENT_PIDFILE
        record = procfs.read_pidfile(path)
        if record is None:
            return
        pid, start = record
        proc = procfs.read_process(pid)
        mine = (
            proc is not None
            and proc.start_time == start
            and not proc.is_zombie
            and (
                procfs.environ_has(pid, MARKER_ENV, str(self.instance_dir))
                # A forked agent carries the zygote's environment, but runs in the directory.
                or procfs.cwd(pid) == str(self.instance_dir)
            )
        )
        if proc is not None and mine:
            log.warning(
                "a guest agent of a previous supervisor (pid %d) is still running: stopping it",
                pid,
            )
            procfs.send_signal(proc, signal.SIGTERM)
            if procfs.wait_gone([proc], min(self.config.stop_timeout, _STALE_AGENT_GRACE)):
                procfs.send_signal(proc, signal.SIGKILL)
                procfs.wait_gone([proc], 2.0)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


#: The agent command ``LocalCompute`` writes by default, minus the interpreter and its options.
AGENT_MODULE = "coffer.guest.agent"


def agent_module_args(argv: list[str]) -> list[str] | None:
    """The agent's own arguments if ``argv`` runs ``python -P -m coffer.guest.agent`` with
    this very interpreter (so a fork of this process can stand in for it); else None."""
    if len(argv) < 4 or argv[1:4] != ["-P", "-m", AGENT_MODULE]:
        return None
    if os.path.realpath(argv[0]) != os.path.realpath(sys.executable):
        return None
    return argv[4:]


def _note_signal(signum: int, frame: object) -> None:
    """Python-level no-op: the C handler already wrote the signal number to the wakeup pipe."""


def _has_children() -> bool:
    try:
        # WNOWAIT leaves an exited child to be reaped (and reported) by _reap.
        os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return False
    return True


def _daemon(instance_dir: Path, config: SupervisorConfig, report_fd: int, fork_agent: bool) -> int:
    os.setsid()
    lock_fd = os.open(
        instance_dir / LOCKFILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600
    )
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.write(report_fd, b"running")
        return EXIT_ALREADY_RUNNING
    if not set_child_subreaper():
        log.warning("could not become a child subreaper: an orphaned engine escapes supervision")
    supervisor = Supervisor(instance_dir, config, fork_agent=fork_agent, private_fds=(lock_fd,))
    supervisor.install_signal_handlers()
    pidfile = instance_dir / PIDFILE
    me = procfs.read_process(os.getpid())
    # With the start time, a pid is trusted even when the command line is the zygote's.
    started = f" {me.start_time}" if me is not None else ""
    write_pidfile(pidfile, f"{os.getpid()}{started}\n")
    log.info("supervising instance %s (pid %d)", config.instance_id, os.getpid())
    os.write(report_fd, b"ok")
    os.close(report_fd)
    try:
        return supervisor.run()
    finally:
        _remove_if_mine(pidfile, os.getpid())
        os.close(lock_fd)


def main(
    argv: list[str] | None = None,
    *,
    fork_agent: bool = False,
    close_in_daemon: tuple[int, ...] = (),
) -> int:
    """Entry point; returns the exit code of the process the driver started (see module doc).

    ``fork_agent``: this process already holds the agent's modules (a fork of the zygote).
    ``close_in_daemon``: descriptors of the caller's (the zygote's request connection) that
    the daemon closes at once.
    """
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s supervisor[%(process)d] %(levelname)s %(message)s",
        force=True,
    )
    if len(args) != 1 or not os.path.isabs(args[0]):
        log.error("usage: python -m %s <absolute instance directory>", MODULE)
        return EXIT_USAGE
    instance_dir = Path(args[0])
    try:
        config = SupervisorConfig.from_json((instance_dir / CONFIG_FILE).read_text())
        os.chdir(instance_dir)
    except (OSError, ValueError) as exc:
        log.error("cannot start: %s", exc)
        return EXIT_USAGE
    read_fd, write_fd = os.pipe()
    if os.fork():
        os.close(write_fd)
        with os.fdopen(read_fd, "rb") as report:
            answer = report.read()
        return {b"ok": EXIT_STARTED, b"running": EXIT_ALREADY_RUNNING}.get(answer, EXIT_FAILED)
    os.close(read_fd)
    for fd in close_in_daemon:
        with contextlib.suppress(OSError):
            os.close(fd)
    code = EXIT_FAILED
    try:
        code = _daemon(instance_dir, config, write_fd, fork_agent)
    except BaseException:
        log.exception("the supervisor failed")
    finally:
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
