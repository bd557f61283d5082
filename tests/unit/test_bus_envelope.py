"""Sealed envelopes, key rings, the replay guard and sequence numbers, without a broker."""

from __future__ import annotations

import threading
import time
from dataclasses import replace

import pytest

from coffer.bus.envelope import (
    Envelope,
    ReplayGuard,
    SequenceCounter,
    StaticKeyRing,
    open_sealed,
    peek_header,
    seal,
)
from coffer.bus.keys import generate_key
from coffer.errors import SealError

KEY = generate_key()
RING = StaticKeyRing({"inst-1": KEY})


def make(**changes: object) -> Envelope:
    env = Envelope.new(
        key_id="inst-1",
        sender="control",
        target="guestagent.inst-1",
        method="create_user",
        kwargs={"name": "app", "password": "s3cret-pw"},
        seq=42,
        reply_to="reply.abc",
        correlation_id="corr-1",
    )
    return replace(env, **changes)  # type: ignore[arg-type]


def test_seal_and_open_round_trip() -> None:
    env = make()
    assert open_sealed(seal(env, KEY), RING, expected_target="guestagent.inst-1") == env


def test_reply_fields_round_trip() -> None:
    env = make(result={"rows": [1, 2]}, error={"kind": "Conflict", "message": "m", "status": 409})
    assert open_sealed(seal(env, KEY), RING) == env


def test_key_id_and_target_are_clear_but_arguments_are_not() -> None:
    data = seal(make(), KEY)
    assert peek_header(data)[:2] == ("inst-1", "guestagent.inst-1")
    assert b"s3cret-pw" not in data
    assert b"create_user" not in data
    assert seal(make(), KEY) != data  # fresh nonce


def test_unknown_key_id_is_rejected() -> None:
    data = seal(make(key_id="inst-2"), generate_key())
    with pytest.raises(SealError, match="no key is known for key id 'inst-2'"):
        open_sealed(data, RING)


def test_wrong_key_is_rejected() -> None:
    with pytest.raises(SealError, match="failed authentication"):
        open_sealed(seal(make(), generate_key()), RING)


def test_every_altered_byte_is_detected() -> None:
    data = seal(make(), KEY)
    for index in range(len(data)):
        altered = bytearray(data)
        altered[index] ^= 0x40
        with pytest.raises(SealError):
            open_sealed(bytes(altered), RING)


def test_target_is_bound_to_the_ciphertext() -> None:
    data = seal(make(), KEY)
    with pytest.raises(SealError, match=r"sealed for 'guestagent\.inst-1', not for 'conductor'"):
        open_sealed(data, RING, expected_target="conductor")
    # Rewriting the clear header to re-route the message breaks the tag.
    rerouted = data.replace(b"guestagent.inst-1", b"guestagent.inst-9", 1)
    with pytest.raises(SealError, match="failed authentication"):
        open_sealed(rerouted, RING, expected_target="guestagent.inst-9")


@pytest.mark.parametrize("data", [b"", b"CFB1", b"hello world, not sealed", b"CFB1\x00\x05ab"])
def test_malformed_bytes_are_rejected(data: bytes) -> None:
    with pytest.raises(SealError, match="malformed header"):
        open_sealed(data, RING)


def test_non_bytes_are_rejected() -> None:
    with pytest.raises(SealError, match="must be bytes"):
        open_sealed("text", RING)  # type: ignore[arg-type]


def test_unsendable_arguments_fail_before_anything_is_sent() -> None:
    with pytest.raises(TypeError, match="cannot be sent on the bus"):
        seal(make(kwargs={"data": b"raw bytes"}), KEY)
    with pytest.raises(TypeError, match="only JSON types"):
        seal(make(kwargs={"ratio": float("nan")}), KEY)
    with pytest.raises(ValueError, match="32 bytes"):
        seal(make(), b"short")


def test_repr_hides_arguments_and_results() -> None:
    env = make(result={"password": "s3cret-pw"})
    assert "s3cret-pw" not in repr(env)
    assert "create_user" in repr(env)
    assert repr(RING) == "StaticKeyRing(key_ids=['inst-1'])"
    assert KEY.hex() not in repr(RING)


def test_keyring_refuses_short_keys() -> None:
    with pytest.raises(ValueError, match="key for 'x' must be 32 bytes"):
        StaticKeyRing({"x": b"short"})


def test_replay_guard_accepts_once() -> None:
    guard = ReplayGuard()
    env = make()
    guard.check(env)
    with pytest.raises(SealError, match="already received"):
        guard.check(env)
    guard.check(make())  # another message id is fine


def test_replay_guard_rejects_stale_and_future_messages() -> None:
    guard = ReplayGuard(max_age=60, max_future=5)
    with pytest.raises(SealError, match="is stale"):
        guard.check(make(sent_at=time.time() - 61))
    with pytest.raises(SealError, match="in the future"):
        guard.check(make(sent_at=time.time() + 30))
    guard.check(make(sent_at=time.time() - 50))
    guard.check(make(sent_at=time.time() + 4))


def test_replay_guard_forgets_ids_once_they_would_be_stale() -> None:
    guard = ReplayGuard(max_age=0.2)
    old = make()
    guard.check(old)
    assert len(guard) == 1
    time.sleep(0.25)
    guard.check(make())
    assert len(guard) == 1  # the old id was pruned
    with pytest.raises(SealError, match="is stale"):
        guard.check(old)  # and the age check still keeps it out


def test_replay_guard_lets_exactly_one_of_many_threads_through() -> None:
    guard = ReplayGuard()
    env = make()
    passed: list[int] = []
    barrier = threading.Barrier(16)

    def attempt(index: int) -> None:
        barrier.wait()
        try:
            guard.check(env)
            passed.append(index)
        except SealError:
            pass

    threads = [threading.Thread(target=attempt, args=(i,)) for i in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(passed) == 1


def test_sequence_counter_is_monotonic_across_threads_and_starts_at_the_clock() -> None:
    counter = SequenceCounter()
    before = time.time_ns()
    values: list[int] = []
    lock = threading.Lock()

    def take() -> None:
        got = [counter.next() for _ in range(500)]
        assert got == sorted(got)
        with lock:
            values.extend(got)

    threads = [threading.Thread(target=take) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(values)) == 2000
    assert min(values) >= before
