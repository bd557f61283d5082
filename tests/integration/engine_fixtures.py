"""What the engine fixture modules (``mariadb_fixtures``, ``postgresql_fixtures``,
``redis_fixtures``) share: a free loopback address for an engine's port, a temporary instance
root the engine user can reach, and finding and killing an instance's engine processes by PID.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


def free_loopback_address(prefix: str, port: int, avoid: tuple[int, ...] = ()) -> str:
    """An address ``<prefix>.N`` (N not in ``avoid``) on which nothing listens on ``port`` yet."""
    for _ in range(50):
        last = random.randint(2, 254)
        if last in avoid:
            continue
        address = f"{prefix}.{last}"
        with socket.socket() as probe:
            try:
                probe.bind((address, port))
            except OSError:
                continue
            return address
    raise RuntimeError(f"no free address in {prefix}.0/24 for port {port}")


@contextlib.contextmanager
def instance_root(prefix: str) -> Iterator[Path]:
    """A fresh directory the engine user can reach (pytest's own tmp dirs are root-only)."""
    base = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        base.chmod(0o711)
        yield base / "instance"
    finally:
        shutil.rmtree(base, ignore_errors=True)


def live_processes() -> Iterator[tuple[int, int, list[bytes]]]:
    """(pid, parent pid, argv) of every live process."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if fields[0] not in ("Z", "X"):
            yield int(entry.name), int(fields[1]), args


def engine_pids(marker: str) -> list[int]:
    """PIDs of live processes whose argv contains ``marker`` (an instance's config path)."""
    return [pid for pid, _, args in live_processes() if marker.encode() in args]


def engine_tree(marker: str) -> list[int]:
    """The processes carrying ``marker`` and their children (backends, forked saves...)."""
    processes = list(live_processes())
    tree = {pid for pid, _, args in processes if marker.encode() in args}
    tree |= {pid for pid, parent, _ in processes if parent in tree}
    return sorted(tree)


def kill_engines(marker: str) -> None:
    """SIGKILL whatever is left of this instance's engine after ``stop()``, and wait for it."""
    for pid in engine_tree(marker):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while engine_tree(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
