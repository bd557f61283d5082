"""The host's zygote: ``python -P -m coffer.compute.zygote <zygote dir>``.

Starting an instance used to start two Python interpreters in a row (the supervisor, then the
guest agent), and the agent's imports (the bus, cryptography, the engine's driver) took most of
half a second before it could answer ``prepare``. The zygote pays that once per host: it imports
everything an agent needs, then waits on a unix socket. For each instance it forks; the fork
becomes that instance's supervisor (:func:`coffer.compute.supervisor.main` with
``fork_agent``), which forks the agent in turn. Supervisor and agent therefore start in
milliseconds and share the zygote's pages copy-on-write.

What does not change: the supervisor daemonizes (its own session, not the zygote's child),
takes the instance lock, writes its pidfile and stays the agent's parent, restarting it the same
way; nothing secret passes through the zygote (a request names only the instance directory, and
the agent reads its key from ``guest.json`` as always).

The zygote runs as the engine user, started by the compute driver (``LocalCompute``), and lives
as long as the process that started it: it watches it through a pidfd and exits when it is gone,
so a new control plane always forks from freshly imported code. The socket is ``zygote.sock`` in
the zygote directory (0700, the engine user's); a request comes only from root or the engine
user (``SO_PEERCRED``) and must name a directory directly under ``<state dir>/instances``.

Protocol: one JSON line ``{"instance_dir": "/abs/path"}``; the answer is one JSON line
``{"code": N}`` with the exit code the supervisor's own start would have had (0 started, 3
already running, else failed; see :mod:`coffer.compute.supervisor`). Each request is answered
by its own fork, so several instances start at once. ``{"spares": true}`` asks for the ready
copies of the host's templates to be topped up (:func:`make_spares`, in a fork of its own,
detached from every instance); it is answered ``{"code": 0}`` at once.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import json
import logging
import os
import select
import signal
import socket
import struct
import sys
from pathlib import Path

from coffer.compute import supervisor

MODULE = "coffer.compute.zygote"
SOCKET_NAME = "zygote.sock"
LOGFILE = "zygote.log"
#: sockaddr_un holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
_REQUEST_LIMIT = 4096
_REQUEST_TIMEOUT = 10.0
#: While forks are answering, how often the accept loop looks for ended ones.
_REAP_INTERVAL = 0.5

#: What a guest agent imports, loaded once here so forks start with it.
PRELOAD = (
    "coffer.guest.agent",
    "coffer.guest.datastores.mariadb",
    "coffer.guest.datastores.postgresql",
    "coffer.guest.datastores.redis",
    # kombu picks its transport at the first connection; both are loaded ahead.
    "kombu.transport.redis",
    "kombu.transport.pyamqp",
    # kombu's package loads these only when its names are first used (an agent's first
    # connection), which every fork would otherwise do for itself.
    "kombu.connection",
    "kombu.entity",
    "kombu.messaging",
    "kombu.common",
)

log = logging.getLogger("coffer.compute.zygote")


def preload() -> list[str]:
    """Import what agents use; returns the modules that could not be loaded (and why)."""
    missing = []
    for name in PRELOAD:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an engine's driver may be missing; its agents import lazily
            missing.append(f"{name} ({type(exc).__name__}: {exc})")
    remember_redis_version()
    _detect_engine_versions()
    # Objects made so far are never collected: the collector would otherwise write to (and so
    # copy) every inherited page of every fork the first time it runs there.
    gc.collect()
    gc.freeze()
    return missing


def remember_redis_version() -> None:
    """redis-py looks its own version up in the installed packages' metadata (files read
    along ``sys.path``) for every connection it makes, to announce itself to the server; an
    agent makes several (the bus's, the engine's admin connections) while it starts, all on
    the way to a ready instance. Looked up once here, the forks inherit the answer. (The
    control plane does the same at start: each guest client's reply connection paid it.)"""
    try:
        import redis.utils
    except ImportError:
        return
    lookup = getattr(redis.utils, "get_lib_version", None)
    if not callable(lookup):
        return
    version = lookup()
    redis.utils.get_lib_version = lambda: version


def _detect_engine_versions() -> None:
    """Ask each preloaded engine driver for its engine's version once (``mariadbd
    --version``, ``postgres --version``: a process start each, which every create's prepare
    would otherwise pay to pick its template). The drivers with templates cache the answer
    per binary (and ask again if the binary changes), so the forks inherit it."""
    for name in PRELOAD:
        module = sys.modules.get(name)
        if module is None or not name.startswith("coffer.guest.datastores."):
            continue
        for value in vars(module).values():
            detect = getattr(value, "detect_version", None)
            if isinstance(value, type) and getattr(value, "__module__", None) == name and detect:
                try:
                    detect()
                except Exception as exc:  # the engine may not be installed here
                    log.info("no version for %s: %s", value.__name__, exc)


def peer_uid(conn: socket.socket) -> int:
    creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


class Zygote:
    """The accept loop; see the module docstring."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        # <state dir>/zygote -> <state dir>/instances
        self.instances_dir = directory.parent / "instances"
        self.templates_dir = directory.parent / "templates"
        self.socket_path = directory / SOCKET_NAME

    def check_request(self, raw: bytes) -> Path | None:
        """The instance directory a request names, or None for a request to make spare copies
        of the templates; ValueError with the reason if it is bad."""
        request = json.loads(raw.decode())
        if request == {"spares": True}:
            return None
        if not isinstance(request, dict) or not isinstance(request.get("instance_dir"), str):
            raise ValueError(
                'a request is a JSON object with an instance_dir string, or {"spares": true}'
            )
        path = Path(request["instance_dir"])
        if not path.is_absolute() or path.parent != self.instances_dir or ".." in path.parts:
            raise ValueError(f"{path} is not an instance directory of {self.instances_dir}")
        if not path.is_dir() or path.is_symlink():
            raise ValueError(f"{path} is not a directory")
        return path

    def serve(self, listener: socket.socket, launcher_fd: int) -> None:
        """Answer requests until the launcher exits (or SIGTERM).

        Each request is answered by its own fork (see ``handle``), so requests for several
        instances are served at once; the forks are reaped here as they end.
        """
        children: set[int] = set()
        while True:
            timeout = _REAP_INTERVAL if children else None
            readable, _, _ = select.select([listener.fileno(), launcher_fd], [], [], timeout)
            _reap(children)
            if launcher_fd in readable:
                log.info("the process that started the zygote has exited; stopping")
                return
            if listener.fileno() not in readable:
                continue
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            with conn:
                try:
                    pid = self.handle(conn, listener, launcher_fd)
                except Exception:
                    log.exception("a request failed")
                    continue
            if pid is not None:
                children.add(pid)

    def handle(self, conn: socket.socket, listener: socket.socket, launcher_fd: int) -> int | None:
        """Read and check one request, then fork; the fork starts the supervisor and answers
        on ``conn`` itself. Returns the fork's pid (None when the request was refused)."""
        conn.settimeout(_REQUEST_TIMEOUT)
        uid = peer_uid(conn)
        if uid not in (0, os.geteuid()):
            log.warning("refused a request from uid %d", uid)
            return None
        raw = b""
        while not raw.endswith(b"\n") and len(raw) < _REQUEST_LIMIT:
            chunk = conn.recv(_REQUEST_LIMIT)
            if not chunk:
                break
            raw += chunk
        try:
            instance_dir = self.check_request(raw)
        except ValueError as exc:
            conn.sendall(json.dumps({"code": supervisor.EXIT_USAGE, "error": str(exc)}).encode())
            return None
        for stream in (sys.stdout, sys.stderr):
            stream.flush()
        pid = os.fork()
        if pid:
            if instance_dir is None:
                conn.sendall(json.dumps({"code": 0}).encode() + b"\n")
            return pid
        if instance_dir is None:
            code = 1
            try:
                listener.close()
                conn.close()
                os.close(launcher_fd)
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                code = make_spares(self.templates_dir)
            except BaseException:
                log.exception("could not make spare copies of the templates")
            finally:
                os._exit(code)
        code = supervisor.EXIT_FAILED
        try:
            listener.close()
            os.close(launcher_fd)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            # The supervisor (a fork of this fork) must not keep the client's connection.
            code = become_supervisor(instance_dir, close_in_daemon=(conn.fileno(),))
        except BaseException:
            log.exception("could not become the supervisor of %s", instance_dir)
        finally:
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"code": code}).encode() + b"\n")
            os._exit(code)


