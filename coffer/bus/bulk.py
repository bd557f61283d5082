"""Bulk reads of one kombu queue on a Redis broker: many messages per round trip, none lost.

kombu's Redis transport keeps a queue as a Redis list named after it (messages published with a
priority above 0 go to ``<queue>\\x06\\x16<level>``, levels 3, 6 and 9). A publisher ``LPUSH``es
each message as a JSON document (body, base64-encoded, plus headers and properties); a kombu
consumer ``BRPOP``s one message per round trip, records it in the ``unacked`` hash and index in a
second one and removes it from there on acknowledgement in a third. For a consumer that handles
thousands of small messages a second (the conductor's heartbeats) those round trips are the cost.

``RedisBulkReader`` reads the same lists, so publishers keep using kombu unchanged, but takes up
to ``batch_size`` messages in one atomic step (a Lua script) and moves them into a list of its
own, ``coffer.bulk.<queue>.taken.<reader id>``, where they stay until the consumer *settles* the
batch: acknowledged messages are then deleted, the others put back at the head of the queue. A
reader that dies between taking and settling loses nothing: its taken list is still in Redis.

Each reader holds a lease (``coffer.bulk.<queue>.lease.<id>``, renewed while it runs, expiring
after ``LEASE_SECONDS``) naming its host (name and boot id), pid and the pid's start time, and
is listed in ``coffer.bulk.<queue>.readers``. When a reader starts, and every ``SWEEP_SECONDS``
after, it puts back at the head of the queue whatever another reader had taken if that reader's
lease has expired, or names a process on this host that is gone (so a restarted conductor
recovers what its killed predecessor held at once). Delivery is therefore at least once: a
message can be handed out again after a crash or a stall longer than the lease, and consumers
must tolerate that (the conductor's sequence guard drops what it already applied).

While the queue is empty the reader blocks in ``BLMOVE`` (no polling) for up to ``idle_wait``
seconds; ``wake()``, from another thread, ends that wait at once (``CLIENT UNBLOCK``). The
blocking wait watches only the priority-0 list (all Coffer publishes); messages of other levels
are taken by the bulk step, so at the latest when a wait ends.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis
from kombu.compression import decompress
from kombu.utils.json import loads
from redis.backoff import NoBackoff
from redis.retry import Retry

from coffer.errors import ValidationError

log = logging.getLogger(__name__)

#: kombu's separator between a queue's name and its priority level, and the levels it uses.
PRIORITY_SEP = "\x06\x16"
PRIORITY_LEVELS = (0, 3, 6, 9)
#: Most messages one take may return (a Lua call's arguments are limited).
MAX_BATCH = 2000
IDLE_WAIT_SECONDS = 5.0
LEASE_SECONDS = 60.0
SWEEP_SECONDS = 30.0
KEY_PREFIX = "coffer.bulk."

#: Redis errors and socket errors: the broker is unreachable or restarting.
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (redis.RedisError, OSError)

# KEYS[1] the taken list, KEYS[2..] the queue's lists in priority order; ARGV[1] most to take.
# Returns the messages taken, oldest first; they are appended to the taken list in that order.
_TAKE = """
local want = tonumber(ARGV[1])
local got = {}
for i = 2, #KEYS do
    if #got >= want then break end
    local items = redis.call('RPOP', KEYS[i], want - #got)
    if items then
        for _, item in ipairs(items) do got[#got + 1] = item end
    end
end
for first = 1, #got, 500 do
    redis.call('RPUSH', KEYS[1], unpack(got, first, math.min(first + 499, #got)))
end
return got
"""

# KEYS: the taken list, the queue, the lease, the readers set. ARGV[1] the reader id; ARGV[2]
# '*' (the caller's own list: no lease check, stays registered), '' (only if the lease has
# expired) or the exact lease value expected (a reader whose process is known to be gone).
# Puts the taken messages back at the head of the queue in their order; -1 if the lease check
# failed, else how many were put back.
_GIVE_BACK = """
local mode = ARGV[2]
if mode ~= '*' then
    local held = redis.call('GET', KEYS[3])
    if mode == '' then
        if held then return -1 end
    elseif held ~= mode then
        return -1
    end
end
local items = redis.call('LRANGE', KEYS[1], 0, -1)
for i = #items, 1, -1 do redis.call('RPUSH', KEYS[2], items[i]) end
redis.call('DEL', KEYS[1])
if mode ~= '*' then
    redis.call('DEL', KEYS[3])
    redis.call('SREM', KEYS[4], ARGV[1])
end
return #items
"""


class BulkMessage:
    """One message of a batch: ``body`` decoded as kombu would (bytes); ``ack()`` marks it (and,
    with ``multiple``, every earlier message of the batch) done. Nothing is sent to the broker
    until the reader settles the batch."""

    __slots__ = ("_acked", "_index", "body")

    def __init__(self, body: bytes | None, index: int, acked: list[bool]) -> None:
        self.body = body
        self._index = index
        self._acked = acked

    def ack(self, multiple: bool = False) -> None:
        if multiple:
            for earlier in range(self._index + 1):
                self._acked[earlier] = True
        else:
            self._acked[self._index] = True

    @property
    def acknowledged(self) -> bool:
        return self._acked[self._index]


def decode_body(raw: bytes | str) -> bytes:
    """The body of one message as kombu's Redis transport stores it (a JSON document), decoded
    the way kombu's virtual ``Message`` does: ``body_encoding`` (base64), then any
    ``compression`` header, then a text body encoded as UTF-8. Raises ``ValueError`` if ``raw``
    is not such a document."""
    try:
        payload = loads(raw)
        body = payload.get("body")
        encoding = payload["properties"].get("body_encoding")
        headers = payload.get("headers") or {}
    except (TypeError, KeyError, AttributeError, ValueError) as exc:
        raise ValueError(f"not a kombu message ({type(exc).__name__})") from None
    if body and encoding and encoding.lower() != "utf-8":
        if encoding != "base64":
            raise ValueError(f"unknown body encoding {encoding!r}")
        body = base64.b64decode(body)
    compression = headers.get("compression") if isinstance(headers, dict) else None
    if body and compression:
        body = decompress(body, compression)
    if isinstance(body, str):
        body = body.encode("utf-8")
    if not isinstance(body, bytes):
        raise ValueError("not a kombu message (no body)")
    return body


def redis_client(
    url: str, *, socket_timeout: float, name: str | None = None, connect_timeout: float = 5
) -> redis.Redis:
    """A connected redis-py client on one connection of its own for a kombu Redis ``url``
    (``redis://``, ``rediss://`` or ``redis+socket://``), without redis-py's own retries (the
    caller reconnects). Raises a ``CONNECTION_ERRORS`` error if the broker does not answer."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "redis+socket":
        url = urlunsplit(("unix", parts.netloc, parts.path, parts.query, ""))
    elif scheme not in ("redis", "rediss"):
        raise ValidationError(f"bulk reads need a Redis transport URL, not {scheme}://")
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout,
        socket_connect_timeout=connect_timeout,
        retry=Retry(NoBackoff(), 0),
        single_connection_client=True,
        client_name=name,
    )


class RedisBulkReader:
    """Takes messages off kombu queue ``queue`` at ``url`` in batches (see the module docstring).

    Used from one thread, except ``wake()``. ``open()`` connects (again, after an error) and puts
    back what this reader had taken and not settled; ``take()`` returns the next batch (empty
    when ``idle_wait`` passed with nothing, or when woken); ``settle()`` must follow every
    non-empty batch, and deletes its acknowledged messages and puts the others back at the head
    of the queue; ``close()`` settles, unregisters and disconnects. Every method but ``wake``
    and ``close`` raises a ``CONNECTION_ERRORS`` error when the broker fails; what the reader
    had taken then stays in its list and is put back by its next ``open()`` (or, if it never
    comes back, by another reader's sweep).
    """

    def __init__(
        self,
        url: str,
        queue: str,
        *,
        batch_size: int,
        idle_wait: float = IDLE_WAIT_SECONDS,
        lease_seconds: float = LEASE_SECONDS,
        sweep_seconds: float = SWEEP_SECONDS,
    ) -> None:
        if not 1 <= batch_size <= MAX_BATCH:
            raise ValidationError(f"batch_size must be between 1 and {MAX_BATCH}")
        if not 0 < idle_wait < lease_seconds / 2:
            raise ValidationError("idle_wait must be positive and under half the lease")
        self.url = url
        self.queue = queue
        self.batch_size = batch_size
        self.idle_wait = idle_wait
        self.lease_seconds = lease_seconds
        self.sweep_seconds = sweep_seconds
        self.reader_id = uuid.uuid4().hex[:16]
        self.taken_key = _taken_key(queue, self.reader_id)
        self.lease_key = _lease_key(queue, self.reader_id)
        self.readers_key = f"{KEY_PREFIX}{queue}.readers"
        self._sources = [_priority_key(queue, level) for level in PRIORITY_LEVELS]
        self._holder = _holder()
        self._client: redis.Redis | None = None
        self._client_id: int | None = None
        self._take_script: Any = None
        self._give_back_script: Any = None
        self._batch: list[tuple[bytes, BulkMessage | None]] = []
        self._acked: list[bool] = []
        self._renew_at = 0.0
        self._sweep_at = 0.0

    def __repr__(self) -> str:
        return f"RedisBulkReader(queue={self.queue!r}, id={self.reader_id!r})"

    # -- life cycle ------------------------------------------------------------------------------

    def open(self) -> None:
        """Connect (replacing an earlier connection), take the lease, put back what this reader
        still held from before, and put back what readers that are gone held."""
        self._disconnect()
        client = redis_client(
            self.url,
            # A blocking wait must end (or be cut short) well before the socket gives up on it.
            socket_timeout=self.idle_wait + 10,
            name=f"coffer-bulk-{self.reader_id}",
        )
        self._client = client
        self._client_id = int(client.client_id())
        self._take_script = client.register_script(_TAKE)
        self._give_back_script = client.register_script(_GIVE_BACK)
        self._renew()
        self._batch, self._acked = [], []
        returned = self._give_back(self.reader_id, "*")
        if returned:
            log.info("put %d unsettled messages back on %s", returned, self.queue)
        self.sweep()

    def close(self) -> None:
        """Settle what is held, give up the lease and disconnect; never raises."""
        client = self._client
        if client is not None:
            with contextlib.suppress(*CONNECTION_ERRORS):
                self.settle()
                self._give_back(self.reader_id, "*")
                with client.pipeline(transaction=True) as pipe:
                    pipe.srem(self.readers_key, self.reader_id)
                    pipe.delete(self.lease_key)
                    pipe.execute()
        self._disconnect()

    def wake(self) -> None:
        """End a blocking wait of ``take`` at once (from another thread); never raises. A
        ``take`` not yet waiting is not affected: call again until the reader's thread ends."""
        client_id = self._client_id
        if client_id is None:
            return
        try:
            with redis_client(self.url, socket_timeout=1, connect_timeout=1) as waker:
                waker.client_unblock(client_id)
        except CONNECTION_ERRORS as exc:
            log.debug("could not wake the reader of %s: %s", self.queue, type(exc).__name__)

    # -- consuming -------------------------------------------------------------------------------

    def take(self) -> list[BulkMessage]:
        """The next batch, oldest first: what is waiting, up to ``batch_size``; if nothing is,
        wait up to ``idle_wait`` for the first message and take what else came with it.
        Messages that are not kombu messages are logged and dropped (kombu would fail on them
        as well); a body that cannot be decoded is dropped the same way."""
        if self._batch:
            raise RuntimeError("settle() the previous batch before taking the next")
        client = self._connected()
        now = time.monotonic()
        if now >= self._renew_at:
            self._renew()
        if now >= self._sweep_at:
            self.sweep()
        items: list[bytes] = list(
            self._take_script(keys=[self.taken_key, *self._sources], args=[self.batch_size])
        )
        if not items:
            wait = max(0.01, min(self.idle_wait, self._renew_at - time.monotonic()))
            first = client.execute_command(
                "BLMOVE", self._sources[0], self.taken_key, "RIGHT", "RIGHT", wait
            )
            if first is None:
                return []
            items = [first]
            if self.batch_size > 1:
                items += self._take_script(
                    keys=[self.taken_key, *self._sources], args=[self.batch_size - 1]
                )
        self._acked = [False] * len(items)
        messages = []
        for index, raw in enumerate(items):
            try:
                message: BulkMessage | None = BulkMessage(decode_body(raw), index, self._acked)
            except (ValueError, TypeError) as exc:  # binascii.Error is a ValueError
                log.warning("dropped an undecodable message on %s: %s", self.queue, exc)
                self._acked[index] = True
                message = None
            self._batch.append((raw, message))
            if message is not None:
                messages.append(message)
        return messages

    def settle(self) -> int:
        """Delete the batch's acknowledged messages and put the others back at the head of the
        queue, in their order, in one atomic step; returns how many were put back."""
        if not self._batch:
            return 0
        client = self._connected()
        unsettled = [
            raw
            for (raw, _message), acked in zip(self._batch, self._acked, strict=True)
            if not acked
        ]
        with client.pipeline(transaction=True) as pipe:
            if unsettled:
                pipe.rpush(self._sources[0], *reversed(unsettled))
            pipe.delete(self.taken_key)
            pipe.execute()
        self._batch, self._acked = [], []
        return len(unsettled)

    def sweep(self) -> int:
        """Put back what readers that are gone had taken (see the module docstring); returns
        how many messages were put back."""
        client = self._connected()
        self._sweep_at = time.monotonic() + self.sweep_seconds
        others = sorted(
            member.decode() if isinstance(member, bytes) else str(member)
            for member in client.smembers(self.readers_key)
        )
        others = [reader for reader in others if reader != self.reader_id]
        if not others:
            return 0
        with client.pipeline(transaction=False) as pipe:
            for reader in others:
                pipe.get(_lease_key(self.queue, reader))
            leases = pipe.execute()
        returned = 0
        for reader, held in zip(others, leases, strict=True):
            value = held.decode() if isinstance(held, bytes) else held
            if value is None:
                expect = ""
            elif _gone_from_this_host(value):
                expect = value
            else:
                continue
            count = self._give_back(reader, expect)
            if count > 0:
                log.warning(
                    "put back %d messages on %s that a stopped consumer had taken",
                    count,
                    self.queue,
                )
                returned += count
        return returned

    # -- helpers -------------------------------------------------------------------------------

    def _connected(self) -> redis.Redis:
        if self._client is None:
            raise redis.ConnectionError(f"the bulk reader of {self.queue} is not connected")
        return self._client

    def _renew(self) -> None:
        client = self._connected()
        with client.pipeline(transaction=True) as pipe:
            pipe.set(self.lease_key, self._holder, ex=max(1, round(self.lease_seconds)))
            pipe.sadd(self.readers_key, self.reader_id)
            pipe.execute()
        self._renew_at = time.monotonic() + self.lease_seconds / 4

    def _give_back(self, reader: str, expect: str) -> int:
        keys = [
            _taken_key(self.queue, reader),
            self._sources[0],
            _lease_key(self.queue, reader),
            self.readers_key,
        ]
        return int(self._give_back_script(keys=keys, args=[reader, expect]))

    def _disconnect(self) -> None:
        client, self._client, self._client_id = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _priority_key(queue: str, level: int) -> str:
    """The list kombu keeps ``queue``'s messages of priority ``level`` in."""
    return f"{queue}{PRIORITY_SEP}{level}" if level else queue


def _taken_key(queue: str, reader: str) -> str:
    return f"{KEY_PREFIX}{queue}.taken.{reader}"


def _lease_key(queue: str, reader: str) -> str:
    return f"{KEY_PREFIX}{queue}.lease.{reader}"


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()
    except OSError:
        return None
    if fields[0] in ("Z", "X"):
        return None
    return fields[19]


def _host() -> str:
    """This host as a lease names it: its name and the kernel's boot id, so that neither another
    machine of the same name nor a container of this one (own pids, own name) is taken for it."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        boot = "?"
    return f"{socket.gethostname()}/{boot}"


def _holder() -> str:
    """This process as a lease names it: host, pid and the pid's start time."""
    pid = os.getpid()
    return f"{_host()} {pid} {_start_time(pid) or '?'}"


def _gone_from_this_host(holder: str) -> bool:
    """True if ``holder`` names a process of this host that no longer runs (its pid is gone,
    or was reused by a process started at another time)."""
    parts = holder.split(" ")
    if len(parts) != 3 or parts[0] != _host() or not parts[1].isdigit():
        return False
    return _start_time(int(parts[1])) != parts[2]


def taken_keys(client: redis.Redis, queue: str) -> Sequence[str]:
    """Every bulk reader's taken list of ``queue`` that holds messages (for tests and operators)."""
    return sorted(
        key.decode() if isinstance(key, bytes) else str(key)
        for key in client.scan_iter(match=f"{KEY_PREFIX}{queue}.taken.*")
    )
