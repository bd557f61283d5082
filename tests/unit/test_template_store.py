"""TemplateStore: building a template once, publishing it atomically, copying it (no engines).

The store is engine-neutral, so these tests build "templates" of plain files; the MariaDB ones
are exercised with a real mariadbd in tests/integration/test_templates.py.
"""

from __future__ import annotations

import json
import shutil
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from coffer.compute.local import LocalCompute
from coffer.config import load_settings
from coffer.errors import ComputeError, ValidationError
from coffer.guest.datastores.template import (
    MARKER,
    TREE,
    TemplateBusy,
    TemplateError,
    TemplateStore,
)

KEYS = ("pg", "15.4", "abc123")


def fill(tree: Path, marker: str = "built") -> None:
    """A small data directory: nested files with distinct modes."""
    (tree / "base").mkdir(mode=0o700)
    (tree / "base" / "1").write_text(marker)
    (tree / "PG_VERSION").write_text("15\n")
    (tree / "PG_VERSION").chmod(0o600)
    (tree / "conf").write_text("x" * 100_000)
    (tree / "conf").chmod(0o640)


class CountingBuilder:
    """A build callback that counts its calls and can be slowed down to widen a race."""

    def __init__(self, delay: float = 0.0) -> None:
        self.calls = 0
        self.delay = delay
        self._lock = threading.Lock()

    def __call__(self, tree: Path, scratch: Path) -> None:
        with self._lock:
            self.calls += 1
        assert scratch.is_dir() and not any(tree.iterdir())
        time.sleep(self.delay)
        fill(tree)


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


def tree_digest(root: Path) -> dict[str, tuple[int, bytes]]:
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), content)
    return found


# -- naming -------------------------------------------------------------------------------------


def test_path_for_joins_the_keys_and_refuses_unsafe_parts(store: TemplateStore) -> None:
    assert store.path_for(*KEYS) == store.root / "pg-15.4-abc123"
    for bad in ("", "../x", "a/b", ".hidden", "x" * 65, "sp ace"):
        with pytest.raises(ValidationError, match="letters, digits"):
            store.path_for("pg", bad, "v")
    with pytest.raises(ValidationError, match="absolute"):
        TemplateStore(Path("relative/templates"))


# -- building once --------------------------------------------------------------------------------


def test_the_first_get_builds_and_publishes_later_ones_reuse(store: TemplateStore) -> None:
    assert store.lookup(*KEYS) is None
    builder = CountingBuilder()
    path = store.get_or_build(*KEYS, builder)
    assert path == store.path_for(*KEYS)
    assert store.lookup(*KEYS) == path
    assert (path / TREE / "base" / "1").read_text() == "built"
    assert json.loads((path / MARKER).read_text())["name"] == path.name
    assert store.get_or_build(*KEYS, builder) == path
    assert builder.calls == 1
    # The build's scratch space and staging directory are gone; only the lock file remains.
    assert sorted(p.name for p in store.root.iterdir()) == [f".{path.name}.lock", path.name]
    assert stat.S_IMODE(store.root.stat().st_mode) == 0o700


def test_racing_threads_build_the_template_once(store: TemplateStore) -> None:
    builder = CountingBuilder(delay=0.3)
    results: list[Path] = []
    errors: list[BaseException] = []

    def first_instance() -> None:
        try:
            results.append(store.get_or_build(*KEYS, builder))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=first_instance) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert not errors
    assert builder.calls == 1
    assert results == [store.path_for(*KEYS)] * 4


def test_a_waiter_gives_up_with_template_busy(store: TemplateStore) -> None:
    holding, release = threading.Event(), threading.Event()

    def slow_builder() -> None:
        with store.acquire(*KEYS) as build:
            holding.set()
            release.wait(10)
            fill(build.tree)
            build.publish()

    thread = threading.Thread(target=slow_builder)
    thread.start()
    try:
        assert holding.wait(5)
        with pytest.raises(TemplateBusy, match="building elsewhere"):
            store.get_or_build(*KEYS, CountingBuilder(), timeout=0.2)
    finally:
        release.set()
        thread.join(10)
    assert store.lookup(*KEYS) is not None


def test_a_failed_build_publishes_nothing_and_the_next_one_retries(store: TemplateStore) -> None:
    def broken(tree: Path, scratch: Path) -> None:
        (tree / "half").write_text("written before the failure")
        raise RuntimeError("init tool crashed")

    with pytest.raises(RuntimeError, match="crashed"):
        store.get_or_build(*KEYS, broken)
    assert store.lookup(*KEYS) is None
    assert not list(store.root.glob(".build-*"))
    builder = CountingBuilder()
    store.get_or_build(*KEYS, builder)
    assert builder.calls == 1


def test_an_empty_build_is_not_published(store: TemplateStore) -> None:
    with pytest.raises(TemplateError, match="produced no files"):
        store.get_or_build(*KEYS, lambda tree, scratch: None)
    assert store.lookup(*KEYS) is None


# -- incomplete and foreign templates --------------------------------------------------------------


