"""Bus transports: the embedded broker, transport URLs, and kombu connections.

The embedded default (``transport_url = embedded://``) is a private ``redis-server`` listening
only on a unix socket in ``<state_dir>/bus/``, protected by a generated password. RabbitMQ
(``rabbit://`` or ``amqp://``) is the production choice for many machines; an external Redis
(``redis://``) also works. Everything above this module speaks kombu URLs only.

The embedded broker's password reaches ``redis-server`` through a 0600 config file, never its
argument list, and it appears in logs and reprs only masked (kombu's ``as_uri`` shows ``**``).
"""

from __future__ import annotations

import contextlib
import difflib
import fcntl
import logging
import os
import re
import secrets
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import kombu

from coffer.errors import BusError, ValidationError

log = logging.getLogger(__name__)

#: Longest unix socket path the kernel accepts (sun_path is 108 bytes including the NUL).
MAX_SOCKET_PATH = 107
REDIS_BRPOP_TIMEOUT = 0.25
_PASSWORD_RE = re.compile(r"^[A-Za-z0-9_-]{32,}$")
_SCHEMES = ("embedded", "rabbit", "amqp", "amqps", "pyamqp", "redis", "rediss", "redis+socket")
# "memory" is kombu's in-process transport: one process only, for unit tests of endpoints.
_TEST_SCHEMES = ("memory",)


class BrokerStartError(BusError):
    """The embedded broker could not be started or adopted; the message says why."""

    transient = False


