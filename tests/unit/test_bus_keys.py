"""Key generation, the master key file, wrapping and derivation."""

from __future__ import annotations

import base64
import stat
import threading
from pathlib import Path

import pytest

from coffer.bus.keys import (
    MasterKeyError,
    derive_key,
    generate_key,
    load_or_create_master_key,
    unwrap_key,
    wrap_key,
)
from coffer.errors import SealError


def test_generated_keys_are_32_random_bytes() -> None:
    keys = {generate_key() for _ in range(100)}
    assert len(keys) == 100
    assert all(isinstance(key, bytes) and len(key) == 32 for key in keys)


def test_master_key_file_is_created_0600_and_read_back(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "master.key"
    key = load_or_create_master_key(path)
    assert len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert base64.b64decode(path.read_text().strip()) == key
    assert load_or_create_master_key(path) == key
    assert [p.name for p in path.parent.iterdir()] == ["master.key"]  # no temp file left


def test_concurrent_creators_agree_on_one_master_key(tmp_path: Path) -> None:
    path = tmp_path / "master.key"
    results: list[bytes] = []
    barrier = threading.Barrier(8)

    def create() -> None:
        barrier.wait()
        results.append(load_or_create_master_key(path))

    threads = [threading.Thread(target=create) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8
    assert len(set(results)) == 1
    assert load_or_create_master_key(path) == results[0]


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ("this is not base64!!\n", "does not contain base64"),
        (base64.b64encode(b"short").decode(), "is 5 bytes, expected 32"),
    ],
)
def test_corrupt_master_key_file_is_a_clear_error(
    tmp_path: Path, content: str, expected: str
) -> None:
    path = tmp_path / "master.key"
    path.write_text(content)
    with pytest.raises(MasterKeyError, match=expected) as caught:
        load_or_create_master_key(path)
    assert content.strip() not in str(caught.value)
    assert path.read_text() == content  # never overwritten


def test_group_readable_master_key_is_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "master.key"
    key = load_or_create_master_key(path)
    path.chmod(0o644)
    assert load_or_create_master_key(path) == key
    assert "chmod 600" in caplog.text


def test_wrap_and_unwrap_round_trip_as_text() -> None:
    master, key = generate_key(), generate_key()
    wrapped = wrap_key(master, key, "instance-1")
    assert wrapped.isascii()
    assert base64.b64encode(key).decode() not in wrapped
    assert wrap_key(master, key, "instance-1") != wrapped  # fresh nonce each time
    assert unwrap_key(master, wrapped, "instance-1") == key


def test_other_secrets_can_be_wrapped_too() -> None:
    master = generate_key()
    secret = b'{"password": "for a later step"}'
    assert unwrap_key(master, wrap_key(master, secret, "purpose"), "purpose") == secret


def test_unwrap_fails_for_another_key_id_master_or_altered_text() -> None:
    master, key = generate_key(), generate_key()
    wrapped = wrap_key(master, key, "instance-1")
    with pytest.raises(SealError, match="does not unwrap"):
        unwrap_key(master, wrapped, "instance-2")
    with pytest.raises(SealError, match="does not unwrap"):
        unwrap_key(generate_key(), wrapped, "instance-1")
    flipped = wrapped[:-5] + ("A" if wrapped[-5] != "A" else "B") + wrapped[-4:]
    with pytest.raises(SealError):
        unwrap_key(master, flipped, "instance-1")
    with pytest.raises(SealError, match="expected format"):
        unwrap_key(master, "garbage", "instance-1")
    with pytest.raises(SealError, match="wrong length"):
        unwrap_key(master, "cfk1." + base64.urlsafe_b64encode(b"x" * 10).decode(), "i")


def test_derived_keys_are_stable_and_purpose_bound() -> None:
    master = generate_key()
    control = derive_key(master, "control-bus")
    assert len(control) == 32
    assert derive_key(master, "control-bus") == control
    assert derive_key(master, "other") != control
    assert derive_key(generate_key(), "control-bus") != control
    assert control != master


def test_keys_of_the_wrong_size_are_refused() -> None:
    with pytest.raises(ValueError, match="must be 32 bytes, got 16"):
        wrap_key(b"x" * 16, generate_key(), "i")
    with pytest.raises(ValueError, match="non-empty bytes"):
        wrap_key(generate_key(), b"", "i")
    with pytest.raises(ValueError, match="non-empty purpose"):
        derive_key(generate_key(), "")
