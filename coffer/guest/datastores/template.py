"""Pre-initialised data directories ("templates") shared by the instances of one host.

Initialising a data directory (``mariadb-install-db``, ``initdb``) dominates provisioning: it
creates hundreds of files and runs the engine once in bootstrap mode. Every instance of one
engine version initialised with the same settings gets the same files, so the first instance
builds them once into a ``TemplateStore`` and every later one copies them (reflinked where the
file system can) and starts the copy. The engine itself must give each copy its own secrets at
first start; a template holds nothing secret or instance-specific (each datastore documents
what it checked).

Layout of the store (its root is ``EngineSpec.template_dir``, owned by the engine user, 0700)::

    <engine>-<version>-<variant>/       a published template; never changed once published
        tree/                           the data directory to copy
        template.json                   the completion marker (engine, version, variant)
    .<engine>-<version>-<variant>.lock  flock(2) taken by whoever builds that template
    .build-<name>-<random>/             a build in progress (or left by a builder that died)
    .spares/<name>/ready-<random>/      a ready copy of the template's tree, taken whole by a
                                        create (``take_spare``); ``making-<random>/`` while
                                        one is made (``make_spares``)
    .spares/.<name>.lock                flock(2) taken by whoever makes that template's copies

A template is keyed by engine, engine version and a *variant*: a short digest of everything
that changes what initialisation writes (locale, page size, the init tool's flags). A template
of another version or variant is never used: it has another name, and its marker must agree.

Concurrency: a published template is found without any lock. Building takes an exclusive
``flock`` on the template's lock file, so two first instances (threads or processes) never both
build it; the loser waits and then uses the winner's template. A build happens in a private
directory that is fsynced and renamed into place with its marker, so a template directory
either is complete or is not a template: one without a valid marker (a copy by hand, a crash
of the disk) is ignored and rebuilt. Ready copies follow the same rule: made under a
``making-`` name, flushed, then renamed ``ready-``; a create takes one by renaming it away,
so no two creates ever get the same copy. The store trusts its owner: anyone who can write it can
change what later instances start from, which the engine user can do to instances directly.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import stat
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from coffer.errors import EngineError, ValidationError
from coffer.guest.layout import chown_to, lookup_user

LOG = logging.getLogger(__name__)

MARKER = "template.json"
TREE = "tree"
#: Under the store's root: ready copies of each template (``<name>/ready-*``), see ``spares``.
SPARES_DIR = ".spares"
#: How many ready copies of a template are kept, so the next creates need not copy.
SPARES = 2
#: Bumped when the store's layout changes, so a newer Coffer never trusts an older layout.
FORMAT = 1
_NAME_PART = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
_LOCK_POLL = 0.02
_COPY_ENV = {"PATH": "/usr/bin:/bin", "LC_ALL": "C"}


class TemplateError(EngineError):
    """The template store cannot serve: unusable directory, failed copy. Callers may fall back
    to initialising a data directory by hand, which is always correct, only slower."""


class TemplateBusy(TemplateError):
    """Another process has been building the template for longer than the caller would wait."""

    transient = True


def _check_part(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME_PART.fullmatch(value):
        raise ValidationError(
            f"The template {what} {value!r} must be 1-64 letters, digits, '.', '_', '+' or '-', "
            "starting with a letter or digit."
        )
    return value


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under ``root`` to disk (a published template must not
    turn out half-written after a host crash, since it is never rebuilt once it has a marker)."""
    for directory, _dirs, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(directory, name), os.O_RDONLY | os.O_NOFOLLOW)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(directory))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove_tree(path: Path) -> None:
    """Remove ``path`` without following symlinks; a missing path is fine."""
    with contextlib.suppress(FileNotFoundError):
        if path.is_symlink() or not path.is_dir():
            path.unlink()
        else:
            shutil.rmtree(path)


