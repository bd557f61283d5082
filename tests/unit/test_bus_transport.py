"""Transport URLs and the embedded broker's files, without starting a broker."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from coffer.bus.transport import (
    REDIS_BRPOP_TIMEOUT,
    BrokerStartError,
    EmbeddedBroker,
    connection,
    resolve_url,
    safe_url,
)
from coffer.errors import ValidationError


def test_embedded_url_points_at_the_socket_with_a_generated_password(tmp_path: Path) -> None:
    state = tmp_path / "s"
    url = resolve_url("embedded://", state)
    password = (state / "bus" / "password").read_text().strip()
    assert url == f"redis+socket://:{password}@{state / 'bus' / 'redis.sock'}"
    assert len(password) >= 32
    assert stat.S_IMODE((state / "bus" / "password").stat().st_mode) == 0o600
    assert stat.S_IMODE((state / "bus").stat().st_mode) == 0o711
    assert resolve_url("embedded://", state) == url  # stable
    assert password not in safe_url(url)
    assert password not in repr(EmbeddedBroker(state))


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("rabbit://u:p@mq:5672/", "amqp://u:p@mq:5672//"),
        ("rabbit://u:p@mq:5672", "amqp://u:p@mq:5672//"),
        ("rabbit://u:p@mq:5672/coffer", "amqp://u:p@mq:5672/coffer"),
        ("rabbit://u:p@a:5672,u:p@b:5672/", "amqp://u:p@a:5672//;amqp://u:p@b:5672//"),
        ("amqp://guest:guest@127.0.0.1:5672//", "amqp://guest:guest@127.0.0.1:5672//"),
        ("redis://127.0.0.1:6380/0", "redis://127.0.0.1:6380/0"),
        ("memory://", "memory://"),
    ],
)
def test_transport_urls_become_kombu_urls(tmp_path: Path, given: str, expected: str) -> None:
    assert resolve_url(given, tmp_path) == expected
    assert not (tmp_path / "bus").exists()  # only embedded:// touches the state dir


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("rabit://h/", "did you mean 'rabbit'"),
        ("kafka://h/", "not supported"),
        ("localhost", "is not a URL"),
        ("embedded://somewhere", "takes no host or path"),
        ("rabbit:///", "at least one host"),
    ],
)
def test_bad_transport_urls_are_clear_errors(tmp_path: Path, given: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        resolve_url(given, tmp_path)
    assert not (tmp_path / "bus").exists()


def test_socket_path_too_long_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    deep = tmp_path / ("x" * 120)
    with pytest.raises(ValidationError, match="choose a shorter state_dir"):
        EmbeddedBroker(deep)
    assert not deep.exists()


def test_socket_mode_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a permission mode"):
        EmbeddedBroker(tmp_path, socket_mode=0o1777)


def test_corrupt_password_file_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "bus").mkdir()
    (tmp_path / "bus" / "password").write_text("short\n")
    with pytest.raises(BrokerStartError, match=r"password file .* is corrupt") as caught:
        _ = EmbeddedBroker(tmp_path).url
    assert "short" not in str(caught.value).replace("shorter", "")


def test_safe_url_masks_passwords() -> None:
    assert safe_url("amqp://guest:topsecret@mq:5672//") == "amqp://guest:**@mq:5672//"
    assert "topsecret" not in safe_url("redis+socket://:topsecret@/tmp/x/redis.sock")


def test_redis_connections_poll_briefly_so_consumers_stop_fast() -> None:
    conn = connection("redis+socket://:pw@/tmp/none.sock")
    try:
        assert conn.transport.brpop_timeout == REDIS_BRPOP_TIMEOUT
        assert "pw" not in repr(conn)
    finally:
        conn.release()
