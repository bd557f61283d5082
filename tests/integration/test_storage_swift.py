"""The storage contract suite against a real OpenStack Swift (Debian's packages).

One all-in-one Swift serves the module (``tests/swift_harness.py``): the ``s3`` driver talks to
it through the s3api middleware, the ``swift`` driver through the native API with tempauth. Each
test gets a bucket or container of its own. What a store would leave behind is looked up over the
native API, which sees everything: the s3api keeps a bucket's multipart parts in the container
``<bucket>+segments``, the swift driver its segments in ``<container>_segments``.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from swift_harness import Swift, running_swift
from swiftclient.client import Connection
from unit.test_storage_contract import BIG, PART, StorageContract, chunked, payload

from coffer.config import load_settings
from coffer.storage.base import (
    BackupStorage,
    StorageAccessDenied,
    StorageConfigError,
    StorageUnavailable,
    storage_from_settings,
)
from coffer.storage.s3 import S3Storage
from coffer.storage.swift import SwiftStorage

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def swift(engine_user: str) -> Iterator[Swift]:
    with running_swift(engine_user) as running:
        yield running


@pytest.fixture(scope="module")
def native(swift: Swift) -> Iterator[Connection]:
    """A plain swiftclient connection, to look behind the drivers' backs."""
    connection = Connection(authurl=swift.auth_url, user=swift.user, key=swift.key, retries=0)
    yield connection
    connection.close()


def _names(native: Connection, container: str, prefix: str = "") -> list[str]:
    from swiftclient.exceptions import ClientException

    try:
        _, listing = native.get_container(container, prefix=prefix, full_listing=True)
    except ClientException as exc:
        if exc.http_status == 404:
            return []
        raise
    return [item["name"] for item in listing]


def _parts(data: bytes) -> list[bytes]:
    return [data[start : start + PART] for start in range(0, len(data), PART)]


def _md5(data: bytes) -> hashlib._Hash:
    return hashlib.md5(data, usedforsecurity=False)


def _s3_storage(swift: Swift, bucket: str, **overrides: Any) -> S3Storage:
    options: dict[str, Any] = {
        "endpoint_url": swift.proxy_url,
        "region_name": swift.region,
        "access_key_id": swift.user,
        "secret_access_key": swift.key,
        "multipart_threshold": PART,
        "multipart_chunksize": PART,
        "max_concurrency": 2,
    }
    return S3Storage(bucket, **(options | overrides))


class TestS3OnSwift(StorageContract):
    # Swift 2.30's s3api keeps a multipart object's segments when the object is overwritten
    # (shown by test_replacing_leaks_segments_in_swift_s3api); AWS S3 frees them.
    frees_replaced_parts = False

    @pytest.fixture
    def storage(self, swift: Swift, native: Connection) -> Iterator[BackupStorage]:
        self.native = native
        with _s3_storage(swift, f"coffer-{uuid.uuid4().hex[:12]}") as storage:
            storage.client.create_bucket(Bucket=storage.bucket)
            yield storage

    def leftovers(self, storage: BackupStorage, key: str) -> list[str]:
        assert isinstance(storage, S3Storage)
        uploads = storage.client.list_multipart_uploads(Bucket=storage.bucket, Prefix=key)
        pending = [f"upload {item['UploadId']}" for item in uploads.get("Uploads") or []]
        return pending + _names(self.native, f"{storage.bucket}+segments", prefix=key)

    def expected_etag(self, data: bytes) -> str:
        # S3's multipart ETag: the MD5 of the parts' binary MD5s, then "-<number of parts>".
        parts = _parts(data)
        if len(parts) == 1:
            return _md5(data).hexdigest()
        digests = b"".join(_md5(part).digest() for part in parts)
        return f"{_md5(digests).hexdigest()}-{len(parts)}"

    def test_replacing_leaks_segments_in_swift_s3api(self, storage: BackupStorage) -> None:
        # Pins the server behaviour ``frees_replaced_parts = False`` works around: when a Swift
        # release frees them, this fails and the flag can go.
        assert isinstance(storage, S3Storage)
        storage.put_stream("k", chunked(payload(BIG)))
        storage.put_stream("k", [b"small"])
        storage.delete("k")
        assert len(_names(self.native, f"{storage.bucket}+segments")) == 3

    def test_wrong_secret_is_access_denied(self, swift: Swift, storage: BackupStorage) -> None:
        assert isinstance(storage, S3Storage)
        wrong = _s3_storage(swift, storage.bucket, secret_access_key="not-the-key")
        with pytest.raises(StorageAccessDenied) as denied:
            wrong.put_stream("k", [b"x"])
        assert not denied.value.transient
        assert "not-the-key" not in str(denied.value) and swift.key not in str(denied.value)
        assert storage.stat("k") is None

    def test_missing_bucket_is_a_configuration_error(self, swift: Swift) -> None:
        with pytest.raises(StorageConfigError, match="does not exist"):
            _s3_storage(swift, "no-such-bucket").get_stream("k")

    def test_unreachable_store_is_transient(self, swift: Swift) -> None:
        storage = _s3_storage(swift, "b", endpoint_url="http://127.0.0.1:9", max_attempts=1)
        with pytest.raises(StorageUnavailable) as unavailable:
            storage.stat("k")
        assert unavailable.value.transient and unavailable.value.status == 503

    def test_settings_reach_the_store(self, swift: Swift, storage: BackupStorage) -> None:
        assert isinstance(storage, S3Storage)
        settings = load_settings(
            environ={"COFFER_STORAGE__S3_SECRET_ACCESS_KEY": swift.key},
            overrides={
                "storage": {
                    "driver": "s3",
                    "s3_endpoint_url": swift.proxy_url,
                    "s3_bucket": storage.bucket,
                    "s3_access_key_id": swift.user,
                }
            },
        )
        with storage_from_settings(settings) as configured:
            configured.put_stream("via/settings", chunked(payload(BIG)))
        found = storage.stat("via/settings")
        assert found is not None and found.size == BIG


