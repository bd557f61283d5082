"""The storage contract's shared parts: names, streams, errors, registry, settings, and how each
driver reads its settings and names its failures (no store needed; the drivers' behaviour is
tested in ``test_storage_contract.py`` and, against a real Swift, in the integration tests)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError
from swiftclient.exceptions import ClientException

from coffer.config import load_settings
from coffer.errors import ConfigError, NotFound, ServiceUnavailable, ValidationError
from coffer.storage.base import (
    ChunkSource,
    InvalidStorageKey,
    StorageAccessDenied,
    StorageConfigError,
    StorageError,
    StorageIntegrityError,
    StorageNotFound,
    StorageUnavailable,
    StoredObject,
    get_storage,
    storage_from_settings,
    validate_key,
    validate_prefix,
)
from coffer.storage.file import FileStorage
from coffer.storage.s3 import S3Storage
from coffer.storage.swift import SwiftStorage

SECRET = "s3cr3t-do-not-show"

# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "status", "transient", "family"),
    [
        (StorageUnavailable, 503, True, ServiceUnavailable),
        (StorageNotFound, 404, False, NotFound),
        (InvalidStorageKey, 400, False, ValidationError),
        (StorageAccessDenied, 500, False, StorageError),
        (StorageIntegrityError, 500, False, StorageError),
        (StorageError, 500, False, StorageError),
    ],
)
def test_error_family_status_and_transience(
    error: type[StorageError], status: int, transient: bool, family: type[Exception]
) -> None:
    raised = error("message")
    assert isinstance(raised, StorageError) and isinstance(raised, family)
    assert (raised.status, raised.transient) == (status, transient)


def test_config_error_is_both_a_storage_and_a_config_error() -> None:
    error = StorageConfigError(["[storage] s3_bucket: missing"])
    assert isinstance(error, ConfigError) and isinstance(error, StorageError)
    assert error.problems == ["[storage] s3_bucket: missing"]
    assert not error.transient and "s3_bucket" in str(error)


# --- names -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key", ["a", "inst-1/full.xbstream.zst", "A_b-c.1/2/3", "x" * 200, "a/b.c/d..e"]
)
def test_valid_keys(key: str) -> None:
    assert validate_key(key) == key


@pytest.mark.parametrize("key", [None, 5, b"bytes", "a/..", "..", "x" * 201])
def test_invalid_keys(key: object) -> None:
    with pytest.raises(InvalidStorageKey):
        validate_key(key)


def test_prefixes_may_end_with_a_slash_or_mid_segment() -> None:
    assert validate_prefix("") == ""
    assert validate_prefix("inst-1/") == "inst-1/"
    assert validate_prefix("inst-1/2024-") == "inst-1/2024-"
    with pytest.raises(InvalidStorageKey):
        validate_prefix("inst-1//")


# --- ChunkSource -------------------------------------------------------------------------------


def test_chunk_source_hands_out_exact_pieces_across_chunk_boundaries() -> None:
    source = ChunkSource([b"abc", bytearray(b"defg"), memoryview(b"hi"), b"", b"j"])
    assert source.read(2) == b"ab"
    assert b"".join(source.take(4)) == b"cdef"
    assert not source.at_end()
    assert list(source) == [b"g", b"hi", b"j"]
    assert source.at_end() and source.exhausted
    assert source.read(5) == b""
    assert source.size == 10
    assert source.sha256 == hashlib.sha256(b"abcdefghij").hexdigest()


def test_chunk_source_remembers_the_callers_failure() -> None:
    failure = RuntimeError("engine died")

    def chunks() -> Iterator[bytes]:
        yield b"a"
        raise failure

    source = ChunkSource(chunks())
    assert source.read(1) == b"a"
    for _ in range(2):  # a library that retries gets the same error again
        with pytest.raises(RuntimeError) as raised:
            source.read(1)
        assert raised.value is failure
    assert source.failure is failure and not source.exhausted


def test_chunk_source_refuses_text() -> None:
    source = ChunkSource(["text"])  # type: ignore[list-item]
    with pytest.raises(TypeError, match="must be bytes"):
        source.read()


# --- the base class's own checks ---------------------------------------------------------------


class _LazyDriver(FileStorage):
    """A driver with a bug: it stores only the first byte and claims success."""

    def _put(self, key: str, source: ChunkSource, metadata: dict[str, str]) -> StoredObject:
        source.read(1)
        return StoredObject(key=key, size=1)


class _WrappingDriver(FileStorage):
    """A driver whose library wraps every error, including the caller's."""

    def _put(self, key: str, source: ChunkSource, metadata: dict[str, str]) -> StoredObject:
        try:
            source.read()
        except Exception as exc:
            raise StorageUnavailable("the library wrapped it") from exc
        raise AssertionError("unreachable")


