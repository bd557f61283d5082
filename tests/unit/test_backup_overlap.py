"""The hand-off that runs a backup's upload in a thread of its own: order, errors crossing
threads unchanged, and early stops that close the source."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from coffer.backup.overlap import write_behind


class Source:
    """A generator source that records how far it got and whether it was closed, and where."""

    def __init__(self, count: int, fail_at: int | None = None) -> None:
        self.count = count
        self.fail_at = fail_at
        self.produced = 0
        self.closed = False
        self.closed_in: str | None = None

    def __iter__(self) -> Iterator[bytes]:
        return self.run()

    def run(self) -> Iterator[bytes]:
        try:
            for index in range(self.count):
                if index == self.fail_at:
                    raise ValueError(f"source failed at {index}")
                self.produced += 1
                yield bytes([index % 256]) * 10
        finally:
            self.closed = True
            self.closed_in = threading.current_thread().name


def test_write_behind_returns_what_the_consumer_returns() -> None:
    source = Source(200)
    consumer_threads = set()

    def consume(items: Iterator[bytes]) -> int:
        total = 0
        for item in items:
            consumer_threads.add(threading.current_thread().name)
            total += len(item)
        return total

    assert write_behind(consume, source, depth=2, name="t-store") == 2000
    assert consumer_threads == {"t-store"}
    assert source.closed


def test_a_failing_source_fails_the_consumer_with_the_same_error() -> None:
    source = Source(100, fail_at=40)
    seen: list[BaseException] = []

    def consume(items: Iterator[bytes]) -> int:
        count = 0
        try:
            for _item in items:
                count += 1
        except BaseException as exc:
            seen.append(exc)
            raise
        return count

    with pytest.raises(ValueError, match="source failed at 40") as raised:
        write_behind(consume, source)
    assert seen and seen[0] is raised.value
    assert source.closed


def test_a_failing_consumer_stops_the_source_at_once() -> None:
    source = Source(100_000)

    def consume(items: Iterator[bytes]) -> int:
        for index, _item in enumerate(items):
            if index == 5:
                raise OSError("the store is full")
        return 0

    with pytest.raises(OSError, match="the store is full"):
        write_behind(consume, source, depth=2)
    assert source.closed
    assert source.produced < 20


def test_a_consumer_that_stops_early_gives_its_result_and_the_source_is_closed() -> None:
    source = Source(100_000)

    def consume(items: Iterator[bytes]) -> str:
        next(items)
        return "enough"

    assert write_behind(consume, source) == "enough"
    assert source.closed
