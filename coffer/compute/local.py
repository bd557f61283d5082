"""The ``local`` compute driver: every instance is a supervised process tree on this machine.

Layout of one instance, ``<state_dir>/instances/<instance id>/`` (its "volume", owned by the
engine user, 0700)::

    guest.json          the guest agent's config (secrets; 0600)
    supervisor.json     what the supervisor runs, and facts about the server (no secrets)
    run/supervisor.pid  the supervisor's pid; run/agent.pid the current agent's
    log/supervisor.log  the supervisor's log; log/agent.log the agent's output

Shared by every instance, ``<state_dir>/templates/`` (owned by the engine user, 0700) holds the
pre-initialised data directories datastores copy instead of initialising one each time (see
:mod:`coffer.guest.datastores.template`).

The tree is ``python -m coffer.compute.supervisor <dir>`` (detached, its own session) -> the guest
agent -> the engine. With the standard agent command, supervisor and agent are forks of the
host's zygote (:mod:`coffer.compute.zygote`, ``<state_dir>/zygote/``), which has the agent's
modules imported already; if the zygote cannot be used, the driver starts the interpreters.
The tree outlives the control plane; a new driver object finds it again through the pidfile,
trusting a pid only if ``/proc/<pid>/cmdline`` names this instance's directory (for a fork of
the zygote: if its start time matches the pidfile's and it runs in the instance's directory).
When Coffer runs as root the whole tree runs as the engine user (``[compute] engine_user``).
Addresses come from the loopback pools in the control DB (see :mod:`coffer.compute.addresses`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from coffer.compute import addresses, procfs
from coffer.compute.base import (
    ComputeDriver,
    ServerInfo,
    ServerNotFound,
    ServerSpec,
    ServerStillRunning,
    check_instance_id,
)
from coffer.compute.cgroup import MemoryCgroups
from coffer.compute.files import (
    EngineUser,
    disk_usage,
    ensure_shared_dir,
    make_owned_dir,
    open_dir,
    open_log_for_append,
    write_file_atomic,
)
from coffer.compute.supervisor import (
    CONFIG_FILE,
    EXIT_ALREADY_RUNNING,
    EXIT_STARTED,
    LOGFILE,
    MARKER_ENV,
    MODULE,
    PIDFILE,
    SupervisorConfig,
    agent_module_args,
)
from coffer.compute.zygote import MAX_SOCKET_PATH as _MAX_SOCKET_PATH
from coffer.compute.zygote import MODULE as ZYGOTE_MODULE
from coffer.compute.zygote import SOCKET_NAME as ZYGOTE_SOCKET
from coffer.config import Settings
from coffer.db.session import make_engine
from coffer.errors import ComputeError, ValidationError
from coffer.guest.datastores.template import MARKER as TEMPLATE_MARKER
from coffer.guest.datastores.template import SPARES as TEMPLATE_SPARES
from coffer.guest.datastores.template import SPARES_DIR as TEMPLATE_SPARES_DIR

log = logging.getLogger(__name__)

#: Replaced, in each agent argument, by the path of the instance's ``guest.json``.
CONFIG_PLACEHOLDER = "{config}"
GUEST_CONFIG_FILE = "guest.json"
#: Under the state dir: the host's template data directories, shared by all instances.
TEMPLATES_DIR = "templates"
#: Under the state dir: the zygote's socket and log (the engine user's, 0700).
ZYGOTE_DIR = "zygote"
#: How long a zygote may take to import everything and listen.
_ZYGOTE_START_TIMEOUT = 60.0
DEFAULT_STOP_TIMEOUT = 20.0
_START_TIMEOUT = 30.0
_KILL_WAIT = 5.0
#: The directory holding the ``coffer`` package, put on the supervisor's PYTHONPATH.
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]
_GB = 1024**3


def _positive_int(config: dict[str, Any], key: str, where: str) -> int | None:
    value = config.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValidationError(f"{where}{key} must be a positive whole number, not {value!r}")
    return value


class LocalCompute(ComputeDriver):
    """Instances as supervised process trees under ``<state_dir>/instances``; see module doc.

    ``agent_argv`` is the guest agent command (``{config}`` becomes the path of ``guest.json``);
    a test may pass any command to exercise supervision without an engine.
    ``supervisor_python`` is the interpreter for the supervisor (default: this one); it must
    be runnable by the engine user. ``stop_timeout`` is how long the supervisor lets the agent
    stop before killing it. ``zygote`` (default: whenever the agent command is the standard
    one run by ``supervisor_python``) forks supervisors and agents from the host's zygote.
    """

    name = "local"

    def __init__(
        self,
        settings: Settings,
        agent_argv: list[str] | None = None,
        *,
        supervisor_python: str | None = None,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        zygote: bool | None = None,
    ) -> None:
        super().__init__(settings)
        self.private_pool, self.public_pool = addresses.parse_pools(
            settings.compute.private_pool, settings.compute.public_pool
        )
        if agent_argv is None:
            # The agent's own entry point, not ``coffer guestagent``: the CLI would load the
            # control plane's settings model into every agent. -P keeps the (engine-writable)
            # instance directory, the agent's working directory, off its sys.path.
            agent_argv = [
                sys.executable,
                "-P",
                "-m",
                "coffer.guest.agent",
                "--config",
                CONFIG_PLACEHOLDER,
            ]
        if not agent_argv or not all(isinstance(arg, str) and arg for arg in agent_argv):
            raise ValidationError("agent_argv must be a non-empty list of non-empty strings")
        self.agent_argv = list(agent_argv)
        self.supervisor_python = supervisor_python or sys.executable
        self.stop_timeout = stop_timeout
        self.state_dir = Path(settings.state_dir).absolute()
        self.instances_dir = self.state_dir / "instances"
        self.templates_dir = self.state_dir / TEMPLATES_DIR
        self.cgroups = MemoryCgroups()
        self._user: EngineUser | None = None
        self._db_engine: Engine | None = None
        # One lock per instance, not one for the driver: creates, starts and deletes of
        # different instances run side by side (each touches only its own directory, cgroup
        # and supervisor); the supervisor's own instance lock guards against other processes.
        self._locks: dict[str, tuple[threading.RLock, list[int]]] = {}
        self._locks_guard = threading.Lock()
        standard = agent_module_args(self.agent_argv) is not None and os.path.realpath(
            self.supervisor_python
        ) == os.path.realpath(sys.executable)
        self.use_zygote = standard if zygote is None else (zygote and standard)
        self.zygote_dir = self.state_dir / ZYGOTE_DIR
        self._zygote: subprocess.Popen[bytes] | None = None
        self._zygote_lock = threading.Lock()

    # -- paths and the engine user -----------------------------------------------------------

    @property
    def engine_user(self) -> EngineUser:
        """The account instances run as; resolved (and checked) on first use."""
        if self._user is None:
            self._user = EngineUser.resolve(self.settings.engine_user)
        return self._user

    def instance_dir(self, instance_id: str) -> Path:
        """``<state_dir>/instances/<instance_id>``: the instance's directory (and volume)."""
        return self.instances_dir / check_instance_id(instance_id)

    def volume_dir(self, instance_id: str) -> Path:
        """The instance's volume; for this driver the instance directory itself."""
        return self.instance_dir(instance_id)

    # -- addresses ---------------------------------------------------------------------------

    def allocate_addresses(
        self, session: Session, instance_id: str, is_public: bool
    ) -> tuple[str, str | None]:
        check_instance_id(instance_id)
        return addresses.allocate(
            session, instance_id, is_public, self.private_pool, self.public_pool
        )

    def release_addresses(self, session: Session, instance_id: str) -> None:
        addresses.release(session, check_instance_id(instance_id))

    def _held_addresses(self, instance_id: str) -> tuple[str | None, str | None]:
        """The instance's committed allocations, read on a connection of the driver's own."""
        engine = self._db()
        if engine is None:
            return None, None
        try:
            with Session(engine) as session:
                return addresses.held_by(session, instance_id)
        except SQLAlchemyError as exc:
            log.warning(
                "cannot read the addresses of instance %s from the control DB (%s)",
                instance_id,
                type(exc).__name__,
            )
            return None, None

    def _db(self) -> Engine | None:
        if self._db_engine is None:
            url = make_url(self.settings.database_url)
            if url.get_backend_name() == "sqlite":
                if not url.database or not Path(url.database).exists():
                    return None
                # Plain deferred transactions: this read must not queue behind the write lock
                # that a session of the very thread calling us may be holding.
                self._db_engine = create_engine(url, connect_args={"timeout": 30})
            else:
                self._db_engine = make_engine(self.settings.database_url)
        return self._db_engine

    def close(self) -> None:
        if self._db_engine is not None:
            self._db_engine.dispose()
            self._db_engine = None
        self.stop_zygote()

    # -- the zygote ----------------------------------------------------------------------------

    def warm(self) -> None:
        """Start the zygote now rather than at the first create (never raises)."""
        if not self.use_zygote:
            return
        try:
            self._prepare_shared_dirs(self.engine_user)
            self._ensure_zygote()
        except Exception as exc:
            log.warning("the zygote could not be started ahead (%s); creates start it", exc)
            return
        self.refill_templates()

    def stop_zygote(self) -> None:
        """Stop the zygote this driver started (instances keep running)."""
        with self._zygote_lock:
            proc, self._zygote = self._zygote, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _zygote_socket(self) -> Path | None:
        path = self.zygote_dir / ZYGOTE_SOCKET
        return path if len(str(path)) <= _MAX_SOCKET_PATH else None

    def refill_templates(self) -> None:
        """Have the zygote top up the ready copies of the host's templates in the background
        (see ``TemplateStore.make_spares``), so the next creates need not copy one. Called
        after a create; does nothing without a zygote, and never raises."""
        if not self.use_zygote or not self._spares_missing():
            return
        try:
            self._ask_zygote(None)
        except OSError as exc:
            log.info("the zygote did not take the request for spare copies (%s)", exc)

    def _spares_missing(self) -> bool:
        """Whether some complete template has fewer ready copies than are kept (or that
        cannot be told): a look at two directory levels, so a create that took no ready copy
        (a Redis create, say) does not cost a fork of the zygote that would find nothing to
        do."""
        try:
            for entry in os.scandir(self.templates_dir):
                if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
                    continue
                if not os.path.exists(os.path.join(entry.path, TEMPLATE_MARKER)):
                    continue
                spares = self.templates_dir / TEMPLATE_SPARES_DIR / entry.name
                try:
                    ready = sum(1 for e in os.scandir(spares) if e.name.startswith("ready-"))
                except FileNotFoundError:
                    ready = 0
                if ready < TEMPLATE_SPARES:
                    return True
        except FileNotFoundError:
            return False
        except OSError:
            return True
        return False

    def _ask_zygote(self, directory: Path | None) -> int:
        """Have the zygote start ``directory``'s supervisor (None: make spare copies of the
        templates); the exit code. OSError if the zygote is not there or breaks off."""
        path = self._zygote_socket()
        if path is None:
            raise OSError("the zygote's socket path is too long")
        request = {"spares": True} if directory is None else {"instance_dir": str(directory)}
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(_START_TIMEOUT)
            conn.connect(str(path))
            conn.sendall(json.dumps(request).encode() + b"\n")
            answer = b""
            while not answer.endswith(b"\n"):
                chunk = conn.recv(4096)
                if not chunk:
                    break
                answer += chunk
        try:
            reply = json.loads(answer.decode())
            return int(reply["code"])
        except (ValueError, KeyError, TypeError) as exc:
            raise OSError(f"the zygote answered {answer[:200]!r}") from exc

    def _ensure_zygote(self) -> None:
        """Start the zygote unless one answers on the socket; wait until it listens."""
        path = self._zygote_socket()
        if path is None:
            raise ComputeError(f"the zygote's socket path under {self.zygote_dir} is too long")
        with self._zygote_lock:
            if self._zygote is not None and self._zygote.poll() is None and path.exists():
                return
            if self._zygote is not None:
                self._zygote.poll()  # reap a zygote that ended
            user = self.engine_user
            with open_dir(self.state_dir) as state_fd:
                make_owned_dir(ZYGOTE_DIR, state_fd, user, 0o700)
                log_fd = open_log_for_append(state_fd, ZYGOTE_DIR, "zygote.log", user)
            identity: dict[str, Any] = {}
            if user.drops_privileges:
                identity = {"user": user.uid, "group": user.gid, "extra_groups": []}
            env = {
                "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
                "LANG": "C.UTF-8",
                "HOME": str(self.zygote_dir),
                "USER": user.name,
                "LOGNAME": user.name,
                "PYTHONPATH": str(_PACKAGE_ROOT),
            }
            try:
                proc = subprocess.Popen(
                    [self.supervisor_python, "-P", "-m", ZYGOTE_MODULE, str(self.zygote_dir)],
                    cwd=self.zygote_dir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log_fd,
                    stderr=log_fd,
                    start_new_session=True,
                    close_fds=True,
                    **identity,
                )
            finally:
                os.close(log_fd)
            deadline = time.monotonic() + _ZYGOTE_START_TIMEOUT
            while not self._zygote_listens(path):
                if proc.poll() is not None or time.monotonic() > deadline:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                    raise ComputeError(
                        f"the zygote did not start; see {self.zygote_dir / 'zygote.log'}"
                    )
                time.sleep(0.01)
            self._zygote = proc
            log.info("zygote started (pid %d)", proc.pid)

    @staticmethod
    def _zygote_listens(path: Path) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(str(path))
            except OSError:
                return False
        return True

    # -- servers -----------------------------------------------------------------------------

    @contextlib.contextmanager
    def _instance_lock(self, instance_id: str) -> Iterator[None]:
        """Hold ``instance_id``'s lock (re-entrant); dropped from the table when unused."""
        with self._locks_guard:
            entry = self._locks.get(instance_id)
            if entry is None:
                entry = self._locks[instance_id] = (threading.RLock(), [0])
            entry[1][0] += 1
        try:
            with entry[0]:
                yield
        finally:
            with self._locks_guard:
                entry[1][0] -= 1
                if entry[1][0] == 0:
                    del self._locks[instance_id]

    def create_server(self, spec: ServerSpec) -> ServerInfo:
        instance_id = check_instance_id(spec.instance_id)
        try:
            guest_json = json.dumps(spec.guest_config, indent=2, sort_keys=True).encode()
        except (TypeError, ValueError) as exc:
            raise ValidationError(
                f"the guest config of instance {instance_id} cannot be written as JSON ({exc}); "
                "pass only strings, numbers, booleans, lists and objects"
            ) from None
        volume_gb = _positive_int(spec.guest_config, "volume_size_gb", "guest_config ")
        flavor = spec.guest_config.get("flavor") or {}
        if not isinstance(flavor, dict):
            raise ValidationError("guest_config flavor must be an object like {'ram': 1024}")
        ram_mb = _positive_int(flavor, "ram", "guest_config flavor ")
        private, public = self._held_addresses(instance_id)
        if private is None or (spec.is_public and public is None):
            which = "private" if private is None else "public"
            raise ComputeError(
                f"instance {instance_id} holds no {which} address; allocate_addresses must run "
                "(and its transaction commit) before create_server"
            )
        user = self.engine_user
        self._prepare_shared_dirs(user)

        directory = self.instance_dir(instance_id)
        agent_argv = [
            arg.replace(CONFIG_PLACEHOLDER, str(directory / GUEST_CONFIG_FILE))
            for arg in self.agent_argv
        ]
        config = SupervisorConfig(
            instance_id=instance_id,
            agent_argv=agent_argv,
            backoff_max=self.settings.compute.guest_restart_backoff_max,
            stop_timeout=self.stop_timeout,
            extra={"volume_size_gb": volume_gb, "ram_mb": ram_mb, "is_public": spec.is_public},
        )
        with self._instance_lock(instance_id):
            with open_dir(self.instances_dir) as instances_fd:
                make_owned_dir(instance_id, instances_fd, user)
            with open_dir(directory) as dir_fd:
                make_owned_dir("run", dir_fd, user)
                make_owned_dir("log", dir_fd, user)
                write_file_atomic(dir_fd, GUEST_CONFIG_FILE, guest_json, user, 0o600)
                write_file_atomic(dir_fd, CONFIG_FILE, config.to_json().encode(), user, 0o600)
            if ram_mb is not None:
                self.cgroups.setup(instance_id, ram_mb)
            info = self._start(instance_id)
        log.info(
            "server of instance %s is up (supervisor pid %s)", instance_id, info.supervisor_pid
        )
        return info

    def ensure_running(self, instance_id: str) -> ServerInfo:
        directory = self.instance_dir(instance_id)
        if not directory.is_dir():
            raise ServerNotFound(
                f"instance {instance_id} has no server on this machine; create it first"
            )
        if not (directory / CONFIG_FILE).is_file():
            raise ComputeError(
                f"the server of instance {instance_id} was never completely created; "
                "run create_server again"
            )
        self._prepare_shared_dirs(self.engine_user)
        with self._instance_lock(instance_id):
            return self._start(instance_id)

    def get_server(self, instance_id: str) -> ServerInfo | None:
        directory = self.instance_dir(instance_id)
        if not directory.is_dir():
            return None
        return self._info(instance_id, self._find_supervisor(directory))

    def delete_server(self, instance_id: str, timeout: float = 30) -> None:
        directory = self.instance_dir(instance_id)
        with self._instance_lock(instance_id):
            supervisor = self._find_supervisor(directory)
            members = self._instance_processes(directory, supervisor)
            if supervisor is not None:
                # The supervisor stops the agent, which stops the engine; strays outside its
                # tree (left by an earlier, killed supervisor) are asked directly.
                tree = {p.pid for p in procfs.descendants(supervisor.pid)} | {supervisor.pid}
                procfs.send_signal(supervisor, signal.SIGTERM)
                for proc in members:
                    if proc.pid not in tree:
                        procfs.send_signal(proc, signal.SIGTERM)
            else:
                for proc in members:
                    procfs.send_signal(proc, signal.SIGTERM)
            procfs.wait_gone(members, max(0.0, timeout))
            for _ in range(3):
                leftovers = self._instance_processes(directory, supervisor)
                if not leftovers:
                    break
                log.warning(
                    "instance %s: killing %d process(es) that did not stop in %.0f s",
                    instance_id,
                    len(leftovers),
                    timeout,
                )
                if supervisor is not None and any(p.pgid == supervisor.pid for p in leftovers):
                    # The group still has members, so its id cannot have been reused: this
                    # also catches children forked after our scan.
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(supervisor.pid, signal.SIGKILL)
                for proc in leftovers:
                    procfs.send_signal(proc, signal.SIGKILL)
                procfs.wait_gone(leftovers, _KILL_WAIT)
            leftovers = self._instance_processes(directory, supervisor)
            if leftovers:
                pids = ", ".join(str(p.pid) for p in leftovers)
                raise ServerStillRunning(
                    f"processes {pids} of instance {instance_id} survived SIGKILL; its directory "
                    "was kept; retry the delete later"
                )
            self.cgroups.remove(instance_id)
            if directory.exists():
                try:
                    shutil.rmtree(directory)
                except OSError as exc:
                    raise ComputeError(
                        f"cannot remove {directory} ({exc.strerror}); remove it by hand"
                    ) from exc
        log.info("server of instance %s deleted", instance_id)

    def list_servers(self) -> list[str]:
        try:
            entries = list(os.scandir(self.instances_dir))
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            if entry.is_dir(follow_symlinks=False):
                try:
                    found.append(check_instance_id(entry.name))
                except ValidationError:
                    continue
        return sorted(found)

    def volume_usage(self, instance_id: str) -> tuple[int, int]:
        directory = self.instance_dir(instance_id)
        if not directory.is_dir():
            raise ServerNotFound(f"instance {instance_id} has no volume on this machine")
        size_gb = self._server_facts(directory).get("volume_size_gb")
        total = size_gb * _GB if isinstance(size_gb, int) else 0
        return disk_usage(directory), total

    # -- internals ---------------------------------------------------------------------------

    def _prepare_shared_dirs(self, user: EngineUser) -> None:
        """Create the state dir, ``instances/`` and ``templates/`` and check the engine user can
        use them all. ``templates/`` belongs to the engine user (0700): its guest agents build
        and copy the templates there, and no one else needs to look inside."""
        traversable = user.drops_privileges
        ensure_shared_dir(self.state_dir, traversable)
        ensure_shared_dir(self.instances_dir, traversable)
        with open_dir(self.state_dir) as state_fd:
            make_owned_dir(TEMPLATES_DIR, state_fd, user, 0o700)
        if not traversable:
            return
        checks = [
            (self.instances_dir, False, "reach the instance directories under"),
            (self.templates_dir, False, "use the template data directories in"),
            (Path(self.supervisor_python), True, "run the Python interpreter"),
            (
                _PACKAGE_ROOT / "coffer" / "compute" / "supervisor.py",
                False,
                "read Coffer's code at",
            ),
        ]
        if os.path.isabs(self.agent_argv[0]):
            checks.append((Path(self.agent_argv[0]), True, "run the guest agent command"))
        for path, execute, what in checks:
            blocked = user.unreachable_part(path, execute=execute)
            if blocked is not None:
                raise ComputeError(
                    f"the engine user {user.name!r} cannot {what} {path}: it has no access to "
                    f"{blocked}; grant it (e.g. chmod o+x on the directories above) or install "
                    "Coffer and its Python where that user can reach them"
                )

    def _start(self, instance_id: str) -> ServerInfo:
        """Start the supervisor unless it runs; the caller holds the instance's lock."""
        directory = self.instance_dir(instance_id)
        supervisor = self._find_supervisor(directory)
        if supervisor is None and self.use_zygote:
            supervisor = self._launch_forked(instance_id, directory)
        if supervisor is None:
            supervisor = self._launch(instance_id, directory)
        cgroup = self.cgroups.path(instance_id)
        if cgroup.is_dir():
            self.cgroups.attach(
                cgroup, [supervisor.pid, *(p.pid for p in procfs.descendants(supervisor.pid))]
            )
        return self._info(instance_id, supervisor)

    def _launch_forked(self, instance_id: str, directory: Path) -> procfs.ProcessInfo | None:
        """Start the supervisor as a fork of the zygote (started if needed); None when the
        zygote cannot be used, so the caller starts an interpreter instead."""
        code = None
        for attempt in range(2):
            try:
                code = self._ask_zygote(directory)
                break
            except OSError as exc:
                if attempt:
                    log.warning("the zygote did not answer (%s); starting Python instead", exc)
                    return None
            try:
                self._ensure_zygote()
            except (ComputeError, OSError) as exc:
                log.warning("%s; starting Python instead", exc)
                self.use_zygote = False
                return None
        if code not in (EXIT_STARTED, EXIT_ALREADY_RUNNING):
            raise ComputeError(
                f"the supervisor of instance {instance_id} failed to start (exit code {code}); "
                f"see {directory / LOGFILE}"
            )
        supervisor = self._find_supervisor(directory)
        if supervisor is None:
            raise ComputeError(
                f"the supervisor of instance {instance_id} started but is no longer running; "
                f"see {directory / LOGFILE}"
            )
        return supervisor

    def _launch(self, instance_id: str, directory: Path) -> procfs.ProcessInfo:
        user = self.engine_user
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(directory),
            "USER": user.name,
            "LOGNAME": user.name,
            "PYTHONPATH": str(_PACKAGE_ROOT),
            MARKER_ENV: str(directory),
            "COFFER_INSTANCE_ID": instance_id,
        }
        identity: dict[str, Any] = {}
        if user.drops_privileges:
            identity = {"user": user.uid, "group": user.gid, "extra_groups": []}
        with open_dir(directory) as dir_fd:
            log_fd = open_log_for_append(dir_fd, "log", "supervisor.log", user)
        try:
            # -P keeps the (engine-writable) instance directory off the supervisor's sys.path.
            process = subprocess.Popen(
                [self.supervisor_python, "-P", "-m", MODULE, str(directory)],
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log_fd,
                stderr=log_fd,
                start_new_session=True,
                close_fds=True,
                **identity,
            )
        except OSError as exc:
            raise ComputeError(
                f"cannot start the supervisor of instance {instance_id} with "
                f"{self.supervisor_python} ({exc.strerror})"
            ) from exc
        finally:
            os.close(log_fd)
        logfile = directory / LOGFILE
        try:
            code = process.wait(timeout=_START_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
            raise ComputeError(
                f"the supervisor of instance {instance_id} did not start within "
                f"{_START_TIMEOUT:.0f} s; see {logfile}"
            ) from None
        if code not in (EXIT_STARTED, EXIT_ALREADY_RUNNING):
            raise ComputeError(
                f"the supervisor of instance {instance_id} failed to start (exit code {code}); "
                f"see {logfile}"
            )
        supervisor = self._find_supervisor(directory)
        if supervisor is None:
            raise ComputeError(
                f"the supervisor of instance {instance_id} started but is no longer running; "
                f"see {logfile}"
            )
        return supervisor

    def _find_supervisor(self, directory: Path) -> procfs.ProcessInfo | None:
        """The live supervisor of ``directory``, by pidfile, checked against ``/proc``."""
        record = procfs.read_pidfile(directory / PIDFILE)
        if record is None:
            return None
        proc = procfs.read_process(record[0])
        if proc is None or proc.is_zombie or proc.uid != self.engine_user.uid:
            return None
        argv = procfs.cmdline(proc.pid)
        if MODULE in argv and argv[-1] == str(directory):
            return proc
        # A fork of the zygote carries the zygote's command line: trusted by its recorded
        # start time and its working directory (the supervisor runs in the instance's).
        if (
            ZYGOTE_MODULE in argv
            and record[1] is not None
            and record[1] == proc.start_time
            and procfs.cwd(proc.pid) == str(directory)
        ):
            return proc
        return None  # the pid was recycled by some other process

    def _instance_processes(
        self, directory: Path, supervisor: procfs.ProcessInfo | None
    ) -> list[procfs.ProcessInfo]:
        """Every live process of the instance: the supervisor's tree and session, and any
        process of the engine user carrying the instance's marker or naming its directory."""
        me = os.getpid()
        uid = self.engine_user.uid
        path = str(directory)
        everything = procfs.all_processes()
        tree: set[int] = set()
        if supervisor is not None and procfs.is_alive(supervisor):
            tree = {supervisor.pid} | {
                p.pid for p in procfs.descendants(supervisor.pid, everything)
            }
        found = []
        for proc in everything:
            if proc.pid == me or proc.is_zombie or proc.uid != uid:
                continue
            if (
                proc.pid in tree
                or (supervisor is not None and proc.sid == supervisor.sid)
                or procfs.environ_has(proc.pid, MARKER_ENV, path)
                or any(procfs.refers_to(arg, path) for arg in procfs.cmdline(proc.pid))
                or procfs.refers_to(procfs.cwd(proc.pid) or "", path)
            ):
                found.append(proc)
        return found

    def _server_facts(self, directory: Path) -> dict[str, Any]:
        try:
            return SupervisorConfig.from_json((directory / CONFIG_FILE).read_text()).extra
        except (OSError, ValueError):
            return {}

    def _info(self, instance_id: str, supervisor: procfs.ProcessInfo | None) -> ServerInfo:
        private, public = self._held_addresses(instance_id)
        cgroup = self.cgroups.path(instance_id)
        return ServerInfo(
            instance_id=instance_id,
            private_address=private or "",
            public_address=public,
            volume_dir=self.volume_dir(instance_id),
            running=supervisor is not None,
            supervisor_pid=supervisor.pid if supervisor is not None else None,
            cgroup=cgroup if cgroup.is_dir() else None,
        )
