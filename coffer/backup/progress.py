"""Progress of a backup or restore stream: bytes so far, rate, and an estimate of what is left."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class ProgressSnapshot:
    """One consistent reading of a ``ProgressMeter``.

    ``rate`` is bytes per second over the meter's recent window (what a progress bar shows);
    ``average_rate`` is over the whole run. ``fraction`` and ``eta`` are None while the total is
    unknown (a backup's size is only known at its end; a restore's is recorded).
    """

    done: int
    total: int | None
    elapsed: float
    rate: float
    average_rate: float

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(1.0, self.done / self.total)

    @property
    def eta(self) -> float | None:
        """Seconds left at the recent rate, or None when it cannot be estimated."""
        if self.total is None or self.rate <= 0:
            return None
        return max(0, self.total - self.done) / self.rate


class ProgressMeter:
    """Counts bytes passing through a stream; safe to update and read from different threads.

    The stream's thread calls ``add`` (or iterates through ``wrap``); a display thread calls
    ``snapshot`` whenever it redraws. ``window`` is how many seconds of history the recent rate
    covers. ``clock`` is a monotonic clock in seconds, replaceable so tests can drive time.
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        window: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if total is not None and total < 0:
            raise ValueError("a progress total cannot be negative")
        if window <= 0:
            raise ValueError("a progress window must be a positive number of seconds")
        self._lock = threading.Lock()
        self._clock = clock
        self._window = window
        self._total = total
        self._done = 0
        self._started = clock()
        # (time, done) samples, at most about 100 per window, to compute the recent rate.
        self._samples: deque[tuple[float, int]] = deque([(self._started, 0)])
        self._sample_every = window / 100

    def add(self, count: int) -> None:
        """Record ``count`` more bytes."""
        if count < 0:
            raise ValueError("progress only moves forward")
        now = self._clock()
        with self._lock:
            self._done += count
            if now - self._samples[-1][0] >= self._sample_every:
                self._samples.append((now, self._done))
                self._trim(now)

    def set_total(self, total: int | None) -> None:
        """Set or clear the expected total, e.g. when a backup's final size becomes known."""
        if total is not None and total < 0:
            raise ValueError("a progress total cannot be negative")
        with self._lock:
            self._total = total

    def wrap(self, chunks: Iterable[bytes]) -> Iterator[bytes]:
        """Yield ``chunks`` unchanged, counting their lengths as they pass."""
        for chunk in chunks:
            self.add(len(chunk))
            yield chunk

    @property
    def done(self) -> int:
        with self._lock:
            return self._done

    def snapshot(self) -> ProgressSnapshot:
        now = self._clock()
        with self._lock:
            self._trim(now)
            first_time, first_done = self._samples[0]
            recent = now - first_time
            rate = (self._done - first_done) / recent if recent > 0 else 0.0
            elapsed = now - self._started
            average = self._done / elapsed if elapsed > 0 else 0.0
            return ProgressSnapshot(
                done=self._done,
                total=self._total,
                elapsed=elapsed,
                rate=rate,
                average_rate=average,
            )

    def _trim(self, now: float) -> None:
        # Keep one sample at or before the window's start so the rate spans the whole window.
        while len(self._samples) > 1 and self._samples[1][0] <= now - self._window:
            self._samples.popleft()