def test_a_directory_without_its_marker_is_ignored_and_rebuilt(store: TemplateStore) -> None:
    partial = store.path_for(*KEYS)
    (partial / TREE).mkdir(parents=True)
    (partial / TREE / "torn-file").write_text("half a data directory")
    dead_build = store.root / f".build-{partial.name}-0123456789ab"
    dead_build.mkdir()
    assert store.lookup(*KEYS) is None
    builder = CountingBuilder()
    assert store.get_or_build(*KEYS, builder) == partial
    assert builder.calls == 1
    assert not (partial / TREE / "torn-file").exists()
    assert (partial / TREE / "PG_VERSION").is_file()
    assert not dead_build.exists()
    assert not list(store.root.glob(".trash-*"))


@pytest.mark.parametrize(
    "marker",
    [
        "",
        "{not json",
        json.dumps({"format": 1, "name": "pg-14.0-abc123"}),  # copied from another version
        json.dumps({"format": 999, "name": "pg-15.4-abc123"}),  # a newer store layout
    ],
)
def test_a_marker_that_does_not_match_is_not_a_template(store: TemplateStore, marker: str) -> None:
    path = store.path_for(*KEYS)
    (path / TREE).mkdir(parents=True)
    (path / MARKER).write_text(marker)
    assert store.lookup(*KEYS) is None
    with pytest.raises(TemplateError, match="not a complete template"):
        store.copy_into(path, store.root.parent / "dest")


def test_a_template_of_another_version_or_variant_is_never_returned(store: TemplateStore) -> None:
    store.get_or_build("pg", "14.0", "abc123", CountingBuilder())
    store.get_or_build("pg", "15.4", "other0", CountingBuilder())
    assert store.lookup(*KEYS) is None
    builder = CountingBuilder()
    assert store.get_or_build(*KEYS, builder).name == "pg-15.4-abc123"
    assert builder.calls == 1


# -- copying ---------------------------------------------------------------------------------------


def test_copy_into_an_empty_dir_keeps_its_mode_and_the_files_modes(
    store: TemplateStore, tmp_path: Path
) -> None:
    template = store.get_or_build(*KEYS, CountingBuilder())
    before = tree_digest(template)
    dest = tmp_path / "instance" / "data"
    dest.mkdir(parents=True, mode=0o750)
    dest.chmod(0o750)
    store.copy_into(template, dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert tree_digest(dest) == tree_digest(template / TREE)
    assert stat.S_IMODE((dest / "conf").stat().st_mode) == 0o640
    # The copy is independent: changing it leaves the template alone.
    (dest / "base" / "1").write_text("tenant data")
    (dest / "new-table").write_text("tenant data")
    assert tree_digest(template) == before
    assert not list(dest.parent.glob(".data.copy-*"))


def test_copy_into_a_missing_dest_creates_it(store: TemplateStore, tmp_path: Path) -> None:
    template = store.get_or_build(*KEYS, CountingBuilder())
    dest = tmp_path / "fresh"
    store.copy_into(template, dest)
    assert (dest / "PG_VERSION").read_text() == "15\n"


def test_copy_into_refuses_a_non_empty_dest_and_clears_a_crashed_copy(
    store: TemplateStore, tmp_path: Path
) -> None:
    template = store.get_or_build(*KEYS, CountingBuilder())
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "precious").write_text("keep me")
    with pytest.raises(TemplateError, match="not an empty directory"):
        store.copy_into(template, dest)
    assert (dest / "precious").read_text() == "keep me"
    (dest / "precious").unlink()
    crashed = tmp_path / ".data.copy-0123456789ab"
    crashed.mkdir()
    store.copy_into(template, dest)
    assert not crashed.exists()
    assert (dest / "base" / "1").is_file()


# -- the local compute driver's shared directory --------------------------------------------------


@pytest.fixture
def reachable_dir() -> Iterator[Path]:
    """A directory the engine user can traverse (pytest's tmp dirs are private to root)."""
    base = Path(tempfile.mkdtemp(prefix="coffer-templates-", dir="/tmp"))
    base.chmod(0o711)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def test_local_compute_gives_the_templates_dir_to_the_engine_user(reachable_dir: Path) -> None:
    state = reachable_dir / "state"
    driver = LocalCompute(
        load_settings(environ={}, overrides={"DEFAULT": {"state_dir": str(state)}}),
        supervisor_python=sys.executable,
    )
    (state / "templates").mkdir(parents=True, mode=0o755)  # wrong mode and owner: repaired
    driver._prepare_shared_dirs(driver.engine_user)
    info = (state / "templates").stat()
    assert driver.templates_dir == state / "templates"
    assert (info.st_uid, info.st_gid) == (driver.engine_user.uid, driver.engine_user.gid)
    assert stat.S_IMODE(info.st_mode) == 0o700
    # A symlink planted in its place is refused, not followed.
    shutil.rmtree(state / "templates")
    (state / "templates").symlink_to(reachable_dir)
    with pytest.raises(ComputeError, match="not a usable directory"):
        driver._prepare_shared_dirs(driver.engine_user)
