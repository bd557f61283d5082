"""The conductor's consumer: takes guest reports off the bus in batches.

Per message the checks are those of every sealed server (``coffer.bus.rpc.RpcServer``): opened
with the sending instance's own key, sealed for this topic, sender equal to the key id. What
differs is the unit of work. The consumer takes up to ``batch_size`` messages at a time and
writes all the heartbeats among them in one transaction (``coffer.conductor.heartbeats``); other
reports (backups, archives) go one by one through the conductor's guard and endpoints as before.

A message is acknowledged only after its effect is committed, or when it is refused (a refused
message has no effect). If the batch's transaction fails, nothing of it is acknowledged: it is
delivered again, and the sequence guard keeps anything from being applied twice.

How a batch is taken depends on the transport:

* RabbitMQ: one kombu consumer thread; the broker pushes messages ahead (prefetch), a batch is
  what arrived until none came within ``GATHER_SECONDS``, and it is acknowledged with one frame.
  A failed batch is redelivered by the broker when the consumer reconnects.
* Redis (the embedded broker): one thread reads the queue in bulk (``coffer.bus.bulk``): up to a
  batch of messages in one round trip, moved atomically into a list of this consumer's own and
  deleted from it only once the batch is settled, after its commit. Unacknowledged messages of a
  failed batch are put back at the head of the queue; what a killed conductor held is put back
  when it (or another conductor) starts again. kombu's own Redis consumer costs several round
  trips per message, which capped ingestion well under the 2,000 heartbeats/s we need.
* Anything else (kombu's in-memory transport in unit tests): two kombu consumers. Two reports
  of one instance queued together may then be taken out of order, and the older one is dropped
  by the sequence guard (a newer status is already there).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlsplit

import kombu
from kombu.exceptions import OperationalError

from coffer.bus.bulk import CONNECTION_ERRORS as REDIS_ERRORS
from coffer.bus.bulk import MAX_BATCH, RedisBulkReader
from coffer.bus.envelope import Envelope, KeyRing, open_sealed, peek_header
from coffer.bus.transport import connection, safe_url
from coffer.conductor.heartbeats import METHOD as HEARTBEAT
from coffer.conductor.heartbeats import HeartbeatReport, parse_heartbeat
from coffer.errors import CofferError, SealError

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

log = logging.getLogger(__name__)

#: Most messages handled (and heartbeats written) per transaction.
BATCH_SIZE = 256
#: How long a batch waits for its next message before it is handled (only while messages keep
#: coming does a batch grow: a lone report waits this long at most).
GATHER_SECONDS = 0.005
_POLL_SECONDS = 0.25
_BACKOFF_MIN = 0.1
_BACKOFF_MAX = 5.0
_REDIS_SCHEMES = ("redis", "rediss", "redis+socket")


class Delivery(Protocol):
    """A message taken off the bus: a kombu ``Message`` or a ``coffer.bus.bulk.BulkMessage``."""

    @property
    def body(self) -> Any: ...

    def ack(self, multiple: bool = False) -> None: ...


class ReportIngester:
    """Consumes ``topic`` until ``stop()``, in ``workers`` threads each with its own connection
    (default: one on RabbitMQ and on Redis, which is read in bulk; two on other transports; see
    the module docstring). ``bulk`` chooses bulk reads on Redis (default: on).

    ``record_heartbeats(reports)`` writes a batch of heartbeats in one transaction and says which
    passed the sequence guard; ``endpoints`` serves every other method named in its
    ``rpc_methods`` (called with the message's kwargs, after ``guard(envelope)``), whose
    arguments are checked against the same-named methods of ``signatures`` (default:
    ``endpoints``). ``preload_keys(key_ids)``, if given, is told a batch's key ids before its
    messages are opened (to look them up together).
    """

    def __init__(
        self,
        url: str,
        topic: str,
        keyring: KeyRing,
        *,
        record_heartbeats: Callable[[Sequence[HeartbeatReport]], list[bool]],
        endpoints: object,
        guard: Callable[[Envelope], None],
        signatures: object | None = None,
        preload_keys: Callable[[Sequence[str]], None] | None = None,
        batch_size: int = BATCH_SIZE,
        workers: int | None = None,
        bulk: bool = True,
    ) -> None:
        scheme = urlsplit(url).scheme.lower()
        amqp = scheme in ("amqp", "amqps", "pyamqp")
        self.bulk = bulk and scheme in _REDIS_SCHEMES
        if workers is None:
            workers = 1 if amqp or self.bulk else 2
        if batch_size < 1 or workers < 1:
            raise ValueError("batch_size and workers must be positive")
        if self.bulk and batch_size > MAX_BATCH:
            raise ValueError(f"batch_size must be at most {MAX_BATCH} on a Redis bus")
        self.url = url
        self.topic = topic
        self.batch_size = batch_size
        self.workers = workers
        self._keyring = keyring
        self._record = record_heartbeats
        self._endpoints = endpoints
        self._guard = guard
        self._preload = preload_keys
        #: RabbitMQ acknowledges a whole batch with one frame (``multiple``), and a bulk reader
        #: settles a batch in one step anyway; kombu's virtual transports take one
        #: acknowledgement per message.
        self._ack_many = amqp or self.bulk
        described = endpoints if signatures is None else signatures
        self._methods = {
            name: inspect.signature(getattr(described, name))
            for name in getattr(endpoints, "rpc_methods", ())
            if name != HEARTBEAT
        }
        self._queue = kombu.Queue(topic, durable=True, auto_delete=False)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._readers: list[RedisBulkReader] = []
        self._ready_lock = threading.Lock()
        self._ready_count = 0
        self._ready = threading.Event()

    def __repr__(self) -> str:
        return f"ReportIngester(url={safe_url(self.url)!r}, topic={self.topic!r})"

    def start(self) -> None:
        """Start consuming in background threads; returns at once. Idempotent."""
        if any(thread.is_alive() for thread in self._threads):
            return
        self._stop.clear()
        self._threads = [
            threading.Thread(
                target=self._run, args=(index,), name=f"conductor-{index}", daemon=True
            )
            for index in range(self.workers)
        ]
        for thread in self._threads:
            thread.start()

    def wait_ready(self, timeout: float) -> bool:
        """Wait until every worker consumes; False on timeout."""
        return self._ready.wait(timeout)

    def stop(self, timeout: float = 5) -> None:
        """Stop consuming; a batch being handled is finished (and acknowledged) first. A bulk
        reader waiting for messages is woken at once."""
        self._stop.set()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            while thread.is_alive() and time.monotonic() < deadline:
                # Again while waiting: a reader between its check of the stop and its blocking
                # wait is not woken by the first call.
                for reader in list(self._readers):
                    reader.wake()
                thread.join(max(0.0, min(0.05, deadline - time.monotonic())))
            if thread.is_alive():
                log.warning("conductor consumer %s did not stop within %g s", thread.name, timeout)
        self._threads = [thread for thread in self._threads if thread.is_alive()]

    # -- consuming -------------------------------------------------------------------------

    def _run(self, index: int) -> None:
        """Consume until stopped; reconnect with backoff after any error (the broker may be
        restarting; a failed batch is redelivered on the new connection)."""
        if self.bulk:
            self._run_bulk(index)
            return
        backoff = _BACKOFF_MIN
        lost = False
        first = True
        while not self._stop.is_set():
            conn = connection(self.url)
            try:
                conn.ensure_connection(max_retries=1, interval_start=0, interval_step=0)
                pending: list[kombu.Message] = []
                consumer = kombu.Consumer(
                    conn.channel(),
                    queues=[self._queue],
                    no_ack=False,
                    on_message=pending.append,
                    prefetch_count=self.batch_size,
                )
                consumer.consume()
                if lost:
                    log.info("the conductor is consuming %s again", self.topic)
                lost, backoff = False, _BACKOFF_MIN
                if first:
                    first = False
                    self._mark_ready()
                while not self._stop.is_set():
                    if not pending:
                        try:
                            conn.drain_events(timeout=_POLL_SECONDS)
                        except TimeoutError:
                            continue
                    self._gather(conn, pending)
                    batch, pending[:] = list(pending), []
                    self.handle_batch(batch)
            except Exception as exc:  # the loop must survive anything
                if self._stop.is_set():
                    break
                known = conn.connection_errors + conn.channel_errors + (OperationalError,)
                if isinstance(exc, known):
                    (log.debug if lost else log.warning)(
                        "the conductor lost the bus at %s (%s); reconnecting in %.1f s",
                        safe_url(self.url),
                        type(exc).__name__,
                        backoff,
                    )
                else:
                    log.exception(
                        "the conductor's consumer #%d failed; its unacknowledged reports will be "
                        "delivered again; reconnecting in %.1f s",
                        index,
                        backoff,
                    )
                lost = True
                self._stop.wait(backoff)
                backoff = min(backoff * 2, _BACKOFF_MAX)
            finally:
                with contextlib.suppress(Exception):
                    conn.release()

    def _run_bulk(self, index: int) -> None:
        """``_run`` for Redis: batches come from a ``RedisBulkReader`` and each is settled
        after it is handled (or failed: its unacknowledged messages go back to the queue)."""
        reader = RedisBulkReader(self.url, self.topic, batch_size=self.batch_size)
        self._readers.append(reader)
        backoff = _BACKOFF_MIN
        lost = False
        first = True
        try:
            while not self._stop.is_set():
                try:
                    reader.open()
                    if lost:
                        log.info("the conductor is consuming %s again", self.topic)
                    lost, backoff = False, _BACKOFF_MIN
                    if first:
                        first = False
                        self._mark_ready()
                    while not self._stop.is_set():
                        batch = reader.take()
                        if not batch:
                            reader.settle()  # messages dropped as undecodable, if any
                            continue
                        try:
                            self.handle_batch(batch)
                        finally:
                            reader.settle()
                except Exception as exc:  # the loop must survive anything
                    if self._stop.is_set():
                        break
                    if isinstance(exc, REDIS_ERRORS):
                        (log.debug if lost else log.warning)(
                            "the conductor lost the bus at %s (%s); reconnecting in %.1f s",
                            safe_url(self.url),
                            type(exc).__name__,
                            backoff,
                        )
                    else:
                        log.exception(
                            "the conductor's consumer #%d failed; its unacknowledged reports "
                            "will be delivered again; reconnecting in %.1f s",
                            index,
                            backoff,
                        )
                    lost = True
                    self._stop.wait(backoff)
                    backoff = min(backoff * 2, _BACKOFF_MAX)
        finally:
            reader.close()
            self._readers.remove(reader)

    def _mark_ready(self) -> None:
        with self._ready_lock:
            self._ready_count += 1
            if self._ready_count >= self.workers:
                self._ready.set()

    def _gather(self, conn: kombu.Connection, pending: list[kombu.Message]) -> None:
        """Take what else is waiting, up to a batch, until nothing arrives for
        ``GATHER_SECONDS``."""
        while len(pending) < self.batch_size:
            try:
                conn.drain_events(timeout=GATHER_SECONDS)
            except TimeoutError:
                return

    # -- handling ----------------------------------------------------------------------------

    def handle_batch(self, messages: Sequence[Delivery]) -> None:
        """Check, apply and acknowledge ``messages`` (see the module docstring). Raises (with
        the heartbeats' messages unacknowledged) when their transaction fails."""
        now = time.time()
        if self._preload is not None:
            self._preload(_key_ids(messages))
        heartbeats: list[tuple[Delivery, HeartbeatReport]] = []
        others: list[tuple[Delivery, Envelope]] = []
        for message in messages:
            try:
                env = self._open(message.body)
                if env.method == HEARTBEAT:
                    heartbeats.append((message, parse_heartbeat(env, now)))
                else:
                    others.append((message, env))
            except SealError as exc:
                log.warning("rejected a message on %s: %s", self.topic, exc)
                message.ack()
            except Exception:
                # E.g. a key lookup in a database that failed: dropping keeps one message from
                # stalling the queue; the guest reports again at its next beat.
                log.exception("could not check a message on %s; dropped it", self.topic)
                message.ack()
        # Other reports first, each acknowledged once handled: the heartbeats' acknowledgement
        # may cover every earlier message of the batch at once.
        for message, env in others:
            self._dispatch(env)
            message.ack()
        if heartbeats:
            passed = self._record([report for _message, report in heartbeats])
            for (_message, report), ok in zip(heartbeats, passed, strict=True):
                if not ok:
                    log.warning(
                        "rejected a message on %s: heartbeat from %s has sequence %d, not newer "
                        "than the last accepted: replayed or out of order",
                        self.topic,
                        report.instance_id,
                        report.seq,
                    )
            if self._ack_many:
                # Every earlier message of this batch on this channel is acknowledged already
                # or is one of these heartbeats.
                heartbeats[-1][0].ack(multiple=True)
            else:
                for message, _report in heartbeats:
                    message.ack()

    def _open(self, body: Any) -> Envelope:
        env = open_sealed(body, self._keyring, expected_target=self.topic)
        if env.sender != env.key_id:
            raise SealError(
                f"message {env.msg_id} claims to come from {env.sender!r} but is sealed with "
                f"the key of {env.key_id!r}; a sender may speak only for itself"
            )
        return env

    def _dispatch(self, env: Envelope) -> None:
        """One report other than a heartbeat: guard, then its endpoint (own transactions)."""
        signature = self._methods.get(env.method)
        if signature is None:
            log.warning("%s has no method %r (sent by %s)", self.topic, env.method, env.sender)
            return
        try:
            signature.bind(**env.kwargs)
        except TypeError as exc:
            log.warning("%s from %s has wrong arguments: %s", env.method, env.sender, exc)
            return
        try:
            self._guard(env)
            getattr(self._endpoints, env.method)(**env.kwargs)
        except SealError as exc:
            log.warning("rejected a message on %s: %s", self.topic, exc)
        except CofferError as exc:
            log.info("%s from %s was refused: %s", env.method, env.sender, type(exc).__name__)
        except Exception:
            # The arguments may hold secrets; the traceback names only the method and sender.
            log.exception("%s from %s (message %s) failed", env.method, env.sender, env.msg_id)


def _key_ids(messages: Sequence[Delivery]) -> list[str]:
    """The key ids named in the messages' sealed headers (malformed ones are left out)."""
    found = []
    for message in messages:
        with contextlib.suppress(SealError):
            found.append(peek_header(message.body)[0])
    return found