@dataclass
class TemplateBuild:
    """A held build lock for one template; see ``TemplateStore.acquire``.

    ``existing`` is the template directory if it was complete by the time the lock was taken
    (another builder published it while we waited): use it and build nothing. Otherwise fill
    ``tree`` (an empty directory owned by the store's owner) with the data directory, using
    ``scratch`` for anything else the build needs, and call ``publish``.
    """

    store: TemplateStore
    name: str
    path: Path
    staging: Path
    existing: Path | None
    published: bool = False

    @property
    def tree(self) -> Path:
        return self.staging / TREE

    @property
    def scratch(self) -> Path:
        return self.staging / "scratch"

    def publish(self) -> Path:
        """Make the built tree the template: flush it, write the marker, rename it into place.

        Returns the template directory. Raises TemplateError if the tree is empty (a build that
        produced nothing must not become a template others copy).
        """
        if self.existing is not None:
            raise TemplateError(
                f"The template {self.name} already exists; there is nothing to publish."
            )
        if not self.tree.is_dir() or not any(self.tree.iterdir()):
            raise TemplateError(
                f"The build of template {self.name} produced no files; it was not published."
            )
        try:
            _remove_tree(self.scratch)
            _fsync_tree(self.tree)
            marker = json.dumps(self.store.marker_for(self.name), sort_keys=True)
            marker_path = self.staging / MARKER
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            fd = os.open(marker_path, flags, 0o600)
            try:
                os.write(fd, marker.encode())
                os.fsync(fd)
            finally:
                os.close(fd)
            chown_to(marker_path, self.store.owner)
            _fsync_dir(self.staging)
            os.rename(self.staging, self.path)
            _fsync_dir(self.store.root)
        except OSError as exc:
            raise TemplateError(
                f"Publishing template {self.name} failed ({exc.strerror}); it was not published."
            ) from None
        self.published = True
        LOG.info("published template %s", self.name)
        return self.path