class TestSwiftNative(StorageContract):
    @pytest.fixture
    def storage(self, swift: Swift) -> Iterator[BackupStorage]:
        container = f"coffer-{uuid.uuid4().hex[:12]}"
        with SwiftStorage(
            swift.auth_url,
            swift.user,
            swift.key,
            auth_version="1",
            container=container,
            segment_size=PART,
            retries=1,
        ) as storage:
            yield storage

    def leftovers(self, storage: BackupStorage, key: str) -> list[str]:
        assert isinstance(storage, SwiftStorage)
        return _names(storage.connection, storage.segment_container, prefix=f"{key}/")

    def expected_etag(self, data: bytes) -> str:
        # A Static Large Object's ETag: the MD5 of its segments' hex MD5s.
        if not data:
            return _md5(b"").hexdigest()
        return _md5("".join(_md5(part).hexdigest() for part in _parts(data)).encode()).hexdigest()

    def test_large_objects_are_segmented_in_the_segments_container(
        self, storage: BackupStorage, native: Connection
    ) -> None:
        assert isinstance(storage, SwiftStorage)
        storage.put_stream("inst-1/full", chunked(payload(BIG)))
        assert _names(native, storage.container) == ["inst-1/full"]
        segments = _names(native, storage.segment_container)
        assert len(segments) == 3 and all(s.startswith("inst-1/full/") for s in segments)
        head = native.head_object(storage.container, "inst-1/full")
        assert head["x-static-large-object"].lower() == "true"

    def test_wrong_key_is_access_denied(self, swift: Swift) -> None:
        storage = SwiftStorage(
            swift.auth_url, swift.user, "not-the-key", auth_version="1", retries=0
        )
        with pytest.raises(StorageAccessDenied) as denied:
            storage.stat("k")
        assert not denied.value.transient and "not-the-key" not in str(denied.value)

    def test_unreachable_store_is_transient(self) -> None:
        storage = SwiftStorage(
            "http://127.0.0.1:9/auth/v1.0", "a:u", "k", auth_version="1", retries=0
        )
        with pytest.raises(StorageUnavailable) as unavailable:
            storage.stat("k")
        assert unavailable.value.transient

    def test_settings_reach_the_store(self, swift: Swift, storage: BackupStorage) -> None:
        assert isinstance(storage, SwiftStorage)
        settings = load_settings(
            environ={"COFFER_STORAGE__SWIFT_KEY": swift.key},
            overrides={
                "storage": {
                    "driver": "swift",
                    "swift_auth_url": swift.auth_url,
                    "swift_auth_version": "1",
                    "swift_user": swift.user,
                    "swift_container": storage.container,
                }
            },
        )
        with storage_from_settings(settings) as configured:
            configured.put_stream("via/settings", [b"x" * 100], {"engine": "redis"})
        found = storage.stat("via/settings")
        assert found is not None and found.metadata == {"engine": "redis"}
