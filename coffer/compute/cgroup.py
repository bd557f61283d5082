"""Best-effort memory limits for local instances through cgroup v2.

Used only where ``/sys/fs/cgroup`` is a writable cgroup v2 hierarchy offering the ``memory``
controller (typically: Coffer runs as root on a systemd host, not in a restricted container).
Anywhere else every call is a no-op and the driver reports the instance as unlimited. The limit
is the flavor's RAM plus headroom for the guest agent and the engine's own overhead.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PARENT = "coffer"
_MB = 1024 * 1024
#: The guest agent (a Python process) and engine bookkeeping live beside the flavor's RAM.
AGENT_HEADROOM_MB = 128


def memory_limit_bytes(ram_mb: int) -> int:
    """``memory.max`` for a flavor with ``ram_mb`` MB: RAM + 25 % + the agent's headroom."""
    return (ram_mb + ram_mb // 4 + AGENT_HEADROOM_MB) * _MB


class MemoryCgroups:
    """Per-instance cgroups ``<root>/coffer/<instance id>`` with ``memory.max`` set."""

    def __init__(self, root: Path = CGROUP_ROOT) -> None:
        self.root = root
        self.parent = root / PARENT

    def available(self) -> bool:
        """True if the host lets us create memory-limited cgroups."""
        try:
            controllers = (self.root / "cgroup.controllers").read_text().split()
        except OSError:
            return False
        return "memory" in controllers and os.access(self.root, os.W_OK)

    def path(self, instance_id: str) -> Path:
        return self.parent / instance_id

    def setup(self, instance_id: str, ram_mb: int) -> Path | None:
        """Create the instance's cgroup with its memory limit; None (logged) if not possible."""
        if not self.available():
            log.info(
                "no writable cgroup v2 memory controller: instance %s has no memory limit",
                instance_id,
            )
            return None
        path = self.path(instance_id)
        try:
            _enable_memory(self.root)
            self.parent.mkdir(exist_ok=True)
            _enable_memory(self.parent)
            path.mkdir(exist_ok=True)
            (path / "memory.max").write_text(f"{memory_limit_bytes(ram_mb)}\n")
        except OSError as exc:
            log.info("cannot set a memory limit for instance %s: %s", instance_id, exc.strerror)
            return None
        return path

    def attach(self, path: Path, pids: Iterable[int]) -> None:
        """Move ``pids`` into the cgroup; their future children are born in it."""
        for pid in pids:
            try:
                (path / "cgroup.procs").write_text(f"{pid}\n")
            except ProcessLookupError:
                continue
            except OSError as exc:
                log.info("cannot move process %d into %s: %s", pid, path, exc.strerror)

    def remove(self, instance_id: str, timeout: float = 5.0) -> None:
        """Kill anything left in the instance's cgroup and remove it; missing is fine."""
        path = self.path(instance_id)
        if not path.is_dir():
            return
        with contextlib.suppress(OSError):
            (path / "cgroup.kill").write_text("1\n")
        deadline = time.monotonic() + timeout
        while True:
            try:
                path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError as exc:
                if time.monotonic() >= deadline:
                    log.warning("cannot remove cgroup %s: %s", path, exc.strerror)
                    return
                time.sleep(0.05)


def _enable_memory(cgroup: Path) -> None:
    control = cgroup / "cgroup.subtree_control"
    if "memory" not in control.read_text().split():
        control.write_text("+memory\n")