class EmbeddedBroker:
    """A private redis-server on a unix socket in <state_dir>/bus/, with a generated password
    (requirepass, read from <state_dir>/bus/password, created 0600), no persistence, run as the
    current user; start() is idempotent and adopts an already-running broker found by its pidfile
    (a restarted `coffer up` must find it); stop() stops it by pid.

    The broker runs daemonized, so it outlives the process that started it until ``stop()``.
    ``start`` and ``stop`` hold an exclusive lock on ``bus/lock`` so two processes never start two
    brokers on one socket. A pidfile is trusted only if its pid is a live ``redis-server`` whose
    working directory is this ``bus/`` directory, so a stale pidfile whose pid was reused never
    makes ``stop()`` signal an unrelated process.

    ``socket_mode`` is the unix socket's permission (guest agents running as another user must be
    able to connect; the password is what keeps others out). The ``bus/`` directory is 0711 and
    the password and config files 0600.
    """

    def __init__(
        self, state_dir: Path, socket_mode: int = 0o777, redis_server: str = "redis-server"
    ) -> None:
        if not 0 <= socket_mode <= 0o777:
            raise ValidationError(
                f"socket_mode {socket_mode:#o} is not a permission mode; use e.g. 0o770 or 0o777"
            )
        self.state_dir = Path(state_dir).absolute()
        self.bus_dir = self.state_dir / "bus"
        self.socket_path = self.bus_dir / "redis.sock"
        self.pid_path = self.bus_dir / "redis.pid"
        self.config_path = self.bus_dir / "redis.conf"
        self.password_path = self.bus_dir / "password"
        self.log_path = self.bus_dir / "redis.log"
        self._lock_path = self.bus_dir / "lock"
        self.socket_mode = socket_mode
        self._redis_server = redis_server
        if len(os.fsencode(self.socket_path)) > MAX_SOCKET_PATH:
            raise ValidationError(
                f"the embedded bus socket {self.socket_path} is longer than the "
                f"{MAX_SOCKET_PATH} bytes a unix socket path may have; choose a shorter state_dir"
            )

    def __repr__(self) -> str:
        return f"EmbeddedBroker(socket={str(self.socket_path)!r}, pid={self.pid})"

    # -- public interface --------------------------------------------------------------------

    @property
    def url(self) -> str:
        """The kombu URL of this broker, password included; creates the password if missing."""
        return f"redis+socket://:{self._password()}@{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """Pid of the running broker, or None if none of ours is running."""
        return self._live_pid()

    def is_running(self) -> bool:
        """True if our redis-server is alive and answers an authenticated PING on the socket."""
        pid = self._live_pid()
        return pid is not None and self._answers(pid)

    def start(self, timeout: float = 10) -> None:
        """Start the broker, or adopt the one already running for this state dir.

        Returns once it answers an authenticated PING. Raises ``BrokerStartError`` (with the tail
        of ``bus/redis.log``, password masked) if it does not within ``timeout`` seconds, or if a
        broker from an earlier run is alive but does not answer; in that case nothing is killed.
        """
        self._ensure_dir()
        password = self._password()
        with self._locked():
            pid = self._live_pid()
            if pid is not None:
                if self._wait_ready(pid, time.monotonic() + timeout):
                    log.info("adopted the running embedded bus broker (pid %d)", pid)
                    return
                raise BrokerStartError(
                    f"a redis-server (pid {pid}) from an earlier run holds {self.pid_path} but "
                    f"does not answer on {self.socket_path}; stop it with 'kill {pid}' and "
                    "start again"
                )
            self._remove_runtime_files()
            self._write_config(password)
            binary = shutil.which(self._redis_server)
            if binary is None:
                raise BrokerStartError(
                    f"{self._redis_server} is not installed or not on PATH; install the "
                    "redis-server package or set transport_url to a RabbitMQ URL"
                )
            try:
                launcher = subprocess.run(
                    [binary, str(self.config_path)],
                    cwd=self.bus_dir,
                    stdin=subprocess.DEVNULL,
                    capture_output=True,
                    timeout=timeout,
                    check=False,
                )
            except subprocess.TimeoutExpired:
                raise BrokerStartError(
                    f"redis-server did not daemonize within {timeout} s; see {self.log_path}"
                ) from None
            if launcher.returncode != 0:
                output = (launcher.stdout + launcher.stderr).decode("utf-8", "replace")
                raise BrokerStartError(
                    f"redis-server exited with status {launcher.returncode} while starting: "
                    f"{_mask(output.strip(), password)[-2000:]}"
                )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                pid = self._live_pid()
                if pid is not None and self._wait_ready(pid, deadline):
                    log.info(
                        "started the embedded bus broker (pid %d) on %s", pid, self.socket_path
                    )
                    return
                time.sleep(0.01)
            pid = self._live_pid()
            if pid is not None:
                self._terminate(pid, 5)
            raise BrokerStartError(
                f"the embedded bus broker did not answer on {self.socket_path} within "
                f"{timeout} s; last lines of {self.log_path}:\n{self._log_tail(password)}"
            )

    def stop(self, timeout: float = 10) -> None:
        """Stop the broker by its pid (SIGTERM, then SIGKILL after ``timeout``); idempotent.

        Queued messages are lost: the embedded broker keeps nothing on disk.
        """
        if not self.bus_dir.is_dir():
            return
        with self._locked():
            pid = self._live_pid()
            if pid is not None:
                self._terminate(pid, timeout)
                log.info("stopped the embedded bus broker (pid %d)", pid)
            self._remove_runtime_files()

    # -- helpers -----------------------------------------------------------------------------

    def _ensure_dir(self) -> None:
        self.bus_dir.mkdir(parents=True, exist_ok=True)
        # Other users (guest agents) must reach the socket, but not list or read the directory.
        os.chmod(self.bus_dir, 0o711)  # noqa: S103 - traverse only, no read or list

    def _password(self) -> str:
        try:
            value = self.password_path.read_text().strip()
        except FileNotFoundError:
            self._ensure_dir()
            value = secrets.token_urlsafe(32)
            tmp = self.bus_dir / f".password.{secrets.token_hex(8)}.tmp"
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "w") as handle:
                    handle.write(value + "\n")
                try:
                    os.link(tmp, self.password_path)
                except FileExistsError:
                    value = self.password_path.read_text().strip()
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        if not _PASSWORD_RE.match(value):
            raise BrokerStartError(
                f"the embedded bus password file {self.password_path} is corrupt; stop Coffer, "
                "delete the file and start again (a new password is generated)"
            )
        return value

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _write_config(self, password: str) -> None:
        lines = [
            "# Written by Coffer for the embedded bus; regenerated at every start.",
            "daemonize yes",
            f'pidfile "{self.pid_path}"',
            f'logfile "{self.log_path}"',
            f'dir "{self.bus_dir}"',
            "port 0",
            f'unixsocket "{self.socket_path}"',
            f"unixsocketperm {self.socket_mode:o}",
            f"requirepass {password}",
            'save ""',
            "appendonly no",
            "loglevel notice",
            # A client holding the password must not be able to reconfigure or stop the broker.
            'rename-command CONFIG ""',
            'rename-command SHUTDOWN ""',
            'rename-command DEBUG ""',
            'rename-command MODULE ""',
        ]
        tmp = self.bus_dir / f".redis.conf.{secrets.token_hex(8)}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write("\n".join(lines) + "\n")
            os.replace(tmp, self.config_path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()

    def _remove_runtime_files(self) -> None:
        for path in (self.pid_path, self.socket_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _live_pid(self) -> int | None:
        """The pidfile's pid if it is a live redis-server working in our bus directory."""
        try:
            pid = int(self.pid_path.read_text().strip())
        except (FileNotFoundError, ValueError):
            return None
        if pid <= 1 or not _alive(pid):
            return None
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
            cwd = os.readlink(f"/proc/{pid}/cwd")
        except OSError:
            return None
        if not comm.startswith("redis-server") or Path(cwd) != self.bus_dir:
            return None
        return pid

    def _answers(self, pid: int) -> bool:
        # Imported here: only the process that runs the broker needs it, and a guest agent on
        # RabbitMQ should not carry redis-py.
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        client = redis.Redis(
            unix_socket_path=str(self.socket_path),
            password=self._password(),
            socket_timeout=1,
            socket_connect_timeout=1,
            # The caller polls; redis-py's own retries with backoff would only slow it down.
            retry=Retry(NoBackoff(), 0),
        )
        try:
            info = client.info("server")
            return int(info.get("process_id", -1)) == pid
        except (redis.RedisError, OSError):
            return False
        finally:
            client.close()

    def _wait_ready(self, pid: int, deadline: float) -> bool:
        while True:
            if self._answers(pid):
                return True
            if time.monotonic() >= deadline or not _alive(pid):
                return False
            time.sleep(0.01)

    def _terminate(self, pid: int, timeout: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _alive(pid):
            if time.monotonic() >= deadline:
                log.warning("embedded bus broker (pid %d) ignored SIGTERM; killing it", pid)
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                deadline = time.monotonic() + 5
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
                return
            time.sleep(0.01)

    def _log_tail(self, password: str, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return _mask("\n".join(text.splitlines()[-lines:]), password)


def _alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie (a dead daemon may linger unreaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in ("Z", "X")


def _mask(text: str, secret: str) -> str:
    return text.replace(secret, "**") if secret else text


def resolve_url(transport_url: str, state_dir: Path) -> str:
    """Turn a ``transport_url`` setting into a kombu URL.

    ``embedded://`` gives the URL of the ``EmbeddedBroker`` in ``state_dir`` (which the caller
    starts); ``rabbit://`` (oslo.messaging style, several hosts separated by commas) becomes
    ``amqp://`` (kombu failover URLs separated by ``;``); ``amqp://``, ``redis://``,
    ``rediss://`` and ``redis+socket://`` are passed through. Raises ``ValidationError`` naming
    the supported schemes for anything else.
    """
    if not isinstance(transport_url, str) or "://" not in transport_url:
        raise ValidationError(
            f"transport_url {transport_url!r} is not a URL; use 'embedded://', "
            "'rabbit://user:password@host:5672/' or 'redis://host:6379/0'"
        )
    scheme, _, rest = transport_url.partition("://")
    scheme = scheme.lower()
    if scheme == "embedded":
        if rest.strip("/"):
            raise ValidationError(
                "transport_url 'embedded://' takes no host or path; the broker lives in "
                "<state_dir>/bus"
            )
        return EmbeddedBroker(state_dir).url
    if scheme == "rabbit":
        return _rabbit_to_amqp(rest)
    if scheme in _SCHEMES or scheme in _TEST_SCHEMES:
        return transport_url
    close = difflib.get_close_matches(scheme, _SCHEMES, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ValidationError(
        f"transport_url scheme {scheme!r} is not supported{hint}; use one of: "
        + ", ".join(f"{s}://" for s in _SCHEMES)
    )


def _rabbit_to_amqp(rest: str) -> str:
    netloc, slash, path = rest.partition("/")
    hosts = [host for host in netloc.split(",") if host]
    if not hosts:
        raise ValidationError("transport_url 'rabbit://' needs at least one host")
    # oslo.messaging treats an empty path as the default virtual host "/".
    vhost = path if slash and path else "/"
    return ";".join(f"amqp://{host}/{vhost}" for host in hosts)


def connection(url: str) -> kombu.Connection:
    """A new, not yet connected kombu ``Connection`` for ``url`` with Coffer's transport options.

    kombu connections are not thread-safe: use one per thread (or guard it with a lock).
    """
    scheme = urlsplit(url).scheme.lower()
    options: dict[str, object] = {}
    if scheme.startswith("redis"):
        # Without a timeout a wedged broker would hang a publisher forever; BRPOP polls every
        # second, well inside it.
        options["socket_timeout"] = 10
    elif scheme == "memory":
        # The in-process transport polls; kombu's 1 s default would make every call take ~1 s.
        options["polling_interval"] = 0.005
    conn = kombu.Connection(url, connect_timeout=5, transport_options=options)
    if scheme.startswith("redis"):
        # A consumer closing its connection waits for its outstanding BRPOP to return; kombu's
        # 1 s default makes every stop take a second. kombu has no option for it (its
        # polling_interval option would also add a sleep between polls), so set it directly.
        conn.transport.brpop_timeout = REDIS_BRPOP_TIMEOUT
    return conn


def safe_url(url: str) -> str:
    """``url`` with any password replaced by ``**``, for logs and error messages."""
    try:
        return str(kombu.Connection(url).as_uri())
    except Exception:  # any parse failure: show nothing rather than risk the secret
        return "<unparseable transport url>"


def delete_queue(url: str, queue: str) -> None:
    """Delete ``queue`` and the messages in it; a missing queue is not an error.

    Used when an instance is deleted (its ``guestagent.<id>`` queue) and by tests.
    """
    with connection(url) as conn:
        channel = conn.channel()
        try:
            channel.queue_delete(queue)
            if not _is_amqp(conn):
                # kombu's virtual transports (redis, memory) only forget bindings on delete;
                # purging removes the stored messages, which is the queue itself for them.
                channel.queue_purge(queue)
        except conn.channel_errors as exc:
            log.debug("queue %s could not be deleted: %s", queue, exc)
        finally:
            channel.close()


def _is_amqp(conn: kombu.Connection) -> bool:
    return str(conn.transport.driver_type) == "amqp"