def test_a_driver_that_stops_reading_early_is_caught(tmp_path: Path) -> None:
    with pytest.raises(StorageIntegrityError, match="before the end of the stream"):
        _LazyDriver(tmp_path).put_stream("k", [b"abc"])


def test_the_callers_error_survives_a_wrapping_library(tmp_path: Path) -> None:
    failure = OSError("pipe from mariabackup closed")

    def chunks() -> Iterator[bytes]:
        yield b"a"
        raise failure

    with pytest.raises(OSError) as raised:
        _WrappingDriver(tmp_path).put_stream("k", chunks())
    assert raised.value is failure


def test_get_stream_detects_a_short_or_long_object(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put_stream("k", [b"abcdef"])
    # A store that delivers fewer bytes than it announced: transient, never silently short.
    short = FileStorage._exactly("k", 10, iter([b"abcdef"]))
    with pytest.raises(StorageUnavailable, match="ended after 6 of 10 bytes"):
        b"".join(short)
    long = FileStorage._exactly("k", 3, iter([b"abcdef"]))
    with pytest.raises(StorageIntegrityError):
        b"".join(long)
    with pytest.raises(InvalidStorageKey, match="chunk_size"):
        storage.get_stream("k", chunk_size=0)


# --- the file driver's format ------------------------------------------------------------------


def test_file_objects_are_published_with_a_trailer_and_mode_0640(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put_stream("inst-1/b", [b"payload"], {"engine": "redis"})
    path = tmp_path / "inst-1%2Fb"
    assert path.read_bytes().startswith(b"payload")
    assert (path.stat().st_mode & 0o777) == 0o640
    assert b"".join(storage.get_stream("inst-1/b")) == b"payload"


def test_a_damaged_file_object_is_reported_not_served(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put_stream("k", [b"payload" * 100])
    path = tmp_path / "k"
    with open(path, "r+b") as handle:
        handle.truncate(path.stat().st_size - 3)
    with pytest.raises(StorageIntegrityError, match="damaged"):
        storage.stat("k")
    with pytest.raises(StorageIntegrityError):
        storage.get_stream("k")


def test_foreign_files_in_the_directory_are_not_listed(tmp_path: Path) -> None:
    storage = FileStorage(tmp_path)
    storage.put_stream("mine", [b"x"])
    for name in ("not a key", ".tmp-file", "a%2F..%2Fb", "lost+found"):
        (tmp_path / name).write_bytes(b"junk")
    assert [item.key for item in storage.list("")] == ["mine"]


def test_file_driver_needs_an_absolute_directory() -> None:
    with pytest.raises(StorageConfigError, match="absolute"):
        FileStorage(Path("relative/backups"))


# --- registry and settings ---------------------------------------------------------------------


def test_unknown_driver_names_the_closest(tmp_path: Path) -> None:
    settings = load_settings(environ={"COFFER_STATE_DIR": str(tmp_path)})
    with pytest.raises(StorageConfigError) as unknown:
        get_storage("swfit", settings.storage, state_dir=tmp_path)
    assert "did you mean 'swift'?" in str(unknown.value)
    assert "file, s3, swift" in str(unknown.value)


def test_settings_build_each_driver_without_connecting(tmp_path: Path) -> None:
    environ = {
        "COFFER_STATE_DIR": str(tmp_path),
        "COFFER_STORAGE__S3_SECRET_ACCESS_KEY": SECRET,
        "COFFER_STORAGE__SWIFT_KEY": SECRET,
    }
    s3 = load_settings(
        environ=environ | {"COFFER_STORAGE__DRIVER": "s3"},
        overrides={
            "storage": {
                "s3_bucket": "backups",
                "s3_endpoint_url": "http://127.0.0.1:1",
                "s3_access_key_id": "AKIA",
                "s3_multipart_chunksize": str(8 << 20),
            }
        },
    )
    driver = storage_from_settings(s3)
    assert isinstance(driver, S3Storage)
    assert (driver.bucket, driver.multipart_chunksize) == ("backups", 8 << 20)
    swift = load_settings(
        environ=environ | {"COFFER_STORAGE__DRIVER": "swift"},
        overrides={
            "storage": {
                "swift_auth_url": "http://127.0.0.1:1/v3",
                "swift_user": "trove",
                "swift_project_name": "service",
            }
        },
    )
    swift_driver = storage_from_settings(swift)
    assert isinstance(swift_driver, SwiftStorage)
    assert swift_driver.segment_container == "database_backups_segments"
    for shown in (repr(s3), repr(swift), repr(driver), repr(swift_driver), str(s3.storage)):
        assert SECRET not in shown


def test_incomplete_storage_settings_are_refused_at_start(tmp_path: Path) -> None:
    environ = {"COFFER_STATE_DIR": str(tmp_path)}
    with pytest.raises(ConfigError) as s3:
        load_settings(environ=environ, overrides={"storage": {"driver": "s3"}})
    assert "s3_bucket" in str(s3.value)
    with pytest.raises(ConfigError) as swift:
        load_settings(
            environ=environ, overrides={"storage": {"driver": "swift", "swift_key": SECRET}}
        )
    assert "swift_auth_url, swift_user" in str(swift.value)
    assert "swift_project_name" in str(swift.value)
    assert SECRET not in str(swift.value)


@pytest.mark.parametrize(
    ("kwargs", "problem"),
    [
        ({"multipart_chunksize": 1 << 20}, "s3_multipart_chunksize"),
        ({"access_key_id": "AKIA"}, "set both or neither"),
        ({"multipart_threshold": 1}, "s3_multipart_threshold"),
    ],
)
def test_s3_driver_checks_its_options(kwargs: dict[str, object], problem: str) -> None:
    with pytest.raises(StorageConfigError, match=problem):
        S3Storage("bucket", **kwargs)  # type: ignore[arg-type]


def test_swift_driver_checks_its_options() -> None:
    with pytest.raises(StorageConfigError) as refused:
        SwiftStorage("", "", "", container="a/b", segment_size=10)
    problems = "\n".join(refused.value.problems)
    for option in ("swift_auth_url", "swift_user", "swift_project_name", "container", "segment"):
        assert option in problems


# --- how drivers name their library's failures -------------------------------------------------


def _client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": "msg"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "GetObject",
    )


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (_client_error("NoSuchKey", 404), StorageNotFound),
        (_client_error("404", 404), StorageNotFound),
        (_client_error("SignatureDoesNotMatch", 403), StorageAccessDenied),
        (_client_error("InvalidAccessKeyId", 403), StorageAccessDenied),
        (_client_error("NoSuchBucket", 404), StorageConfigError),
        (_client_error("SlowDown", 503), StorageUnavailable),
        (_client_error("InternalError", 500), StorageUnavailable),
        (_client_error("EntityTooSmall", 400), StorageError),
        (EndpointConnectionError(endpoint_url="http://127.0.0.1:1"), StorageUnavailable),
        (NoCredentialsError(), StorageAccessDenied),
    ],
)
def test_s3_errors_map_to_the_family(error: Exception, expected: type[StorageError]) -> None:
    mapped = S3Storage("bucket", access_key_id="AKIA", secret_access_key=SECRET)._error(
        error, "read", "k"
    )
    assert type(mapped) is expected
    assert SECRET not in str(mapped)


