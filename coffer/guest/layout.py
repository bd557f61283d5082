"""The directory layout of one instance's volume, shared by the compute driver and the guest."""

from __future__ import annotations

import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from coffer.errors import ValidationError

# Engines and the agent run as the owner; nobody else needs to look inside. The secrets
# directory is tighter still because it holds the engine's admin password.
_DIR_MODE = 0o750
_SECRETS_MODE = 0o700


def lookup_user(name: str) -> pwd.struct_passwd:
    """The passwd entry of OS user ``name``; ValidationError if there is no such user."""
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise ValidationError(
            f"The OS user {name!r} does not exist; create it (for example with "
            f"'useradd --system --no-create-home --shell /usr/sbin/nologin {name}') or "
            "configure another engine user."
        ) from None


def chown_to(path: Path, owner: str | None) -> None:
    """Give ``path`` to OS user ``owner`` (and its primary group); no-op when ``owner`` is None.

    Only root can give files away, so when we are not root ``owner`` must be ourselves.
    """
    if owner is None:
        return
    entry = lookup_user(owner)
    if os.geteuid() != 0:
        if entry.pw_uid != os.geteuid():
            raise ValidationError(
                f"Cannot give {path} to OS user {owner!r}: only root can change file owners."
            )
        return
    os.chown(path, entry.pw_uid, entry.pw_gid, follow_symlinks=False)


@dataclass(frozen=True)
class InstanceLayout:
    """One instance's volume: a root directory with fixed subdirectories.

    ``root/data`` holds the engine's data files, ``etc`` its configuration, ``run`` sockets and
    the pid file, ``log`` its logs and ``secrets`` the credentials the agent uses (mode 0700).
    ``guest.json`` is written by the compute driver (mode 0600) before the agent starts.
    """

    root: Path

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def etc_dir(self) -> Path:
        return self.root / "etc"

    @property
    def run_dir(self) -> Path:
        return self.root / "run"

    @property
    def log_dir(self) -> Path:
        return self.root / "log"

    @property
    def secrets_dir(self) -> Path:
        return self.root / "secrets"

    @property
    def guest_config(self) -> Path:
        return self.root / "guest.json"

    def create(self, owner: str | None) -> None:
        """Create the root and every subdirectory, owned by OS user ``owner`` when given.

        Idempotent: existing directories are kept and their owner and mode are set again, so a
        half-made layout is completed. ``owner`` None leaves files owned by the current user.
        Raises ValidationError for an unknown owner or when a non-root caller names another user.
        """
        if owner is not None:
            lookup_user(owner)  # fail before creating anything
        self.root.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        chown_to(self.root, owner)
        for directory, mode in (
            (self.data_dir, _DIR_MODE),
            (self.etc_dir, _DIR_MODE),
            (self.run_dir, _DIR_MODE),
            (self.log_dir, _DIR_MODE),
            (self.secrets_dir, _SECRETS_MODE),
        ):
            directory.mkdir(mode=mode, exist_ok=True)
            # mkdir's mode is filtered by the umask; set it exactly.
            directory.chmod(mode)
            chown_to(directory, owner)


def write_private_file(path: Path, content: str, owner: str | None, mode: int = 0o600) -> None:
    """Write ``content`` to ``path`` atomically, created with ``mode`` and given to ``owner``.

    The file is born with its final mode (never briefly world-readable), so it is safe for
    secrets. The parent directory must exist.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(content)
        os.chmod(tmp, mode)
        chown_to(tmp, owner)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
