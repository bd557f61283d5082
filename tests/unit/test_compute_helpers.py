"""Building blocks of the local driver: /proc reading, safe file writes, supervisor settings."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from coffer.compute import procfs
from coffer.compute.cgroup import MemoryCgroups, memory_limit_bytes
from coffer.compute.files import (
    EngineUser,
    disk_usage,
    open_dir,
    open_log_for_append,
    write_file_atomic,
)
from coffer.compute.supervisor import SupervisorConfig, next_backoff
from coffer.errors import ComputeError


@pytest.fixture
def me() -> EngineUser:
    return EngineUser("me", os.geteuid(), os.getegid(), frozenset(os.getgroups()))


def test_read_process_describes_this_process() -> None:
    info = procfs.read_process(os.getpid())
    assert info is not None
    assert (info.ppid, info.pgid, info.sid) == (os.getppid(), os.getpgrp(), os.getsid(0))
    assert info.uid == os.geteuid()
    assert procfs.is_alive(info)
    assert "pytest" in " ".join(procfs.cmdline(os.getpid()))


def test_a_recycled_pid_is_neither_alive_nor_signalled() -> None:
    info = procfs.read_process(os.getpid())
    assert info is not None
    impostor = dataclasses.replace(info, start_time=info.start_time + 1)
    assert not procfs.is_alive(impostor)
    # Signal 0 would succeed on the real process; the start time mismatch must stop it.
    assert procfs.send_signal(impostor, 0) is False
    assert procfs.send_signal(info, 0) is True


def test_refers_to_matches_the_directory_but_not_a_sibling_with_its_prefix() -> None:
    directory = "/var/lib/coffer/instances/abc"
    assert procfs.refers_to("--datadir=/var/lib/coffer/instances/abc/data", directory)
    assert procfs.refers_to("/var/lib/coffer/instances/abc", directory)
    assert not procfs.refers_to("/var/lib/coffer/instances/abcdef/data", directory)
    assert not procfs.refers_to("/var/lib/coffer/instances/abc-2", directory)


def test_read_pidfile_parses_pid_and_start_time_and_ignores_junk(tmp_path: Path) -> None:
    pidfile = tmp_path / "x.pid"
    pidfile.write_text("1234 5678\n")
    assert procfs.read_pidfile(pidfile) == (1234, 5678)
    pidfile.write_text("99\n")
    assert procfs.read_pidfile(pidfile) == (99, None)
    pidfile.write_text("garbage")
    assert procfs.read_pidfile(pidfile) is None
    assert procfs.read_pidfile(tmp_path / "missing.pid") is None
    link = tmp_path / "link.pid"
    link.symlink_to(pidfile.with_name("target"))
    (tmp_path / "target").write_text("42\n")
    assert procfs.read_pidfile(link) is None  # never followed


def test_write_file_atomic_replaces_a_planted_symlink_instead_of_following_it(
    tmp_path: Path, me: EngineUser
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    directory = tmp_path / "instance"
    directory.mkdir()
    (directory / "guest.json").symlink_to(victim)
    with open_dir(directory) as dir_fd:
        write_file_atomic(dir_fd, "guest.json", b'{"a": 1}', me, 0o600)
    assert victim.read_text() == "precious"
    written = directory / "guest.json"
    assert not written.is_symlink()
    assert json.loads(written.read_text()) == {"a": 1}
    assert stat.S_IMODE(written.stat().st_mode) == 0o600
    assert [p.name for p in directory.iterdir()] == ["guest.json"]  # no temporary file left


def test_log_opening_refuses_symlinks(tmp_path: Path, me: EngineUser) -> None:
    directory = tmp_path / "instance"
    (directory / "log").mkdir(parents=True)
    (directory / "log" / "supervisor.log").symlink_to(tmp_path / "elsewhere")
    with open_dir(directory) as dir_fd, pytest.raises(OSError):
        open_log_for_append(dir_fd, "log", "supervisor.log", me)
    assert not (tmp_path / "elsewhere").exists()
    os.unlink(directory / "log" / "supervisor.log")
    os.rmdir(directory / "log")
    os.symlink(tmp_path, directory / "log")
    with open_dir(directory) as dir_fd, pytest.raises(ComputeError, match="not a usable"):
        open_log_for_append(dir_fd, "log", "supervisor.log", me)


def test_engine_user_must_exist_and_must_not_be_root() -> None:
    with pytest.raises(ComputeError, match="useradd"):
        EngineUser.resolve("no-such-user-coffer-test")
    if os.geteuid() == 0:
        with pytest.raises(ComputeError, match="never run as root"):
            EngineUser.resolve("root")


def test_unreachable_part_finds_the_closed_directory() -> None:
    outsider = EngineUser("outsider", 65534, 65534, frozenset({65534}))
    # Under /tmp itself: pytest's own temporary directories are private to their user.
    base = Path(tempfile.mkdtemp(prefix="coffer-reach-", dir="/tmp"))
    try:
        base.chmod(0o755)
        closed = base / "closed"
        (closed / "inner").mkdir(parents=True, mode=0o755)
        target = closed / "inner" / "file"
        target.write_text("x")
        target.chmod(0o644)
        closed.chmod(0o700)
        assert outsider.unreachable_part(target) == closed
        closed.chmod(0o711)
        assert outsider.unreachable_part(target) is None
        assert outsider.unreachable_part(target, execute=True) == target
        assert outsider.unreachable_part(closed) is None
    finally:
        shutil.rmtree(base)


def test_disk_usage_counts_hard_links_once(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "big").write_bytes(os.urandom(1 << 20))
    before = disk_usage(data)
    assert before >= 1 << 20
    os.link(data / "big", data / "big-again")
    assert disk_usage(data) - before < 4096


def test_supervisor_config_round_trips_and_rejects_bad_fields() -> None:
    config = SupervisorConfig("inst-a", ["agent", "--config", "/x/guest.json"], backoff_max=4.0)
    assert SupervisorConfig.from_json(config.to_json()) == config
    with pytest.raises(ValueError, match="agent_argv"):
        SupervisorConfig.from_json('{"instance_id": "a", "agent_argv": []}')
    with pytest.raises(ValueError, match="backoff_max"):
        SupervisorConfig.from_json('{"instance_id": "a", "agent_argv": ["x"], "backoff_max": "1"}')


def test_backoff_doubles_up_to_the_cap() -> None:
    delays = [0.5]
    for _ in range(6):
        delays.append(next_backoff(delays[-1], 10.0))
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]


def test_memory_limit_leaves_headroom_above_the_flavor_ram() -> None:
    assert memory_limit_bytes(1024) == (1024 + 256 + 128) * 1024 * 1024
    assert memory_limit_bytes(512) > 512 * 1024 * 1024


def test_cgroups_are_skipped_where_the_host_has_none(tmp_path: Path) -> None:
    cgroups = MemoryCgroups(root=tmp_path)
    assert not cgroups.available()
    assert cgroups.setup("inst-a", 512) is None
    assert not (tmp_path / "coffer").exists()
    cgroups.remove("inst-a")  # nothing there: fine