@pytest.mark.parametrize(
    ("error", "expected"),
    [
        (ClientException("Object GET failed", http_status=404), StorageNotFound),
        (ClientException("Auth GET failed", http_status=401), StorageAccessDenied),
        (ClientException("Unauthorized. Check username, password"), StorageAccessDenied),
        (ClientException("Object PUT failed", http_status=503), StorageUnavailable),
        (ClientException("Object PUT failed", http_status=499), StorageUnavailable),
        (ClientException("Object PUT failed", http_status=422), StorageError),
        (ConnectionRefusedError(111, "refused"), StorageUnavailable),
    ],
)
def test_swift_errors_map_to_the_family(error: Exception, expected: type[StorageError]) -> None:
    mapped = SwiftStorage("http://x/auth/v1.0", "a:u", SECRET, auth_version="1")._error(
        error, "read", "k"
    )
    assert type(mapped) is expected
    assert SECRET not in str(mapped)


def test_nothing_is_written_outside_the_directory(tmp_path: Path) -> None:
    inside = tmp_path / "backups"
    storage = FileStorage(inside)
    for key in ("a/b/c", "x..y/z..", "dots.../more"):
        storage.put_stream(key, [b"x"])
    assert sorted(os.listdir(tmp_path)) == ["backups"]
    assert all("/" not in name for name in os.listdir(inside))