class TemplateStore:
    """The templates of one host under ``root``; see the module docstring for the contract.

    ``owner`` is the OS user that owns the store and its files (the engine user) when this
    process runs as root, or None to leave files owned by the current user. The root is
    created (0700) if missing. Methods block only on file I/O, and ``acquire`` also on another
    builder of the same template.
    """

    def __init__(self, root: Path, owner: str | None = None) -> None:
        if not root.is_absolute():
            raise ValidationError(f"The template directory {root} must be an absolute path.")
        if owner is not None:
            lookup_user(owner)
        self.root = root
        self.owner = owner

    # -- naming and finding -------------------------------------------------------------------

    def path_for(self, engine: str, version: str, variant: str) -> Path:
        """The directory of the template for ``engine`` ``version`` ``variant`` (may not exist).

        Raises ValidationError if a part is empty or holds characters other than letters,
        digits, '.', '_', '+' and '-'.
        """
        name = "-".join(
            (
                _check_part(engine, "engine"),
                _check_part(version, "version"),
                _check_part(variant, "variant"),
            )
        )
        return self.root / name

    def marker_for(self, name: str) -> dict[str, object]:
        """The completion marker a template named ``name`` carries."""
        return {"format": FORMAT, "name": name}

    def lookup(self, engine: str, version: str, variant: str) -> Path | None:
        """The complete template for these keys, or None. Takes no lock; never blocks on a
        builder. A directory without a valid marker is not a template and gives None."""
        path = self.path_for(engine, version, variant)
        return path if self._is_complete(path) else None

    def _is_complete(self, path: Path) -> bool:
        try:
            with open(path / MARKER, "rb") as handle:
                marker = json.loads(handle.read(4096))
        except (OSError, ValueError):
            return False
        return marker == self.marker_for(path.name) and (path / TREE).is_dir()

    # -- building -----------------------------------------------------------------------------

    def _ensure_root(self) -> None:
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            info = self.root.lstat()
        except OSError as exc:
            raise TemplateError(
                f"Cannot create the template directory {self.root} ({exc.strerror})."
            ) from None
        if not stat.S_ISDIR(info.st_mode):
            raise TemplateError(f"The template directory {self.root} is not a directory.")
        if self.owner is not None and os.geteuid() == 0:
            chown_to(self.root, self.owner)

    @contextlib.contextmanager
    def _locked(self, name: str, timeout: float) -> Iterator[None]:
        lock_path = self.root / f".{name}.lock"
        try:
            # Read-only is enough for flock, and works whoever created the file.
            fd = os.open(lock_path, os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise TemplateError(
                f"Cannot open the template lock {lock_path} ({exc.strerror})."
            ) from None
        try:
            if self.owner is not None and os.geteuid() == 0:
                entry = lookup_user(self.owner)
                os.fchown(fd, entry.pw_uid, entry.pw_gid)
            deadline = time.monotonic() + timeout
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except OSError as exc:
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                        raise TemplateError(f"Cannot lock {lock_path} ({exc.strerror}).") from None
                if time.monotonic() >= deadline:
                    raise TemplateBusy(
                        f"The template {name} has been building elsewhere for over "
                        f"{timeout:g} s; initialise without it or try again later."
                    )
                time.sleep(_LOCK_POLL)
            yield
        finally:
            os.close(fd)  # releases the flock

    @contextlib.contextmanager
    def acquire(
        self, engine: str, version: str, variant: str, timeout: float = 600
    ) -> Iterator[TemplateBuild]:
        """Hold the build lock of one template; yields a ``TemplateBuild``.

        Waits up to ``timeout`` seconds for another builder (TemplateBusy after that). Under
        the lock, leftovers of builders that died and an incomplete directory in the
        template's place are removed. If the block exits without ``publish`` (or raises), the
        build is discarded. Raises TemplateError if the store cannot be created or locked.
        """
        path = self.path_for(engine, version, variant)
        self._ensure_root()
        with self._locked(path.name, timeout):
            if self._is_complete(path):
                yield TemplateBuild(self, path.name, path, path, existing=path)
                return
            staging = self.root / f".build-{path.name}-{secrets.token_hex(6)}"
            build = TemplateBuild(self, path.name, path, staging, existing=None)
            try:
                try:
                    self._clear_leftovers(path)
                    for directory in (staging, build.tree, build.scratch):
                        directory.mkdir(mode=0o700)
                        chown_to(directory, self.owner)
                except OSError as exc:
                    raise TemplateError(
                        f"Cannot prepare a build of template {path.name} in {self.root} "
                        f"({exc.strerror})."
                    ) from None
                yield build
            finally:
                if not build.published:
                    _remove_tree(staging)

    def _clear_leftovers(self, path: Path) -> None:
        """Remove dead builds of ``path`` and a non-template in its place; the caller holds
        the lock."""
        for entry in self.root.glob(f".build-{path.name}-*"):
            LOG.info("removing the unfinished template build %s", entry.name)
            _remove_tree(entry)
        if path.exists() or path.is_symlink():
            LOG.warning("ignoring %s: it has no valid completion marker; rebuilding it", path)
            # Out of the way first, so the name is free even if removing fails half-way.
            trash = self.root / f".trash-{path.name}-{secrets.token_hex(6)}"
            path.rename(trash)
            _remove_tree(trash)

    def get_or_build(
        self,
        engine: str,
        version: str,
        variant: str,
        build: Callable[[Path, Path], None],
        timeout: float = 600,
    ) -> Path:
        """The template for these keys, built first if there is none.

        ``build(tree, scratch)`` fills the empty directory ``tree`` with the data directory;
        it runs at most once per template across all processes sharing the store, and what it
        raises propagates (nothing is published then). Returns the template directory.
        """
        found = self.lookup(engine, version, variant)
        if found is not None:
            return found
        with self.acquire(engine, version, variant, timeout) as lease:
            if lease.existing is not None:
                return lease.existing
            started = time.monotonic()
            build(lease.tree, lease.scratch)
            path = lease.publish()
            LOG.info("built template %s in %.2f s", path.name, time.monotonic() - started)
            return path

    # -- copying ------------------------------------------------------------------------------

    def copy_into(self, template: Path, dest: Path) -> None:
        """Copy the data directory of ``template`` to ``dest``, all or nothing.

        ``dest`` must be missing or an empty directory; it keeps its owner and mode. The tree
        is copied with ``cp -a --reflink=auto`` (file modes and owners preserved; blocks shared
        on file systems with reflinks, holes kept) to a hidden sibling that is then renamed
        onto ``dest``, so ``dest`` is never seen half-filled; a crash leaves only the sibling,
        which the next copy removes. Raises TemplateError if ``template`` is not a complete
        template, ``dest`` is not empty or is a mount point (rename cannot replace it), or the
        copy fails.
        """
        if not self._is_complete(template):
            raise TemplateError(f"{template} is not a complete template.")
        try:
            self._copy_into(template, dest)
        except OSError as exc:
            raise TemplateError(
                f"Copying template {template.name} to {dest} failed ({exc.strerror})."
            ) from None

    # -- spare copies ------------------------------------------------------------------------

    def spares_dir(self, template: Path) -> Path:
        """Where the ready copies of ``template`` wait (``ready-*``; ``making-*`` while one is
        being made)."""
        return self.root / SPARES_DIR / template.name

    def take_spare(self, template: Path, dest: Path) -> bool:
        """Move a ready copy of ``template`` onto ``dest`` (missing or an empty directory, as
        for ``copy_into``); False when there is none (or it cannot be moved there, e.g. on
        another file system): the caller copies instead. Each copy is taken once: the first
        ``rename`` wins it."""
        spares = self.spares_dir(template)
        if not self._is_complete(template):
            return False
        try:
            ready = sorted(spares.glob("ready-*"))
        except OSError:
            return False
        if not ready:
            return False
        try:
            before = dest.lstat()
        except FileNotFoundError:
            before = None
        if before is not None and (not stat.S_ISDIR(before.st_mode) or any(dest.iterdir())):
            raise TemplateError(
                f"{dest} is not an empty directory; a template is copied only into an empty one."
            )
        for entry in ready:
            temp = dest.parent / f".{dest.name}.copy-{secrets.token_hex(6)}"
            try:
                os.rename(entry, temp)
            except FileNotFoundError:
                continue  # taken by another instance a moment ago
            except OSError as exc:
                LOG.info("cannot take a ready copy of %s (%s); copying", template.name, exc)
                return False
            try:
                if before is not None:
                    copied = temp.lstat()
                    if (copied.st_uid, copied.st_gid) != (before.st_uid, before.st_gid):
                        os.chown(temp, before.st_uid, before.st_gid, follow_symlinks=False)
                    os.chmod(temp, stat.S_IMODE(before.st_mode))
                os.rename(temp, dest)
            except OSError as exc:
                _remove_tree(temp)
                raise TemplateError(
                    f"Cannot move a copy of template {template.name} to {dest} ({exc.strerror})."
                ) from None
            LOG.info("took a ready copy of template %s", template.name)
            return True
        return False

    def make_spares(self, template: Path, count: int = SPARES) -> int:
        """Make ready copies of ``template`` until there are ``count``; returns how many were
        made. Meant for the background, after a create: the copy runs at the lowest CPU
        priority, and a process already making copies of this template is left to it (its
        lock is held; nothing is made here). Each copy is made under a ``making-`` name,
        flushed to disk and only then renamed ``ready-``, so a taken copy is always whole;
        ``making-`` directories left by a process that died are removed under the lock."""
        if count <= 0 or not self._is_complete(template):
            return 0
        spares = self.spares_dir(template)
        try:
            for directory in (spares.parent, spares):
                directory.mkdir(mode=0o700, exist_ok=True)
                chown_to(directory, self.owner)
            fd = os.open(
                spares.parent / f".{template.name}.lock",
                os.O_RDONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                0o600,
            )
        except OSError as exc:
            raise TemplateError(
                f"Cannot prepare ready copies of {template.name} ({exc.strerror})."
            ) from None
        made = 0
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                    return 0
                raise TemplateError(f"Cannot lock the ready copies of {template.name}.") from None
            for leftover in spares.glob("making-*"):
                _remove_tree(leftover)
            while len(list(spares.glob("ready-*"))) < count:
                token = secrets.token_hex(6)
                making = spares / f"making-{token}"
                self._run_copy(template, making, background=True)
                try:
                    _fsync_tree(making)
                    os.rename(making, spares / f"ready-{token}")
                    _fsync_dir(spares)
                except OSError as exc:
                    _remove_tree(making)
                    raise TemplateError(
                        f"Cannot keep a ready copy of {template.name} ({exc.strerror})."
                    ) from None
                made += 1
        finally:
            os.close(fd)
        if made:
            LOG.info(
                "made %d ready cop%s of template %s",
                made,
                "y" if made == 1 else "ies",
                template.name,
            )
        return made

    def _run_copy(self, template: Path, temp: Path, background: bool = False) -> None:
        """``cp -a --reflink=auto`` of ``template``'s tree to ``temp`` (must not exist);
        TemplateError (``temp`` removed) if it fails. ``background``: at the lowest CPU
        priority."""
        argv = ["cp", "-a", "--reflink=auto", "--no-target-directory", str(template / TREE)]
        if background:
            argv = ["nice", "-n", "19", *argv]
        try:
            result = subprocess.run(
                [*argv, str(temp)],
                env=_COPY_ENV,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
            )
        except (OSError, subprocess.SubprocessError) as exc:
            _remove_tree(temp)
            raise TemplateError(f"Copying template {template.name} failed: {exc}.") from None
        if result.returncode != 0:
            _remove_tree(temp)
            detail = " | ".join(result.stderr.strip().splitlines()[-3:])
            raise TemplateError(f"Copying template {template.name} to {temp} failed: {detail}")

    def _copy_into(self, template: Path, dest: Path) -> None:
        try:
            before = dest.lstat()
        except FileNotFoundError:
            before = None
        if before is not None and (not stat.S_ISDIR(before.st_mode) or any(dest.iterdir())):
            raise TemplateError(
                f"{dest} is not an empty directory; a template is copied only into an empty one."
            )
        for leftover in dest.parent.glob(f".{dest.name}.copy-*"):
            _remove_tree(leftover)
        temp = dest.parent / f".{dest.name}.copy-{secrets.token_hex(6)}"
        self._run_copy(template, temp)
        try:
            if before is not None:
                copied = temp.lstat()
                if (copied.st_uid, copied.st_gid) != (before.st_uid, before.st_gid):
                    os.chown(temp, before.st_uid, before.st_gid, follow_symlinks=False)
                os.chmod(temp, stat.S_IMODE(before.st_mode))
            # rename(2) replaces an empty directory atomically (not a mount point: EBUSY).
            os.rename(temp, dest)
        except OSError as exc:
            _remove_tree(temp)
            raise TemplateError(
                f"Cannot move the copy of template {template.name} to {dest} ({exc.strerror})."
            ) from None
