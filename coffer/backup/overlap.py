"""Overlap a backup's upload with the stages that produce it: the store's writes in a thread
of their own, a bounded hand-off in between.

A backup moves bytes through stages that each wait on something different: an engine tool's
pipe, zstd (its own worker threads), AES-GCM and SHA-256 (which release the interpreter lock
for large buffers), and the store's file or socket (with a second SHA-256 of what it receives).
In one thread, the engine tool waits while the store writes and the store waits while Python
encrypts. ``write_behind`` runs the consumer (the store) in a thread of its own while the
calling thread keeps producing; at most ``depth`` items (chunks of about 1 MiB) wait between
them, so memory stays bounded and nothing is staged whole.

Errors cross the hand-off unchanged: an exception of the producer is raised to the consumer
after the items before it (so a store removes its partial upload), and an exception of the
consumer stops the producer at its next item and closes its source (stopping an engine tool).

Measured on a busy 2-core host, the same hand-off in front of a restore's engine tool gained
nothing and cost about 15 % more CPU: there the tool's pipe (1 MiB, ``base.PIPE_SIZE``)
already lets the tool and the agent work side by side, so restores do not use it.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")
R = TypeVar("R")

#: Items that may wait between the two threads by default (chunks of about 1 MiB).
DEFAULT_DEPTH = 4


class _Closed(Exception):
    """The other side of a hand-off has gone; the side that sees it stops."""


class _HandOff(Generic[T]):
    """A bounded queue between one producing and one consuming thread, with an end."""

    def __init__(self, depth: int) -> None:
        if depth < 1:
            raise ValueError("a hand-off holds at least one item")
        self._depth = depth
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._ended = False
        self._error: BaseException | None = None
        self._abandoned = False

    def put(self, item: T) -> None:
        """Wait for room, then add ``item``; ``_Closed`` if the consumer has gone."""
        with self._cond:
            while len(self._items) >= self._depth and not self._abandoned:
                self._cond.wait()
            if self._abandoned:
                raise _Closed
            self._items.append(item)
            self._cond.notify_all()

    def end(self, error: BaseException | None = None) -> None:
        """No more items: the stream ended (``error`` None) or failed with ``error``."""
        with self._cond:
            self._ended = True
            self._error = error
            self._cond.notify_all()

    def get(self) -> T:
        """The next item; ``StopIteration`` at the end, the producer's error if it failed."""
        with self._cond:
            while not self._items and not self._ended:
                self._cond.wait()
            if self._items:
                item = self._items.popleft()
                self._cond.notify_all()
                return item
            error, self._error = self._error, None
        if error is not None:
            raise error
        raise StopIteration

    def abandon(self) -> None:
        """The consumer stops: drop what waits and wake the producer."""
        with self._cond:
            self._abandoned = True
            self._items.clear()
            self._cond.notify_all()


def _close(source: object) -> None:
    close = getattr(source, "close", None)
    if callable(close):
        close()


def write_behind(
    consume: Callable[[Iterator[T]], R],
    source: Iterable[T],
    depth: int = DEFAULT_DEPTH,
    name: str = "",
) -> R:
    """``consume(items)`` in a thread of its own while this thread iterates ``source``; its result.

    ``items`` yields what ``source`` yields, up to ``depth`` items behind it. If ``source``
    raises, ``items`` raises the same exception in the consumer (so a store removes the partial
    upload), and that exception is raised here once the consumer has finished. If ``consume``
    raises or
    returns before the end, ``source`` is closed at once (an engine tool behind it is stopped)
    and the consumer's exception is raised here. ``source`` is always closed when this returns.
    """
    hand_off: _HandOff[T] = _HandOff(depth)
    outcome: list[R] = []
    failure: list[BaseException] = []

    def items() -> Iterator[T]:
        while True:
            try:
                item = hand_off.get()
            except StopIteration:
                return
            yield item

    def run() -> None:
        try:
            outcome.append(consume(items()))
        except BaseException as exc:
            failure.append(exc)
        finally:
            hand_off.abandon()

    thread = threading.Thread(target=run, name=name or "write-behind", daemon=True)
    thread.start()
    source_error: BaseException | None = None
    try:
        for item in source:
            hand_off.put(item)
    except _Closed:
        pass  # the consumer stopped; its error (or result) is what counts
    except BaseException as exc:
        source_error = exc
    finally:
        try:
            _close(source)
        finally:
            hand_off.end(source_error)
            thread.join()
    if source_error is not None:
        raise source_error  # the cause; the consumer's own error, if any, followed from it
    if failure:
        raise failure[0]
    if not outcome:
        raise RuntimeError("the stream's consumer ended without a result")
    return outcome[0]
