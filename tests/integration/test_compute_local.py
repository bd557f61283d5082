"""The local compute driver with real supervisor processes (and real control DBs for addresses).

The guest agent here is a stand-in script: these tests are about supervision, not engines. It
writes its pid to ``run/stub-agent.pid`` and, when asked to, starts a stand-in "engine" in its
own session (as engines that daemonize do) that the driver must still find and stop.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg
import pytest
from sqlalchemy.orm import Session, sessionmaker

from coffer.compute import addresses
from coffer.compute.base import ServerInfo, ServerSpec
from coffer.compute.cgroup import MemoryCgroups, memory_limit_bytes
from coffer.compute.local import LocalCompute
from coffer.config import Settings, load_settings
from coffer.db.models import Base
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import ComputeError

pytestmark = pytest.mark.integration

SECRET = "s3cret-" + uuid.uuid4().hex[:12]

STUB_AGENT = r"""
import json, os, signal, subprocess, sys, time

config_path = sys.argv[1]
with open(config_path) as handle:
    options = json.load(handle).get("stub", {})
run = os.path.join(os.path.dirname(config_path), "run")


def write(name, text):
    tmp = os.path.join(run, "." + name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
    os.replace(tmp, os.path.join(run, name))


def alive(pid):
    try:
        with open("/proc/%d/stat" % pid) as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


engine_pid = 0
if options.get("engine"):
    try:
        with open(os.path.join(run, "stub-engine.pid")) as handle:
            engine_pid = int(handle.read())
    except (OSError, ValueError):
        engine_pid = 0
    if not (engine_pid and alive(engine_pid)):
        engine = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(3600)"], start_new_session=True
        )
        engine_pid = engine.pid
        write("stub-engine.pid", str(engine_pid))


