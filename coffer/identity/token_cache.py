"""An in-process cache of validated tokens, so a busy API does not ask the control DB who a
token speaks for on every request.

What is cached is the ``AuthContext`` a full validation produced (the token's user, project and
the roles the user still held), keyed by a SHA-256 digest of the token, so the cache holds no
bearer token itself. An entry is reused while all of these hold:

* it is younger than ``ttl`` seconds (``[identity] token_cache_time``): a change made in the
  control DB by another process (a user disabled, a role removed) is seen within that bound;
* the token has not expired (checked on every hit against the token's own expiry);
* nothing was changed through this process's identity service since it was stored: every such
  change calls ``invalidate``, which empties the cache and makes validations already under way
  unable to store what they read before the change.

The cache holds at most ``max_entries`` tokens; when full, the oldest entry is dropped.
Thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coffer.identity.service import AuthContext

#: Most tokens one process keeps; each entry is a few hundred bytes.
DEFAULT_MAX_ENTRIES = 10_000


@dataclass(frozen=True)
class _Entry:
    ctx: AuthContext
    fresh_until: float  # monotonic seconds
    expires_at: float  # the token's expiry, POSIX seconds


class TokenCache:
    """Validated tokens for at most ``ttl`` seconds each (``ttl <= 0``: nothing is cached).

    ``clock`` (monotonic seconds) and ``wall`` (POSIX seconds) may be replaced by tests.
    """

    def __init__(
        self,
        ttl: float,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        if max_entries < 1:
            raise ValueError("a token cache needs room for at least one entry")
        self.ttl = float(ttl)
        self.max_entries = max_entries
        self._clock = clock
        self._wall = wall
        self._lock = threading.Lock()
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._generation = 0

    def __repr__(self) -> str:
        return f"TokenCache(ttl={self.ttl:g}, entries={len(self)})"

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self.ttl > 0

    @staticmethod
    def key(token: str) -> bytes:
        """What the cache files ``token`` under: its SHA-256 digest."""
        return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()

    @property
    def generation(self) -> int:
        """Changes on every ``invalidate``; pass the value read before a validation to ``put``."""
        with self._lock:
            return self._generation

    def get(self, key: bytes) -> AuthContext | None:
        """The cached context for ``key`` while it is fresh and its token unexpired, else None."""
        if not self.enabled:
            return None
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.fresh_until <= self._clock() or entry.expires_at <= self._wall():
                del self._entries[key]
                return None
            return entry.ctx

    def put(self, key: bytes, ctx: AuthContext, generation: int) -> None:
        """Remember ``ctx`` for ``key``, unless ``invalidate`` ran since ``generation`` was read
        (the validation may then have read the state from before the change)."""
        if not self.enabled:
            return
        entry = _Entry(ctx, self._clock() + self.ttl, ctx.expires_at.timestamp())
        with self._lock:
            if generation != self._generation:
                return
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def invalidate(self) -> None:
        """Forget every token: who they speak for may just have changed."""
        with self._lock:
            self._generation += 1
            self._entries.clear()
