"""File-system helpers for the local driver: the engine user, and safe writes into its directories.

When Coffer runs as root, an instance's directory belongs to the unprivileged engine user, who
could swap a file in it for a symlink to, say, ``/etc/shadow``. So everything root writes there
goes through a directory file descriptor with ``O_NOFOLLOW``/``O_EXCL`` and an atomic rename,
never through a path that is resolved twice.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import secrets
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from coffer.errors import ComputeError


@dataclass(frozen=True)
class EngineUser:
    """The OS account instances run as (the current user when Coffer is not root)."""

    name: str
    uid: int
    gid: int
    groups: frozenset[int]

    @property
    def drops_privileges(self) -> bool:
        """True when the control plane must switch to this user to start an instance."""
        return os.geteuid() != self.uid

    @classmethod
    def resolve(cls, name: str) -> EngineUser:
        """Look ``name`` up and check Coffer may run instances as it; ``ComputeError`` if not."""
        try:
            entry = pwd.getpwnam(name)
        except KeyError:
            raise ComputeError(
                f"the engine user {name!r} does not exist; create it with "
                f"'useradd --system --no-create-home --shell /usr/sbin/nologin {name}' "
                "or set [compute] engine_user to an existing unprivileged user"
            ) from None
        if entry.pw_uid == 0:
            raise ComputeError(
                f"the engine user {name!r} is root, and engines never run as root; "
                "set [compute] engine_user to an unprivileged user such as 'coffer'"
            )
        if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
            raise ComputeError(
                f"running instances as {name!r} needs root; run Coffer as root or leave "
                "[compute] engine_user unset to run them as the current user"
            )
        groups = {entry.pw_gid}
        with contextlib.suppress(KeyError, OSError):
            groups.update(os.getgrouplist(name, entry.pw_gid))
        return cls(name=name, uid=entry.pw_uid, gid=entry.pw_gid, groups=frozenset(groups))

    def may(self, path: Path, want: int) -> bool:
        """Whether this user has the ``want`` bits (``os.R_OK|os.X_OK``...) on ``path`` itself."""
        try:
            st = os.stat(path)
        except OSError:
            return False
        if self.uid == st.st_uid:
            bits = (st.st_mode >> 6) & 7
        elif st.st_gid in self.groups:
            bits = (st.st_mode >> 3) & 7
        else:
            bits = st.st_mode & 7
        return bits & want == want

    def unreachable_part(self, path: Path, *, execute: bool = False) -> Path | None:
        """The first directory on the way to ``path`` this user cannot enter, or ``path`` itself
        if the user cannot read (with ``execute``: run; for a directory: enter) it; None when
        all is reachable."""
        given = Path(os.path.abspath(path))
        real = Path(os.path.realpath(path))
        # Both ways matter: the directories the user walks to reach a symlink, and those on
        # the way to what it points at.
        for chain in (given.parents, real.parents):
            for parent in reversed(chain):
                if not self.may(parent, os.X_OK):
                    return parent
        want = os.X_OK if execute or real.is_dir() else os.R_OK
        return None if self.may(real, want) else real


def ensure_shared_dir(path: Path, traversable: bool) -> None:
    """Create a control-plane directory (state dir, ``instances/``) owned by us.

    With ``traversable`` (Coffer is root, engines are not) others get search permission, 0711,
    so the engine user can reach its own instance directory but list nothing.
    """
    mode = 0o711 if traversable else 0o700
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise ComputeError(f"{path} must be a directory; move the file away and retry")
    if traversable and st.st_mode & 0o001 == 0:
        # Search-only for others: the engine user must pass through, not list or write.
        os.chmod(path, stat.S_IMODE(st.st_mode) | 0o011)  # noqa: S103


@contextlib.contextmanager
def open_dir(path: Path, dir_fd: int | None = None) -> Iterator[int]:
    """A file descriptor of the directory ``path``; fails rather than follow a symlink."""
    try:
        fd = os.open(
            path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd
        )
    except OSError as exc:
        raise ComputeError(
            f"{path} is not a usable directory ({exc.strerror}); remove it if it is a leftover"
        ) from exc
    try:
        yield fd
    finally:
        os.close(fd)


def make_owned_dir(name: str, dir_fd: int, user: EngineUser, mode: int = 0o700) -> None:
    """Create directory ``name`` in ``dir_fd``, owned by ``user`` with ``mode``; fine if it exists.

    Ownership and mode are set through a descriptor opened with ``O_NOFOLLOW``, so a symlink
    planted in its place fails the call instead of redirecting the change.
    """
    with contextlib.suppress(FileExistsError):
        os.mkdir(name, mode, dir_fd=dir_fd)
    with open_dir(Path(name), dir_fd=dir_fd) as fd:
        st = os.fstat(fd)
        if (st.st_uid, st.st_gid) != (user.uid, user.gid):
            os.fchown(fd, user.uid, user.gid)
        if stat.S_IMODE(st.st_mode) != mode:
            os.fchmod(fd, mode)


def write_file_atomic(
    dir_fd: int, name: str, data: bytes, user: EngineUser, mode: int = 0o600
) -> None:
    """Replace ``name`` in the directory ``dir_fd`` with ``data``, owned by ``user``, ``mode``.

    A fresh, exclusively created temporary file is filled and renamed over ``name``, so a reader
    sees the old or the new content, and a symlink planted at ``name`` is replaced, not followed.
    """
    tmp = f".{name}.{secrets.token_hex(8)}"
    fd = os.open(
        tmp,
        os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
        0o600,
        dir_fd=dir_fd,
    )
    try:
        with os.fdopen(fd, "wb", closefd=False) as handle:
            if os.geteuid() != user.uid:
                os.fchown(fd, user.uid, user.gid)
            os.fchmod(fd, mode)
            handle.write(data)
            handle.flush()
            os.fsync(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise
    finally:
        os.close(fd)


def open_log_for_append(dir_fd: int, subdir: str, name: str, user: EngineUser) -> int:
    """An ``O_APPEND`` descriptor on ``subdir/name`` owned by ``user``, opened without following
    any symlink and refusing a hard link to somebody else's file."""
    with open_dir(Path(subdir), dir_fd=dir_fd) as sub_fd:
        fd = os.open(
            name,
            os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=sub_fd,
        )
    st = os.fstat(fd)
    if (
        not stat.S_ISREG(st.st_mode)
        or st.st_nlink != 1
        or st.st_uid not in (user.uid, os.geteuid())
    ):
        os.close(fd)
        raise ComputeError(
            f"{subdir}/{name} in the instance directory is not a plain log file; "
            "remove it and retry"
        )
    if st.st_uid != user.uid:
        os.fchown(fd, user.uid, user.gid)
    return fd


def disk_usage(path: Path) -> int:
    """Bytes on disk under ``path``, like ``du``: hard links counted once, symlinks not followed."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, dirs, files in os.walk(path, followlinks=False):
        for name in (*dirs, *files, "."):
            with contextlib.suppress(OSError):
                st = os.lstat(os.path.join(root, name))
                key = (st.st_dev, st.st_ino)
                if key not in seen:
                    seen.add(key)
                    total += st.st_blocks * 512
    return total