def make_spares(templates_dir: Path) -> int:
    """In a fork of the zygote: top up the ready copies of every complete template under
    ``templates_dir`` (``TemplateStore.make_spares``), at the lowest CPU priority. Runs apart
    from any instance, so deleting the instance whose create asked for it does not cut it
    short; a fork already doing it for a template is left to it. Returns an exit code."""
    from coffer.guest.datastores.template import MARKER, TemplateError, TemplateStore

    os.setsid()
    with contextlib.suppress(OSError):
        os.nice(19)
    store = TemplateStore(templates_dir)
    code = 0
    for marker in sorted(templates_dir.glob(f"*/{MARKER}")):
        try:
            store.make_spares(marker.parent)
        except TemplateError as exc:
            log.warning("%s", exc.message)
            code = 1
    return code


def _reap(children: set[int]) -> None:
    """Collect the forks that have ended (one that starts a supervisor exits once it runs)."""
    for pid in list(children):
        try:
            done, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done:
            children.discard(pid)


def become_supervisor(instance_dir: Path, close_in_daemon: tuple[int, ...] = ()) -> int:
    """In a fork of the zygote: start the instance's supervisor as
    ``python -m coffer.compute.supervisor <instance_dir>`` would (same environment additions
    as ``LocalCompute`` gives that process, output to the instance's supervisor log);
    ``close_in_daemon``: descriptors the supervisor itself must not inherit."""
    config = supervisor.SupervisorConfig.from_json(
        (instance_dir / supervisor.CONFIG_FILE).read_text()
    )
    os.environ.update(
        {
            "HOME": str(instance_dir),
            supervisor.MARKER_ENV: str(instance_dir),
            "COFFER_INSTANCE_ID": config.instance_id,
        }
    )
    log_dir = os.open(instance_dir / "log", os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        log_fd = os.open(
            "supervisor.log",
            os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=log_dir,
        )
    finally:
        os.close(log_dir)
    os.dup2(log_fd, 1)
    os.dup2(log_fd, 2)
    os.close(log_fd)
    return supervisor.main([str(instance_dir)], fork_agent=True, close_in_daemon=close_in_daemon)


def _exit_on_signal(signum: int, frame: object) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    logging.basicConfig(
        stream=sys.stderr,
        level=logging.INFO,
        format="%(asctime)s zygote[%(process)d] %(levelname)s %(message)s",
    )
    if len(args) != 1 or not os.path.isabs(args[0]):
        log.error("usage: python -m %s <absolute zygote directory>", MODULE)
        return supervisor.EXIT_USAGE
    directory = Path(args[0])
    zygote = Zygote(directory)
    if len(str(zygote.socket_path)) > MAX_SOCKET_PATH:
        log.error("the socket path %s is too long for a unix socket", zygote.socket_path)
        return supervisor.EXIT_USAGE
    try:
        launcher_fd = os.pidfd_open(os.getppid())
    except OSError as exc:
        log.error("cannot watch the process that started the zygote: %s", exc)
        return supervisor.EXIT_FAILED
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, _exit_on_signal)
    for name in preload():
        log.warning("not preloaded: %s", name)
    # Bound under a name of our own, then renamed: a client never meets a half-made socket.
    temporary = directory / f".{SOCKET_NAME}.{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        temporary.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o077)
    try:
        listener.bind(str(temporary))
    finally:
        os.umask(old_umask)
    listener.listen(64)
    os.replace(temporary, zygote.socket_path)
    inode = os.stat(zygote.socket_path).st_ino
    log.info("zygote ready (pid %d)", os.getpid())
    try:
        zygote.serve(listener, launcher_fd)
    finally:
        listener.close()
        # Removed only if it is still ours (a newer zygote may have replaced it).
        with contextlib.suppress(OSError):
            if os.stat(zygote.socket_path).st_ino == inode:
                zygote.socket_path.unlink()
    return 0


if __name__ == "__main__":
    sys.exit(main())
