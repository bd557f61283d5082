"""Supervisors and guest agents forked from the host's zygote (``coffer.compute.zygote``).

Real ``coffer up``, real Redis instances, real redis-py log-ins. What must hold: an instance's
supervisor and agent are forks of the zygote (no interpreter start on the way to ``prepare``),
yet the supervisor is daemonized, stays the agent's parent and restarts it; the zygote answers
only for instance directories; a zygote that dies is replaced at the next create; and the
zygote ends with the control plane that started it while instances keep serving.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from coffer_harness import Coffer, TenantApi, coffer_environment, processes_under
from redis.backoff import NoBackoff
from redis.retry import Retry

from coffer.compute import procfs
from coffer.compute.supervisor import AGENT_PIDFILE, PIDFILE
from coffer.compute.zygote import MODULE as ZYGOTE_MODULE

pytestmark = pytest.mark.integration


def _wait_for(condition: Callable[[], Any], timeout: float = 30.0, what: str = "it") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _zygotes(state_dir: Path) -> list[int]:
    """Live zygote processes of this Coffer (its forks share its command line, but run in
    their instance's directory)."""
    found = []
    for pid in processes_under(state_dir):
        argv = procfs.cmdline(pid)
        proc = procfs.read_process(pid)
        if (
            proc is not None
            and not proc.is_zombie
            and ZYGOTE_MODULE in argv
            and argv[-1] == str(state_dir / "zygote")
            and procfs.cwd(pid) == str(state_dir / "zygote")
        ):
            found.append(pid)
    return found


def _redis_instance(api: TenantApi, name: str, password: str) -> tuple[str, str]:
    instance_id = api.create(
        name=name,
        flavorRef="6",
        volume={"size": 1},
        datastore={"type": "redis"},
        users=[{"name": "app", "password": password}],
    )
    shown = api.wait_settled(instance_id)
    assert shown["status"] == "ACTIVE", shown
    return instance_id, shown["addresses"][0]["address"]


def _logs_in(address: str, password: str) -> bool:
    client = redis.Redis(
        host=address,
        username="app",
        password=password,
        socket_connect_timeout=3,
        retry=Retry(NoBackoff(), 0),
    )
    try:
        return bool(client.ping())
    finally:
        client.close()


def _tree(coffer: Coffer, instance_id: str) -> tuple[int, int | None, int]:
    """(supervisor pid, its recorded start time, agent pid) from the instance's pidfiles."""
    directory = coffer.state_dir / "instances" / instance_id
    supervisor = procfs.read_pidfile(directory / PIDFILE)
    agent = procfs.read_pidfile(directory / AGENT_PIDFILE)
    assert supervisor is not None and agent is not None
    return supervisor[0], supervisor[1], agent[0]


def _agent_pid(coffer: Coffer, instance_id: str) -> int | None:
    """The current agent's pid (None between an agent's exit and its restart)."""
    record = procfs.read_pidfile(coffer.state_dir / "instances" / instance_id / AGENT_PIDFILE)
    return None if record is None else record[0]


def _ask(coffer: Coffer, request: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(30)
        conn.connect(str(coffer.state_dir / "zygote" / "zygote.sock"))
        conn.sendall(request)
        answer = b""
        while chunk := conn.recv(4096):
            answer += chunk
    reply: dict[str, Any] = json.loads(answer)
    return reply


def test_instances_are_forks_of_the_zygote_and_recover(coffer_up: Coffer) -> None:
    coffer = coffer_up
    api = TenantApi(coffer)
    instance_id, address = _redis_instance(api, "forked", "pw-forked-1")
    assert _logs_in(address, "pw-forked-1")

    zygotes = _wait_for(lambda: _zygotes(coffer.state_dir), what="the zygote")
    assert len(zygotes) == 1
    zygote = procfs.read_process(zygotes[0])
    supervisor_pid, started, agent_pid = _tree(coffer, instance_id)
    supervisor = procfs.read_process(supervisor_pid)
    agent = procfs.read_process(agent_pid)
    assert zygote is not None and supervisor is not None and agent is not None
    # Forks, not new interpreters: they carry the zygote's command line ...
    assert ZYGOTE_MODULE in procfs.cmdline(supervisor_pid)
    assert ZYGOTE_MODULE in procfs.cmdline(agent_pid)
    # ... recognised by the recorded start time and the working directory.
    assert started == supervisor.start_time
    assert procfs.cwd(supervisor_pid) == str(coffer.state_dir / "instances" / instance_id)
    # The supervisor is a daemon of its own (not the zygote's child, not in its session) and
    # the agent's parent.
    assert supervisor.ppid != zygote.pid and supervisor.sid == supervisor.pid != zygote.sid
    assert agent.ppid == supervisor_pid
    # Nothing secret on any command line.
    for pid in (zygote.pid, supervisor_pid, agent_pid):
        assert "pw-forked-1" not in " ".join(procfs.cmdline(pid))

    # A killed agent is restarted by its supervisor, again as a fork, and adopts the engine.
    engines = [p.pid for p in procfs.descendants(agent_pid)]
    assert engines, "the agent runs the engine"
    os.kill(agent_pid, signal.SIGKILL)
    new_agent = _wait_for(
        lambda: (lambda pid: pid if pid not in (None, agent_pid) else None)(
            _agent_pid(coffer, instance_id)
        ),
        what="a new agent",
    )
    assert procfs.read_process(new_agent).ppid == supervisor_pid  # type: ignore[union-attr]
    assert ZYGOTE_MODULE in procfs.cmdline(new_agent)
    assert all(procfs.read_process(pid) is not None for pid in engines), "engine kept running"
    _wait_for(
        lambda: api.request("GET", f"/instances/{instance_id}/users").status_code == 200,
        what="the new agent to answer calls",
    )
    assert _logs_in(address, "pw-forked-1")

    # A dead zygote is replaced by the next create.
    os.kill(zygote.pid, signal.SIGKILL)
    _wait_for(lambda: zygote.pid not in _zygotes(coffer.state_dir), what="the zygote to end")
    second_id, second_address = _redis_instance(api, "after-zygote", "pw-forked-2")
    assert _logs_in(second_address, "pw-forked-2")
    replacements = _zygotes(coffer.state_dir)
    assert len(replacements) == 1 and replacements[0] != zygote.pid
    assert ZYGOTE_MODULE in procfs.cmdline(_tree(coffer, second_id)[0])

    for done in (instance_id, second_id):
        volume = coffer.state_dir / "instances" / done
        api.delete_and_wait_gone(done)
        assert not volume.exists()
        assert processes_under(volume) == []


def test_the_zygote_answers_only_for_instance_directories(coffer_up: Coffer) -> None:
    coffer = coffer_up
    _wait_for(lambda: _zygotes(coffer.state_dir), what="the zygote")
    before = set(processes_under(coffer.state_dir))
    instances = coffer.state_dir / "instances"
    for request in (
        {"instance_dir": "/etc"},
        {"instance_dir": str(instances / ".." / "zygote")},
        {"instance_dir": str(instances / "no-such-instance")},
        {"instance_dir": "relative/path"},
        {"something": "else"},
    ):
        reply = _ask(coffer, json.dumps(request).encode() + b"\n")
        assert reply["code"] == 2, (request, reply)
        assert reply["error"]
    reply = _ask(coffer, b"not json\n")
    assert "code" not in reply or reply["code"] != 0
    # Nothing was started for any of them.
    time.sleep(0.2)
    assert set(processes_under(coffer.state_dir)) - before == set()


def test_the_zygote_ends_with_coffer_up_and_instances_keep_serving(engine_user: str) -> None:
    with coffer_environment() as coffer:
        coffer.start("up", "up")
        coffer.wait_api()
        api = TenantApi(coffer)
        instance_id, address = _redis_instance(api, "outlives", "pw-outlives")
        supervisor_pid = _tree(coffer, instance_id)[0]
        first = _wait_for(lambda: _zygotes(coffer.state_dir), what="the zygote")

        coffer.stop("up", sig=signal.SIGINT)
        _wait_for(lambda: not _zygotes(coffer.state_dir), what="the zygote to end")
        assert _logs_in(address, "pw-outlives")
        assert procfs.read_process(supervisor_pid) is not None

        coffer.start("up", "up")
        coffer.wait_api()
        api = TenantApi(coffer)
        # The new control plane finds the same supervisor (no second one) and its agent.
        _wait_for(
            lambda: api.request("GET", f"/instances/{instance_id}/users").status_code == 200,
            what="the agent to answer the new control plane",
        )
        assert _tree(coffer, instance_id)[0] == supervisor_pid
        assert api.show(instance_id)["status"] == "ACTIVE"
        second = _wait_for(lambda: _zygotes(coffer.state_dir), what="a new zygote")
        assert set(second).isdisjoint(first)
        api.delete_and_wait_gone(instance_id)
