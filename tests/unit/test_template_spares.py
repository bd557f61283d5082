"""Ready copies ("spares") of a template: made in the background, each taken by one create.

Plain-file templates, as in test_template_store.py; the engines take spares in
tests/integration/test_templates.py and test_postgresql_templates.py.
"""

from __future__ import annotations

import fcntl
import os
import stat
import threading
from pathlib import Path

import pytest

from coffer.guest.datastores.template import (
    SPARES,
    TREE,
    TemplateError,
    TemplateStore,
)

KEYS = ("pg", "15.4", "abc123")


def fill(tree: Path, scratch: Path) -> None:
    (tree / "base").mkdir(mode=0o700)
    (tree / "base" / "1").write_text("built")
    (tree / "PG_VERSION").write_text("15\n")
    (tree / "PG_VERSION").chmod(0o600)
    (tree / "conf").write_text("x" * 100_000)
    (tree / "conf").chmod(0o640)


def digest(root: Path) -> dict[str, tuple[int, bytes]]:
    found = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        content = path.read_bytes() if path.is_file() else b""
        found[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), content)
    return found


@pytest.fixture
def store(tmp_path: Path) -> TemplateStore:
    return TemplateStore(tmp_path / "templates")


@pytest.fixture
def template(store: TemplateStore) -> Path:
    return store.get_or_build(*KEYS, fill)


def ready(store: TemplateStore, template: Path) -> list[Path]:
    return sorted(store.spares_dir(template).glob("ready-*"))


def test_make_spares_tops_up_to_the_count_with_whole_copies(
    store: TemplateStore, template: Path
) -> None:
    assert store.make_spares(template) == SPARES
    copies = ready(store, template)
    assert len(copies) == SPARES
    for copy in copies:
        assert digest(copy) == digest(template / TREE)
    assert store.make_spares(template) == 0  # already full
    assert not list(store.spares_dir(template).glob("making-*"))


def test_a_spare_is_moved_into_the_instance_keeping_its_directory_mode(
    store: TemplateStore, template: Path, tmp_path: Path
) -> None:
    store.make_spares(template)
    dest = tmp_path / "instance" / "data"
    dest.mkdir(parents=True)
    dest.chmod(0o750)
    assert store.take_spare(template, dest)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o750
    assert digest(dest) == digest(template / TREE)
    assert len(ready(store, template)) == SPARES - 1
    assert not list(dest.parent.glob(".data.copy-*"))
    # The copy is the instance's own: changing it leaves the template alone.
    before = digest(template / TREE)
    (dest / "base" / "1").write_text("tenant data")
    assert digest(template / TREE) == before
    # Used up, the caller copies instead.
    other = tmp_path / "other"
    store.take_spare(template, other)
    assert not store.take_spare(template, tmp_path / "third")
    assert not (tmp_path / "third").exists()


def test_take_spare_refuses_a_non_empty_dest_and_keeps_the_spare(
    store: TemplateStore, template: Path, tmp_path: Path
) -> None:
    store.make_spares(template, count=1)
    dest = tmp_path / "data"
    dest.mkdir()
    (dest / "tenant-file").write_text("keep me")
    with pytest.raises(TemplateError, match="not an empty directory"):
        store.take_spare(template, dest)
    assert (dest / "tenant-file").read_text() == "keep me"
    assert len(ready(store, template)) == 1


def test_racing_creates_each_get_a_different_spare_or_none(
    store: TemplateStore, template: Path, tmp_path: Path
) -> None:
    store.make_spares(template, count=3)
    spares = {path.name for path in ready(store, template)}
    results: dict[int, bool] = {}
    start = threading.Barrier(8)

    def take(index: int) -> None:
        start.wait()
        results[index] = store.take_spare(template, tmp_path / f"d{index}")

    threads = [threading.Thread(target=take, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [i for i, took in results.items() if took]
    assert len(winners) == len(spares) == 3
    for index in winners:
        assert digest(tmp_path / f"d{index}") == digest(template / TREE)
    assert not ready(store, template)


def test_a_maker_that_died_leaves_nothing_usable_and_is_cleaned_up(
    store: TemplateStore, template: Path
) -> None:
    spares = store.spares_dir(template)
    spares.mkdir(parents=True)
    half = spares / "making-dead"
    half.mkdir()
    (half / "PG_VERSION").write_text("15\n")  # a copy cut short
    assert not store.take_spare(template, spares.parent / "dest")
    assert store.make_spares(template) == SPARES
    assert not half.exists()


def test_while_another_process_makes_spares_nothing_is_made_here(
    store: TemplateStore, template: Path
) -> None:
    store.spares_dir(template).mkdir(parents=True)
    lock = store.spares_dir(template).parent / f".{template.name}.lock"
    fd = os.open(lock, os.O_RDONLY | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        assert store.make_spares(template) == 0
    finally:
        os.close(fd)
    assert store.make_spares(template) == SPARES


def test_no_spares_of_an_incomplete_template(store: TemplateStore, tmp_path: Path) -> None:
    fake = store.root / "pg-15.4-zzz"
    (fake / TREE).mkdir(parents=True)  # no marker: not a template
    assert store.make_spares(fake) == 0
    assert not store.take_spare(fake, tmp_path / "dest")
