"""Progress of a backup or restore stream: bytes so far, rate, and an estimate of what is left;
and what a restore reports about itself while it runs (``RestoreMeter``)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

#: The phases a restore reports, in order: every backup of the chain read whole and checked,
#: then streamed again into the engine; ``restored`` once the engine's data is in place.
RESTORE_PHASES = ("verifying", "restoring", "restored")

#: Seconds between two progress reports of a running restore (and at each phase's start).
RESTORE_REPORT_INTERVAL = 0.5


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


class RestoreMeter:
    """What a restore has verified and restored so far, reported now and then.

    A restore reads its backup chain twice, and this counts both passes in engine bytes (what
    comes out of the sealed stream, uncompressed): ``verified_bytes`` while every backup is read
    and checked before anything is written, ``restored_bytes`` while the chain is streamed again
    into the engine. Both end at the chain's engine bytes, which the verifying pass learns
    (``total_bytes``; None until then), so neither ever passes the total.

    ``send(fields)`` gets ``{"phase", "verified_bytes", "restored_bytes", "total_bytes",
    "rate"}`` (``rate``: whole bytes per second over the recent ``window`` of the current pass,
    and the pass's average once ``restored``) at each phase's start, at most every ``interval``
    seconds while bytes pass, and at ``finish``. Used from the restore's one thread; ``send``
    runs on it, so a slow ``send`` slows the restore (the guest's is a cast).
    """

    def __init__(
        self,
        send: Callable[[dict[str, Any]], None],
        *,
        interval: float = RESTORE_REPORT_INTERVAL,
        window: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if interval < 0:
            raise ValueError("a report interval cannot be negative")
        self._send = send
        self._interval = interval
        self._window = window
        self._clock = clock
        self.phase: str | None = None
        self.verified_bytes = 0
        self.restored_bytes = 0
        self.total_bytes: int | None = None
        self._meter: ProgressMeter | None = None
        self._last_report = 0.0
        #: (phase, part) -> the furthest byte of that part counted in that phase.
        self._reached: dict[tuple[str | None, Hashable], int] = {}

    def begin(self, phase: str) -> None:
        """Start ``verifying`` (first) or ``restoring`` (after verifying); reports at once.
        Restoring takes the bytes verified as the total."""
        expected = "verifying" if self.phase is None else "restoring"
        if phase != expected or self.phase == "restoring":
            raise ValueError(f"a restore cannot go from {self.phase or 'nothing'} to {phase}")
        if phase == "restoring":
            self.total_bytes = self.verified_bytes
        self.phase = phase
        self._meter = ProgressMeter(self.total_bytes, window=self._window, clock=self._clock)
        self._report()

    def add(self, count: int) -> None:
        """Count ``count`` more bytes of the current pass; report if one is due."""
        if self._meter is None or self.phase == "restored":
            raise ValueError("bytes can only be counted while verifying or restoring")
        self._meter.add(count)
        if self.phase == "verifying":
            self.verified_bytes += count
        else:
            self.restored_bytes += count
        if self._clock() - self._last_report >= self._interval:
            self._report()

    def wrap(self, chunks: Iterable[bytes], part: Hashable | None = None) -> Iterator[bytes]:
        """Yield ``chunks`` unchanged, counting them; closes ``chunks`` when done or dropped.

        ``part`` names what ``chunks`` is (a backup of the chain): an engine handler may open
        one backup more than once (to read its header first, say), and only bytes past the
        furthest any opening of that part got in this pass are counted again."""
        reached = self._reached if part is not None else {}
        key = (self.phase, part)
        position = 0
        try:
            for chunk in chunks:
                position += len(chunk)
                furthest = reached.get(key, 0)
                if position > furthest:
                    reached[key] = position
                    self.add(position - furthest)
                yield chunk
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()

    def finish(self) -> None:
        """The engine's data is in place: one last report, phase ``restored``."""
        if self.phase != "restoring":
            raise ValueError(f"a restore cannot finish from {self.phase or 'nothing'}")
        self.phase = "restored"
        self._report()

    def fields(self) -> dict[str, Any]:
        """What the next report says."""
        rate = 0.0
        if self._meter is not None:
            snapshot = self._meter.snapshot()
            rate = snapshot.average_rate if self.phase == "restored" else snapshot.rate
        return {
            "phase": self.phase,
            "verified_bytes": self.verified_bytes,
            "restored_bytes": self.restored_bytes,
            "total_bytes": self.total_bytes,
            "rate": int(rate),
        }

    def _report(self) -> None:
        self._last_report = self._clock()
        self._send(self.fields())