def stop(signum, frame):
    if engine_pid:
        try:
            os.kill(engine_pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    sys.exit(0)


signal.signal(signal.SIGTERM, signal.SIG_IGN if options.get("ignore_sigterm") else stop)
write("stub-agent.pid", str(os.getpid()))
while True:
    time.sleep(1)
"""


# --- helpers that look at /proc on their own (not through the code under test) ----------------


def _pids() -> list[int]:
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z"


def _ppid(pid: int) -> int:
    fields = _stat(pid)
    assert fields is not None, f"process {pid} is gone"
    return int(fields[1])


def _uid(pid: int) -> int:
    return os.stat(f"/proc/{pid}").st_uid


def _references(pid: int, text: str) -> bool:
    """True if the process's argv, environment or working directory mention ``text``."""
    blob = b""
    for name in ("cmdline", "environ"):
        with contextlib.suppress(OSError):
            blob += Path(f"/proc/{pid}/{name}").read_bytes()
    with contextlib.suppress(OSError):
        blob += os.readlink(f"/proc/{pid}/cwd").encode()
    return text.encode() in blob


def _processes_referencing(text: str) -> list[int]:
    return [pid for pid in _pids() if pid != os.getpid() and _alive(pid) and _references(pid, text)]


def _supervisors_of(directory: Path) -> list[int]:
    found = []
    for pid in _pids():
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"coffer.compute.supervisor" in argv and str(directory).encode() in argv:
            found.append(pid)
    return found


def _wait_for(condition: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text())
    except (OSError, ValueError):
        return None


def _python_for(user: str) -> str:
    """An interpreter the engine user can run (the virtualenv's may sit under /root)."""
    if os.geteuid() != 0:
        return sys.executable
    for candidate in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if not candidate:
            continue
        try:
            probe = subprocess.run(
                [candidate, "-c", "import sys; sys.exit(sys.version_info < (3, 11))"],
                user=user,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            )
        except OSError:  # e.g. the interpreter sits under a directory closed to the user
            continue
        if probe.returncode == 0:
            return candidate
    pytest.fail(f"no Python 3.11+ interpreter is runnable by the engine user {user!r}")


# --- fixtures -------------------------------------------------------------------------------


@dataclass
class Env:
    state: Path
    settings: Settings
    factory: sessionmaker[Session]
    python: str
    stub: Path
    drivers: list[LocalCompute] = field(default_factory=list)

    def driver(self, **kwargs: Any) -> LocalCompute:
        driver = LocalCompute(
            self.settings,
            [self.python, str(self.stub), "{config}"],
            supervisor_python=self.python,
            **kwargs,
        )
        self.drivers.append(driver)
        return driver

    def create(
        self,
        driver: LocalCompute,
        instance_id: str = "inst-a",
        is_public: bool = False,
        **stub: Any,
    ) -> ServerInfo:
        with transaction(self.factory) as session:
            driver.allocate_addresses(session, instance_id, is_public)
        config = {
            "instance_id": instance_id,
            "password": SECRET,
            "volume_size_gb": 1,
            "flavor": {"ram": 256},
            "stub": stub,
        }
        return driver.create_server(ServerSpec(instance_id, config, is_public))

    @property
    def engine_uid(self) -> int:
        return pwd.getpwnam(self.settings.engine_user).pw_uid


@pytest.fixture(scope="session")
def engine_python() -> str:
    return _python_for(load_settings(environ={}).engine_user)


@pytest.fixture
def env(engine_python: str) -> Iterator[Env]:
    # Directly under /tmp: the engine user must be able to traverse every parent directory.
    state = Path(tempfile.mkdtemp(prefix="coffer-compute-", dir="/tmp"))
    try:
        settings = load_settings(
            environ={},
            overrides={
                "DEFAULT": {"state_dir": str(state)},
                "compute": {"guest_restart_backoff_max": 1.0},
            },
        )
        engine = make_engine(settings.database_url)
        Base.metadata.create_all(engine)
        stub = state / "stub_agent.py"
        stub.write_text(STUB_AGENT)
        stub.chmod(0o644)
    except BaseException:
        shutil.rmtree(state, ignore_errors=True)
        raise
    environment = Env(
        state=state,
        settings=settings,
        factory=make_session_factory(engine),
        python=engine_python,
        stub=stub,
    )
    try:
        yield environment
    finally:
        try:
            for driver in environment.drivers:
                for instance_id in driver.list_servers():
                    try:
                        driver.delete_server(instance_id, timeout=5)
                    except Exception as exc:  # the independent sweep below still runs
                        print(f"cleanup: delete_server({instance_id}) failed: {exc}")
                driver.close()
        finally:
            leftovers = _processes_referencing(str(state))
            for pid in leftovers:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            engine.dispose()
            shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
def sleeper() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process of the engine user whose pid a test can plant in a pidfile."""
    user = load_settings(environ={}).engine_user
    identity: dict[str, Any] = {"user": user} if os.geteuid() == 0 else {}
    process = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, **identity)
    try:
        yield process
    finally:
        process.kill()
        process.wait(timeout=10)


# --- supervision ------------------------------------------------------------------------------


def test_create_server_runs_supervisor_and_agent_as_the_engine_user(env: Env) -> None:
    driver = env.driver()
    info = env.create(driver, is_public=True)
    directory = info.volume_dir
    assert info.running and info.supervisor_pid
    assert (info.private_address, info.public_address) == ("127.10.0.1", "127.20.0.1")
    assert directory == env.state / "instances" / "inst-a"

    supervisor = info.supervisor_pid
    agent = _wait_for(lambda: _read_pid(directory / "run" / "stub-agent.pid"), what="the agent")
    assert _uid(supervisor) == _uid(agent) == env.engine_uid
    if os.geteuid() == 0:
        assert env.engine_uid != 0
    assert _ppid(agent) == supervisor
    assert os.getsid(supervisor) == supervisor  # detached from the control plane's session

    assert directory.stat().st_uid == env.engine_uid
    assert directory.stat().st_mode & 0o777 == 0o700
    guest = directory / "guest.json"
    assert (guest.stat().st_uid, guest.stat().st_mode & 0o777) == (env.engine_uid, 0o600)
    assert json.loads(guest.read_text())["password"] == SECRET

    # The secret is in guest.json only: not on any command line, not in any log.
    for pid in _pids():
        try:
            assert SECRET.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
    for log in (directory / "log").iterdir():
        assert SECRET not in log.read_text()

    again = env.create(driver, is_public=True)  # a retried step
    assert again.supervisor_pid == supervisor
    assert _supervisors_of(directory) == [supervisor]
    assert driver.list_servers() == ["inst-a"]
    assert driver.get_server("inst-a") == info


def test_a_killed_agent_is_restarted_and_its_engine_stays_supervised(env: Env) -> None:
    driver = env.driver()
    info = env.create(driver, engine=True)
    run = info.volume_dir / "run"
    agent = _wait_for(lambda: _read_pid(run / "stub-agent.pid"), what="the agent")
    engine = _wait_for(lambda: _read_pid(run / "stub-engine.pid"), what="the engine")

    os.kill(agent, signal.SIGKILL)
    started = time.monotonic()
    new_agent = _wait_for(
        lambda: (p := _read_pid(run / "stub-agent.pid")) != agent and p and _alive(p) and p,
        timeout=10,
        what="a new agent",
    )
    assert time.monotonic() - started < 5
    assert _ppid(new_agent) == info.supervisor_pid
    # The engine outlived its agent, was adopted by the supervisor, and was not started twice.
    assert _alive(engine)
    assert _read_pid(run / "stub-engine.pid") == engine
    assert _ppid(engine) == info.supervisor_pid
    assert driver.get_server("inst-a").supervisor_pid == info.supervisor_pid  # type: ignore[union-attr]


def test_ensure_running_restarts_a_killed_supervisor_without_duplicating_the_agent(
    env: Env,
) -> None:
    driver = env.driver()
    info = env.create(driver)
    run = info.volume_dir / "run"
    old_agent = _wait_for(lambda: _read_pid(run / "stub-agent.pid"), what="the agent")
    assert info.supervisor_pid is not None

    os.kill(info.supervisor_pid, signal.SIGKILL)
    _wait_for(lambda: not _alive(info.supervisor_pid or 0), what="the supervisor to die")
    down = driver.get_server("inst-a")
    assert down is not None and not down.running and down.supervisor_pid is None

    up = driver.ensure_running("inst-a")
    assert up.running and up.supervisor_pid not in (None, info.supervisor_pid)
    new_agent = _wait_for(
        lambda: (p := _read_pid(run / "stub-agent.pid")) != old_agent and p and _alive(p) and p,
        what="the new agent",
    )
    assert _ppid(new_agent) == up.supervisor_pid
    assert not _alive(old_agent)  # the orphaned agent was stopped, not left running beside
    stub_agents = [p for p in _processes_referencing(str(env.stub)) if _alive(p)]
    assert stub_agents == [new_agent]
    assert driver.ensure_running("inst-a").supervisor_pid == up.supervisor_pid


def test_a_restarted_control_plane_adopts_the_running_server(env: Env) -> None:
    first = env.driver()
    info = env.create(first)
    agent = _wait_for(lambda: _read_pid(info.volume_dir / "run" / "stub-agent.pid"))
    first.close()

    second = env.driver()  # a new `coffer up` process: nothing shared but the state dir
    found = second.get_server("inst-a")
    assert found == info
    assert second.ensure_running("inst-a").supervisor_pid == info.supervisor_pid
    assert (
        second.create_server(
            ServerSpec("inst-a", {"password": SECRET, "stub": {}}, False)
        ).supervisor_pid
        == info.supervisor_pid
    )
    assert _supervisors_of(info.volume_dir) == [info.supervisor_pid]
    assert _read_pid(info.volume_dir / "run" / "stub-agent.pid") == agent
    assert second.list_servers() == ["inst-a"]


def test_a_recycled_pid_in_the_pidfile_is_not_taken_for_the_supervisor(
    env: Env, sleeper: subprocess.Popen[bytes]
) -> None:
    driver = env.driver()
    info = env.create(driver)
    assert info.supervisor_pid is not None
    os.kill(info.supervisor_pid, signal.SIGKILL)
    _wait_for(lambda: not _alive(info.supervisor_pid or 0), what="the supervisor to die")
    (info.volume_dir / "run" / "supervisor.pid").write_text(f"{sleeper.pid}\n")

    down = driver.get_server("inst-a")
    assert down is not None and not down.running
    up = driver.ensure_running("inst-a")
    assert up.supervisor_pid not in (None, sleeper.pid)
    driver.delete_server("inst-a", timeout=10)
    assert sleeper.poll() is None  # the unrelated process was left alone throughout


def test_an_agent_that_keeps_crashing_is_restarted_with_capped_backoff(env: Env) -> None:
    driver = LocalCompute(
        env.settings,
        [env.python, "-c", "import sys; sys.exit(3)"],
        supervisor_python=env.python,
    )
    env.drivers.append(driver)
    info = env.create(driver)
    log = info.volume_dir / "log" / "supervisor.log"

    def delays() -> list[float]:
        lines = log.read_text().splitlines()
        return [float(line.split(" in ")[-1].split()[0]) for line in lines if "restarting" in line]

    _wait_for(lambda: len(delays()) >= 4, timeout=15, what="four restarts")
    # Doubling from 0.5 s, capped by guest_restart_backoff_max = 1.0 in these settings.
    assert delays()[:4] == [0.5, 1.0, 1.0, 1.0]
    assert "exited with code 3" in log.read_text()
    assert driver.get_server("inst-a").running  # type: ignore[union-attr]


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands instances to another user")
def test_an_interpreter_the_engine_user_cannot_reach_is_reported_before_starting(
    env: Env,
) -> None:
    hidden = env.state / "hidden"
    hidden.mkdir(mode=0o700)
    (hidden / "python3").symlink_to(env.python)
    driver = env.driver()
    driver.supervisor_python = str(hidden / "python3")
    with pytest.raises(ComputeError, match="cannot run the Python interpreter") as caught:
        env.create(driver)
    assert str(hidden) in caught.value.message
    assert driver.list_servers() == []


# --- deletion ---------------------------------------------------------------------------------


def test_delete_server_leaves_no_process_and_no_directory(env: Env) -> None:
    driver = env.driver()
    info = env.create(driver, engine=True)
    run = info.volume_dir / "run"
    agent = _wait_for(lambda: _read_pid(run / "stub-agent.pid"))
    engine = _wait_for(lambda: _read_pid(run / "stub-engine.pid"))
    assert _processes_referencing(str(info.volume_dir))

    driver.delete_server("inst-a")
    assert _processes_referencing(str(info.volume_dir)) == []
    assert not any(_alive(pid) for pid in (info.supervisor_pid or 0, agent, engine))
    assert not info.volume_dir.exists()
    assert driver.get_server("inst-a") is None
    assert driver.list_servers() == []
    driver.delete_server("inst-a")  # retried step: a no-op


@pytest.mark.parametrize(
    ("stop_timeout", "delete_timeout"),
    [(1.0, 20.0), (20.0, 1.0)],
    ids=["supervisor-escalates", "driver-escalates"],
)
def test_delete_server_kills_an_agent_that_ignores_sigterm(
    env: Env, stop_timeout: float, delete_timeout: float
) -> None:
    driver = env.driver(stop_timeout=stop_timeout)
    info = env.create(driver, engine=True, ignore_sigterm=True)
    run = info.volume_dir / "run"
    agent = _wait_for(lambda: _read_pid(run / "stub-agent.pid"))
    engine = _wait_for(lambda: _read_pid(run / "stub-engine.pid"))

    started = time.monotonic()
    driver.delete_server("inst-a", timeout=delete_timeout)
    assert time.monotonic() - started < 8  # whichever side escalates, nobody waits 20 s
    assert not _alive(agent) and not _alive(engine)
    assert _processes_referencing(str(info.volume_dir)) == []
    assert not info.volume_dir.exists()


def test_delete_also_stops_a_stray_left_by_an_earlier_supervisor(env: Env) -> None:
    driver = env.driver()
    info = env.create(driver, engine=True)
    run = info.volume_dir / "run"
    engine = _wait_for(lambda: _read_pid(run / "stub-engine.pid"))
    agent = _wait_for(lambda: _read_pid(run / "stub-agent.pid"))
    assert info.supervisor_pid is not None
    # Supervisor and agent die hard: the engine is orphaned outside any supervised tree.
    os.kill(info.supervisor_pid, signal.SIGKILL)
    os.kill(agent, signal.SIGKILL)
    _wait_for(lambda: not _alive(agent) and not _alive(info.supervisor_pid or 0))
    assert _alive(engine) and _ppid(engine) != info.supervisor_pid

    driver.delete_server("inst-a", timeout=5)
    assert not _alive(engine)
    assert _processes_referencing(str(info.volume_dir)) == []


# --- volume and limits ------------------------------------------------------------------------


def test_volume_usage_counts_the_bytes_under_the_instance_directory(env: Env) -> None:
    driver = env.driver()
    info = env.create(driver)
    used, total = driver.volume_usage("inst-a")
    assert total == 1024**3
    (info.volume_dir / "data.bin").write_bytes(os.urandom(2 << 20))
    grown, _ = driver.volume_usage("inst-a")
    assert grown - used >= 2 << 20


@pytest.mark.skipif(
    os.geteuid() != 0 or not MemoryCgroups().available(),
    reason="needs root and a writable cgroup v2 hierarchy with the memory controller",
)
def test_memory_limit_cgroup_holds_the_instance_tree(env: Env) -> None:
    driver = env.driver()
    info = env.create(driver)
    assert info.cgroup is not None
    assert int((info.cgroup / "memory.max").read_text()) == memory_limit_bytes(256)
    members = (info.cgroup / "cgroup.procs").read_text().split()
    assert str(info.supervisor_pid) in members
    driver.delete_server("inst-a")
    assert not info.cgroup.exists()


# --- addresses from several processes and on PostgreSQL ---------------------------------------

ALLOCATOR = r"""
import json, sys
from coffer.compute.local import LocalCompute
from coffer.config import load_settings
from coffer.db.session import make_engine, make_session_factory, transaction
from coffer.errors import ComputeError

state, prefix = sys.argv[1], sys.argv[2]
settings = load_settings(environ={}, overrides={"DEFAULT": {"state_dir": state}})
driver = LocalCompute(settings)
factory = make_session_factory(make_engine(settings.database_url))
got = []
for index in range(6):
    with transaction(factory) as session:
        got.append(driver.allocate_addresses(session, f"{prefix}-{index}", index % 2 == 0))
print(json.dumps(got))
"""


def test_processes_allocating_at_once_never_share_an_address(env: Env) -> None:
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", ALLOCATOR, str(env.state), f"proc{n}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for n in range(3)
    ]
    try:
        outputs = [worker.communicate(timeout=120) for worker in workers]
    finally:
        for worker in workers:
            if worker.poll() is None:
                worker.kill()
                worker.wait(timeout=10)
    assert all(worker.returncode == 0 for worker in workers), [err for _, err in outputs]
    pairs = [pair for out, _ in outputs for pair in json.loads(out)]
    privates = [private for private, _ in pairs]
    publics = [public for _, public in pairs if public]
    assert len(privates) == len(set(privates)) == 18
    assert len(publics) == len(set(publics)) == 9


@pytest.fixture
def postgres_factory() -> Iterator[sessionmaker[Session]]:
    """A scratch database on the machine's PostgreSQL, dropped afterwards."""
    name = f"coffer_compute_{uuid.uuid4().hex[:10]}"
    admin = "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    engine = make_engine(f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
    try:
        Base.metadata.create_all(engine)
        yield make_session_factory(engine)
    finally:
        engine.dispose()
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_allocation_on_postgresql_races_and_recovers_from_a_stale_read(
    env: Env, postgres_factory: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    driver = env.driver()
    count = 8
    barrier = threading.Barrier(count)
    results: list[tuple[str, str | None]] = []
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            barrier.wait(timeout=10)
            with transaction(postgres_factory) as session:
                results.append(driver.allocate_addresses(session, f"pg-{index}", True))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert len({private for private, _ in results}) == count
    assert len({public for _, public in results}) == count

    # A reader that missed the others' commits hits the primary key and moves on.
    monkeypatch.setattr(addresses, "_used", lambda session, pool: set())
    with transaction(postgres_factory) as session:
        assert driver.allocate_addresses(session, "late", False) == (f"127.10.0.{count + 1}", None)


def test_a_slow_delete_does_not_hold_up_the_create_of_another_instance(env: Env) -> None:
    # Locks are per instance: while one instance's delete waits for an agent that ignores
    # SIGTERM, another instance is created (and its supervisor started) at once.
    driver = env.driver(stop_timeout=6)
    env.create(driver, "inst-a", engine=True, ignore_sigterm=True)
    _wait_for(lambda: _read_pid(env.state / "instances" / "inst-a" / "run" / "stub-agent.pid"))
    deleting = threading.Thread(
        target=driver.delete_server, args=("inst-a",), kwargs={"timeout": 4}
    )
    deleting.start()
    try:
        time.sleep(0.5)  # the delete is now waiting for the agent, which ignores SIGTERM
        assert deleting.is_alive()
        started = time.monotonic()
        info = env.create(driver, "inst-b")
        took = time.monotonic() - started
        assert info.running and info.supervisor_pid
        assert deleting.is_alive(), "the delete ended before the create could show anything"
        assert took < 3, f"the create waited {took:.1f} s behind another instance's delete"
    finally:
        deleting.join(timeout=30)
    assert not (env.state / "instances" / "inst-a").exists()
    assert driver.list_servers() == ["inst-b"]
