"""Reading and signalling processes through Linux ``/proc``.

Stdlib only: the instance supervisor imports this module and must start with nothing but the
Python standard library. A process is identified by ``(pid, start time)`` so that a recycled pid
is never mistaken for the process we recorded, and signals go through a pidfd when the kernel
has them, so the process we checked is the process we signal.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PROC = Path("/proc")


@dataclass(frozen=True)
class ProcessInfo:
    """One snapshot of a process's ``/proc/<pid>/stat`` line (and owner)."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    state: str
    #: Clock ticks since boot when the process started: with ``pid`` this names one process.
    start_time: int
    uid: int

    @property
    def is_zombie(self) -> bool:
        return self.state in ("Z", "X")


def read_process(pid: int) -> ProcessInfo | None:
    """The process with this pid, or None if there is none (or it is already gone)."""
    try:
        with open(PROC / str(pid) / "stat", "rb") as handle:
            raw = handle.read().decode("utf-8", "replace")
        uid = os.stat(PROC / str(pid)).st_uid
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) is in parentheses and may itself contain spaces or ')'.
    fields = raw[raw.rfind(")") + 2 :].split()
    try:
        return ProcessInfo(
            pid=pid,
            state=fields[0],
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            sid=int(fields[3]),
            start_time=int(fields[19]),
            uid=uid,
        )
    except (IndexError, ValueError):
        return None


def all_processes() -> list[ProcessInfo]:
    """Every process visible in /proc (zombies included; callers decide what to do with them)."""
    result = []
    for entry in os.listdir(PROC):
        if entry.isdigit():
            info = read_process(int(entry))
            if info is not None:
                result.append(info)
    return result


def is_alive(proc: ProcessInfo) -> bool:
    """True while the very process in ``proc`` exists and has not exited (zombies are dead)."""
    now = read_process(proc.pid)
    return now is not None and now.start_time == proc.start_time and not now.is_zombie


def cmdline(pid: int) -> list[str]:
    """The argument vector of ``pid`` (empty for kernel threads, zombies and vanished pids)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode("utf-8", "replace") for part in raw.split(b"\0") if part]


def environ_has(pid: int, name: str, value: str) -> bool:
    """True if ``pid`` was started with ``name=value`` in its environment."""
    try:
        raw = (PROC / str(pid) / "environ").read_bytes()
    except OSError:
        return False
    wanted = f"{name}={value}".encode()
    return wanted in raw.split(b"\0")


def cwd(pid: int) -> str | None:
    try:
        return os.readlink(PROC / str(pid) / "cwd")
    except OSError:
        return None


def refers_to(text: str, directory: str) -> bool:
    """True if ``text`` names ``directory`` or a path inside it (not a sibling sharing a prefix)."""
    start = text.find(directory)
    while start >= 0:
        end = start + len(directory)
        if end == len(text) or not (text[end].isalnum() or text[end] in "._-"):
            return True
        start = text.find(directory, start + 1)
    return False


def descendants(root_pid: int, processes: Iterable[ProcessInfo] | None = None) -> list[ProcessInfo]:
    """Every live process below ``root_pid`` in the parent tree (not ``root_pid`` itself)."""
    procs = list(all_processes() if processes is None else processes)
    children: dict[int, list[ProcessInfo]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    found: list[ProcessInfo] = []
    stack = [root_pid]
    while stack:
        for child in children.get(stack.pop(), []):
            if child.pid != root_pid and not child.is_zombie:
                found.append(child)
                stack.append(child.pid)
    return found


def send_signal(proc: ProcessInfo, signum: int) -> bool:
    """Send ``signum`` to exactly the process in ``proc``; False if it no longer exists.

    With a pidfd, the start time is re-checked after the pidfd is open, so a pid recycled in
    between can never receive the signal.
    """
    pidfd_open = getattr(os, "pidfd_open", None)
    send = getattr(signal, "pidfd_send_signal", None)
    if pidfd_open is not None and send is not None:
        try:
            fd = pidfd_open(proc.pid)
        except ProcessLookupError:
            return False
        except OSError:
            fd = -1  # pidfds not supported by this kernel: fall back below
        if fd >= 0:
            try:
                if not is_alive(proc):
                    return False
                send(fd, signum)
                return True
            except ProcessLookupError:
                return False
            finally:
                os.close(fd)
    if not is_alive(proc):
        return False
    try:
        os.kill(proc.pid, signum)
    except ProcessLookupError:
        return False
    return True


def wait_gone(
    procs: Iterable[ProcessInfo], timeout: float, interval: float = 0.05
) -> list[ProcessInfo]:
    """Wait up to ``timeout`` seconds for every process to exit; return those still alive."""
    remaining = [proc for proc in procs if is_alive(proc)]
    deadline = time.monotonic() + timeout
    while remaining and time.monotonic() < deadline:
        time.sleep(interval)
        remaining = [proc for proc in remaining if is_alive(proc)]
    return remaining


def read_pidfile(path: Path) -> tuple[int, int | None] | None:
    """``(pid, start time or None)`` from a pidfile, or None if it is missing or unreadable.

    Never follows a symlink: the file may sit in a directory the engine user controls.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    with contextlib.closing(os.fdopen(fd, "rb")) as handle:
        words = handle.read(64).decode("ascii", "replace").split()
    if not words or not words[0].isdigit() or int(words[0]) <= 0:
        return None
    start = int(words[1]) if len(words) > 1 and words[1].isdigit() else None
    return int(words[0]), start
