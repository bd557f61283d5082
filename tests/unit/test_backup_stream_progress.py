"""ProgressMeter: totals, recent and average rates, estimates, and use from several threads."""

from __future__ import annotations

import threading
from collections.abc import Callable

import pytest

from coffer.backup import ProgressMeter, open_stream, seal_stream
from coffer.bus.keys import generate_key


class Clock:
    """A hand-driven monotonic clock."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_counts_bytes_and_computes_rates() -> None:
    clock = Clock()
    meter = ProgressMeter(total=1000, window=5.0, clock=clock)
    assert meter.snapshot().rate == 0.0
    for _ in range(4):
        clock.now += 1.0
        meter.add(100)
    snap = meter.snapshot()
    assert snap.done == 400 and snap.total == 1000
    assert snap.elapsed == pytest.approx(4.0)
    assert snap.rate == pytest.approx(100.0)
    assert snap.average_rate == pytest.approx(100.0)
    assert snap.fraction == pytest.approx(0.4)
    assert snap.eta == pytest.approx(6.0)


def test_recent_rate_follows_the_window_and_drops_when_stalled() -> None:
    clock = Clock()
    meter = ProgressMeter(window=2.0, clock=clock)
    for _ in range(10):  # 10 s at 100 B/s
        clock.now += 1.0
        meter.add(100)
    for _ in range(4):  # then 4 s at 1000 B/s
        clock.now += 1.0
        meter.add(1000)
    snap = meter.snapshot()
    assert snap.rate == pytest.approx(1000.0)
    assert snap.average_rate == pytest.approx(5000 / 14)
    assert snap.fraction is None and snap.eta is None  # no total known
    clock.now += 10.0  # nothing arrives
    assert meter.snapshot().rate == 0.0
    meter.set_total(10_000)
    assert meter.snapshot().fraction == pytest.approx(0.5)


def test_wrap_counts_what_passes_and_changes_nothing() -> None:
    meter = ProgressMeter()
    pieces = [b"a" * 10, b"", b"b" * 5]
    assert list(meter.wrap(pieces)) == pieces
    assert meter.done == 15


def test_meters_a_real_backup_and_restore() -> None:
    master = generate_key()
    data = bytes(range(256)) * 20_000
    sent = ProgressMeter()
    stored_iter, info = seal_stream(sent.wrap([data[:3000], data[3000:]]), master, "b")
    stored = list(stored_iter)
    assert sent.done == len(data) == info().raw_size
    received = ProgressMeter(total=info().size)
    restored = b"".join(open_stream(received.wrap(stored), master, "b", info().wrapped_key))
    assert restored == data
    assert received.snapshot().fraction == 1.0


def test_concurrent_updates_are_not_lost() -> None:
    meter = ProgressMeter()
    barrier = threading.Barrier(8)

    def work() -> None:
        barrier.wait()
        for count in range(10_000):
            meter.add(3)
            if count % 1000 == 0:  # readers interleave with writers
                assert meter.snapshot().done >= 3

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert meter.done == 8 * 10_000 * 3


@pytest.mark.parametrize(
    "build",
    [
        lambda: ProgressMeter(total=-1),
        lambda: ProgressMeter(window=0),
        lambda: ProgressMeter().add(-5),
        lambda: ProgressMeter().set_total(-1),
    ],
    ids=["negative-total", "zero-window", "negative-add", "negative-set-total"],
)
def test_nonsense_values_are_refused(build: Callable[[], object]) -> None:
    with pytest.raises(ValueError):
        build()
