"""One behaviour suite for the backup storage contract (``coffer.storage.base.BackupStorage``).

``StorageContract`` holds every test; a driver's subclass provides a fresh, empty storage per
test (``storage`` fixture) whose multipart/segment size is ``PART`` bytes, and says how to see
what that store would leave behind (``leftovers``) and which ETag it gives an object
(``expected_etag``), computed here independently of the driver. The file driver runs it here,
always; the S3 and Swift drivers run it against a real OpenStack Swift in
``tests/integration/test_storage_swift.py``.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from pathlib import Path
from typing import ClassVar

import pytest

from coffer.storage.base import (
    BackupStorage,
    InvalidStorageKey,
    StorageNotFound,
    get_storage,
)
from coffer.storage.file import FileStorage

MIB = 1 << 20
#: The part/segment size every driver under test is configured with.
PART = 5 * MIB
#: Bigger than two parts, so a round trip crosses part boundaries.
BIG = 12 * MIB


def payload(size: int, seed: int = 5) -> bytes:
    return random.Random(seed).randbytes(size)


def chunked(data: bytes, size: int = 256 * 1024) -> Iterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


class SourceBroke(Exception):
    """What a backup pipeline raises mid-stream (say, the engine's tool died)."""


def breaking(data: bytes, after: int) -> Iterator[bytes]:
    """Yields ``data`` but raises once ``after`` bytes have been handed out."""
    sent = 0
    for chunk in chunked(data):
        if sent >= after:
            raise SourceBroke(f"the source broke after {sent} bytes")
        sent += len(chunk)
        yield chunk


class Tripwire:
    """A chunk iterator that records whether anyone read from it."""

    def __init__(self) -> None:
        self.read = False

    def __iter__(self) -> Iterator[bytes]:
        self.read = True
        yield b"must not be stored"


BAD_KEYS = [
    "",
    "/absolute",
    "../escape",
    "a/../../etc/passwd",
    "a//b",
    "trailing/",
    ".hidden",
    "a/.hidden",
    "a/./b",
    "space in name",
    "new\nline",
    "percent%2Fencoded",
    "back\\slash",
    "nul\x00byte",
    "ünïcode",
    "x" * 201,
]

BAD_METADATA: list[dict[str, str]] = [
    {"Upper": "x"},
    {"under_score": "x"},
    {"": "x"},
    {"empty": ""},
    {"padded": " x"},
    {"newline": "a\r\nX-Injected: 1"},
    {"unicode": "é"},
    {f"k{i}": "v" for i in range(33)},
    {"big": "v" * 2000},
]


class StorageContract:
    """Subclass with a ``storage`` fixture, ``leftovers`` and ``expected_etag``."""

    #: Whether the driver records the SHA-256 so that ``stat`` returns it.
    records_sha256: ClassVar[bool] = False
    #: Whether replacing an object frees the parts of the one it replaced (a store's duty
    #: where the store keeps the parts, as S3 does).
    frees_replaced_parts: ClassVar[bool] = True

    @pytest.fixture
    def storage(self) -> Iterator[BackupStorage]:
        raise NotImplementedError

    def leftovers(self, storage: BackupStorage, key: str) -> list[str]:
        """Parts of uploads of ``key`` still held by the store (temporary files, parts)."""
        raise NotImplementedError

    def expected_etag(self, data: bytes) -> str:
        """The ETag this store gives ``data`` uploaded in ``PART``-sized parts."""
        raise NotImplementedError

    # -- round trips ---------------------------------------------------------------------------

    def test_multipart_round_trip_keeps_every_byte(self, storage: BackupStorage) -> None:
        data = payload(BIG)
        stored = storage.put_stream("inst-1/full.xbstream", chunked(data), {"engine": "mariadb"})

        assert stored.key == "inst-1/full.xbstream"
        assert stored.size == BIG
        assert stored.sha256 == hashlib.sha256(data).hexdigest()
        assert stored.etag == self.expected_etag(data)

        chunks = list(storage.get_stream("inst-1/full.xbstream", chunk_size=MIB))
        assert max(len(chunk) for chunk in chunks) <= MIB
        assert hashlib.sha256(b"".join(chunks)).hexdigest() == stored.sha256

        found = storage.stat("inst-1/full.xbstream")
        assert found is not None
        assert (found.size, found.etag) == (BIG, stored.etag)
        if self.records_sha256:
            assert found.sha256 == stored.sha256

    def test_metadata_is_kept(self, storage: BackupStorage) -> None:
        metadata = {
            "engine": "postgresql",
            "backup-id": "7c1e9a52-3b0e-4d61-9f43-0d6f1f8f3a10",
            "lsn": "0/3000060",
            "note": "full backup; zstd -3 | aes-256-gcm",
        }
        stored = storage.put_stream("inst-1/meta", chunked(payload(1000)), metadata)
        assert stored.metadata == metadata
        found = storage.stat("inst-1/meta")
        assert found is not None
        assert found.metadata == metadata

    def test_small_and_empty_objects(self, storage: BackupStorage) -> None:
        assert storage.put_stream("empty", iter([])).size == 0
        assert storage.put_stream("tiny", [b"ab", b"", b"c"]).size == 3

        assert b"".join(storage.get_stream("empty")) == b""
        assert b"".join(storage.get_stream("tiny")) == b"abc"
        empty = storage.stat("empty")
        assert empty is not None and empty.size == 0
        assert [item.key for item in storage.list("")] == ["empty", "tiny"]

    def test_replacing_an_object_swaps_it_whole(self, storage: BackupStorage) -> None:
        first, second = payload(BIG, seed=1), payload(PART + 10, seed=2)
        storage.put_stream("inst-1/b", chunked(first), {"version": "1"})
        storage.put_stream("inst-1/b", chunked(second), {"version": "2"})

        assert b"".join(storage.get_stream("inst-1/b")) == second
        found = storage.stat("inst-1/b")
        assert found is not None
        assert (found.size, found.metadata) == (len(second), {"version": "2"})
        storage.put_stream("inst-1/b", [], {"version": "3"})
        emptied = storage.stat("inst-1/b")
        assert emptied is not None and (emptied.size, emptied.metadata) == (0, {"version": "3"})
        storage.delete("inst-1/b")
        if self.frees_replaced_parts:
            # Deleting the new object would not remove the old one's parts had they leaked.
            assert self.leftovers(storage, "inst-1/b") == []

    def test_a_key_may_also_prefix_other_keys(self, storage: BackupStorage) -> None:
        storage.put_stream("a/b", [b"parent"])
        storage.put_stream("a/b/c", [b"child"])
        assert b"".join(storage.get_stream("a/b")) == b"parent"
        assert b"".join(storage.get_stream("a/b/c")) == b"child"

    # -- failures ------------------------------------------------------------------------------

    def test_failed_upload_leaves_nothing(self, storage: BackupStorage) -> None:
        data = payload(BIG)
        with pytest.raises(SourceBroke) as broke:
            storage.put_stream("inst-1/broken", breaking(data, after=PART + 2 * MIB))
        # The caller's own exception, not a wrapper.
        assert "the source broke after" in str(broke.value)

        assert storage.stat("inst-1/broken") is None
        assert list(storage.list("inst-1/")) == []
        with pytest.raises(StorageNotFound):
            storage.get_stream("inst-1/broken")
        assert self.leftovers(storage, "inst-1/broken") == []

    def test_failed_replacement_keeps_the_previous_object(self, storage: BackupStorage) -> None:
        old = payload(PART + 1, seed=3)
        storage.put_stream("inst-1/b", chunked(old), {"version": "1"})
        with pytest.raises(SourceBroke):
            storage.put_stream("inst-1/b", breaking(payload(BIG), after=PART + MIB))

        assert b"".join(storage.get_stream("inst-1/b")) == old
        found = storage.stat("inst-1/b")
        assert found is not None and found.metadata == {"version": "1"}

    def test_missing_key_is_a_clear_not_found(self, storage: BackupStorage) -> None:
        with pytest.raises(StorageNotFound) as missing:
            storage.get_stream("inst-9/nothing-here")
        assert "inst-9/nothing-here" in str(missing.value)
        assert missing.value.status == 404
        assert not missing.value.transient
        assert storage.stat("inst-9/nothing-here") is None

    def test_delete_is_idempotent(self, storage: BackupStorage) -> None:
        storage.put_stream("inst-1/gone", chunked(payload(BIG)))
        storage.delete("inst-1/gone")
        storage.delete("inst-1/gone")
        storage.delete("never/existed")

        assert storage.stat("inst-1/gone") is None
        assert list(storage.list("")) == []
        with pytest.raises(StorageNotFound):
            storage.get_stream("inst-1/gone")
        assert self.leftovers(storage, "inst-1/gone") == []

    # -- listing -------------------------------------------------------------------------------

    def test_list_by_prefix(self, storage: BackupStorage) -> None:
        keys = ["other", "inst-2/b4", "inst-10/b3", "inst-1/b2", "inst-1/b1"]
        for size, key in enumerate(keys, start=1):
            storage.put_stream(key, [b"x" * size])

        def listed(prefix: str) -> list[tuple[str, int]]:
            return [(item.key, item.size) for item in storage.list(prefix)]

        assert listed("inst-1/") == [("inst-1/b1", 5), ("inst-1/b2", 4)]
        assert [key for key, _ in listed("inst-1")] == ["inst-1/b1", "inst-1/b2", "inst-10/b3"]
        assert [key for key, _ in listed("")] == sorted(keys)
        assert listed("inst-3/") == []
        assert all(item.metadata == {} for item in storage.list(""))

    # -- bad input -----------------------------------------------------------------------------

    # One test per kind of bad input, looping over the cases: each case needs no store, and a
    # fresh bucket per case would cost more than the checks.

    def test_bad_keys_are_refused_before_anything_happens(self, storage: BackupStorage) -> None:
        for key in BAD_KEYS:
            source = Tripwire()
            with pytest.raises(InvalidStorageKey) as refused:
                storage.put_stream(key, source)
                pytest.fail(f"put_stream accepted the key {key!r}")
            assert refused.value.status == 400
            assert not source.read, f"put_stream read chunks for the bad key {key!r}"
            for call in (storage.get_stream, storage.stat, storage.delete):
                with pytest.raises(InvalidStorageKey):
                    call(key)
                    pytest.fail(f"{call.__name__} accepted the key {key!r}")
        assert list(storage.list("")) == []

    def test_bad_prefixes_are_refused(self, storage: BackupStorage) -> None:
        for prefix in ("../", "/", "a//", ".hidden", "a b", "a/../"):
            with pytest.raises(InvalidStorageKey):
                list(storage.list(prefix))
                pytest.fail(f"list accepted the prefix {prefix!r}")

    def test_bad_metadata_is_refused_before_anything_happens(self, storage: BackupStorage) -> None:
        for metadata in BAD_METADATA:
            source = Tripwire()
            with pytest.raises(InvalidStorageKey):
                storage.put_stream("inst-1/b", source, metadata)
                pytest.fail(f"put_stream accepted the metadata {metadata!r}")
            assert not source.read
        assert storage.stat("inst-1/b") is None


# --- the file driver runs the suite here -------------------------------------------------------


class TestFileStorage(StorageContract):
    records_sha256 = True

    @pytest.fixture
    def storage(self, tmp_path: Path) -> Iterator[BackupStorage]:
        with FileStorage(tmp_path / "backups") as storage:
            yield storage

    def leftovers(self, storage: BackupStorage, key: str) -> list[str]:
        assert isinstance(storage, FileStorage)
        if not storage.directory.exists():
            return []
        return sorted(p.name for p in storage.directory.iterdir() if p.name.startswith("."))

    def expected_etag(self, data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def test_default_directory_is_under_the_state_dir(self, tmp_path: Path) -> None:
        from coffer.config import load_settings

        settings = load_settings(environ={"COFFER_STATE_DIR": str(tmp_path)})
        storage = get_storage("file", settings.storage, state_dir=settings.state_dir)
        storage.put_stream("inst-1/b", [b"data"])
        assert isinstance(storage, FileStorage)
        assert storage.directory == tmp_path / "backups"
        assert [p.name for p in (tmp_path / "backups").iterdir()] == ["inst-1%2Fb"]
